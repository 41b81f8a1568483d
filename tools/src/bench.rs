//! `tandem bench`: a workload against an NBD export (Tandem's or any
//! server's): block size, read/write mix, random or sequential offsets, queue
//! depth, duration after a warm-up, an optional rate limit; IOPS, MiB/s,
//! latency percentiles (hdrhistogram) and CPU per I/O. `--compare` runs two
//! targets alternately in one invocation and prints their ratios.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;

use crate::nbd_load::NbdConnection;

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
    /// At most this many requests per second (none: as fast as answered).
    pub rate_iops: Option<u64>,
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

/// One second of a run, as it goes.
#[derive(Debug, Clone, Copy)]
pub struct Interval {
    /// Measured seconds so far.
    pub elapsed_s: u64,
    pub iops: f64,
    pub latency_avg_us: f64,
    pub latency_p99_us: u64,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What one run measured (after its warm-up).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub target: String,
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

struct Run<'a> {
    connection: NbdConnection,
    options: &'a BenchOptions,
    next_offset: u64,
    cookie: u64,
    in_flight: HashMap<u64, (Instant, bool)>,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl Run<'_> {
    fn submit(&mut self, rng: &mut impl Rng) -> Result<(), String> {
        let block = u64::from(self.options.block_bytes);
        let blocks = (self.connection.size_bytes / block).max(1);
        let offset = if self.options.sequential {
            let offset = self.next_offset;
            self.next_offset = (self.next_offset + block) % (blocks * block);
            offset
        } else {
            rng.random_range(0..blocks) * block
        };
        self.cookie += 1;
        let read = rng.random_range(0..100) < self.options.read_percent;
        let sent = if read {
            self.connection.send_read(self.cookie, offset, self.options.block_bytes)
        } else {
            let stamp = 64.min(self.payload.len());
            rng.fill(&mut self.payload[..stamp]);
            self.connection.send_write(self.cookie, offset, &self.payload)
        };
        sent.map_err(|e| format!("sending a request failed: {e}"))?;
        self.in_flight.insert(self.cookie, (Instant::now(), read));
        Ok(())
    }

    /// Waits for one reply: (is a read, latency in us).
    fn complete(&mut self) -> Result<(bool, u64), String> {
        let (error, cookie) = self.connection.reply().map_err(|e| format!("reading a reply failed: {e}"))?;
        let (sent, read) =
            self.in_flight.remove(&cookie).ok_or_else(|| format!("the server answered unknown request {cookie}"))?;
        if error != 0 {
            return Err(format!("the server failed a {} with NBD error {error}", if read { "read" } else { "write" }));
        }
        if read {
            self.connection.read_data(&mut self.scratch).map_err(|e| format!("reading data failed: {e}"))?;
        }
        Ok((read, sent.elapsed().as_micros().max(1) as u64))
    }
}

/// Runs `options` against `uri`; `on_second` hears every measured second.
pub fn run(uri: &str, options: &BenchOptions, mut on_second: impl FnMut(&Interval)) -> Result<BenchResult, String> {
    let (address, export) = parse_nbd_uri(uri)?;
    let connection = NbdConnection::connect(&address, &export).map_err(|e| format!("{uri}: {e}"))?;
    if connection.size_bytes < u64::from(options.block_bytes) {
        return Err(format!(
            "{uri} is {} bytes, smaller than one {}-byte block",
            connection.size_bytes, options.block_bytes
        ));
    }
    let block = options.block_bytes as usize;
    let mut run = Run {
        connection,
        options,
        next_offset: 0,
        cookie: 0,
        in_flight: HashMap::new(),
        payload: vec![0xa5; block],
        scratch: vec![0; block],
    };
    let mut rng = rand::rng();
    let (mut latency_us, mut second_latency_us) = (latency_histogram(), latency_histogram());
    let (mut reads, mut writes) = (0u64, 0u64);
    let started = Instant::now();
    let mut measuring_since: Option<(Instant, (u64, u64))> = None;
    let mut second_mark = started;
    let mut submitted = 0u64;
    loop {
        let now = Instant::now();
        if measuring_since.is_none() && now.duration_since(started) >= options.warmup {
            measuring_since = Some((now, cpu_times_us()));
            second_mark = now;
        }
        let running = measuring_since.is_none_or(|(since, _)| now.duration_since(since) < options.duration);
        while running && run.in_flight.len() < options.queue_depth {
            if let Some(rate) = options.rate_iops {
                let due = started + Duration::from_secs_f64(submitted as f64 / rate.max(1) as f64);
                if Instant::now() < due {
                    if run.in_flight.is_empty() {
                        std::thread::sleep(due - Instant::now());
                    } else {
                        break;
                    }
                }
            }
            run.submit(&mut rng)?;
            submitted += 1;
        }
        if run.in_flight.is_empty() {
            break;
        }
        let (read, latency) = run.complete()?;
        if let Some((since, _)) = measuring_since {
            let _ = latency_us.record(latency);
            let _ = second_latency_us.record(latency);
            if read {
                reads += 1;
            } else {
                writes += 1;
            }
            if second_mark.elapsed() >= Duration::from_secs(1) {
                on_second(&Interval {
                    elapsed_s: since.elapsed().as_secs(),
                    iops: second_latency_us.len() as f64 / second_mark.elapsed().as_secs_f64(),
                    latency_avg_us: second_latency_us.mean(),
                    latency_p99_us: second_latency_us.value_at_quantile(0.99),
                });
                second_mark = Instant::now();
                second_latency_us.reset();
            }
        }
    }
    let (since, (process_before, machine_before)) = measuring_since.expect("the warm-up ended");
    let elapsed_s = since.elapsed().as_secs_f64();
    let (process_after, machine_after) = cpu_times_us();
    run.connection.disconnect();
    let ios = (reads + writes).max(1);
    let bytes = (reads + writes) * u64::from(options.block_bytes);
    Ok(BenchResult {
        target: uri.to_owned(),
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

/// One result as text.
#[must_use]
pub fn render(result: &BenchResult) -> String {
    let l = &result.latency;
    format!(
        "{}: {:.0} IOPS, {:.1} MiB/s ({} reads, {} writes in {:.1} s)\n  latency us: avg {:.0}, p50 {}, p90 {}, p99 {}, p99.9 {}, max {}\n  CPU per I/O: {:.1} us in tandem bench, {:.1} us on the whole machine",
        result.target,
        result.iops,
        result.mib_per_s,
        result.reads,
        result.writes,
        result.elapsed_s,
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
