//! A group's status and performance counters, as the API reports them.

use super::*;

impl GroupRt {
    /// Numbers for `tandem status`.
    #[must_use]
    pub fn status(&self) -> GroupStatus {
        let snapshot = self.core.snapshot();
        let latency = &self.counters.write_latency_us();
        let (reads_completed, bytes_read) = self.counters.reads();
        let has_samples = !latency.is_empty();
        GroupStatus {
            name: self.name.clone(),
            state: if let Some(reason) = self.core.failure() {
                format!("Failed: {reason}")
            } else {
                "Online".to_owned()
            },
            current_lsn: snapshot.current_lsn,
            durable_lsn: snapshot.durable_lsn,
            checkpoint_lsn: snapshot.checkpoint_lsn,
            log_path: self.log_path.clone(),
            log_size_bytes: self.superblock.ring_size_bytes,
            log_used_bytes: snapshot.log_used_bytes,
            log_free_bytes: snapshot.log_free_bytes,
            log_sector_bytes: self.superblock.sector_size,
            log_direct_io: self.log.direct_io,
            max_batch_records: self.core.config().max_batch_records,
            max_inflight_appends: self.core.config().max_inflight_appends,
            volumes: self
                .superblock
                .volumes()
                .iter()
                .map(|v| VolumeStatus {
                    name: tandem_proto::read_fixed_str(&v.name).unwrap_or_default().to_owned(),
                    path: tandem_proto::read_fixed_str(&v.path).unwrap_or_default().to_owned(),
                    size_bytes: v.size_bytes,
                })
                .collect(),
            writes_completed: snapshot.writes_completed,
            writes_waiting_for_log_space: snapshot.writes_waiting_for_space,
            reads_completed,
            bytes_written: self.bytes_written,
            bytes_read,
            write_latency_us_avg: if has_samples { latency.mean() } else { 0.0 },
            write_latency_us_p99: if has_samples { latency.value_at_quantile(0.99) } else { 0 },
            write_latency_us_buckets: LATENCY_BUCKET_BOUNDS_US
                .iter()
                .map(|&bound| (bound, latency.count_between(0, bound)))
                .chain(std::iter::once((u64::MAX, latency.len())))
                .collect(),
            checkpoints: snapshot.checkpoints,
            connections: self.connections,
            core: 0,
            epoch: self.superblock.epoch,
            last_recovery: self.recovery.clone(),
            role: match self.superblock.role {
                tandem_proto::ROLE_SOURCE => "source",
                tandem_proto::ROLE_DESTINATION => "destination",
                _ => "standalone",
            }
            .to_owned(),
            partnership: self.partnership_status(),
            counters: self.counters_report(&snapshot),
            promoted_from: if self.superblock.promoted_from == [0; 16] {
                String::new()
            } else {
                self.superblock.promoted_from.iter().map(|b| format!("{b:02x}")).collect()
            },
            promoted_after_lsn: self.superblock.promoted_after_lsn,
            fenced_after_lsn: self.fenced_after_lsn(),
            generation: self.superblock.generation.iter().map(|b| format!("{b:02x}")).collect(),
            test_failover: self.test_failover.as_ref().map(crate::runtime::test_failover::CowSnapshot::status),
            snapshots: self.snapshots.list(),
        }
    }

    /// The group's volume names, in volume order.
    #[must_use]
    pub fn volume_names(&self) -> Vec<String> {
        self.superblock
            .volumes()
            .iter()
            .map(|v| tandem_proto::read_fixed_str(&v.name).unwrap_or_default().to_owned())
            .collect()
    }

    pub(super) fn counters_report(
        &self,
        snapshot: &crate::core::GroupSnapshot,
    ) -> crate::runtime::counters::GroupCountersReport {
        let names = self.volume_names();
        let log_now = crate::runtime::counters::LogCounters {
            flush_queue_length: (snapshot.current_lsn - snapshot.durable_lsn) + snapshot.writes_waiting_for_space,
            pending_flush_io: self.batches.len() as u64,
            times_flush_paused: snapshot.log_full_stalls,
            ..crate::runtime::counters::LogCounters::default()
        };
        self.counters.report(&names, log_now)
    }
}
