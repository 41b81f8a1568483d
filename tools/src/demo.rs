//! `tandem demo`: two daemons on loopback replicating a workload, with live
//! status and a final byte-for-byte check. Needs no root and no configuration:
//! everything lives in a temporary directory that is removed at the end.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use tandem_engine::runtime::status::{GroupStatus, PartnershipStatus};

use crate::api::{call, Request, ResponseBody};
use crate::size::format_size;

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub mode: String,
    pub volume_bytes: u64,
    pub seconds: u64,
    pub queue_depth: usize,
    pub block_bytes: u32,
    /// Keep the temporary directory (volumes, logs, daemon logs).
    pub keep: bool,
}

struct DemoNode {
    name: &'static str,
    api: PathBuf,
    nbd_port: u16,
    replication_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl DemoNode {
    fn start(name: &'static str, dir: &Path) -> Result<Self, String> {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).map_err(|e| format!("cannot create {}: {e}", home.display()))?;
        let (nbd_port, replication_port) = (free_port()?, free_port()?);
        let api = home.join("api.sock");
        let cpus = crate::config::allowed_cpus();
        let cores: Vec<String> = cpus.iter().take(2).map(usize::to_string).collect();
        // Each node gets a certificate of the demo's own cluster CA: the
        // partnership runs over mutual TLS with AES-128-GCM frames.
        let tls = home.join("tls");
        tandem_crypto::identity::issue(&dir.join("ca"), name, &tls, 1)?;
        let config = format!(
            "[node]\nname = \"{name}\"\ncores = [{}]\nstate_dir = \"{}\"\napi_socket = \"{}\"\nnbd_listen = \"127.0.0.1:{nbd_port}\"\nreplication_listen = \"127.0.0.1:{replication_port}\"\nlog_level = \"warn\"\n\n[tls]\nca = \"{3}/ca.pem\"\ncert = \"{3}/node.pem\"\nkey = \"{3}/node.key\"\n",
            cores.join(", "),
            home.join("state").display(),
            api.display(),
            tls.display()
        );
        let config_path = home.join("tandem.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
        let log = home.join("tandemd.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let daemon = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("tandemd")))
            .filter(|p| p.exists())
            .ok_or("tandemd is not next to tandem; build both (`cargo build --release --bins`)")?;
        let child = Command::new(daemon)
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start tandemd: {e}"))?;
        let node = Self { name, api, nbd_port, replication_port, child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(&node.api, &Request::Status).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{name}'s tandemd did not start: {}", node.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(&self, request: &Request) -> Result<ResponseBody, String> {
        call(&self.api, request).map_err(|e| format!("{}: {e}", self.name))
    }

    fn partnership(&self, group: &str) -> Result<PartnershipStatus, String> {
        match self.request(&Request::PartnershipShow { group: Some(group.to_owned()) })? {
            ResponseBody::Groups(groups) => groups
                .into_iter()
                .find_map(|g: GroupStatus| g.partnership)
                .ok_or_else(|| format!("{group} has no partnership")),
            ResponseBody::Message(m) => Err(m),
            ResponseBody::Events(_) | ResponseBody::Node(_) | ResponseBody::Delegations(_) => {
                Err("tandemd answered without groups".to_owned())
            }
        }
    }

    /// SIGTERM: the daemon drains and checkpoints its volumes.
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{}'s tandemd exited with {status}: {}", self.name, self.log_text()))
        }
    }
}

impl Drop for DemoNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port on loopback: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Fills a quarter of a sparse file with random data in 4 MiB extents.
fn seed_volume(path: &Path, size_bytes: u64) -> Result<u64, String> {
    let file =
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(|e| e.to_string())?;
    file.set_len(size_bytes).map_err(|e| e.to_string())?;
    let extent = 4u64 << 20;
    let mut rng = rand::rng();
    let mut data = vec![0u8; extent as usize];
    let mut written = 0;
    for index in 0..size_bytes / extent {
        if index % 4 == 0 {
            rng.fill(&mut data[..]);
            std::os::unix::fs::FileExt::write_all_at(&file, &data, index * extent).map_err(|e| e.to_string())?;
            written += extent;
        }
    }
    Ok(written)
}

fn files_equal(a: &Path, b: &Path) -> Result<bool, String> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).map_err(|e| e.to_string())?;
        let nb = fb.read_exact(&mut bb[..na]).map(|()| na).map_err(|e| e.to_string())?;
        if ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(fb.read(&mut bb).map_err(|e| e.to_string())? == 0);
        }
    }
}

/// Runs the demo; returns a summary, or why it failed.
pub fn run(options: &DemoOptions) -> Result<String, String> {
    let dir = tempfile::Builder::new()
        .prefix("tandem-demo-")
        .tempdir()
        .map_err(|e| format!("no temporary directory: {e}"))?;
    println!("== Tandem demo in {}: two nodes on loopback, {} replication", dir.path().display(), options.mode);
    tandem_crypto::identity::init_ca(&dir.path().join("ca"), "tandem-demo-ca", 1)?;
    let mut a = DemoNode::start("node-a", dir.path())?;
    let mut b = DemoNode::start("node-b", dir.path())?;
    for node in [&a, &b] {
        println!("   {}: NBD 127.0.0.1:{}, replication 127.0.0.1:{}", node.name, node.nbd_port, node.replication_port);
    }
    let (source_volume, destination_volume) = (dir.path().join("node-a/data.img"), dir.path().join("node-b/data.img"));
    let seeded = seed_volume(&source_volume, options.volume_bytes)?;
    std::fs::File::create(&destination_volume)
        .and_then(|f| f.set_len(options.volume_bytes))
        .map_err(|e| e.to_string())?;
    println!(
        "== volumes: {} each, sparse; the source already holds {} of data",
        format_size(options.volume_bytes),
        format_size(seeded)
    );
    for (node, group, volume) in [(&a, "rg01", &source_volume), (&b, "rg02", &destination_volume)] {
        let request = Request::GroupCreate {
            name: group.to_owned(),
            log: volume.with_file_name(format!("{group}.log")),
            log_size_bytes: 256 << 20,
            volumes: vec![crate::api::VolumeArg { name: "data".to_owned(), path: volume.clone() }],
        };
        node.request(&request)?;
    }
    let create = Request::PartnershipCreate {
        source_group: "rg01".to_owned(),
        destination: format!("127.0.0.1:{}", b.replication_port),
        destination_group: "rg02".to_owned(),
        mode: options.mode.clone(),
        channels: None,
        seeded: false,
        source_network: None,
        destination_network: None,
        encryption: Some("aes-128-gcm".to_owned()),
        destination_node: Some("node-b".to_owned()),
        transport: "tcp".to_owned(),
    };
    if let ResponseBody::Message(message) = a.request(&create)? {
        println!("== {message}");
    }
    let copy_ms = show_initial_copy(&a, options.volume_bytes)?;
    let copied = a.partnership("rg01")?;
    println!(
        "   initial block copy done in {copy_ms} ms: {} sent, {} of holes skipped",
        format_size(copied.copy_bytes_sent),
        format_size(copied.copy_bytes_skipped)
    );
    println!(
        "== workload: {} random writes, queue depth {}, {} s, through NBD on node-a",
        format_size(u64::from(options.block_bytes)),
        options.queue_depth,
        options.seconds
    );
    let report = run_workload(&a, options)?;
    println!("== writes stopped; waiting until node-b holds every record");
    wait_in_sync(&a)?;
    let last = a.partnership("rg01")?;
    a.stop()?;
    b.stop()?;
    print!("== comparing the volumes byte for byte ... ");
    if !files_equal(&source_volume, &destination_volume)? {
        println!("DIFFERENT");
        if options.keep {
            let _ = dir.keep();
        }
        return Err("the destination volume differs from the source volume".to_owned());
    }
    println!("equal");
    let summary = format!(
        "summary: {} writes ({:.0} IOPS), write latency avg {:.0} us, p99 {} us, p99.9 {} us; {} mode; {} sent to node-b; last LSN {} on both nodes; volumes identical ({})",
        report.writes,
        report.iops,
        report.latency.avg_us,
        report.latency.p99_us,
        report.latency.p999_us,
        options.mode,
        format_size(last.bytes_sent),
        last.destination_durable_lsn,
        format_size(options.volume_bytes)
    );
    if options.keep {
        println!("   kept {}", dir.keep().display());
    }
    Ok(summary)
}

fn show_initial_copy(a: &DemoNode, total_bytes: u64) -> Result<u128, String> {
    let started = Instant::now();
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "   initial block copy [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    loop {
        let p = a.partnership("rg01")?;
        bar.set_position(total_bytes - p.copy_remaining_bytes.min(total_bytes));
        bar.set_message(format!("({} skipped as holes)", format_size(p.copy_bytes_skipped)));
        if p.copy_remaining_bytes == 0 && p.state != "InitialBlockCopy" && p.state != "WaitingForDestination" {
            bar.finish();
            return Ok(started.elapsed().as_millis());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("the initial copy did not finish in 10 minutes: {p:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Random writes through NBD on node-a, with a line of numbers every second.
fn run_workload(a: &DemoNode, options: &DemoOptions) -> Result<crate::bench::BenchResult, String> {
    let uri = format!("nbd://127.0.0.1:{}/rg01/data", a.nbd_port);
    let workload = crate::bench::BenchOptions {
        block_bytes: options.block_bytes,
        read_percent: 0,
        sequential: false,
        queue_depth: options.queue_depth,
        duration: Duration::from_secs(options.seconds),
        warmup: Duration::ZERO,
        ..crate::bench::BenchOptions::new()
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let load = std::thread::spawn(move || {
        crate::bench::run(&uri, &workload, |second| {
            let _ = tx.send((second.iops, second.latency_avg_us, second.latency_p99_us));
        })
    });
    let started = Instant::now();
    for (iops, avg, p99) in rx {
        let p = a.partnership("rg01")?;
        println!(
            "   t={:>3}s  {:>7.0} IOPS  latency avg {:>6.0} us  p99 {:>6} us  RPO {:>4} ms  LSN {} / node-b {}  {}",
            started.elapsed().as_secs(),
            iops,
            avg,
            p99,
            p.rpo_ms,
            p.current_lsn,
            p.destination_durable_lsn,
            p.state
        );
    }
    load.join().map_err(|_| "the workload thread panicked".to_owned())?.map_err(|e| format!("workload: {e}"))
}

fn wait_in_sync(a: &DemoNode) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = a.partnership("rg01")?;
        if p.state == "ContinuouslyReplicating" && p.destination_durable_lsn == p.current_lsn {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("node-b did not catch up within 2 minutes: {p:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
