//! Events the cores report to the control plane: partnership state changes,
//! the initial copy, RPO above target, recovery. Stable numbered ids are
//! documented in docs/events.md; never renumber one.

use serde::{Deserialize, Serialize};

/// What happened, with the numbers an operator needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    RecoveryReplayed {
        records: u64,
        bytes: u64,
        first_lsn: u64,
        last_lsn: u64,
        elapsed_ms: u64,
    },
    InitialCopyStarted {
        total_bytes: u64,
    },
    InitialCopyCompleted {
        bytes_sent: u64,
        bytes_skipped: u64,
        elapsed_ms: u64,
    },
    PeerLost {
        reason: String,
    },
    /// This source's destination was promoted after `after_lsn`: the group
    /// is fenced off from clients until it fails back.
    PeerPromoted {
        peer: String,
        after_lsn: u64,
        diverged_records: u64,
        diverged_bytes: u64,
        /// This group's generation and the promoted peer's (hex).
        generation: String,
        peer_generation: String,
    },
    /// A test failover of this destination started (its snapshot at `lsn`).
    TestFailoverStarted {
        lsn: u64,
    },
    /// The test failover stopped; what it wrote is discarded.
    TestFailoverStopped,
    /// A consistent snapshot was taken here at its record's LSN.
    SnapshotTaken {
        name: String,
        lsn: u64,
    },
    /// A snapshot was deleted; its blocks are freed.
    SnapshotDeleted {
        name: String,
        lsn: u64,
    },
    /// A snapshot could not be taken or can no longer keep its blocks.
    SnapshotFailed {
        name: String,
        lsn: u64,
        reason: String,
    },
    /// A planned switch: this group is now `now` (source or destination).
    PartnershipSwitched {
        peer: String,
        now: String,
    },
    /// A partnership over RDMA lost its RDMA path and replicates over TCP
    /// (`replication.rdma_fallback = "tcp"`).
    TransportFallback {
        reason: String,
    },
    /// The RDMA path is back: the partnership replicates over RDMA again.
    TransportRestored,
    /// A peer was refused before any group was named (TLS or policy).
    PeerRefused {
        peer: String,
        reason: String,
    },
    /// A received frame failed authentication; its session was reset.
    FrameRejected {
        peer: String,
        reason: String,
    },
    PeerConnected {
        peer_durable_lsn: u64,
        current_lsn: u64,
    },
    CatchUpCompleted {
        records: u64,
        elapsed_ms: u64,
    },
    BitmapSpill {
        dirty_bytes: u64,
    },
    ModeChanged {
        from: String,
        to: String,
        peer: String,
    },
    GroupPromoted {
        former_source: String,
        last_lsn: u64,
        records_missing: u64,
        /// Milliseconds since the source was last heard (0: unknown).
        #[serde(default)]
        source_silent_ms: u64,
    },
    BitmapCatchUpCompleted {
        elapsed_ms: u64,
    },
    /// At reconnection the destination held records after `recovered_lsn`
    /// that this source lost in a crash (shipped while their local append
    /// was in flight, so never acknowledged): their ranges (every region
    /// when the destination could not list them) are marked in the bitmap
    /// and copied from this source again.
    LostRecordsRecopied {
        recovered_lsn: u64,
        ranges: u64,
        bytes: u64,
        every_region: bool,
    },
    RpoExceeded {
        rpo_ms: u64,
        target_rpo_ms: u64,
        bytes_behind: u64,
    },
    RpoWithinTarget {
        rpo_ms: u64,
        target_rpo_ms: u64,
    },
    GroupFailed {
        reason: String,
    },
    GroupCreated {
        volumes: usize,
    },
    GroupDeleted,
    PartnershipCreated {
        peer: String,
        mode: String,
    },
    PartnershipRemoved {
        peer: String,
    },
    PartnershipRefused {
        reason: String,
    },
    DestinationAttached {
        source: String,
    },
    VerifyStarted {
        total_bytes: u64,
        repair: bool,
    },
    OutOfSync {
        volume_index: u8,
        volume: String,
        offset: u64,
        length: u32,
        repair: bool,
    },
    VerifyCompleted {
        bytes_verified: u64,
        out_of_sync_ranges: u64,
        out_of_sync_bytes: u64,
        repaired_bytes: u64,
        elapsed_ms: u64,
    },
    VerifyStopped {
        reason: String,
        bytes_verified: u64,
    },
}

impl EventKind {
    /// The stable id.
    #[must_use]
    pub fn id(&self) -> u32 {
        match self {
            Self::GroupCreated { .. } => 1001,
            Self::GroupDeleted => 1002,
            Self::RecoveryReplayed { .. } => 1003,
            Self::GroupFailed { .. } => 1009,
            Self::PartnershipCreated { .. } => 2001,
            Self::PartnershipRemoved { .. } => 2002,
            Self::PartnershipRefused { .. } => 2003,
            Self::DestinationAttached { .. } => 2004,
            Self::ModeChanged { .. } => 2005,
            Self::PartnershipSwitched { .. } => 2006,
            Self::TransportFallback { .. } => 2007,
            Self::TransportRestored => 2008,
            Self::GroupPromoted { .. } => 7001,
            Self::PeerPromoted { .. } => 7002,
            Self::TestFailoverStarted { .. } => 7003,
            Self::TestFailoverStopped => 7004,
            Self::SnapshotTaken { .. } => 7005,
            Self::SnapshotDeleted { .. } => 7006,
            Self::SnapshotFailed { .. } => 7007,
            Self::InitialCopyStarted { .. } => 3001,
            Self::InitialCopyCompleted { .. } => 3002,
            Self::PeerLost { .. } => 4001,
            Self::FrameRejected { .. } => 8001,
            Self::PeerRefused { .. } => 8002,
            Self::PeerConnected { .. } => 4002,
            Self::CatchUpCompleted { .. } => 4003,
            Self::BitmapSpill { .. } => 4004,
            Self::BitmapCatchUpCompleted { .. } => 4005,
            Self::LostRecordsRecopied { .. } => 4006,
            Self::RpoExceeded { .. } => 5001,
            Self::RpoWithinTarget { .. } => 5002,
            Self::VerifyStarted { .. } => 6001,
            Self::OutOfSync { .. } => 6002,
            Self::VerifyCompleted { .. } => 6003,
            Self::VerifyStopped { .. } => 6004,
        }
    }

    /// `info`, `warning` or `error`.
    #[must_use]
    pub fn severity(&self) -> &'static str {
        match self {
            Self::GroupFailed { .. } => "error",
            Self::PeerLost { .. }
            | Self::FrameRejected { .. }
            | Self::PeerRefused { .. }
            | Self::RpoExceeded { .. }
            | Self::PartnershipRefused { .. }
            | Self::BitmapSpill { .. }
            | Self::LostRecordsRecopied { .. }
            | Self::OutOfSync { .. }
            | Self::GroupPromoted { .. }
            | Self::PeerPromoted { .. }
            | Self::SnapshotFailed { .. }
            | Self::TransportFallback { .. }
            | Self::VerifyStopped { .. } => "warning",
            Self::VerifyCompleted { out_of_sync_ranges, repaired_bytes, out_of_sync_bytes, .. }
                if *out_of_sync_ranges > 0 && repaired_bytes < out_of_sync_bytes =>
            {
                "warning"
            }
            _ => "info",
        }
    }

    /// One line for people.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::RecoveryReplayed { records, bytes, first_lsn, last_lsn, elapsed_ms } => format!(
                "recovery replayed {records} records ({bytes} bytes, LSN {first_lsn}..{last_lsn}) in {elapsed_ms} ms"
            ),
            Self::InitialCopyStarted { total_bytes } => format!("initial block copy started ({total_bytes} bytes)"),
            Self::InitialCopyCompleted { bytes_sent, bytes_skipped, elapsed_ms } => format!(
                "initial block copy completed in {elapsed_ms} ms: {bytes_sent} bytes sent, {bytes_skipped} bytes of holes skipped"
            ),
            Self::PeerLost { reason } => format!("replication peer lost: {reason}"),
            Self::PeerPromoted { peer, after_lsn, diverged_records, diverged_bytes, generation, peer_generation } => {
                let split = if *diverged_records > 0 || *diverged_bytes > 0 { "split brain: " } else { "" };
                format!(
                    "{split}{peer} was promoted after LSN {after_lsn} (its generation {peer_generation}, this group's {generation}): this group takes no client I/O and nothing moves; it holds {diverged_records} record(s) beyond that ({diverged_bytes} bytes of ranges, see `tandem partnership show`); `tandem partnership resolve --keep NODE/GROUP` chooses the side that survives"
                )
            }
            Self::TestFailoverStarted { lsn } => format!(
                "test failover started at LSN {lsn}: GROUP@test exports are a writable snapshot; replication goes on"
            ),
            Self::TestFailoverStopped => "test failover stopped; its writes are discarded".to_owned(),
            Self::SnapshotTaken { name, lsn } => format!(
                "snapshot {name} taken at LSN {lsn}: it holds every write before that record, as its partner's does"
            ),
            Self::SnapshotDeleted { name, lsn } => format!("snapshot {name} (LSN {lsn}) deleted"),
            Self::SnapshotFailed { name, lsn, reason } => {
                format!("snapshot {name} (LSN {lsn}) is not usable: {reason}; replication goes on")
            }
            Self::PartnershipSwitched { peer, now } => {
                format!("planned switch: this group is now the {now} of the partnership with {peer}")
            }
            Self::TransportFallback { reason } => {
                format!("the RDMA path is gone ({reason}): replicating over TCP until it is back")
            }
            Self::TransportRestored => "the RDMA path is back: replicating over RDMA again".to_owned(),
            Self::PeerRefused { peer, reason } => format!("replication peer {peer} refused: {reason}"),
            Self::FrameRejected { peer, reason } => format!("replication channel from {peer} reset: {reason}"),
            Self::PeerConnected { peer_durable_lsn, current_lsn } => format!(
                "replication peer connected; it holds LSN {peer_durable_lsn}, this group is at LSN {current_lsn}"
            ),
            Self::CatchUpCompleted { records, elapsed_ms } => {
                format!("catch-up completed: {records} records in {elapsed_ms} ms")
            }
            Self::BitmapSpill { dirty_bytes } => format!(
                "the log filled while the destination was away: its records were folded into the dirty-region bitmap ({dirty_bytes} bytes to copy at reconnection)"
            ),
            Self::BitmapCatchUpCompleted { elapsed_ms } => {
                format!("bitmap catch-up completed in {elapsed_ms} ms: the destination holds every marked region")
            }
            Self::LostRecordsRecopied { recovered_lsn, ranges, bytes, every_region } => {
                let what = if *every_region {
                    "it could not list them, so every region is copied again".to_owned()
                } else {
                    format!("{ranges} range(s), {bytes} bytes, marked in the dirty-region bitmap and copied again")
                };
                format!(
                    "the destination held records after LSN {recovered_lsn} that this source lost in its crash (shipped while their local write was in flight, never acknowledged to a client): {what}"
                )
            }
            Self::RpoExceeded { rpo_ms, target_rpo_ms, bytes_behind } => format!(
                "RPO {rpo_ms} ms exceeds the target of {target_rpo_ms} ms ({bytes_behind} bytes behind)"
            ),
            Self::RpoWithinTarget { rpo_ms, target_rpo_ms } => {
                format!("RPO back within target: {rpo_ms} ms (target {target_rpo_ms} ms)")
            }
            Self::GroupFailed { reason } => format!("group failed: {reason}"),
            Self::GroupCreated { volumes } => format!("group created with {volumes} volume(s)"),
            Self::GroupDeleted => "group deleted".to_owned(),
            Self::PartnershipCreated { peer, mode } => format!("partnership created with {peer} ({mode})"),
            Self::PartnershipRemoved { peer } => format!("partnership with {peer} removed"),
            Self::PartnershipRefused { reason } => format!("partnership refused: {reason}"),
            Self::DestinationAttached { source } => format!("became the replication destination of {source}"),
            Self::GroupPromoted { former_source, last_lsn, records_missing, source_silent_ms } => format!(
                "promoted: no longer a destination of {former_source}, serving writes after LSN {last_lsn}; {records_missing} record(s) the source reported never arrived; last heard from it {source_silent_ms} ms before"
            ),
            Self::ModeChanged { from, to, peer } => format!("the partnership with {peer} changed from {from} to {to} mode"),
            Self::VerifyStarted { total_bytes, repair } => format!(
                "online verify started over {total_bytes} bytes{}",
                if *repair { ", repairing what differs" } else { "" }
            ),
            Self::OutOfSync { volume_index, volume, offset, length, repair } => format!(
                "volume {volume_index} ({volume}) differs from the destination at {offset}..{} ({length} bytes){}",
                offset + u64::from(*length),
                if *repair { "; sending it again" } else { "; run `tandem partnership verify --repair` to fix it" }
            ),
            Self::VerifyCompleted { bytes_verified, out_of_sync_ranges, out_of_sync_bytes, repaired_bytes, elapsed_ms } => {
                format!(
                    "online verify completed in {elapsed_ms} ms: {bytes_verified} bytes compared, {out_of_sync_ranges} range(s) out of sync ({out_of_sync_bytes} bytes), {repaired_bytes} bytes repaired"
                )
            }
            Self::VerifyStopped { reason, bytes_verified } => {
                format!("online verify stopped after {bytes_verified} bytes: {reason}")
            }
        }
    }
}

/// An event of a group, as a core reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineEvent {
    pub group: String,
    pub kind: EventKind,
}
