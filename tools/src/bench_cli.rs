//! `tandem bench`'s command line: the options, the progress bar, the text or
//! JSON output, and `--compare`'s alternating rounds.

use std::time::Duration;

use crate::bench::{BenchOptions, BenchResult};
use crate::bench_target::Pattern;
use crate::size::parse_size;

/// Benchmark an NBD export, a local file or block device, or the transport to a daemon.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["nbd", "file", "transport"])))]
pub struct BenchArgs {
    /// An NBD export, nbd://HOST[:PORT]/EXPORT (Tandem's or any server's).
    #[arg(long)]
    pub nbd: Option<String>,
    /// A local file or block device, driven with io_uring and O_DIRECT (writes overwrite it).
    #[arg(long)]
    pub file: Option<String>,
    /// A daemon's replication listener, HOST[:PORT] (port 5445 by default): round trips or bandwidth of the path.
    #[arg(long)]
    pub transport: Option<String>,
    /// A second target run alternately with the first; prints the ratios
    /// (nbd://HOST[:PORT]/EXPORT, /PATH or tandem://HOST[:PORT]).
    #[arg(long, value_name = "TARGET")]
    pub compare: Option<String>,
    /// Transport targets: ping-pong (the block goes there and back) or stream (one way).
    #[arg(long, default_value = "ping-pong", value_parser = ["ping-pong", "stream"])]
    pub pattern: String,
    /// Bytes per request.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Share of reads in percent (the rest are writes).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_percent: u8,
    /// Sequential offsets instead of random ones.
    #[arg(long)]
    pub sequential: bool,
    /// Requests in flight per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queue_depth: u16,
    /// Parallel jobs, each with its own connection or ring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds run first and not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup_seconds: u64,
    /// At most this many requests per second (all jobs together).
    #[arg(long)]
    pub rate_iops: Option<u64>,
    /// With --compare: alternating rounds of each target.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Transport targets: send and receive buffer of both ends' sockets [default: the kernel's].
    #[arg(long, value_parser = parse_size)]
    pub socket_buffer: Option<u64>,
    /// Confirms that writes to a block device may destroy its data.
    #[arg(long)]
    pub destroy_data: bool,
    /// Print JSON instead of text (no progress bar).
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The first target as `bench::run` takes it.
    fn target(&self) -> String {
        match (&self.nbd, &self.file, &self.transport) {
            (Some(uri), _, _) => uri.clone(),
            (_, Some(path), _) => {
                if path.starts_with('/') {
                    path.clone()
                } else {
                    std::env::current_dir().map_or_else(|_| path.clone(), |d| d.join(path).display().to_string())
                }
            }
            (_, _, Some(address)) => format!("tandem://{address}"),
            _ => unreachable!("clap requires one target"),
        }
    }

    /// The workload the options describe, or what is wrong with them.
    pub fn options(&self) -> Result<BenchOptions, String> {
        let block_bytes = u32::try_from(self.block_size)
            .ok()
            .filter(|b| (512..=(16 << 20)).contains(b))
            .ok_or_else(|| "--block-size must be from 512B to 16MiB".to_owned())?;
        let pattern = if self.pattern == "stream" { Pattern::Stream } else { Pattern::PingPong };
        Ok(BenchOptions {
            block_bytes,
            read_percent: self.read_percent,
            sequential: self.sequential,
            queue_depth: usize::from(self.queue_depth),
            duration: Duration::from_secs(self.seconds.max(1)),
            warmup: Duration::from_secs(self.warmup_seconds),
            rate_iops: self.rate_iops,
            jobs: usize::from(self.jobs),
            pattern,
            destroy_data: self.destroy_data,
            socket_buffer_bytes: match self.socket_buffer {
                None => 0,
                Some(bytes) => u32::try_from(bytes)
                    .ok()
                    .filter(|b| (4096..=(256 << 20)).contains(b))
                    .ok_or_else(|| "--socket-buffer must be from 4KiB to 256MiB".to_owned())?,
            },
        })
    }

    /// Runs the benchmark and prints its results.
    pub fn run(&self) -> Result<(), String> {
        let options = self.options()?;
        if let Some(uri) = &self.nbd {
            crate::bench::parse_nbd_uri(uri)?;
        }
        let first = self.target();
        let targets: Vec<&str> = std::iter::once(first.as_str()).chain(self.compare.as_deref()).collect();
        let rounds = if self.compare.is_some() { self.rounds.max(1) } else { 1 };
        let mut results: Vec<Vec<BenchResult>> = vec![Vec::new(); targets.len()];
        for _ in 0..rounds {
            for (index, target) in targets.iter().enumerate() {
                let result = run_with_progress(target, &options, self.json)?;
                if !self.json {
                    println!("{}", crate::bench::render(&result));
                }
                results[index].push(result);
            }
        }
        if self.json {
            let all: Vec<&BenchResult> = results.iter().flatten().collect();
            println!("{}", serde_json::to_string_pretty(&all).expect("results serialize"));
        } else if results.len() == 2 {
            println!("{}", crate::bench::render_comparison(&results[0], &results[1]));
        }
        Ok(())
    }
}

/// One run with a progress bar (hidden for JSON output).
pub fn run_with_progress(target: &str, options: &BenchOptions, quiet: bool) -> Result<BenchResult, String> {
    let bar =
        if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(options.duration.as_secs()) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} s {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(target.to_owned());
    let result = crate::bench::run(target, options, |second| {
        bar.set_position(second.elapsed_s);
        bar.set_message(format!("{:.0} IOPS", second.iops));
    });
    bar.finish_and_clear();
    result
}
