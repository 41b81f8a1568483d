//! `tandem bench`: a workload against an NBD export (Tandem's or any
//! server's), a local file or device, or a transport (bench_target.rs):
//! block size, read/write mix, random or sequential offsets, queue depth,
//! jobs, duration after a warm-up, an optional rate limit; IOPS, MiB/s,
//! latency percentiles (hdrhistogram) and CPU per I/O. `--compare` runs two
//! targets alternately in one invocation and prints their ratios.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use tandem_engine::runtime::counters::latency_histogram;

use crate::bench_target::{Pattern, Prepared, Target, TargetSpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub block_bytes: u32,
    /// Share of reads, 0 to 100.
    pub read_percent: u8,
    pub sequential: bool,
    pub queue_depth: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// At most this many requests per second over all jobs (none: as fast
    /// as answered).
    pub rate_iops: Option<u64>,
    /// Parallel connections (or rings), each with `queue_depth` in flight.
    pub jobs: usize,
    /// How a transport target is exercised.
    pub pattern: Pattern,
    /// Allows writes to a block device.
    pub destroy_data: bool,
    /// Transport targets: socket buffer of both ends (0: the kernel's default).
    pub socket_buffer_bytes: u32,
}

impl BenchOptions {
    /// 4 KiB random writes, QD1, one job, 10 s after 2 s of warm-up.
    #[must_use]
    pub fn new() -> Self {
        Self {
            block_bytes: 4096,
            read_percent: 0,
            sequential: false,
            queue_depth: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            rate_iops: None,
            jobs: 1,
            pattern: Pattern::PingPong,
            destroy_data: false,
            socket_buffer_bytes: 0,
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub avg_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// One second of a run, as it goes (all jobs together).
#[derive(Debug, Clone, Copy)]
pub struct Interval {
    /// Measured seconds so far.
    pub elapsed_s: u64,
    /// Requests finished in that second.
    pub iops: f64,
    pub latency_avg_us: f64,
    pub latency_p99_us: u64,
}

/// What one run measured (after its warm-up).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub target: String,
    pub jobs: usize,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency: Latency,
    /// CPU time of this process, and of the whole machine (server included
    /// when it runs here), per I/O, in microseconds.
    pub client_cpu_us_per_io: f64,
    pub machine_cpu_us_per_io: f64,
}

/// `nbd://HOST:PORT/EXPORT` (port 10809 by default) as (address, export).
pub fn parse_nbd_uri(uri: &str) -> Result<(String, String), String> {
    let rest = uri.strip_prefix("nbd://").ok_or_else(|| format!("{uri}: an NBD target is nbd://HOST[:PORT]/EXPORT"))?;
    let (host, export) = rest
        .split_once('/')
        .filter(|(_, e)| !e.is_empty())
        .ok_or_else(|| format!("{uri}: the export name is missing"))?;
    let address = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        host.to_owned()
    } else {
        format!("{host}:10809")
    };
    Ok((address, export.to_owned()))
}

/// CPU time of this process and busy time of the machine, in microseconds.
fn cpu_times_us() -> (u64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    let process = micros(usage.ru_utime) + micros(usage.ru_stime);
    // /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...
    let busy_ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| {
            let fields: Vec<u64> =
                text.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            let idle = fields.get(3)? + fields.get(4)?;
            Some(fields.iter().take(8).sum::<u64>() - idle)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (process, busy_ticks * 1_000_000 / ticks_per_s)
}

/// What one job sends the collector.
enum JobReport {
    /// Job 0's warm-up ended: the CPU times then.
    MeasureStart((u64, u64)),
    /// One measured second of one job.
    Second(u64, Histogram<u64>),
}

/// What one job measured.
struct JobTotals {
    reads: u64,
    writes: u64,
    latency_us: Histogram<u64>,
    elapsed_s: f64,
}

/// Runs `options` against `target` (see `TargetSpec::parse`) with
/// `options.jobs` jobs; `on_second` hears every measured second, merged
/// over the jobs.
pub fn run(target: &str, options: &BenchOptions, mut on_second: impl FnMut(&Interval)) -> Result<BenchResult, String> {
    let prepared = Prepared::new(TargetSpec::parse(target)?, options)?;
    let targets: Vec<Box<dyn Target>> =
        (0..options.jobs.max(1)).map(|_| prepared.open_job()).collect::<Result<_, _>>()?;
    let jobs = targets.len();
    let (reports, collected) = crossbeam_channel::unbounded();
    let (totals, cpu_before, cpu_after) = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .into_iter()
            .enumerate()
            .map(|(index, target)| {
                let reports = reports.clone();
                scope.spawn(move || run_job(target, options, index == 0, &reports))
            })
            .collect();
        drop(reports);
        let mut cpu_before = None;
        let mut seconds: std::collections::BTreeMap<u64, (usize, Histogram<u64>)> = std::collections::BTreeMap::new();
        for report in collected {
            match report {
                JobReport::MeasureStart(cpu) => cpu_before = Some(cpu),
                JobReport::Second(index, histogram) => {
                    let entry = seconds.entry(index).or_insert_with(|| (0, latency_histogram()));
                    entry.0 += 1;
                    let _ = entry.1.add(&histogram);
                    if entry.0 == jobs {
                        let (_, merged) = seconds.remove(&index).expect("present");
                        on_second(&Interval {
                            elapsed_s: index + 1,
                            iops: merged.len() as f64,
                            latency_avg_us: merged.mean(),
                            latency_p99_us: merged.value_at_quantile(0.99),
                        });
                    }
                }
            }
        }
        let totals: Result<Vec<JobTotals>, String> =
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a bench job panicked".to_owned()))).collect();
        (totals, cpu_before, cpu_times_us())
    });
    let totals = totals?;
    let (process_before, machine_before) = cpu_before.expect("job 0 reports its warm-up end");
    let (process_after, machine_after) = cpu_after;
    let mut latency_us = latency_histogram();
    for job in &totals {
        let _ = latency_us.add(&job.latency_us);
    }
    let reads: u64 = totals.iter().map(|t| t.reads).sum();
    let writes: u64 = totals.iter().map(|t| t.writes).sum();
    let elapsed_s = totals.iter().map(|t| t.elapsed_s).fold(0.0, f64::max);
    let ios = (reads + writes).max(1);
    let bytes = (reads + writes) * u64::from(options.block_bytes);
    Ok(BenchResult {
        target: target.to_owned(),
        jobs,
        reads,
        writes,
        bytes,
        elapsed_s,
        iops: (reads + writes) as f64 / elapsed_s,
        mib_per_s: bytes as f64 / elapsed_s / f64::from(1 << 20),
        latency: Latency {
            avg_us: latency_us.mean(),
            p50_us: latency_us.value_at_quantile(0.5),
            p90_us: latency_us.value_at_quantile(0.9),
            p99_us: latency_us.value_at_quantile(0.99),
            p999_us: latency_us.value_at_quantile(0.999),
            max_us: latency_us.max(),
        },
        client_cpu_us_per_io: (process_after - process_before) as f64 / ios as f64,
        machine_cpu_us_per_io: machine_after.saturating_sub(machine_before) as f64 / ios as f64,
    })
}

/// Offsets of one job: sequential (each job from its own start) or random,
/// aligned to the block size.
struct Offsets {
    block: u64,
    blocks: u64,
    next: u64,
    sequential: bool,
}

impl Offsets {
    fn next(&mut self, rng: &mut impl Rng) -> u64 {
        if self.sequential {
            let offset = self.next;
            self.next = (self.next + 1) % self.blocks;
            offset * self.block
        } else {
            rng.random_range(0..self.blocks) * self.block
        }
    }
}

fn run_job(
    mut target: Box<dyn Target>,
    options: &BenchOptions,
    reports_start: bool,
    reports: &crossbeam_channel::Sender<JobReport>,
) -> Result<JobTotals, String> {
    let block = u64::from(options.block_bytes);
    let mut offsets =
        Offsets { block, blocks: (target.size_bytes() / block).max(1), next: 0, sequential: options.sequential };
    let mut rng = rand::rng();
    let rate_per_job = options.rate_iops.map(|rate| (rate as f64 / options.jobs.max(1) as f64).max(1.0));
    let mut in_flight: HashMap<u64, (Instant, bool)> = HashMap::new();
    let (mut latency_us, mut second_latency_us) = (latency_histogram(), latency_histogram());
    let (mut reads, mut writes, mut submitted, mut next_id) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut measuring_since: Option<Instant> = None;
    let mut second_index = 0u64;
    loop {
        let now = Instant::now();
        if measuring_since.is_none() && now.duration_since(started) >= options.warmup {
            measuring_since = Some(now);
            if reports_start {
                let _ = reports.send(JobReport::MeasureStart(cpu_times_us()));
            }
        }
        let running = measuring_since.is_none_or(|since| now.duration_since(since) < options.duration);
        while running && in_flight.len() < options.queue_depth {
            if let Some(rate) = rate_per_job {
                let due = started + Duration::from_secs_f64(submitted as f64 / rate);
                if Instant::now() < due {
                    if in_flight.is_empty() {
                        std::thread::sleep(due - Instant::now());
                    } else {
                        break;
                    }
                }
            }
            next_id += 1;
            let read = rng.random_range(0..100) < options.read_percent;
            target.submit(next_id, read, offsets.next(&mut rng), &mut rng)?;
            in_flight.insert(next_id, (Instant::now(), read));
            submitted += 1;
        }
        if in_flight.is_empty() {
            break;
        }
        let id = target.complete()?;
        let (sent, read) = in_flight.remove(&id).ok_or_else(|| format!("the target answered unknown request {id}"))?;
        let Some(since) = measuring_since else { continue };
        let latency = sent.elapsed().as_micros().max(1) as u64;
        let _ = latency_us.record(latency);
        if read {
            reads += 1;
        } else {
            writes += 1;
        }
        // A request finishing after the measured time belongs to no second.
        let second = since.elapsed().as_secs();
        if second >= options.duration.as_secs() {
            continue;
        }
        if second > second_index {
            let _ = reports.send(JobReport::Second(second_index, second_latency_us.clone()));
            second_latency_us.reset();
            second_index = second;
        }
        let _ = second_latency_us.record(latency);
    }
    let since = measuring_since.expect("the warm-up ended");
    if second_index < options.duration.as_secs() {
        let _ = reports.send(JobReport::Second(second_index, second_latency_us));
    }
    let elapsed_s = since.elapsed().as_secs_f64();
    target.finish();
    Ok(JobTotals { reads, writes, latency_us, elapsed_s })
}

/// One result as text.
#[must_use]
pub fn render(result: &BenchResult) -> String {
    let l = &result.latency;
    // A transport target's requests are messages (ping-pong or stream), not reads or writes.
    let requests = if result.target.starts_with("tandem://") {
        format!("{} messages", result.writes)
    } else {
        format!("{} reads, {} writes", result.reads, result.writes)
    };
    format!(
        "{}: {:.0} IOPS, {:.1} MiB/s ({requests} in {:.1} s, {} job(s))\n  latency us: avg {:.0}, p50 {}, p90 {}, p99 {}, p99.9 {}, max {}\n  CPU per I/O: {:.1} us in tandem bench, {:.1} us on the whole machine",
        result.target,
        result.iops,
        result.mib_per_s,
        result.elapsed_s,
        result.jobs,
        l.avg_us,
        l.p50_us,
        l.p90_us,
        l.p99_us,
        l.p999_us,
        l.max_us,
        result.client_cpu_us_per_io,
        result.machine_cpu_us_per_io
    )
}

/// The ratios of `b` to `a` (averaged over the rounds each ran).
#[must_use]
pub fn render_comparison(a: &[BenchResult], b: &[BenchResult]) -> String {
    let mean = |runs: &[BenchResult], f: fn(&BenchResult) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
    let iops = mean(b, |r| r.iops) / mean(a, |r| r.iops);
    let p50 = mean(b, |r| r.latency.p50_us as f64) / mean(a, |r| r.latency.p50_us as f64);
    let p99 = mean(b, |r| r.latency.p99_us as f64) / mean(a, |r| r.latency.p99_us as f64);
    format!(
        "{} vs {} over {} alternating round(s): IOPS x{iops:.2}, latency p50 x{p50:.2}, p99 x{p99:.2}",
        b[0].target,
        a[0].target,
        a.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_parse_with_a_default_port_and_refuse_with_the_form() {
        assert_eq!(parse_nbd_uri("nbd://10.0.0.1/rg01/data").unwrap(), ("10.0.0.1:10809".into(), "rg01/data".into()));
        assert_eq!(parse_nbd_uri("nbd://h:20000/x").unwrap(), ("h:20000".into(), "x".into()));
        assert!(parse_nbd_uri("http://h/x").unwrap_err().contains("nbd://HOST[:PORT]/EXPORT"));
        assert!(parse_nbd_uri("nbd://h:1/").unwrap_err().contains("export name is missing"));
    }
}
