//! The write path of one group as a sans-IO state machine.
//!
//! A submitted write gets an LSN and a place in the log ring, joins a batch
//! (group commit: everything submitted while earlier appends are in flight goes
//! out in one O_DIRECT write), and is applied to its volume in parallel. It is
//! completed once its record is durable (the contiguous durable prefix of the
//! log covers its LSN) and its volume write has finished. A checkpoint makes the
//! volumes durable up to a settled LSN and lets the ring reclaim the space.
//!
//! Invariants asserted here: LSNs are assigned in submission order and become
//! durable as a contiguous prefix; overlapping volume writes are applied in LSN
//! order; no write is completed before its record is durable; the ring never
//! overwrites bytes that are not reclaimed by a checkpoint.

use std::collections::VecDeque;

use tandem_proto::{RecordHeader, RecordKind, RecordStamp, FLAG_NO_HOLE};

use super::recovery::ScannedRecord;
use super::retention::Retention;
use super::ring::LogRing;

#[path = "group_events.rs"]
mod events;
pub use events::*;

#[derive(Debug)]
struct PlacedRecord {
    lsn: u64,
    end_position: u64,
    write_id: WriteId,
    applied: bool,
    completed: bool,
}

#[derive(Debug)]
struct BatchState {
    batch_id: u64,
    last_lsn: u64,
    done: bool,
}

/// The state machine of one group's write path.
#[derive(Debug)]
pub struct GroupCore {
    config: GroupConfig,
    stamp: RecordStamp,
    ring: LogRing,
    next_lsn: u64,
    next_batch_id: u64,
    /// Submitted writes waiting for a place, each with the highest LSN
    /// completed when it was submitted (what it may depend on).
    pending: VecDeque<(WriteRequest, u64)>,
    /// The highest LSN completed so far.
    max_completed_lsn: u64,
    placed: VecDeque<PlacedRecord>,
    batches: VecDeque<BatchState>,
    durable_lsn: u64,
    apply_queue: VecDeque<ApplyOp>,
    apply_inflight: Vec<ApplyOp>,
    /// Payload bytes of queued and in-flight volume writes: while small, a
    /// durable write completes before its volume write (reads of its range
    /// wait instead; see `unapplied_overlaps`).
    unapplied_write_bytes: u64,
    settled_lsn: u64,
    settled_end_position: u64,
    /// Where the next record (or pad) is placed; asserts back-to-back placement.
    placed_head: u64,
    checkpoint_lsn: u64,
    checkpoint_in_flight: bool,
    checkpoint_requested: bool,
    last_checkpoint_ms: u64,
    now_ms: u64,
    waiting_for_space: bool,
    log_full_stalls: u64,
    failed: Option<String>,
    writes_completed: u64,
    checkpoints: u64,
    /// Records kept for a replication peer; `None` without a peer.
    retention: Option<Retention>,
    /// The source side of a partnership; `None` without one.
    shipper: Option<peer::Shipper>,
    /// The volumes changed outside the log since the last checkpoint began.
    unlogged_changes: bool,
    /// Volume writes wait until their record is durable (groups in a
    /// partnership; see `set_apply_after_durable`).
    apply_after_durable: bool,
    /// A source's dirty-region bitmap, when its log has room for one.
    bitmap: Option<super::bitmap::DirtyBitmap>,
    bitmap_write_in_flight: bool,
    bitmap_write_again: bool,
    spill_in_flight: bool,
    spill_cancelled: bool,
    spills: u64,
    actions: Vec<Action>,
}

impl GroupCore {
    /// The write-path tunables in force.
    #[must_use]
    pub fn config(&self) -> GroupConfig {
        self.config
    }

    /// Changes the group-commit limits while running (`tandem tune`): the
    /// next batch formed uses them; batches in flight are not touched.
    pub fn set_batching(&mut self, max_batch_records: usize, max_inflight_appends: usize) {
        assert!((2..=1024).contains(&max_batch_records), "a batch holds 2 to 1024 records (IOV_MAX)");
        assert!(max_inflight_appends >= 1, "at least one append is in flight");
        self.config.max_batch_records = max_batch_records;
        self.config.max_inflight_appends = max_inflight_appends;
    }

    /// A group whose log is empty after `checkpoint_lsn`, with its next record at
    /// `tail_position` (the state right after recovery and its checkpoint).
    #[must_use]
    pub fn new(config: GroupConfig, stamp: RecordStamp, ring: LogRing, checkpoint_lsn: u64) -> Self {
        assert_eq!(ring.head(), ring.tail(), "a group starts with a checkpointed, empty log");
        Self::with_retention(config, stamp, ring, checkpoint_lsn, None)
    }

    /// A group after recovery whose log still holds, between the ring's tail
    /// and head, the records `retention` keeps for a replication peer; every
    /// record up to `checkpoint_lsn` (the last one in the log) is in the volumes.
    #[must_use]
    pub fn with_retention(
        config: GroupConfig,
        stamp: RecordStamp,
        ring: LogRing,
        checkpoint_lsn: u64,
        retention: Option<Retention>,
    ) -> Self {
        let head = ring.head();
        if let Some(first) = retention.as_ref().and_then(|r| r.records().next()) {
            assert_eq!(first.position, ring.tail(), "the tail is the first retained record");
        }
        Self {
            config,
            stamp,
            ring,
            next_lsn: checkpoint_lsn + 1,
            next_batch_id: 1,
            pending: VecDeque::new(),
            max_completed_lsn: checkpoint_lsn,
            placed: VecDeque::new(),
            batches: VecDeque::new(),
            durable_lsn: checkpoint_lsn,
            apply_queue: VecDeque::new(),
            apply_inflight: Vec::new(),
            unapplied_write_bytes: 0,
            settled_lsn: checkpoint_lsn,
            settled_end_position: head,
            placed_head: head,
            checkpoint_lsn,
            checkpoint_in_flight: false,
            checkpoint_requested: false,
            last_checkpoint_ms: 0,
            now_ms: 0,
            waiting_for_space: false,
            log_full_stalls: 0,
            failed: None,
            writes_completed: 0,
            checkpoints: 0,
            retention,
            shipper: None,
            unlogged_changes: false,
            apply_after_durable: false,
            bitmap: None,
            bitmap_write_in_flight: false,
            bitmap_write_again: false,
            spill_in_flight: false,
            spill_cancelled: false,
            spills: 0,
            actions: Vec::new(),
        }
    }

    /// Continues this (empty, fully checkpointed) log at LSN `lsn + 1`: a
    /// destination takes over its source's LSN sequence when a partnership
    /// starts. The caller persists the new checkpoint LSN.
    pub fn rebase(&mut self, lsn: u64, epoch: u32) {
        assert!(self.is_fully_checkpointed(), "only an idle, checkpointed log is rebased");
        assert_eq!(self.ring.head(), self.ring.tail(), "only an empty log is rebased");
        assert!(self.retention.is_none(), "a source is never rebased");
        self.next_lsn = lsn + 1;
        self.durable_lsn = lsn;
        self.settled_lsn = lsn;
        self.checkpoint_lsn = lsn;
        self.stamp.epoch = epoch;
    }

    /// The last LSN this log has taken: placed, or submitted and waiting for
    /// a place (a destination continues its stream after it).
    #[must_use]
    pub fn last_taken_lsn(&self) -> u64 {
        self.next_lsn - 1 + self.pending.len() as u64
    }

    /// Volume writes of a group in a partnership are issued only once their
    /// record is durable in the log. A crash can then leave no trace in the
    /// volumes of a write its log lost: on a source such a trace would be a
    /// difference the destination never receives; on a destination it would
    /// be a later write present without an earlier one (write order broken).
    /// Sync writes lose no latency to it: the volume write runs while the
    /// record travels to the destination.
    pub fn set_apply_after_durable(&mut self, enabled: bool) {
        self.apply_after_durable = enabled;
    }

    /// Where the next record will be placed.
    #[must_use]
    pub fn head_position(&self) -> u64 {
        self.ring.head()
    }

    /// Records kept for the replication peer, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &ScannedRecord> {
        self.retention.iter().flat_map(Retention::records)
    }

    /// Feeds one event. Call [`GroupCore::take_actions`] after one or more events;
    /// feeding several submissions before taking actions is what forms batches.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Submit(request) => self.submit(request, self.max_completed_lsn),
            Event::SubmitReplicated { request, lsn, depends_on } => {
                let expected = self.last_taken_lsn() + 1;
                assert_eq!(lsn, expected, "replicated records arrive in LSN order");
                assert!(self.shipper.is_none(), "a source does not take replicated records");
                assert!(depends_on < lsn, "record {lsn} depends on a later record {depends_on}");
                self.submit(request, depends_on);
            }
            Event::VolumesChangedOutsideLog => self.unlogged_changes = true,
            Event::AppendDone { batch_id, result } => self.append_done(batch_id, result),
            Event::ApplyDone { lsn, result } => self.apply_done(lsn, result),
            Event::CheckpointDone { lsn, tail_position, result } => self.checkpoint_done(lsn, tail_position, result),
            Event::Tick { now_ms } => self.now_ms = self.now_ms.max(now_ms),
            Event::PeerDurable { lsn } => {
                assert!(lsn < self.next_lsn, "the peer acknowledged LSN {lsn}, which was never placed");
                self.retention.as_mut().expect("acknowledgement without a peer").peer_durable(lsn);
            }
            Event::CheckpointRequested => self.checkpoint_requested = true,
        }
    }

    /// Runs the machine to quiescence and returns the actions to execute.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.fail_pending_if_failed();
        self.form_batches();
        self.issue_applies();
        self.complete_and_settle();
        self.ship();
        self.maybe_spill();
        self.maybe_checkpoint();
        std::mem::take(&mut self.actions)
    }

    /// True when nothing is in flight or waiting (safe to close the group).
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.placed.is_empty() && self.batches.is_empty() && !self.checkpoint_in_flight
    }

    /// True while a placed record is not yet applied to its volume.
    #[must_use]
    pub fn has_unapplied(&self) -> bool {
        self.placed.iter().any(|r| !r.applied)
    }

    /// True when every settled record is also checkpointed.
    #[must_use]
    pub fn is_fully_checkpointed(&self) -> bool {
        self.is_idle() && self.checkpoint_lsn == self.settled_lsn
    }

    /// Why the group failed, if it did.
    #[must_use]
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Counters for status.
    #[must_use]
    pub fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot {
            current_lsn: self.next_lsn - 1,
            durable_lsn: self.durable_lsn,
            checkpoint_lsn: self.checkpoint_lsn,
            log_used_bytes: self.ring.used_bytes(),
            log_free_bytes: self.ring.free_bytes(),
            writes_completed: self.writes_completed,
            writes_waiting_for_space: if self.waiting_for_space { self.pending.len() as u64 } else { 0 },
            checkpoints: self.checkpoints,
            log_full_stalls: self.log_full_stalls,
        }
    }

    fn submit(&mut self, request: WriteRequest, depends_on: u64) {
        if self.failed.is_some() {
            self.pending.push_back((request, depends_on));
            return;
        }
        let record_bytes = self.ring.record_bytes(payload_bytes(&request));
        if record_bytes > self.ring.max_record_bytes() {
            let max_record_bytes = self.ring.max_record_bytes();
            let result = Err(WriteError::TooLarge { record_bytes, max_record_bytes });
            self.actions.push(Action::Complete { id: request.id, result });
            return;
        }
        self.pending.push_back((request, depends_on));
    }

    fn form_batches(&mut self) {
        let was_waiting = self.waiting_for_space;
        self.waiting_for_space = false;
        while self.failed.is_none() && !self.pending.is_empty() && self.batches.len() < self.config.max_inflight_appends
        {
            match self.form_one_batch() {
                Some(batch) => self.actions.push(Action::Append(batch)),
                None => {
                    self.waiting_for_space = true;
                    if !was_waiting {
                        self.log_full_stalls += 1;
                    }
                    break;
                }
            }
        }
    }

    /// Places as many pending writes as fit into one batch; `None` when not even
    /// the first fits in the ring (backpressure until the next checkpoint).
    fn form_one_batch(&mut self) -> Option<AppendBatch> {
        let batch_id = self.next_batch_id;
        let mut segments: Vec<AppendSegment> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut records = 0usize;
        while let Some((request, depends_on)) = self.pending.front().copied() {
            let bytes = self.ring.record_bytes(payload_bytes(&request));
            if records > 0
                && (batch_bytes + bytes > self.config.max_batch_bytes || records + 2 > self.config.max_batch_records)
            {
                break;
            }
            let Some(placement) = self.ring.try_place(bytes) else { break };
            self.pending.pop_front();
            if placement.pad_bytes > 0 {
                let pad_position = placement.position - placement.pad_bytes;
                let header = self.pad_header(placement.pad_bytes);
                let pad = LogRecord { header, write_id: None };
                self.place(&mut segments, pad_position, placement.pad_bytes, pad, 0);
                records += 1;
            }
            let (header, apply) = self.record_for(&request, depends_on);
            let record = LogRecord { header, write_id: Some(request.id) };
            self.place(&mut segments, placement.position, bytes, record, depends_on);
            if apply.kind == ApplyKind::Write {
                self.unapplied_write_bytes += u64::from(apply.length);
            }
            self.apply_queue.push_back(apply);
            batch_bytes += bytes + placement.pad_bytes;
            records += 1;
        }
        if segments.is_empty() {
            return None;
        }
        self.next_batch_id += 1;
        self.batches.push_back(BatchState { batch_id, last_lsn: self.next_lsn - 1, done: false });
        Some(AppendBatch { batch_id, segments })
    }

    /// A pad carries the LSN of the record that follows it and does not consume
    /// it: LSNs number the records of the stream, while pads depend on where
    /// each log wraps (a destination places its own pads).
    fn pad_header(&mut self, pad_bytes: u64) -> RecordHeader {
        let lsn = self.next_lsn;
        let length = u32::try_from(pad_bytes).expect("a pad is shorter than the largest record");
        RecordHeader::without_payload(self.stamp, RecordKind::Pad, 0, lsn, 0, 0, length)
    }

    fn record_for(&mut self, request: &WriteRequest, depends_on: u64) -> (RecordHeader, ApplyOp) {
        let lsn = self.take_lsn();
        let (header, kind) = match request.op {
            WriteOp::Write { payload_checksum } => (
                RecordHeader::seal_with(
                    self.stamp,
                    RecordKind::Write,
                    0,
                    lsn,
                    request.volume_index,
                    request.offset,
                    request.length,
                    payload_checksum,
                ),
                ApplyKind::Write,
            ),
            WriteOp::Trim => (self.range_header(RecordKind::Trim, 0, lsn, request), ApplyKind::Trim),
            WriteOp::Snapshot { payload_checksum } => (
                RecordHeader::seal_with(
                    self.stamp,
                    RecordKind::Snapshot,
                    0,
                    lsn,
                    0,
                    0,
                    request.length,
                    payload_checksum,
                ),
                ApplyKind::Snapshot,
            ),
            WriteOp::WriteZeroes { no_hole } => {
                let flags = if no_hole { FLAG_NO_HOLE } else { 0 };
                (self.range_header(RecordKind::WriteZeroes, flags, lsn, request), ApplyKind::WriteZeroes { no_hole })
            }
        };
        let apply = ApplyOp {
            lsn,
            write_id: request.id,
            volume_index: request.volume_index,
            offset: request.offset,
            length: header.changed_bytes(),
            kind,
            depends_on,
        };
        (header, apply)
    }

    fn range_header(&self, kind: RecordKind, flags: u8, lsn: u64, request: &WriteRequest) -> RecordHeader {
        RecordHeader::without_payload(
            self.stamp,
            kind,
            flags,
            lsn,
            request.volume_index,
            request.offset,
            request.length,
        )
    }

    fn take_lsn(&mut self) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        lsn
    }

    /// Appends a record (or pad) to the batch's segments; records are tracked
    /// until they settle. A pad is always followed by its record in the same
    /// batch, so it needs no tracking of its own.
    fn place(
        &mut self,
        segments: &mut Vec<AppendSegment>,
        position: u64,
        bytes: u64,
        record: LogRecord,
        depends_on: u64,
    ) {
        let ring_offset = self.ring.ring_offset(position);
        let lsn = record.header.lsn;
        assert_eq!(self.placed_head, position, "records are placed back to back");
        self.placed_head = position + bytes;
        match record.write_id {
            None => assert_eq!(lsn, self.next_lsn, "a pad carries the LSN of the record after it"),
            Some(write_id) => {
                if let Some(previous) = self.placed.back() {
                    assert_eq!(previous.lsn + 1, lsn, "LSNs are placed in order without gaps");
                }
                let end_position = position + bytes;
                self.placed.push_back(PlacedRecord { lsn, end_position, write_id, applied: false, completed: false });
                if let Some(retention) = self.retention.as_mut() {
                    let header = &record.header;
                    retention.placed(ScannedRecord {
                        lsn,
                        position,
                        end_position,
                        volume_index: header.volume_index,
                        offset: header.offset,
                        length: header.changed_bytes(),
                        depends_on,
                    });
                }
            }
        }
        match segments.last_mut() {
            Some(segment) if segment.ring_offset + segment.bytes == ring_offset => {
                segment.bytes += bytes;
                segment.records.push(record);
            }
            _ => segments.push(AppendSegment { ring_offset, bytes, records: vec![record] }),
        }
    }

    fn append_done(&mut self, batch_id: u64, result: Result<(), IoFailure>) {
        if let Err(failure) = result {
            self.fail(format!("log append failed: {}", errno_text(failure.errno)));
        }
        let batch = self.batches.iter_mut().find(|b| b.batch_id == batch_id).expect("append done for an unknown batch");
        assert!(!batch.done, "batch {batch_id} reported done twice");
        batch.done = true;
        // Only a contiguous prefix of batches is durable: a later batch that
        // completed first sits behind an earlier one that may yet be torn.
        while self.batches.front().is_some_and(|b| b.done) {
            let batch = self.batches.pop_front().expect("checked above");
            if self.failed.is_none() {
                assert!(batch.last_lsn > self.durable_lsn, "durable LSN only moves forward");
                self.durable_lsn = batch.last_lsn;
            }
        }
    }

    fn apply_done(&mut self, lsn: u64, result: Result<(), IoFailure>) {
        if let Err(failure) = result {
            self.fail(format!("volume write of LSN {lsn} failed: {}", errno_text(failure.errno)));
        }
        let index = self.apply_inflight.iter().position(|a| a.lsn == lsn).expect("apply done for an unknown LSN");
        let apply = self.apply_inflight.swap_remove(index);
        self.forget_unapplied(&apply);
        let index = self.placed.binary_search_by_key(&lsn, |r| r.lsn).expect("an applied record is still placed");
        self.placed[index].applied = true;
    }

    fn issue_applies(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let dependency_order = self.apply_after_durable && self.shipper.is_none();
        let applied_prefix = self.applied_prefix_lsn();
        if self.apply_inflight.iter().any(|a| a.kind == ApplyKind::Snapshot) {
            return;
        }
        let mut index = 0;
        while index < self.apply_queue.len() {
            let candidate = self.apply_queue[index];
            if candidate.kind == ApplyKind::Snapshot {
                let ready = index == 0 && self.apply_inflight.is_empty() && candidate.lsn <= self.durable_lsn;
                if ready {
                    assert_eq!(applied_prefix, candidate.lsn - 1, "a snapshot follows every record before it");
                    self.apply_queue.remove(index);
                    self.apply_inflight.push(candidate);
                    self.actions.push(Action::Apply(candidate));
                }
                // Nothing after a snapshot is applied before it.
                break;
            }
            let blocked = self.fence().is_some_and(|f| f.holds(&candidate))
                || self.apply_inflight.iter().any(|a| a.overlaps(&candidate))
                || self.apply_queue.iter().take(index).any(|a| a.overlaps(&candidate));
            if self.apply_after_durable && candidate.lsn > self.durable_lsn {
                // The queue is in LSN order: every later one waits too.
                break;
            }
            if dependency_order && candidate.depends_on > applied_prefix {
                // A destination keeps write order at every instant: a write
                // the source's client issued after others completed waits
                // until they are applied here (their dependencies are monotone).
                break;
            }
            if blocked {
                index += 1;
                continue;
            }
            self.apply_queue.remove(index);
            self.apply_inflight.push(candidate);
            self.actions.push(Action::Apply(candidate));
        }
    }

    fn forget_unapplied(&mut self, apply: &ApplyOp) {
        if apply.kind == ApplyKind::Write {
            self.unapplied_write_bytes -= u64::from(apply.length);
        }
    }

    /// Whether a volume change of a taken write overlapping this range is
    /// not yet in the volume: a read of the range must wait, since the write
    /// may already be answered (see `complete_and_settle`).
    #[must_use]
    pub fn unapplied_overlaps(&self, volume_index: u8, offset: u64, length: u32) -> bool {
        let range = ApplyOp { lsn: 0, write_id: 0, volume_index, offset, length, kind: ApplyKind::Trim, depends_on: 0 };
        self.apply_queue.iter().chain(&self.apply_inflight).any(|a| a.overlaps(&range))
    }

    /// Every record up to this LSN is applied to the volumes.
    #[must_use]
    pub fn applied_prefix_lsn(&self) -> u64 {
        match self.placed.iter().find(|r| !r.applied) {
            Some(first_unapplied) => first_unapplied.lsn - 1,
            None => self.placed.back().map_or(self.settled_lsn, |r| r.lsn),
        }
    }

    fn complete_and_settle(&mut self) {
        if self.failed.is_some() {
            self.fail_placed();
            return;
        }
        let limit_lsn = self.completion_limit_lsn();
        // A durable write is answered before its volume write while those in
        // the queue are few: the volume write is not on the write's latency
        // path (in a partnership it starts only after the log write). Reads
        // of an unapplied range wait for it, so every answered write is seen.
        // A large backlog answers writes only as they reach the volumes, so
        // memory held by payloads stays bounded.
        let answer_before_apply = self.unapplied_write_bytes <= MAX_ANSWERED_UNAPPLIED_BYTES;
        for record in self.placed.iter_mut() {
            if record.lsn > limit_lsn {
                break;
            }
            if (record.applied || answer_before_apply) && !record.completed {
                record.completed = true;
                self.max_completed_lsn = self.max_completed_lsn.max(record.lsn);
                self.writes_completed += 1;
                self.actions.push(Action::Complete { id: record.write_id, result: Ok(()) });
            }
        }
        while let Some(front) = self.placed.front() {
            if !(front.completed && front.applied && front.lsn <= self.durable_lsn) {
                break;
            }
            self.settled_lsn = front.lsn;
            self.settled_end_position = front.end_position;
            self.placed.pop_front();
        }
    }
}

fn payload_bytes(request: &WriteRequest) -> u32 {
    match request.op {
        WriteOp::Write { .. } | WriteOp::Snapshot { .. } => request.length,
        WriteOp::Trim | WriteOp::WriteZeroes { .. } => 0,
    }
}

/// "EIO (errno 5)": the kernel's name for an errno, for log lines and status.
#[must_use]
pub fn errno_text(errno: i32) -> String {
    format!("{} (errno {errno})", std::io::Error::from_raw_os_error(errno))
}

#[path = "group_bitmap.rs"]
mod bitmap_spill;
#[path = "group_checkpoint.rs"]
mod checkpoint;
#[path = "group_failure.rs"]
mod failure;
#[path = "group_peer.rs"]
pub mod peer;
#[path = "group_verify.rs"]
pub mod verify;

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
