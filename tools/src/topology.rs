//! `tandem topology test` (Storage Replica's Test-SRTopology): checks every
//! requirement of a planned partnership on its own, each failure with the
//! measured value, the limit and the fix; then measures the source's real
//! write workload and the path to the destination for a while and writes an
//! HTML report with the recommended log size and the initial sync estimate.
//!
//! It runs on the source node: the source group is asked through the local
//! management socket and its devices are examined here; the destination is
//! asked through a probe on its replication listener (probe.rs), which also
//! carries the round trips and the bandwidth, so the path measured is the
//! one replication would take from this node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tandem_engine::runtime::counters::latency_histogram;

use crate::api::{call, Request, ResponseBody};
use crate::device_facts::{group_devices, GroupDevices};
use crate::probe::{GroupFacts, ProbeClient};
use crate::size::{format_size, parse_duration};
use crate::topology_requirements::{
    bandwidth_requirement, faster_log_requirement, requirement, sector_requirement, separate_log_requirement,
    volume_size_requirement,
};
pub use crate::topology_requirements::{render_requirement, Requirement};
use crate::topology_source::{group_status, SourceSide};

/// Round trip a synchronous partnership tolerates (Storage Replica's limit).
pub const MAX_SYNC_ROUND_TRIP_MS: f64 = 5.0;
/// Smallest log a group may have.
const MIN_LOG_BYTES: u64 = 128 << 20;
const PING_PAYLOAD_BYTES: u32 = 64;
const STREAM_FRAME_BYTES: u32 = 1 << 20;

/// Check a planned partnership's requirements and measure its workload and path.
#[derive(Debug, Clone, clap::Args)]
pub struct TopologyTestArgs {
    /// The source, NODE/GROUP: this node (run the test on it) and the group to replicate.
    #[arg(long)]
    pub source: String,
    /// The destination, HOST[:PORT]/GROUP: its replication address (port 5445 by default) and group.
    #[arg(long)]
    pub destination: String,
    /// How long to measure the workload and the path, e.g. 30m, 1h, 60s.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Directory for the report (topology-report.html and .json; created).
    #[arg(long, required_unless_present = "requirements_only")]
    pub result_path: Option<PathBuf>,
    /// Check the requirements only (a few seconds): no workload measurement, no report.
    #[arg(long)]
    pub requirements_only: bool,
    /// The planned mode; sync needs a round trip of at most 5 ms.
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    pub mode: String,
    /// Longest destination outage the log must absorb without a bitmap resync.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub tolerated_outage: Duration,
    /// Before GROUP exists: a volume planned for it (repeat for more), measured
    /// through its block device's statistics while the application writes to it.
    #[arg(long = "source-volume", requires = "source_log")]
    pub source_volumes: Vec<PathBuf>,
    /// Before GROUP exists: the log planned for it (file or block device).
    #[arg(long, requires = "source_volumes")]
    pub source_log: Option<PathBuf>,
}

/// One measured second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub second: u64,
    pub write_bytes_per_s: f64,
    /// Average durable log write of that second (none when the log was idle).
    pub log_write_latency_us: Option<f64>,
    pub round_trip_us_avg: f64,
}

/// Everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyReport {
    pub source: String,
    pub destination: String,
    pub mode: String,
    pub started_unix_s: u64,
    pub requirements: Vec<Requirement>,
    /// Where the source's workload came from.
    pub workload_method: String,
    pub source_devices: Option<GroupDevices>,
    pub destination_devices: Option<GroupDevices>,
    pub samples: Vec<Sample>,
    /// (upper bound in us, count) of every round trip measured.
    pub round_trip_us_buckets: Vec<(u64, u64)>,
    pub round_trip_us_p50: u64,
    pub round_trip_us_p99: u64,
    pub bandwidth_bytes_per_s: Option<f64>,
    pub peak_write_bytes_per_s: f64,
    pub tolerated_outage_s: u64,
    pub recommended_log_bytes: u64,
    pub log_size_reasoning: String,
    pub current_log_bytes: u64,
    pub initial_sync_bytes: u64,
    pub initial_sync_estimate_s: Option<f64>,
    pub elapsed_s: f64,
}

/// What the test learned before measuring.
struct Facts {
    source: Option<SourceSide>,
    destination: Option<(ProbeClient, GroupFacts)>,
}

fn split_target(text: &str, what: &str) -> Result<(String, String), String> {
    text.rsplit_once('/')
        .filter(|(node, group)| !node.is_empty() && !group.is_empty())
        .map(|(node, group)| (node.to_owned(), group.to_owned()))
        .ok_or_else(|| format!("--{what} {text}: write it as NODE/GROUP"))
}

impl TopologyTestArgs {
    /// Runs the test; `Err` carries the summary when a requirement failed.
    pub fn run(&self, api: &Path) -> Result<(), String> {
        let (source_node, source_group) = split_target(&self.source, "source")?;
        let (destination_address, destination_group) = split_target(&self.destination, "destination")?;
        let started = Instant::now();
        let mut requirements = Vec::new();
        let mut facts =
            self.gather(api, &source_node, &source_group, &destination_address, &destination_group, &mut requirements);
        let mut round_trips_us = latency_histogram();
        let first_reading = facts.source.as_ref().and_then(|source| source.read().ok());
        let mut bandwidth = None;
        if let Some((client, _)) = facts.destination.as_mut() {
            let pings = client.ping(200, PING_PAYLOAD_BYTES);
            let rate = client.stream_rate(STREAM_FRAME_BYTES, 8, Duration::from_secs(2));
            requirements.push(self.round_trip_requirement(&pings, &mut round_trips_us));
            bandwidth = rate.as_ref().ok().copied();
            let now = facts.source.as_ref().and_then(|source| source.read().ok());
            let check_rate = first_reading.zip(now).map(|(before, now)| {
                now.write_bytes.saturating_sub(before.write_bytes) as f64 / started.elapsed().as_secs_f64()
            });
            requirements.push(bandwidth_requirement(&rate, check_rate.unwrap_or(0.0), "during the requirement checks"));
        }
        for r in &requirements {
            println!("{}", render_requirement(r));
        }
        let failed = requirements.iter().filter(|r| !r.passed).count();
        if self.requirements_only {
            return summary(failed, requirements.len());
        }
        let result_path = self.result_path.clone().expect("clap requires --result-path without --requirements-only");
        let report = self.measure(facts, requirements, round_trips_us, bandwidth, started)?;
        std::fs::create_dir_all(&result_path)
            .map_err(|e| format!("cannot create --result-path {}: {e}", result_path.display()))?;
        let html = result_path.join("topology-report.html");
        std::fs::write(&html, crate::topology_html::render(&report))
            .map_err(|e| format!("cannot write {}: {e}", html.display()))?;
        let json = result_path.join("topology-report.json");
        std::fs::write(&json, serde_json::to_string_pretty(&report).expect("the report serializes"))
            .map_err(|e| format!("cannot write {}: {e}", json.display()))?;
        println!(
            "report written to {} in {:.0} s: recommended log size {}, initial sync {}",
            html.display(),
            report.elapsed_s,
            format_size(report.recommended_log_bytes),
            report.initial_sync_estimate_s.map_or_else(|| "not estimated".to_owned(), |s| format!("about {s:.1} s"))
        );
        summary(failed, report.requirements.len())
    }

    /// The requirements that need no measurement of the path, and the
    /// source's and destination's facts.
    fn gather(
        &self,
        api: &Path,
        source_node: &str,
        source_group: &str,
        destination_address: &str,
        destination_group: &str,
        requirements: &mut Vec<Requirement>,
    ) -> Facts {
        let mut facts = Facts { source: None, destination: None };
        let node = match call(api, &Request::Node) {
            Ok(ResponseBody::Node(node)) => Some(node),
            Ok(_) => None,
            Err(e) => {
                requirements.push(requirement(
                    "source daemon reachable",
                    false,
                    e.to_string(),
                    "tandemd answers on this node",
                    format!("run the test on {source_node}, with tandemd running (or pass --api PATH)"),
                ));
                None
            }
        };
        if let Some(node) = node {
            requirements.push(requirement(
                "source daemon reachable",
                node.name == source_node,
                format!("tandemd of node {} answers on this machine", node.name),
                &format!("the daemon of {source_node}"),
                format!("run the topology test on {source_node} (this machine is {})", node.name),
            ));
            let (source, verdict) = self.source_side(api, &node.name, source_group);
            requirements.push(verdict);
            facts.source = source;
        }
        match ProbeClient::connect(destination_address, Some(destination_group), true, 0) {
            Ok((client, answer)) => {
                let probe = answer.probe.unwrap_or_default();
                requirements.push(requirement(
                    "destination daemon reachable",
                    true,
                    format!("node {} answers on {destination_address}, same replication protocol", answer.destination_node),
                    "answers on the replication port",
                    String::new(),
                ));
                match probe.group {
                    Some(group) => {
                        requirements.push(requirement("destination group exists", true, format!("{} ({}, role {})", group.name, group.state, group.role), "the group exists", String::new()));
                        facts.destination = Some((client, group));
                    }
                    None => requirements.push(requirement(
                        "destination group exists",
                        false,
                        probe.group_error.unwrap_or_else(|| format!("no group {destination_group}")),
                        "the group exists",
                        format!("create it on {} with volumes of the source's sizes", answer.destination_node),
                    )),
                }
            }
            Err(reason) => requirements.push(requirement(
                "destination daemon reachable",
                false,
                reason,
                "answers on the replication port",
                format!("start tandemd on the destination, check replication_listen and any firewall on the path to {destination_address}"),
            )),
        }
        if let (Some(source), Some((_, destination))) = (&facts.source, &facts.destination) {
            requirements.push(volume_size_requirement(source, destination));
            requirements.push(sector_requirement(source, destination));
        }
        for (side, devices) in [
            ("source", facts.source.as_ref().map(|s| &s.devices)),
            ("destination", facts.destination.as_ref().map(|(_, g)| &g.devices)),
        ] {
            if let Some(devices) = devices {
                requirements.push(separate_log_requirement(side, devices));
                requirements.push(faster_log_requirement(side, devices));
            }
        }
        facts
    }

    /// The source group, or the volumes and log planned for it.
    fn source_side(&self, api: &Path, node: &str, group: &str) -> (Option<SourceSide>, Requirement) {
        let status = group_status(api, group);
        if self.source_volumes.is_empty() {
            let verdict = requirement(
                "source group exists",
                status.is_some(),
                status.as_ref().map_or_else(
                    || format!("no group {group} on {node}"),
                    |s| format!("{} ({}, {} volume(s))", s.name, s.state, s.volumes.len()),
                ),
                "the group exists and is online",
                format!("create it first (tandem group create --name {group} --log LOG --volume PATH), or name the planned volumes and log with --source-volume and --source-log"),
            );
            return (status.map(|s| SourceSide::of_group(api, &s)), verdict);
        }
        let name = "source volumes";
        let limit = "the planned volumes and log exist, and no group has them yet";
        if status.is_some() {
            let measured = format!("group {group} already exists on {node}");
            return (
                None,
                requirement(
                    name,
                    false,
                    measured,
                    limit,
                    "drop --source-volume and --source-log: the group's own counters measure it".to_owned(),
                ),
            );
        }
        let log = self.source_log.as_deref().expect("clap requires --source-log with --source-volume");
        match SourceSide::planned(group, &self.source_volumes, log) {
            Ok(side) => {
                let measured =
                    format!("{} planned volume(s), workload from {}", side.volume_sizes_bytes.len(), side.method);
                (Some(side), requirement(name, true, measured, limit, String::new()))
            }
            Err(reason) => (
                None,
                requirement(name, false, reason, limit, "name the volumes the application writes today".to_owned()),
            ),
        }
    }

    fn round_trip_requirement(&self, pings: &Result<Vec<u64>, String>, histogram: &mut Histogram<u64>) -> Requirement {
        let limit = if self.mode == "sync" {
            format!("at most {MAX_SYNC_ROUND_TRIP_MS} ms on average (sync mode)")
        } else {
            "none for async mode".to_owned()
        };
        match pings {
            Ok(round_trips_us) => {
                for &us in round_trips_us {
                    let _ = histogram.record(us);
                }
                let avg_ms = histogram.mean() / 1000.0;
                let passed = self.mode == "async" || avg_ms <= MAX_SYNC_ROUND_TRIP_MS;
                requirement(
                    "round trip",
                    passed,
                    format!(
                        "{avg_ms:.3} ms average, {:.3} ms p99 over {} round trips of {PING_PAYLOAD_BYTES} bytes",
                        histogram.value_at_quantile(0.99) as f64 / 1000.0,
                        histogram.len()
                    ),
                    &limit,
                    "use async mode for this distance, or a shorter, less loaded path".to_owned(),
                )
            }
            Err(reason) => {
                requirement("round trip", false, reason.clone(), &limit, "check the path to the destination".to_owned())
            }
        }
    }

    /// The measurement run: one sample a second for `duration`, then the
    /// bandwidth again, then the report.
    fn measure(
        &self,
        mut facts: Facts,
        mut requirements: Vec<Requirement>,
        mut round_trips_us: Histogram<u64>,
        first_bandwidth: Option<f64>,
        started: Instant,
    ) -> Result<TopologyReport, String> {
        let mut samples = Vec::new();
        if let (Some(source), Some((client, _))) = (facts.source.as_ref(), facts.destination.as_mut()) {
            let mut previous = source.read()?;
            let bar = indicatif::ProgressBar::new(self.duration.as_secs());
            bar.set_style(
                indicatif::ProgressStyle::with_template("measuring [{bar:30}] {pos}/{len} s {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            let run_started = Instant::now();
            let mut previous_at = Instant::now();
            for second in 0..self.duration.as_secs() {
                let pings = client.ping(10, PING_PAYLOAD_BYTES)?;
                let next_second = run_started + Duration::from_secs(second + 1);
                std::thread::sleep(next_second.saturating_duration_since(Instant::now()));
                let reading = source.read()?;
                let elapsed_s = previous_at.elapsed().as_secs_f64();
                previous_at = Instant::now();
                let log_writes = reading.log_writes.saturating_sub(previous.log_writes);
                for &us in &pings {
                    let _ = round_trips_us.record(us);
                }
                let sample = Sample {
                    second: second + 1,
                    write_bytes_per_s: reading.write_bytes.saturating_sub(previous.write_bytes) as f64 / elapsed_s,
                    log_write_latency_us: (log_writes > 0)
                        .then(|| (reading.log_latency_sum_us - previous.log_latency_sum_us) / log_writes as f64),
                    round_trip_us_avg: pings.iter().sum::<u64>() as f64 / pings.len().max(1) as f64,
                };
                bar.set_position(second + 1);
                bar.set_message(format!(
                    "{}/s written, round trip {:.0} us",
                    format_size(sample.write_bytes_per_s as u64),
                    sample.round_trip_us_avg
                ));
                samples.push(sample);
                previous = reading;
            }
            bar.finish_and_clear();
        }
        let last_bandwidth = facts
            .destination
            .as_mut()
            .and_then(|(client, _)| client.stream_rate(STREAM_FRAME_BYTES, 8, Duration::from_secs(2)).ok());
        let bandwidth = match (first_bandwidth, last_bandwidth) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let peak = samples.iter().map(|s| s.write_bytes_per_s).fold(0.0, f64::max);
        if !samples.is_empty() {
            let bandwidth_result = bandwidth.ok_or_else(|| "the bandwidth could not be measured".to_owned());
            // The measured peak replaces the short look taken during the checks.
            requirements.retain(|r| r.name != "bandwidth");
            requirements.push(bandwidth_requirement(&bandwidth_result, peak, "in its peak second"));
        }
        let (recommended_log_bytes, log_size_reasoning) = recommend_log_size(&samples, self.tolerated_outage);
        // Thin volumes grow during the run: count what they hold at its end.
        let initial_sync_bytes = facts.source.as_ref().map_or(0, |source| {
            let volumes: Vec<PathBuf> = source.devices.volumes.iter().map(|v| PathBuf::from(&v.path)).collect();
            let log = Path::new(&source.devices.log.path);
            group_devices(log, &volumes, false).volumes.iter().map(|v| v.allocated_bytes).sum()
        });
        Ok(TopologyReport {
            source: self.source.clone(),
            destination: self.destination.clone(),
            mode: self.mode.clone(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(started.elapsed().as_secs()),
            requirements,
            workload_method: facts.source.as_ref().map_or_else(String::new, |s| s.method.clone()),
            source_devices: facts.source.as_ref().map(|s| s.devices.clone()),
            destination_devices: facts.destination.as_ref().map(|(_, g)| g.devices.clone()),
            round_trip_us_buckets: round_trip_buckets(&round_trips_us),
            round_trip_us_p50: round_trips_us.value_at_quantile(0.5),
            round_trip_us_p99: round_trips_us.value_at_quantile(0.99),
            samples,
            bandwidth_bytes_per_s: bandwidth,
            peak_write_bytes_per_s: peak,
            tolerated_outage_s: self.tolerated_outage.as_secs(),
            recommended_log_bytes,
            log_size_reasoning,
            current_log_bytes: facts.source.as_ref().map_or(0, |s| s.log_size_bytes),
            initial_sync_bytes,
            initial_sync_estimate_s: bandwidth.filter(|b| *b > 0.0).map(|b| initial_sync_bytes as f64 / b),
            elapsed_s: started.elapsed().as_secs_f64(),
        })
    }
}

fn summary(failed: usize, total: usize) -> Result<(), String> {
    if failed == 0 {
        println!("all {total} requirements met");
        Ok(())
    } else {
        Err(format!("{failed} of {total} requirements failed (see above)"))
    }
}

/// The log must hold what the source writes while the destination is away:
/// the busiest window of the run (as long as the tolerated outage, or the
/// whole run when shorter) at its average rate, times the tolerated outage.
#[must_use]
pub fn recommend_log_size(samples: &[Sample], outage: Duration) -> (u64, String) {
    let outage_s = outage.as_secs().max(1);
    let window = (outage_s as usize).min(samples.len()).max(1);
    let rates: Vec<f64> = samples.iter().map(|s| s.write_bytes_per_s).collect();
    let busiest = rates.windows(window).map(|w| w.iter().sum::<f64>() / window as f64).fold(0.0, f64::max);
    let needed = (busiest * outage_s as f64) as u64;
    let rounded = if needed <= MIN_LOG_BYTES { MIN_LOG_BYTES } else { needed.div_ceil(1 << 30) * (1 << 30) };
    let reasoning = format!(
        "busiest {window}-second window wrote {}/s on average × tolerated outage {outage_s} s = {}, rounded up to {} (minimum 128 MiB)",
        format_size(busiest as u64),
        format_size(needed),
        format_size(rounded)
    );
    (rounded, reasoning)
}

fn round_trip_buckets(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    histogram.iter_log(10, 2.0).map(|v| (v.value_iterated_to(), v.count_since_last_iteration())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(second: u64, mib: f64) -> Sample {
        Sample {
            second,
            write_bytes_per_s: mib * f64::from(1 << 20),
            log_write_latency_us: None,
            round_trip_us_avg: 100.0,
        }
    }

    #[test]
    fn the_log_size_follows_the_busiest_window_and_rounds_up() {
        let samples: Vec<Sample> = (0..10).map(|s| sample(s, if s == 4 { 100.0 } else { 1.0 })).collect();
        let (one_second, reasoning) = recommend_log_size(&samples, Duration::from_secs(1));
        assert_eq!(one_second, MIN_LOG_BYTES, "100 MiB in the busiest second fits the minimum log");
        assert!(reasoning.contains("busiest 1-second window"), "{reasoning}");
        let (ten_minutes, _) = recommend_log_size(&samples, Duration::from_secs(600));
        // The whole run (10 s) averages 10.9 MiB/s; 600 s of it is 6.4 GiB, rounded to 7 GiB.
        assert_eq!(ten_minutes, 7 << 30);
        assert_eq!(recommend_log_size(&[], Duration::from_secs(60)).0, MIN_LOG_BYTES);
    }

    #[test]
    fn targets_split_at_the_last_slash() {
        assert_eq!(split_target("10.0.0.2:5445/rg02", "destination").unwrap(), ("10.0.0.2:5445".into(), "rg02".into()));
        assert!(split_target("rg02", "source").unwrap_err().contains("NODE/GROUP"));
    }
}
