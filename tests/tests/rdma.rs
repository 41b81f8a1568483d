//! Partnerships over RDMA. The `#[ignore]`d tests need an RDMA device: they
//! run in the soft-RoCE lab guest (`scripts/test-rdma`), where both daemons
//! listen on rxe0's 10.77.0.1 side by side. The last one runs here: asking
//! for RDMA on a host without it fails with the reason and the fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_tests::pattern::{check_acknowledged, WriteModel};
use tandem_tests::writer;
use tandem_tests::{run_ok, Node};

const LAB_IP: &str = "10.77.0.1";
const VOLUME_BYTES: u64 = 16 << 20;
/// The guest is emulated (TCG): everything takes tens of times longer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

fn lab_pair(replication_toml: &str, mode: &str) -> (Node, Node) {
    unlimited_memlock();
    let a = Node::start_on("node-a", LAB_IP, replication_toml);
    let b = Node::start_on("node-b", LAB_IP, replication_toml);
    a.create_group("rg01", "128MiB", &[("data", VOLUME_BYTES)]);
    b.create_group("rg02", "128MiB", &[("data", VOLUME_BYTES)]);
    let created = a.partner_with("rg01", &b, "rg02", &["--mode", mode, "--transport", "rdma", "--channels", "2"]);
    let out = String::from_utf8_lossy(&created.stdout);
    assert!(created.status.success(), "{out}{}", String::from_utf8_lossy(&created.stderr));
    assert!(out.contains("2 rdma channel(s)"), "{out}");
    (a, b)
}

fn md5(path: &std::path::Path) -> String {
    run_ok(std::process::Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

/// Status names the transport of each channel: TCP control, then rxe0's queue pairs.
fn assert_rdma_channels(node: &Node, group: &str) {
    let p = node.partnership(group);
    assert_eq!(p["transport"], "rdma", "{p:#}");
    assert_eq!(p["channels_connected"], 2, "{p:#}");
    let channels: Vec<String> =
        p["channel_addresses"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert!(channels[0].starts_with("tcp "), "{channels:?}");
    assert!(channels[1..].iter().all(|c| c.starts_with("rdma rxe0 port 1 gid ")), "{channels:?}");
}

fn converges(mode: &str) {
    let (a, b) = lab_pair("", mode);
    assert_rdma_channels(&a, "rg01");
    assert_rdma_channels(&b, "rg02");
    let image = a.path("image.raw");
    let bytes: Vec<u8> = (0..VOLUME_BYTES / 2).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&image, bytes).unwrap();
    run_ok(
        a.client_command("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(a.nbd_uri("rg01", "data")),
    );
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")), "{mode}: the volumes are equal");
    let p = a.partnership("rg01");
    assert!(p["bytes_sent"].as_u64().unwrap() > VOLUME_BYTES / 2, "{mode}: the image crossed: {p:#}");
    // qemu-img's large writes (and the initial copy's 1 MiB chunks) are
    // above the 16 KiB threshold: the destination read them from the
    // source's record buffers, no copy through messages.
    let lent = p["zero_copy_bytes_sent"].as_u64().unwrap();
    assert!(lent >= VOLUME_BYTES / 2, "{mode}: the image crossed without copies: {p:#}");
    let read = b.partnership("rg02")["zero_copy_bytes_received"].as_u64().unwrap();
    assert_eq!(read, lent, "{mode}: the destination read every lent byte");
    let shown = a.cli_ok(&["partnership", "show", "--group", "rg01"]);
    assert!(shown.contains("zero copy") && shown.contains("RDMA READ"), "{shown}");
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn a_sync_partnership_over_rdma_converges() {
    converges("sync");
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn an_async_partnership_over_rdma_converges() {
    converges("async");
}

/// Writers through NBD until stopped, recording what was acknowledged.
fn writers(a: &Node, count: usize, model: &Arc<Mutex<WriteModel>>, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<u64>> {
    // Writers share the model: each numbers its writes from its own billion.
    (0..count as u64)
        .map(|seed| writer::spawn(None, a, ("rg01/data", VOLUME_BYTES), (seed * 1_000_000_000, seed + 5), model, stop))
        .collect()
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn killing_the_destination_under_load_loses_no_acknowledged_write() {
    let (a, mut b) = lab_pair("", "sync");
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = writers(&a, 1, &model, &stop);
    std::thread::sleep(Duration::from_secs(4));
    b.kill9();
    std::thread::sleep(Duration::from_secs(2));
    b.spawn();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for writer in load {
        writer.join().unwrap();
    }
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_rdma_channels(&a, "rg01");
    check_acknowledged(&b.path("rg02-data.img"), &model);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
}

/// The smallest window and buffers with many writers: replication keeps
/// up (the partnership is never lost, so no wait reached the heartbeat
/// timeout) and the volumes end equal.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn tiny_credit_windows_under_many_writers_never_stall() {
    let (a, b) = lab_pair("rdma_window = 4\nrdma_message_bytes = 4096\n", "sync");
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = writers(&a, 4, &model, &stop);
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = load.into_iter().map(|w| w.join().unwrap() % 1_000_000_000).sum();
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert!(writes > 100, "the writers wrote ({writes} writes in {:?})", started.elapsed());
    let events = a.cli_ok(&["events", "--json"]);
    assert!(!events.contains("\"id\": 4001"), "the partnership was never lost: {events}");
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
}

/// The lab's RDMA device, put back (if a test deleted it) when dropped.
struct LabDevice;

fn lab_command(program: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command.args(args);
    command
}

impl Drop for LabDevice {
    fn drop(&mut self) {
        if !lab_command("rdma", &["link", "show", "rxe0/1"]).output().is_ok_and(|o| o.status.success()) {
            let _ = lab_command("rdma", &["link", "add", "rxe0", "type", "rxe", "netdev", "veth0"]).status();
        }
    }
}

/// Waits until the source's partnership status satisfies `wanted`.
fn wait_partnership(node: &Node, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let p = node.partnership("rg01");
        if wanted(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "{what}: {p:#}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn channels_of(p: &serde_json::Value) -> Vec<String> {
    p["channel_addresses"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect()
}

/// Waits until the source replicates over TCP on its fallback.
fn wait_fallen_back(a: &Node) -> serde_json::Value {
    let fallen =
        wait_partnership(a, "resumed over TCP", |p| p["connected"] == true && p["transport_fallback"].is_string());
    assert!(channels_of(&fallen).iter().all(|c| c.starts_with("tcp ")), "{fallen:#}");
    assert_eq!(fallen["transport"], "rdma", "the partnership stays an RDMA one: {fallen:#}");
    fallen
}

/// A sync pair over RDMA, in sync, with a verifying writer running.
struct LoadedPair {
    a: Node,
    b: Node,
    model: Arc<Mutex<WriteModel>>,
    stop: Arc<AtomicBool>,
    load: Vec<JoinHandle<u64>>,
}

impl LoadedPair {
    fn start(replication_toml: &str) -> Self {
        let (a, b) = lab_pair(replication_toml, "sync");
        a.wait_in_sync("rg01", SYNC_TIMEOUT);
        let model = Arc::new(Mutex::new(WriteModel::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = writers(&a, 1, &model, &stop);
        std::thread::sleep(Duration::from_secs(2));
        Self { a, b, model, stop, load }
    }

    /// Stops the writer; once in sync, every acknowledged write is on the
    /// destination and the volumes are equal.
    fn finish(self) -> (Node, Node) {
        self.stop.store(true, Ordering::Relaxed);
        for writer in self.load {
            writer.join().unwrap();
        }
        self.a.wait_in_sync("rg01", SYNC_TIMEOUT);
        check_acknowledged(&self.b.path("rg02-data.img"), &self.model);
        assert_eq!(md5(&self.a.path("rg01-data.img")), md5(&self.b.path("rg02-data.img")));
        (self.a, self.b)
    }
}

/// Daemons started from here on may lock any amount of memory, as their
/// systemd unit lets them (LimitMEMLOCK=infinity): each RDMA channel
/// registers the zero-copy arena (64 MiB) besides its message buffers, over
/// the guest's default limit of 8 MiB.
fn unlimited_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit on this process with a valid struct (root may raise it).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) }, 0);
}

/// Runs `start` under a memory-lock limit of `bytes` (the child inherits
/// it), then puts this process's limit back.
fn with_memlock_limit(bytes: u64, start: impl FnOnce()) {
    let mut before = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit on this process with valid structs.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut before), 0);
        let low = libc::rlimit { rlim_cur: bytes, rlim_max: before.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &low), 0);
    }
    start();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &before), 0) };
}

/// Restarts `node` with a memory-lock limit too small for RDMA buffers: its
/// RDMA listener cannot start, and its status and log say why.
fn restart_without_rdma_listener(node: &mut Node) {
    node.kill9();
    with_memlock_limit(64 << 10, || node.spawn());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !node.log().contains("locked memory") {
        assert!(Instant::now() < deadline, "the RDMA listener did not refuse: {}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Raises a running node's memory-lock limit: its listener binds within 2 s.
fn lift_memlock_limit(node: &Node) {
    let pid = node.pid().unwrap().to_string();
    run_ok(&mut lab_command("prlimit", &["--pid", &pid, "--memlock=unlimited:unlimited"]));
}

/// The destination comes back without its RDMA listener (restarted under a
/// memory-lock limit too low for its buffers) while a writer runs: the source
/// resumes over TCP and says why (event 2007, status, `partnership show`);
/// no acknowledged write is lost. Once the destination's limit is raised its
/// listener starts, the source finds RDMA again (its probe every 10 s) and
/// moves back by itself in the running partnership (event 2008), holding
/// sync writes while it reconnects.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn a_destination_without_rdma_gets_tcp_until_rdma_is_back() {
    let mut pair = LoadedPair::start("");
    restart_without_rdma_listener(&mut pair.b);
    let a = &pair.a;
    let fallen = wait_fallen_back(a);
    assert!(fallen["transport_fallback"].as_str().unwrap().contains("locked memory"), "{fallen:#}");
    let destination = pair.b.partnership("rg02");
    assert!(
        destination["transport_fallback"].as_str().is_some_and(|r| r.contains("resumed over TCP")),
        "{destination:#}"
    );
    let shown = a.cli_ok(&["partnership", "show"]);
    assert!(shown.contains("TCP while RDMA is away"), "{shown}");
    std::thread::sleep(Duration::from_secs(3));
    let lifted = Instant::now();
    lift_memlock_limit(&pair.b);
    wait_partnership(a, "back on RDMA", |p| p["connected"] == true && p["transport_fallback"].is_null());
    let returned_after = lifted.elapsed();
    assert_rdma_channels(a, "rg01");
    std::thread::sleep(Duration::from_secs(2));
    let (a, _b) = pair.finish();
    a.wait_for_events(&[2007, 2008], Duration::from_secs(10));
    assert!(a.log().contains("the RDMA path is back: reconnecting over RDMA"), "{}", a.log());
    eprintln!("back on RDMA {returned_after:?} after the destination's listener could start");
}

/// The RDMA device removed under load (`rdma link delete rxe0`): both
/// daemons hear rdma_cm's removal event and close every queue pair at once;
/// the partnership resumes over TCP and no acknowledged write is lost.
/// (librdmacm 44 keeps the verbs context of a system's last device open
/// while the process lives, and rxe cannot disassociate it, so the
/// deletion itself finishes only when the daemons exit; after a restart
/// with the device back the partnership runs over RDMA again.)
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn removing_the_rdma_device_falls_back_to_tcp() {
    let _device = LabDevice;
    let pair = LoadedPair::start("");
    let mut deletion = lab_command("rdma", &["link", "delete", "rxe0"]).spawn().unwrap();
    let fallen = wait_fallen_back(&pair.a);
    assert!(fallen["transport_fallback"].as_str().unwrap().contains("no RDMA devices"), "{fallen:#}");
    std::thread::sleep(Duration::from_secs(3));
    let (mut a, mut b) = pair.finish();
    a.wait_for_events(&[2007], Duration::from_secs(10));
    a.kill9();
    b.kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    while deletion.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "rdma link delete did not finish once the daemons exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    run_ok(&mut lab_command("rdma", &["link", "add", "rxe0", "type", "rxe", "netdev", "veth0"]));
    b.spawn();
    a.spawn();
    wait_partnership(&a, "back on RDMA after the restart", |p| p["connected"] == true);
    assert_rdma_channels(&a, "rg01");
}

/// With `rdma_fallback = "none"` the source waits for RDMA: while the
/// destination has no RDMA listener it counts as lost (writes go on under
/// the default peer-loss policy), and once the listener is up the
/// partnership resumes over RDMA and catches up.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn without_fallback_the_partnership_waits_for_rdma() {
    let mut pair = LoadedPair::start("rdma_fallback = \"none\"\n");
    restart_without_rdma_listener(&mut pair.b);
    let (a, b) = (&pair.a, &pair.b);
    let waiting = wait_partnership(a, "waiting for RDMA", |p| {
        p["connected"] == false && p["last_error"].as_str().is_some_and(|e| e.contains("takes no RDMA data channels"))
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(a.partnership("rg01")["connected"], false, "no TCP session: {waiting:#}");
    lift_memlock_limit(b);
    wait_partnership(a, "back on RDMA", |p| p["connected"] == true);
    assert_rdma_channels(a, "rg01");
    let (a, _b) = pair.finish();
    let events = a.cli_ok(&["events", "--json"]);
    assert!(!events.contains("\"id\": 2007"), "no fallback: {events}");
}

/// On a host without RDMA (this one, outside the lab), asking for it fails
/// with the reason and the fix; auto falls back to TCP.
#[test]
fn asking_for_rdma_without_a_device_fails_with_the_reason() {
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    a.create_group("rg01", "128MiB", &[("data", 4 << 20)]);
    b.create_group("rg02", "128MiB", &[("data", 4 << 20)]);
    let refused = a.partner_with("rg01", &b, "rg02", &["--transport", "rdma"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("--transport rdma: this node cannot use RDMA from 127.0.0.1"), "{stderr}");
    assert!(stderr.contains("or use --transport tcp"), "the fix is named: {stderr}");
    assert_eq!(a.group_status("rg01")["role"], "standalone", "nothing was created");
    let auto = a.partner_with("rg01", &b, "rg02", &["--transport", "auto"]);
    assert!(String::from_utf8_lossy(&auto.stdout).contains("tcp channel(s)"), "{auto:?}");
    assert_eq!(a.partnership("rg01")["transport"], "tcp");
}
