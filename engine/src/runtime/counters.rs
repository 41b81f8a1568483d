//! Performance counters of a group, named after Storage Replica's: kept by
//! the group's core thread only (plain integers and hdrhistograms, nothing
//! shared on the write path) and summarised when status is read.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// An exponentially weighted average (weight 0.1 per sample) that starts at
/// its first sample.
#[must_use]
pub fn moving_average(average: f64, sample: f64) -> f64 {
    if average == 0.0 {
        sample
    } else {
        0.9 * average + 0.1 * sample
    }
}

/// Latency percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub avg_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    #[must_use]
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            avg_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.5),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// Counters of one volume (Storage Replica: "Application Write Requests",
/// "Avg. App Write Latency", "Avg. App Read Latency", ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeCounters {
    pub volume: String,
    pub application_write_requests: u64,
    pub application_write_bytes: u64,
    pub application_read_requests: u64,
    pub application_read_bytes: u64,
    pub application_write_latency: LatencySummary,
    pub application_read_latency: LatencySummary,
}

/// Counters of a group's log ("Avg. Requests per Log Write", "Flush Queue
/// Length", "Pending Flush I/O", "Number of times flush paused").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogCounters {
    pub log_writes: u64,
    pub records_logged: u64,
    pub requests_per_log_write_avg: f64,
    /// Writes taken and not yet durable in the log.
    pub flush_queue_length: u64,
    /// Log writes in flight.
    pub pending_flush_io: u64,
    /// Times writes had to wait because the log was full.
    pub times_flush_paused: u64,
    pub log_write_latency: LatencySummary,
}

/// A group's counters as reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupCountersReport {
    pub volumes: Vec<VolumeCounters>,
    pub log: LogCounters,
}

struct VolumeTally {
    writes: u64,
    write_bytes: u64,
    reads: u64,
    read_bytes: u64,
    write_latency_us: Histogram<u64>,
    read_latency_us: Histogram<u64>,
}

/// A latency histogram in microseconds: 1 us to 60 s, 3 significant digits.
#[must_use]
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The tallies a group's core keeps.
pub struct GroupCounters {
    volumes: Vec<VolumeTally>,
    log_writes: u64,
    records_logged: u64,
    log_write_latency_us: Histogram<u64>,
}

impl std::fmt::Debug for GroupCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupCounters({} volumes, {} log writes)", self.volumes.len(), self.log_writes)
    }
}

impl GroupCounters {
    #[must_use]
    pub fn new(volume_count: usize) -> Self {
        let volumes = (0..volume_count)
            .map(|_| VolumeTally {
                writes: 0,
                write_bytes: 0,
                reads: 0,
                read_bytes: 0,
                write_latency_us: latency_histogram(),
                read_latency_us: latency_histogram(),
            })
            .collect();
        Self { volumes, log_writes: 0, records_logged: 0, log_write_latency_us: latency_histogram() }
    }

    /// A client write (or trim or zeroing) of `bytes` answered after `latency_us`.
    pub fn write_answered(&mut self, volume_index: u8, bytes: u64, latency_us: u64) {
        let tally = &mut self.volumes[usize::from(volume_index)];
        tally.writes += 1;
        tally.write_bytes += bytes;
        let _ = tally.write_latency_us.record(latency_us.max(1));
    }

    /// A client read of `bytes` answered after `latency_us`.
    pub fn read_answered(&mut self, volume_index: u8, bytes: u64, latency_us: u64) {
        let tally = &mut self.volumes[usize::from(volume_index)];
        tally.reads += 1;
        tally.read_bytes += bytes;
        let _ = tally.read_latency_us.record(latency_us.max(1));
    }

    /// A log write of `records` records completed after `latency_us`.
    pub fn log_written(&mut self, records: u64, latency_us: u64) {
        self.log_writes += 1;
        self.records_logged += records;
        let _ = self.log_write_latency_us.record(latency_us.max(1));
    }

    /// Every volume's client write latencies in one histogram.
    #[must_use]
    pub fn write_latency_us(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        for tally in &self.volumes {
            all.add(&tally.write_latency_us).expect("same bounds");
        }
        all
    }

    #[must_use]
    pub fn reads(&self) -> (u64, u64) {
        self.volumes.iter().fold((0, 0), |(n, b), t| (n + t.reads, b + t.read_bytes))
    }

    /// The report; `names` are the volumes' names, the log gauges come from
    /// the caller (they are the core's and the runtime's state now).
    #[must_use]
    pub fn report(&self, names: &[String], log_now: LogCounters) -> GroupCountersReport {
        let volumes = self
            .volumes
            .iter()
            .zip(names)
            .map(|(tally, name)| VolumeCounters {
                volume: name.clone(),
                application_write_requests: tally.writes,
                application_write_bytes: tally.write_bytes,
                application_read_requests: tally.reads,
                application_read_bytes: tally.read_bytes,
                application_write_latency: LatencySummary::of(&tally.write_latency_us),
                application_read_latency: LatencySummary::of(&tally.read_latency_us),
            })
            .collect();
        let requests_per_log_write_avg =
            if self.log_writes == 0 { 0.0 } else { self.records_logged as f64 / self.log_writes as f64 };
        let log = LogCounters {
            log_writes: self.log_writes,
            records_logged: self.records_logged,
            requests_per_log_write_avg,
            log_write_latency: LatencySummary::of(&self.log_write_latency_us),
            ..log_now
        };
        GroupCountersReport { volumes, log }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_per_volume_and_for_the_log() {
        let mut counters = GroupCounters::new(2);
        for latency in [100, 200, 300] {
            counters.write_answered(1, 4096, latency);
        }
        counters.read_answered(0, 512, 50);
        counters.log_written(3, 150);
        counters.log_written(1, 250);
        let names = vec!["data".to_owned(), "logs".to_owned()];
        let report = counters.report(&names, LogCounters { pending_flush_io: 2, ..LogCounters::default() });
        assert_eq!(report.volumes[1].application_write_requests, 3);
        assert_eq!(report.volumes[1].application_write_bytes, 3 * 4096);
        assert_eq!(report.volumes[1].application_write_latency.p50_us, 200);
        assert_eq!(report.volumes[0].application_read_requests, 1);
        assert_eq!(report.volumes[0].application_write_requests, 0);
        assert_eq!(report.log.log_writes, 2);
        assert!((report.log.requests_per_log_write_avg - 2.0).abs() < f64::EPSILON);
        assert_eq!(report.log.pending_flush_io, 2, "gauges from the caller are kept");
        assert_eq!(counters.write_latency_us().len(), 3);
        assert_eq!(counters.reads(), (1, 512));
    }
}
