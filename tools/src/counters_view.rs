//! `tandem counters`: the performance counters of every group, volume and
//! partnership, named as Storage Replica names them, as text or JSON.

use std::fmt::Write as _;

use serde::Serialize;
use tandem_engine::runtime::counters::{LatencySummary, LogCounters, VolumeCounters};
use tandem_engine::runtime::status::GroupStatus;

/// The counters of one partnership, as `tandem counters --json` prints them.
#[derive(Debug, Serialize)]
pub struct PartnershipCounters {
    pub role: String,
    pub replication_state: String,
    pub target_rpo_seconds: Option<u64>,
    pub current_rpo_ms: u64,
    pub log_queue_length: u64,
    pub log_queue_length_avg: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub avg_network_send_latency_us: f64,
    pub avg_message_round_trip_us: f64,
    pub last_recovery_elapsed_ms: u64,
    pub recovery_transactions: u64,
    pub replication_transactions: u64,
    pub max_lsn: u64,
    pub destination_durable_lsn: u64,
}

/// The counters of one group.
#[derive(Debug, Serialize)]
pub struct GroupCounters<'a> {
    pub group: &'a str,
    pub volumes: &'a [VolumeCounters],
    pub log: &'a LogCounters,
    pub partnership: Option<PartnershipCounters>,
}

/// The counters of `groups`.
#[must_use]
pub fn collect(groups: &[GroupStatus]) -> Vec<GroupCounters<'_>> {
    groups
        .iter()
        .map(|g| GroupCounters {
            group: &g.name,
            volumes: &g.counters.volumes,
            log: &g.counters.log,
            partnership: g.partnership.as_ref().map(|p| PartnershipCounters {
                role: g.role.clone(),
                replication_state: p.state.clone(),
                target_rpo_seconds: Some(p.target_rpo_seconds).filter(|_| g.role == "source" && p.mode == "async"),
                current_rpo_ms: p.rpo_ms,
                log_queue_length: p.log_queue_length,
                log_queue_length_avg: p.log_queue_length_avg,
                bytes_sent: p.bytes_sent,
                bytes_received: p.bytes_received,
                messages_sent: p.messages_sent,
                messages_received: p.messages_received,
                avg_network_send_latency_us: p.send_latency_us_avg,
                avg_message_round_trip_us: p.ack_round_trip_us_avg,
                last_recovery_elapsed_ms: p.last_recovery_elapsed_ms,
                recovery_transactions: p.recovery_records_shipped,
                replication_transactions: p.replication_records_shipped,
                max_lsn: p.current_lsn,
                destination_durable_lsn: p.destination_durable_lsn,
            }),
        })
        .collect()
}

fn latency(summary: &LatencySummary) -> String {
    format!(
        "avg {:.0} us, p50 {} us, p99 {} us, p99.9 {} us",
        summary.avg_us, summary.p50_us, summary.p99_us, summary.p999_us
    )
}

/// The counters as text.
#[must_use]
pub fn render(counters: &[GroupCounters<'_>]) -> String {
    let mut out = String::new();
    for group in counters {
        let _ = writeln!(out, "group {}", group.group);
        for v in group.volumes {
            let _ = writeln!(out, "  volume {}", v.volume);
            let _ = writeln!(
                out,
                "    application write requests {:>12}   bytes {:>14}   latency {}",
                v.application_write_requests,
                v.application_write_bytes,
                latency(&v.application_write_latency)
            );
            let _ = writeln!(
                out,
                "    application read requests  {:>12}   bytes {:>14}   latency {}",
                v.application_read_requests,
                v.application_read_bytes,
                latency(&v.application_read_latency)
            );
        }
        let log = group.log;
        let _ = writeln!(
            out,
            "  log  writes {}, requests per log write {:.2}, flush queue length {}, pending flush I/O {}, times flush paused {}",
            log.log_writes,
            log.requests_per_log_write_avg,
            log.flush_queue_length,
            log.pending_flush_io,
            log.times_flush_paused
        );
        let _ = writeln!(out, "       log write latency {}", latency(&log.log_write_latency));
        if let Some(p) = &group.partnership {
            let _ = writeln!(out, "  partnership ({}) {}", p.role, p.replication_state);
            let target = p.target_rpo_seconds.map_or_else(|| "-".to_owned(), |s| format!("{s} s"));
            let _ = writeln!(
                out,
                "    RPO target {target}, current {} ms; log queue length {} (avg {:.1}); max LSN {}, destination durable {}",
                p.current_rpo_ms, p.log_queue_length, p.log_queue_length_avg, p.max_lsn, p.destination_durable_lsn
            );
            let _ = writeln!(
                out,
                "    sent {} bytes in {} messages, received {} bytes in {} messages; avg send latency {:.0} us, message round trip {:.0} us",
                p.bytes_sent,
                p.messages_sent,
                p.bytes_received,
                p.messages_received,
                p.avg_network_send_latency_us,
                p.avg_message_round_trip_us
            );
            let _ = writeln!(
                out,
                "    transactions: replication {}, recovery {}; last recovery took {} ms",
                p.replication_transactions, p.recovery_transactions, p.last_recovery_elapsed_ms
            );
        }
    }
    out
}
