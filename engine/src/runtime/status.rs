//! Status of a group as reported to the CLI (`tandem status`).

use serde::{Deserialize, Serialize};

use super::log_store::RecoveryReport;

/// One volume of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
}

/// Everything `tandem status` shows about a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub state: String,
    pub current_lsn: u64,
    pub durable_lsn: u64,
    pub checkpoint_lsn: u64,
    pub log_path: String,
    /// Usable bytes of the log ring: the log minus its two 16 KiB superblock slots.
    pub log_size_bytes: u64,
    pub log_used_bytes: u64,
    pub log_free_bytes: u64,
    pub log_sector_bytes: u32,
    pub log_direct_io: bool,
    /// Group commit in force: most records per log write, log writes in flight.
    #[serde(default)]
    pub max_batch_records: usize,
    #[serde(default)]
    pub max_inflight_appends: usize,
    pub volumes: Vec<VolumeStatus>,
    pub writes_completed: u64,
    pub writes_waiting_for_log_space: u64,
    pub reads_completed: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub write_latency_us_avg: f64,
    pub write_latency_us_p99: u64,
    /// Cumulative write latency counts: (upper bound in us, writes at or
    /// below it), for histogram exposition; the count of all is `writes_completed`.
    pub write_latency_us_buckets: Vec<(u64, u64)>,
    pub checkpoints: u64,
    pub connections: usize,
    /// Index (into `node.cores`) of the core thread serving the group; the
    /// control plane fills it in.
    #[serde(default)]
    pub core: usize,
    pub epoch: u32,
    pub last_recovery: RecoveryReport,
    /// `standalone`, `source` or `destination`.
    pub role: String,
    pub partnership: Option<PartnershipStatus>,
    /// Performance counters (`tandem counters`).
    pub counters: super::counters::GroupCountersReport,
    /// After an unplanned promotion: the partnership (hex id) this group was
    /// the destination of, and the last LSN it held (empty: never promoted).
    #[serde(default)]
    pub promoted_from: String,
    #[serde(default)]
    pub promoted_after_lsn: u64,
    /// A source whose destination was promoted after this LSN: fenced off
    /// from clients until it fails back.
    #[serde(default)]
    pub fenced_after_lsn: Option<u64>,
    /// The group's current generation (hex): a promotion starts a new one.
    #[serde(default)]
    pub generation: String,
    /// A destination's test failover, when one runs.
    #[serde(default)]
    pub test_failover: Option<super::test_failover::TestFailoverStatus>,
    /// Consistent snapshots of the group, oldest first.
    #[serde(default)]
    pub snapshots: Vec<super::snapshots::SnapshotInfo>,
}

/// A group's partnership, as `tandem partnership show` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartnershipStatus {
    /// Hex of the 128-bit partnership id.
    pub id: String,
    pub mode: String,
    /// Data channels of the partnership, and how many are connected now.
    pub channels: u32,
    pub channels_connected: u32,
    /// The network constraint on this side (interface or address; empty: none).
    #[serde(default)]
    pub network: String,
    /// How the channels' frames are protected: aes-128-gcm, sign or none.
    #[serde(default)]
    pub encryption: String,
    /// The data channels' transport: tcp or rdma.
    #[serde(default)]
    pub transport: String,
    /// A source whose partnership is over RDMA but runs over TCP now
    /// (`replication.rdma_fallback = "tcp"`): why RDMA is away.
    #[serde(default)]
    pub transport_fallback: Option<String>,
    /// Frames that failed authentication (each reset its session).
    #[serde(default)]
    pub frames_rejected: u64,
    /// A fenced source: the ranges it holds beyond the promoted side (its
    /// records after the promotion LSN and its bitmap's regions), and how
    /// many of its records came after that LSN.
    #[serde(default)]
    pub diverged: Vec<super::failback::DivergedRange>,
    #[serde(default)]
    pub diverged_records: u64,
    /// A source that opened since its destination was last connected: the
    /// lowest LSN its log recovered to (see `GroupCore::peer_connected`).
    #[serde(default)]
    pub recovered_lsn: Option<u64>,
    /// Each connected channel as "LOCAL -> REMOTE".
    #[serde(default)]
    pub channel_addresses: Vec<String>,
    pub peer_node: String,
    pub peer_group: String,
    /// Source: `HOST:PORT` of the destination.
    pub peer_address: String,
    /// Source: `InitialBlockCopy`, `ContinuouslyReplicating`, `WaitingForDestination`,
    /// `Recovering`; destination: `Connected` or `WaitingForSource`.
    pub state: String,
    pub connected: bool,
    /// Last LSN of the source's log (this group's on a source).
    pub current_lsn: u64,
    /// Source: last LSN the destination made durable; destination: last LSN durable here.
    pub destination_durable_lsn: u64,
    /// Source: last LSN the destination applied to its volumes (they equal
    /// this side's up to it); destination: the same, here.
    pub destination_applied_lsn: u64,
    /// Log bytes the destination still lacks (source).
    pub bytes_behind: u64,
    /// Age of the oldest write the destination lacks, in milliseconds (source).
    pub rpo_ms: u64,
    /// Initial copy bytes the destination has not yet acknowledged (source).
    pub copy_remaining_bytes: u64,
    /// Initial copy bytes read and sent, and bytes skipped as holes (source).
    pub copy_bytes_sent: u64,
    pub copy_bytes_skipped: u64,
    /// Source: records shipped by reading them back from the log because
    /// memory no longer held them (the destination lagged or was away).
    pub records_read_back: u64,
    /// Destination: the initial copy is complete and durable.
    pub copy_complete: bool,
    /// Source: bytes of the volumes the dirty-region bitmap marks (copied by
    /// the next bitmap catch-up), and how often a full log folded records into it.
    pub bitmap_dirty_bytes: u64,
    pub bitmap_spills: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// RDMA: payload bytes the peer's adapter read straight from this
    /// node's buffers (RDMA READ, no copy), and bytes this node read so
    /// from the peer's; the rest of `bytes_sent` / `bytes_received` was
    /// copied through message buffers.
    #[serde(default)]
    pub zero_copy_bytes_sent: u64,
    #[serde(default)]
    pub zero_copy_bytes_received: u64,
    /// Source: average time from shipping a record to the destination's
    /// durable acknowledgement (network round trip plus its log write).
    pub ack_round_trip_us_avg: f64,
    /// Source: when the destination was last in sync, and last fell out of
    /// sync (Unix milliseconds; 0: never). Destination: the last LSN the
    /// source said it holds (`source_durable_lsn`).
    pub last_in_sync_unix_ms: u64,
    pub last_out_of_sync_unix_ms: u64,
    pub source_durable_lsn: u64,
    /// Why the connection last ended or was refused.
    pub last_error: Option<String>,
    /// Frames sent to and received from the peer.
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Average time from queueing frames to the kernel taking them, in us.
    pub send_latency_us_avg: f64,
    /// Source: records the destination lacks now, and their average over
    /// the last minute (sampled every 100 ms).
    pub log_queue_length: u64,
    pub log_queue_length_avg: f64,
    /// Source: records shipped while catching up (after a disconnection or
    /// restart) and while continuously replicating.
    pub recovery_records_shipped: u64,
    pub replication_records_shipped: u64,
    /// Source: how long the last catch-up took, in milliseconds.
    pub last_recovery_elapsed_ms: u64,
    /// The RPO above which an async source raises event 5001, in seconds.
    pub target_rpo_seconds: u64,
    /// Source: the compared initial copy (checksum aggregation).
    #[serde(default)]
    pub sync: SyncProgress,
    /// Destination: bytes read from its volumes to hash them for the source
    /// (holes are not read).
    #[serde(default)]
    pub compare_bytes_read: u64,
    /// Source: online verify (the pass running or the last one).
    #[serde(default)]
    pub verify: super::verify_source::VerifyStatus,
}

/// Progress of a compared initial copy, as Storage Replica's initial sync
/// reports it: compared, found equal, sent (and punched as holes), how fast
/// and how long until the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub bytes_compared: u64,
    pub bytes_equal: u64,
    /// Differing bytes sent as data.
    pub bytes_sent: u64,
    /// Differing bytes that are zeros here, sent as holes to punch.
    pub bytes_zeroed: u64,
    pub rate_bytes_per_s: f64,
    /// Seconds until the copy is done at that rate (none before a rate is known).
    pub eta_s: Option<f64>,
}
