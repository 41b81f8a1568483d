//! A group on its core: executes the actions of its [`GroupCore`] on io_uring
//! and feeds the completions back as events.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use io_uring::{opcode, types};
use tandem_proto::{RecordKind, Superblock, FLAG_NO_HOLE, RING_OFFSET_BYTES};

use super::buf::AlignedBuf;
use super::device::Device;
use super::io::{Io, Op};
use super::log_store::{fallocate_mode, sealed_slot, OpenGroup, RecoveryReport};
use super::session::BlockError;
use super::status::{GroupStatus, VolumeStatus};
use crate::core::{
    Action, AppendBatch, ApplyKind, ApplyOp, Event, GroupConfig, GroupCore, IoFailure, WriteError, WriteId,
};

/// Rounds of actions one pump carries out before the loop serves others.
const MAX_PUMP_ROUNDS: usize = 16;

/// A write waiting for completion: who to answer and the buffer holding the
/// record (header sector, then payload) for writes with data.
#[derive(Debug)]
pub struct PendingWrite {
    pub conn: usize,
    pub conn_id: u64,
    pub cookie: u64,
    pub buf: Option<Rc<AlignedBuf>>,
    /// Payload bytes the connection counted for this write.
    pub payload_bytes: usize,
    pub started: Instant,
    /// The volume written (for its counters).
    pub volume_index: u8,
}

/// Where the volume change of a taken write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeWrite {
    NotIssued,
    InFlight,
    Done,
}

/// A write the core has taken. Its entry (and buffer) lives until it is both
/// answered and in its volume: a durable write may be answered first, and
/// its volume write reads the buffer until it completes.
#[derive(Debug)]
pub struct TakenWrite {
    pub pending: PendingWrite,
    answered: bool,
    volume_write: VolumeWrite,
}

impl TakenWrite {
    fn new(pending: PendingWrite) -> Self {
        Self { pending, answered: false, volume_write: VolumeWrite::NotIssued }
    }

    /// Nothing will read the buffer any more once answered: the volume
    /// write is done, or it never starts (a failed group issues none).
    fn finished(&self, failed: bool) -> bool {
        self.answered
            && match self.volume_write {
                VolumeWrite::Done => true,
                VolumeWrite::NotIssued => failed,
                VolumeWrite::InFlight => false,
            }
    }
}

/// Upper bounds of the write latency histogram buckets reported in status
/// (and exposed to Prometheus), in microseconds; a last bucket holds all.
pub const LATENCY_BUCKET_BOUNDS_US: [u64; 14] =
    [25, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 1_000_000];

/// A finished write to be answered on its connection.
#[derive(Debug)]
pub struct Completion {
    pub conn: usize,
    pub conn_id: u64,
    pub cookie: u64,
    pub payload_bytes: usize,
    pub result: Result<(), BlockError>,
}

/// The O_DIRECT descriptor of `volume` when this write can use it: buffer,
/// offset and length aligned to the volume's sector. Overlapping volume writes
/// are issued one after the other in LSN order by the core, so mixing direct
/// and buffered writes keeps their order (a direct write first flushes and then
/// invalidates cached pages of its range).
fn direct_fd_for(volume: &Device, ptr: *const u8, offset: u64, length: u32) -> Option<types::Fd> {
    let buffer_aligned = (ptr as u64).is_multiple_of(u64::from(volume.sector_bytes));
    let file = volume.direct_file_for(offset, u64::from(length)).filter(|_| buffer_aligned)?;
    Some(types::Fd(file.as_raw_fd()))
}

#[derive(Debug)]
struct BatchIo {
    segments_left: usize,
    failure: Option<i32>,
    /// Records of writes in the batch (pads excluded), and when it was issued.
    records: u64,
    started: Instant,
}

#[derive(Debug)]
struct CheckpointIo {
    lsn: u64,
    tail_position: u64,
    tail_lsn: u64,
    fsyncs_left: usize,
    failure: Option<i32>,
    /// Partnership fields to persist with this checkpoint, and the version of
    /// the metadata they carry (for waiters).
    partnership: tandem_proto::PartnershipEntry,
    meta_version: u64,
}

/// One group owned by this core.
pub struct GroupRt {
    pub name: String,
    pub core: GroupCore,
    pub log: Device,
    pub volumes: Vec<Device>,
    pub superblock: Superblock,
    log_path: String,
    pub recovery: RecoveryReport,
    pub connections: usize,
    pub detaching: bool,
    sector_bytes: usize,
    next_write_id: WriteId,
    pub(super) writes: HashMap<WriteId, TakenWrite>,
    /// The source side of a partnership.
    pub source: Option<super::replica_source::SourceLink>,
    /// The destination side of a partnership.
    pub destination: Option<super::replica_dest::DestinationLink>,
    /// The replication connection must be closed (set by IO failures).
    pub close_peer: bool,
    pub copy_bytes_read: u64,
    pub copy_bytes_skipped: u64,
    /// When this process read the first chunk of the initial copy.
    pub copy_started_at: Option<Instant>,
    /// When the initial copy was seen complete: its rate is over the copy's
    /// own time, not over the time since.
    pub copy_finished_at: Option<Instant>,
    /// Progress of compared copies (source).
    pub compare_progress: crate::core::compare::CompareProgress,
    /// Online verify (source).
    pub verify: super::verify_source::VerifyState,
    /// Events raised by the runtime, reported at the next observation.
    pub pending_events: Vec<super::events::EventKind>,
    /// Frames of this group's sessions that failed authentication.
    pub frames_rejected: u64,
    /// Test failover: the snapshot in force, or one waiting for the
    /// volume writes in flight to finish (those after it wait meanwhile).
    pub test_failover: Option<super::test_failover::CowSnapshot>,
    pub test_failover_pending: Option<super::test_failover_rt::PendingTestFailover>,
    pub volume_writes_in_flight: usize,
    pub(super) held_volume_writes: Vec<super::test_failover_rt::HeldVolumeWrite>,
    /// Consistent snapshots: every volume write keeps its blocks in them first.
    pub snapshots: super::snapshots::SnapshotSet,
    /// Snapshot records written here, waiting to be taken.
    pub(super) snapshot_waiters: Vec<(WriteId, crossbeam_channel::Sender<Result<u64, String>>)>,
    /// Bumped whenever the superblock's role or partnership changes.
    meta_version: u64,
    pub(super) observer: super::group_events::Observer,
    persist_waiters: Vec<(u64, crossbeam_channel::Sender<Result<(), String>>)>,
    /// A source that opened since its destination was last connected: the
    /// durable LSN it announces stays at most the LSN it recovered to, until
    /// the superblock of this metadata version (which forgets that LSN) is
    /// durable. The destination lists its records after what it heard, so
    /// it can always name those after the recovered LSN (`core::unconfirmed`).
    announce_cap: Option<(u64, u64)>,
    batches: HashMap<u64, BatchIo>,
    checkpoint: Option<CheckpointIo>,
    pub counters: super::counters::GroupCounters,
    bytes_written: u64,
}

impl GroupRt {
    /// Takes over an opened, recovered group.
    #[must_use]
    pub fn new(open: OpenGroup, config: GroupConfig, peer_defaults: super::partner::PeerDefaults) -> Self {
        let sb = open.superblock;
        let stamp = tandem_proto::RecordStamp {
            group_id: sb.group_id,
            epoch: sb.epoch,
            generation_tag: u32::from_le_bytes(sb.generation[..4].try_into().expect("4 bytes")),
        };
        let ring = crate::core::LogRing::new(sb.ring_size_bytes, sb.sector_size, sb.tail_position, open.head_position);
        let retention = (sb.role == tandem_proto::ROLE_SOURCE)
            .then(|| crate::core::Retention::new(sb.tail_lsn - 1, open.retained.iter().copied()));
        let mut rt = Self {
            snapshots: open.snapshots,
            snapshot_waiters: Vec::new(),
            name: sb.group_name().to_owned(),
            core: GroupCore::with_retention(config, stamp, ring, sb.checkpoint_lsn, retention),
            log: open.log,
            volumes: open.volumes,
            superblock: sb,
            log_path: open.log_path.display().to_string(),
            recovery: open.recovery,
            connections: 0,
            detaching: false,
            sector_bytes: sb.sector_size as usize,
            next_write_id: 1,
            writes: HashMap::new(),
            source: None,
            destination: None,
            close_peer: false,
            copy_bytes_read: 0,
            copy_bytes_skipped: 0,
            copy_started_at: None,
            copy_finished_at: None,
            compare_progress: crate::core::compare::CompareProgress::default(),
            verify: super::verify_source::VerifyState::new(
                (peer_defaults.verify_interval_seconds > 0).then_some(peer_defaults.verify_interval_seconds * 1000),
                peer_defaults.verify_rate_bytes_per_s,
            ),
            pending_events: Vec::new(),
            frames_rejected: 0,
            test_failover: None,
            test_failover_pending: None,
            volume_writes_in_flight: 0,
            held_volume_writes: Vec::new(),
            meta_version: 0,
            observer: super::group_events::Observer::default(),
            persist_waiters: Vec::new(),
            announce_cap: sb
                .recovered_lsn_since_connect()
                .filter(|_| sb.role == tandem_proto::ROLE_SOURCE)
                .map(|lsn| (lsn, u64::MAX)),
            batches: HashMap::new(),
            checkpoint: None,
            counters: super::counters::GroupCounters::new(sb.volumes().len()),
            bytes_written: 0,
        };
        rt.restore_partnership(peer_defaults, open.unconfirmed);
        rt
    }

    #[must_use]
    pub fn sector_bytes(&self) -> usize {
        self.sector_bytes
    }

    /// Registers a write whose payload (if any) is in `pending.buf` and hands it
    /// to the core.
    pub fn submit(
        &mut self,
        pending: PendingWrite,
        offset: u64,
        length: u32,
        volume_index: u8,
        op: crate::core::WriteOp,
    ) -> WriteId {
        let id = self.next_write_id;
        self.next_write_id += 1;
        self.writes.insert(id, TakenWrite::new(pending));
        let request = crate::core::WriteRequest { id, volume_index, offset, length, op };
        self.core.handle(Event::Submit(request));
        id
    }

    /// A destination's write of the source's record `lsn`.
    pub(super) fn submit_replicated(
        &mut self,
        pending: PendingWrite,
        lsn: u64,
        (volume_index, offset, length): (u8, u64, u32),
        op: crate::core::WriteOp,
        depends_on: u64,
    ) {
        let id = self.next_write_id;
        self.next_write_id += 1;
        self.writes.insert(id, TakenWrite::new(pending));
        let request = crate::core::WriteRequest { id, volume_index, offset, length, op };
        self.core.handle(Event::SubmitReplicated { request, lsn, depends_on });
    }

    /// Runs the core and executes its actions; returns the writes to answer.
    /// Appends run first (a record ships from memory in parallel with its
    /// append, which writes its header into the buffer it still owns alone),
    /// then ships: a record shipped from memory takes its buffer before the
    /// completion of its write (in the same batch) releases it.
    pub fn pump(&mut self, io: &mut Io, group: usize, completions: &mut Vec<Completion>) {
        // Carrying out actions can give the core more to do at once (a copy
        // chunk that needs no IO lets the next one start): a few rounds here
        // instead of waiting for the next completion or tick.
        for _ in 0..MAX_PUMP_ROUNDS {
            if !self.pump_once(io, group, completions) {
                break;
            }
        }
    }

    /// One round of actions; false when there were none.
    fn pump_once(&mut self, io: &mut Io, group: usize, completions: &mut Vec<Completion>) -> bool {
        let mut actions = self.core.take_actions();
        if actions.is_empty() {
            return false;
        }
        for action in actions.extract_if(.., |action| matches!(action, Action::Append(_))) {
            let Action::Append(batch) = action else { unreachable!("extracted appends only") };
            self.append(io, group, batch);
        }
        // The stream's order: a rebase comes before the records after it.
        for action in &actions {
            match *action {
                Action::Ship { lsn, position, end_position, depends_on } => {
                    self.ship(io, group, (lsn, depends_on), position, end_position);
                }
                Action::SendRebase { lsn } => self.send_rebase(lsn),
                _ => {}
            }
        }
        // The round's volume changes keep their blocks in the snapshots
        // first, made durable together (one pair of fdatasyncs for the
        // round, not for each write).
        let applies = actions.iter().filter_map(|action| match action {
            Action::Apply(op) => Some((op.volume_index, op.offset, u64::from(op.length))),
            _ => None,
        });
        self.keep_in_snapshots(applies);
        for action in actions {
            match action {
                Action::Append(_) => unreachable!("appends ran first"),
                Action::Apply(op) => {
                    if let Some(write) = self.writes.get_mut(&op.write_id) {
                        write.volume_write = VolumeWrite::InFlight;
                    }
                    self.apply(io, group, op, 0);
                }
                Action::Complete { id, result } => {
                    if let Some(completion) = self.complete(id, result) {
                        completions.push(completion);
                    }
                }
                Action::Checkpoint { lsn, tail_position, tail_lsn } => {
                    self.start_checkpoint(io, group, lsn, (tail_position, tail_lsn));
                }
                Action::Ship { .. } | Action::SendRebase { .. } => {}
                Action::ReadChunk { chunk_id, volume_index, offset, length, after_lsn, purpose } => {
                    let chunk = super::replica_source::ChunkRequest {
                        chunk_id,
                        volume_index,
                        offset,
                        length,
                        after_lsn,
                        purpose,
                    };
                    self.read_chunk(io, group, chunk);
                }
                Action::SendCopyDone { after_lsn } => self.send_copy_done(after_lsn),
                Action::PersistBitmap { spilled_up_to_lsn } => self.write_bitmap(io, group, spilled_up_to_lsn),
            }
        }
        if let Some(link) = self.source.as_mut() {
            let peer_durable_lsn = self.core.peer_durable_lsn().unwrap_or(0);
            link.durable_advanced(self.core.snapshot().durable_lsn, peer_durable_lsn, Instant::now());
        }
        true
    }

    /// Makes the superblock's role and partnership durable at the next
    /// checkpoint, which is started at once; `reply` hears when it is.
    pub fn persist_soon(&mut self) -> u64 {
        self.meta_version += 1;
        self.core.handle(Event::VolumesChangedOutsideLog);
        self.core.handle(Event::CheckpointRequested);
        self.meta_version
    }

    /// The durable LSN this source announces to its destination.
    #[must_use]
    pub fn announced_durable_lsn(&self) -> u64 {
        let durable_lsn = self.core.snapshot().durable_lsn;
        self.announce_cap.map_or(durable_lsn, |(lsn, _)| durable_lsn.min(lsn))
    }

    /// Once connected again (and the destination's log continues where this
    /// one recovered to, after a rebase if it held more), the LSN recovered
    /// to is forgotten: records shipped from now on are this log's.
    pub fn forget_recovered_lsn(&mut self) {
        let connected = self.source.as_ref().is_some_and(|link| link.conn.is_some());
        if self.superblock.recovered_lsn_since_connect().is_none() || !connected || self.core.rebase_pending() {
            return;
        }
        self.superblock.recovered_since_connect = 0;
        let version = self.persist_soon();
        self.announce_cap = Some((self.superblock.recovered_lsn, version));
    }

    /// Like `persist_soon`, answering `reply` once the superblock is durable.
    pub fn persist_then_reply(&mut self, reply: crossbeam_channel::Sender<Result<(), String>>) {
        self.persist_soon();
        self.persist_waiters.push((self.meta_version, reply));
    }

    /// The partnership fields a checkpoint starting now persists.
    fn partnership_to_persist(&self) -> tandem_proto::PartnershipEntry {
        let mut entry = self.superblock.partnership;
        if let Some(peer_durable) = self.core.peer_durable_lsn() {
            entry.peer_durable_lsn = peer_durable;
        }
        if self.core.copy_acknowledged() {
            entry.copy_state = tandem_proto::COPY_DONE;
        }
        if let Some(link) = self.destination.as_ref() {
            match link.receiver.copy_to_persist() {
                crate::core::CopyPosition::Done => entry.copy_state = tandem_proto::COPY_DONE,
                crate::core::CopyPosition::At { volume_index, offset } => {
                    entry.copy_state = tandem_proto::COPY_IN_PROGRESS;
                    entry.copy_volume = u32::from(volume_index);
                    entry.copy_offset = offset;
                }
            }
        }
        entry
    }

    /// Forgets a finished write; a source keeps its buffer if the record
    /// still waits to be shipped.
    fn release_write(&mut self, id: WriteId) {
        let write = self.writes.remove(&id).expect("released write is pending");
        if let (Some(link), Some(buf)) = (self.source.as_mut(), write.pending.buf.as_ref()) {
            link.release(id, buf);
        }
    }

    fn complete(&mut self, id: WriteId, result: Result<(), WriteError>) -> Option<Completion> {
        let failed = result.is_err();
        let taken = self.writes.get_mut(&id).expect("completed write is pending");
        assert!(!taken.answered, "write {id} answered twice");
        taken.answered = true;
        let write = &taken.pending;
        let (conn, conn_id, cookie, payload_bytes, started, volume_index) =
            (write.conn, write.conn_id, write.cookie, write.payload_bytes, write.started, write.volume_index);
        if taken.finished(failed) {
            self.release_write(id);
        }
        if conn == super::snapshot_rt::SNAPSHOT_WRITE_CONN {
            if let Err(error) = result {
                self.snapshot_write_failed(id, format!("the snapshot record was not written: {error:?}"));
            }
            return None;
        }
        if conn == super::replica_dest::REPLICATED_WRITE_CONN {
            if let Err(error) = result {
                tracing::error!(group = %self.name, ?error, "replicated write failed");
                self.close_peer = true;
            }
            return None;
        }
        if result.is_ok() {
            let latency_us = started.elapsed().as_micros() as u64;
            self.counters.write_answered(volume_index, payload_bytes as u64, latency_us);
        } else {
            tracing::error!(group = %self.name, ?result, "write failed");
        }
        Some(Completion { conn, conn_id, cookie, payload_bytes, result: result.map_err(|_| BlockError::Io) })
    }

    fn append(&mut self, io: &mut Io, group: usize, batch: AppendBatch) {
        let records = batch.segments.iter().flat_map(|s| &s.records).filter(|r| r.write_id.is_some()).count() as u64;
        let started = Instant::now();
        let batch_io = BatchIo { segments_left: batch.segments.len(), failure: None, records, started };
        self.batches.insert(batch.batch_id, batch_io);
        for segment in batch.segments {
            if let Some(link) = self.source.as_mut() {
                link.appended(&segment.records);
            }
            let mut headers = Vec::new();
            let mut iovecs = Vec::with_capacity(segment.records.len());
            for record in &segment.records {
                let write_buf = record
                    .write_id
                    .and_then(|id| self.writes.get_mut(&id))
                    .and_then(|w| w.pending.buf.as_mut())
                    .map(|buf| Rc::get_mut(buf).expect("a record buffer is not shared before its append"));
                let (base, len) = match (record.header.record_kind().has_payload(), write_buf) {
                    (true, Some(buf)) => {
                        buf[..64].copy_from_slice(record.header.as_bytes());
                        (buf.as_mut_ptr(), buf.len())
                    }
                    (true, None) => panic!("record LSN {} has no payload buffer", record.header.lsn),
                    (false, _) => {
                        let mut sector = AlignedBuf::zeroed(self.sector_bytes);
                        sector[..64].copy_from_slice(record.header.as_bytes());
                        let base = sector.as_mut_ptr();
                        headers.push(sector);
                        (base, self.sector_bytes)
                    }
                };
                iovecs.push(libc::iovec { iov_base: base.cast(), iov_len: len });
            }
            let expected_bytes: usize = iovecs.iter().map(|v| v.iov_len).sum();
            let pad_bytes = segment.records.iter().find(|r| r.header.record_kind() == RecordKind::Pad);
            // A pad's header sector is written; the rest of the ring it skips is not.
            let segment_bytes =
                segment.bytes as usize - pad_bytes.map_or(0, |p| p.header.length as usize - self.sector_bytes);
            assert_eq!(expected_bytes, segment_bytes, "iovecs cover the segment exactly");
            let fd = types::Fd(self.log.file.as_raw_fd());
            let offset = RING_OFFSET_BYTES + segment.ring_offset;
            let op = Op::LogWrite {
                group,
                batch_id: batch.batch_id,
                expected_bytes,
                iovecs: iovecs.into_boxed_slice(),
                headers,
            };
            io.submit(op, |op| {
                let Op::LogWrite { iovecs, .. } = op else { unreachable!() };
                opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32).offset(offset).build()
            });
        }
    }

    /// Completion of one log segment write.
    pub fn log_write_done(&mut self, batch_id: u64, result: i32, expected_bytes: usize) {
        let batch = self.batches.get_mut(&batch_id).expect("segment of a known batch");
        if result < 0 || result as usize != expected_bytes {
            let errno = if result < 0 { -result } else { libc::EIO };
            tracing::error!(group = %self.name, batch_id, result, expected_bytes, "log write failed");
            batch.failure = Some(errno);
        }
        batch.segments_left -= 1;
        if batch.segments_left == 0 {
            let batch = self.batches.remove(&batch_id).expect("present");
            self.counters.log_written(batch.records, batch.started.elapsed().as_micros() as u64);
            let result = batch.failure.map_or(Ok(()), |errno| Err(IoFailure { errno }));
            self.core.handle(Event::AppendDone { batch_id, result });
        }
    }

    pub(super) fn apply(&mut self, io: &mut Io, group: usize, apply: ApplyOp, done: u32) {
        if apply.kind == ApplyKind::Snapshot {
            self.take_snapshot(io, group, apply);
            return;
        }
        if done == 0 && self.hold_or_preserve(apply.volume_index, apply.offset, u64::from(apply.length)) {
            self.held_volume_writes.push(super::test_failover_rt::HeldVolumeWrite::Apply(apply));
            return;
        }
        self.volume_writes_in_flight += 1;
        let volume = &self.volumes[usize::from(apply.volume_index)];
        assert!(apply.offset + u64::from(apply.length) <= volume.size_bytes, "apply within the volume");
        let fd = types::Fd(volume.file.as_raw_fd());
        let op = Op::Apply { group, apply, done };
        let entry = match apply.kind {
            ApplyKind::Write => {
                let buf = self.writes[&apply.write_id].pending.buf.as_ref().expect("write has a buffer");
                let start = self.sector_bytes + done as usize;
                // SAFETY: start + remaining stays within the record buffer.
                let ptr = unsafe { buf.as_ptr().add(start) };
                let offset = apply.offset + u64::from(done);
                let length = apply.length - done;
                let fd = direct_fd_for(volume, ptr, offset, length).unwrap_or(fd);
                opcode::Write::new(fd, ptr, length).offset(offset).build()
            }
            ApplyKind::Snapshot => unreachable!("a snapshot writes no volume"),
            ApplyKind::Trim | ApplyKind::WriteZeroes { .. } => {
                let (kind, flags) = match apply.kind {
                    ApplyKind::WriteZeroes { no_hole: true } => (RecordKind::WriteZeroes, FLAG_NO_HOLE),
                    ApplyKind::WriteZeroes { no_hole: false } => (RecordKind::WriteZeroes, 0),
                    _ => (RecordKind::Trim, 0),
                };
                opcode::Fallocate::new(fd, u64::from(apply.length))
                    .offset(apply.offset)
                    .mode(fallocate_mode(kind, flags))
                    .build()
            }
        };
        io.submit_last(op, |_| entry);
    }

    /// Completion of a volume change; resubmits the rest of a short write.
    pub fn apply_done(&mut self, io: &mut Io, group: usize, apply: ApplyOp, done: u32, result: i32) {
        self.volume_writes_in_flight -= 1;
        if apply.kind == ApplyKind::Write && result > 0 {
            let done = done + result as u32;
            if done < apply.length {
                self.apply(io, group, apply, done);
                return;
            }
        }
        if let Some(write) = self.writes.get_mut(&apply.write_id) {
            write.volume_write = VolumeWrite::Done;
            if write.finished(false) {
                self.release_write(apply.write_id);
            }
        }
        let stalled = apply.kind == ApplyKind::Write && result == 0;
        let result = match result {
            _ if stalled => Err(IoFailure { errno: libc::EIO }),
            r if r < 0 => Err(IoFailure { errno: -r }),
            _ => Ok(()),
        };
        self.core.handle(Event::ApplyDone { lsn: apply.lsn, result });
    }

    /// Accounts a completed client read.
    pub fn read_done(&mut self, volume_index: u8, bytes: usize, started: Instant) {
        let latency_us = started.elapsed().as_micros() as u64;
        self.counters.read_answered(volume_index, bytes as u64, latency_us);
    }

    /// Accounts written payload bytes at submission.
    pub fn account_write(&mut self, bytes: u32) {
        self.bytes_written += u64::from(bytes);
    }
}

#[path = "group_io_checkpoint.rs"]
mod checkpoint;

#[path = "group_io_status.rs"]
mod status_report;
