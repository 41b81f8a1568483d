//! The vocabulary of a group's write path: the requests and events the
//! runtime feeds [`super::GroupCore`], the actions it gets back, the
//! configuration and the numbers for status.

use tandem_proto::{Checksum128, RecordHeader};

use super::peer;

/// Identifies a write for the runtime (which owns its buffer).
pub type WriteId = u64;

/// Payload bytes of volume writes still to do below which durable writes are
/// answered before their volume write (see `GroupCore::complete_and_settle`).
pub const MAX_ANSWERED_UNAPPLIED_BYTES: u64 = 64 << 20;

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    /// Data write; the checksum of the payload was computed when it arrived.
    Write { payload_checksum: Checksum128 },
    /// Discard the range (punch a hole).
    Trim,
    /// Zero the range; `no_hole` keeps it allocated.
    WriteZeroes { no_hole: bool },
    /// A consistent snapshot of every volume at this LSN; the payload (the
    /// snapshot's name, `length` bytes) was checksummed when it was made.
    Snapshot { payload_checksum: Checksum128 },
}

/// A write submitted by a front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRequest {
    pub id: WriteId,
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
    pub op: WriteOp,
}

/// An IO failure reported by the runtime (errno from the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFailure {
    pub errno: i32,
}

/// Input to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Submit(WriteRequest),
    /// A destination's write: the record `lsn` shipped by the source, which
    /// must be the next LSN of this log (the runtime delivers them in order).
    SubmitReplicated {
        request: WriteRequest,
        lsn: u64,
        /// Every record up to this LSN is applied before this one (see
        /// `ScannedRecord::depends_on`).
        depends_on: u64,
    },
    /// The runtime changed the volumes outside the log (the initial copy of a
    /// destination): a checkpoint must make that durable too.
    VolumesChangedOutsideLog,
    AppendDone {
        batch_id: u64,
        result: Result<(), IoFailure>,
    },
    ApplyDone {
        lsn: u64,
        result: Result<(), IoFailure>,
    },
    CheckpointDone {
        lsn: u64,
        tail_position: u64,
        result: Result<(), IoFailure>,
    },
    /// Time passes (milliseconds on the runtime's monotonic clock).
    Tick {
        now_ms: u64,
    },
    /// The replication peer made every record up to `lsn` durable in its log.
    PeerDurable {
        lsn: u64,
    },
    /// Checkpoint everything settled as soon as possible (shutdown, delete).
    CheckpointRequested,
}

/// One record of an append: the header sector, then (for writes) the payload of
/// the write `write_id`, padded to whole sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub header: RecordHeader,
    pub write_id: Option<WriteId>,
}

/// Records that are contiguous in the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendSegment {
    pub ring_offset: u64,
    pub bytes: u64,
    pub records: Vec<LogRecord>,
}

/// One group-commit write (one segment, or two when it wraps the ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendBatch {
    pub batch_id: u64,
    pub segments: Vec<AppendSegment>,
}

/// How the runtime changes the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Write,
    Trim,
    WriteZeroes {
        no_hole: bool,
    },
    /// Take the snapshot the record names. It is an apply barrier: it is
    /// issued once every record before it is applied (and durable here), and
    /// no record after it is issued until it is done, so the snapshot holds
    /// exactly the records before it. Its range is empty.
    Snapshot,
}

/// A volume change to execute (buffered; made durable by the next checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOp {
    pub lsn: u64,
    pub write_id: WriteId,
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
    pub kind: ApplyKind,
    /// Records up to this LSN are applied first (destinations; see `SubmitReplicated`).
    pub depends_on: u64,
}

impl ApplyOp {
    pub(super) fn overlaps(&self, other: &Self) -> bool {
        self.volume_index == other.volume_index
            && self.offset < other.offset + u64::from(other.length)
            && other.offset < self.offset + u64::from(self.length)
    }
}

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The group failed earlier (log or volume IO error) and accepts no writes.
    GroupFailed(String),
    /// The record is larger than the log can ever hold.
    TooLarge { record_bytes: u64, max_record_bytes: u64 },
}

/// Output of the state machine, executed by the runtime in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Append(AppendBatch),
    Apply(ApplyOp),
    Complete {
        id: WriteId,
        result: Result<(), WriteError>,
    },
    /// Send record `lsn` (at `position..end_position` in the log) to the
    /// replication destination, after every record shipped before it.
    /// `depends_on`: see `ScannedRecord::depends_on`.
    Ship {
        lsn: u64,
        position: u64,
        end_position: u64,
        depends_on: u64,
    },
    /// Read `length` bytes of the volume at `offset` (the state after
    /// `after_lsn`, held stable by a fence), queue them for the destination,
    /// and report `GroupCore::chunk_shipped`.
    ReadChunk {
        chunk_id: u64,
        volume_index: u8,
        offset: u64,
        length: u32,
        after_lsn: u64,
        /// Copy it, hash it for verify, or send it again as a repair.
        purpose: peer::FencePurpose,
    },
    /// Tell the destination (first on this connection) to continue after
    /// `lsn`: the records before it left the log for the bitmap.
    SendRebase {
        lsn: u64,
    },
    /// Write the bitmap (`GroupCore::bitmap_bytes`) to its area, then report
    /// `GroupCore::bitmap_persisted(spilled_up_to_lsn)`.
    PersistBitmap {
        spilled_up_to_lsn: Option<u64>,
    },
    /// Tell the destination the initial copy is complete.
    SendCopyDone {
        after_lsn: u64,
    },
    /// fdatasync every volume, then persist `checkpoint_lsn = lsn`,
    /// `tail_position` and `tail_lsn` in the superblock; report `CheckpointDone`.
    Checkpoint {
        lsn: u64,
        tail_position: u64,
        tail_lsn: u64,
    },
}

/// Tunables of the write path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// Largest group-commit write.
    pub max_batch_bytes: u64,
    /// Most records in one group-commit write (bounded by IOV_MAX of writev).
    pub max_batch_records: usize,
    /// Appends in flight at once; more writes wait and are batched.
    pub max_inflight_appends: usize,
    /// Checkpoint when this percentage of the ring is in use.
    pub checkpoint_used_percent: u64,
    /// Checkpoint at least this often while records are waiting for one.
    pub checkpoint_interval_ms: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            max_batch_bytes: 4 << 20,
            max_batch_records: 256,
            max_inflight_appends: 4,
            checkpoint_used_percent: 50,
            checkpoint_interval_ms: 5_000,
        }
    }
}

/// Numbers for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupSnapshot {
    pub current_lsn: u64,
    pub durable_lsn: u64,
    pub checkpoint_lsn: u64,
    pub log_used_bytes: u64,
    pub log_free_bytes: u64,
    pub writes_completed: u64,
    pub writes_waiting_for_space: u64,
    /// Times writes began to wait for log space (the log was full).
    pub log_full_stalls: u64,
    pub checkpoints: u64,
}
