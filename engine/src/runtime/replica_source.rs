//! The source side of a partnership on the group's core: executes the core's
//! Ship, ReadChunk and SendCopyDone actions into an ordered outbox, from
//! memory when the record's buffer is still held and from the log otherwise.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use io_uring::{opcode, types};
use tandem_proto::{FrameHeader, FrameKind, RecordHeader, RecordKind, RING_OFFSET_BYTES};

use super::buf::AlignedBuf;
use super::group_io::GroupRt;
use super::io::{Io, Op};
use super::peer_conn::{OutFrame, SharedBytes};
use crate::core::group::peer::FencePurpose;
use crate::core::{LogRecord, WriteId};

/// The RPO is measured to this resolution.
const RPO_RESOLUTION: std::time::Duration = std::time::Duration::from_millis(1);
/// Most entries of the durable-time history the RPO is measured from.
const MAX_DURABLE_TIMES: usize = 65_536;
/// Records remembered for shipping from memory; beyond this many the rest is
/// read back from the log.
const MAX_UNSHIPPED_IN_MEMORY: usize = 65_536;

/// Payload bytes of answered writes kept in memory for shipping: a
/// destination that falls behind by less than this is fed from memory, not
/// by reading the log back.
const MAX_HELD_PAYLOAD_BYTES: usize = 64 << 20;

/// Where a record waiting to be shipped can be found without reading the log.
#[derive(Debug, Clone)]
enum Unshipped {
    /// A write whose payload is in its record buffer (while the write is pending).
    Write(WriteId, RecordHeader),
    /// A write already answered and applied whose record buffer is kept here.
    Held(Rc<AlignedBuf>, RecordHeader),
    Header(RecordHeader),
}

#[derive(Debug)]
struct Slot {
    id: u64,
    frame: Option<OutFrame>,
}

/// Shipping state of a source group.
#[derive(Debug, Default)]
pub struct SourceLink {
    /// The connection to the destination (reactor key and id), when connected.
    pub conn: Option<(usize, u64)>,
    /// The comparison of a compared copy on this connection.
    pub compare: Option<super::compare_source::SourceCompare>,
    unshipped: BTreeMap<u64, Unshipped>,
    /// The LSN of each write remembered as `Unshipped::Write`.
    lsn_of_write: std::collections::HashMap<WriteId, u64>,
    /// Payload bytes of `Unshipped::Held` buffers.
    held_payload_bytes: usize,
    /// Records shipped by reading them back from the log (the destination
    /// fell behind what memory holds, or came back after a disconnection).
    pub records_read_back: u64,
    /// Records shipped while catching up, and while replicating continuously.
    pub recovery_records_shipped: u64,
    pub replication_records_shipped: u64,
    /// How long the last catch-up took.
    pub last_recovery_elapsed_ms: u64,
    /// Records the destination lacks, averaged over about a minute.
    pub log_queue_length_avg: f64,
    outbox: VecDeque<Slot>,
    next_slot_id: u64,
    /// (durable LSN, when it became durable): the age of the oldest record the
    /// destination lacks is the RPO.
    durable_times: VecDeque<(u64, Instant)>,
    pub last_error: Option<String>,
    /// The last barrier sent on this connection.
    barrier_lsn: u64,
    /// When records were shipped (sampled), for the round trip to the
    /// destination's durable acknowledgement.
    shipped_at: VecDeque<(u64, Instant)>,
    /// Average round trip from shipping a record to its durable
    /// acknowledgement (exponentially weighted), in microseconds.
    pub ack_round_trip_us_avg: f64,
    /// When the destination last was, and last stopped being, in sync
    /// (Unix milliseconds; 0: never).
    pub last_in_sync_unix_ms: u64,
    pub last_out_of_sync_unix_ms: u64,
}

/// Now as Unix milliseconds.
#[must_use]
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl SourceLink {
    /// Remembers the records of an append for shipping from memory.
    pub fn appended(&mut self, records: &[LogRecord]) {
        for record in records {
            if record.header.record_kind() == RecordKind::Pad || self.unshipped.len() >= MAX_UNSHIPPED_IN_MEMORY {
                continue;
            }
            let entry = match record.write_id {
                Some(id) if record.header.record_kind().has_payload() => {
                    self.lsn_of_write.insert(id, record.header.lsn);
                    Unshipped::Write(id, record.header)
                }
                _ => Unshipped::Header(record.header),
            };
            self.unshipped.insert(record.header.lsn, entry);
        }
    }

    /// A write's record buffer is about to be freed: keep it for shipping if
    /// the record still waits and memory allows.
    pub fn release(&mut self, id: WriteId, buf: &Rc<AlignedBuf>) {
        let Some(lsn) = self.lsn_of_write.remove(&id) else { return };
        let Some(entry) = self.unshipped.get_mut(&lsn) else { return };
        let Unshipped::Write(entry_id, header) = *entry else { return };
        assert_eq!(entry_id, id, "LSN {lsn} belongs to write {entry_id}");
        let bytes = header.payload_bytes() as usize;
        if self.held_payload_bytes + bytes <= MAX_HELD_PAYLOAD_BYTES {
            self.held_payload_bytes += bytes;
            *entry = Unshipped::Held(Rc::clone(buf), header);
        }
    }

    /// Takes the remembered form of record `lsn`, if any.
    fn take_unshipped(&mut self, lsn: u64) -> Option<Unshipped> {
        let entry = self.unshipped.remove(&lsn)?;
        match &entry {
            Unshipped::Write(id, _) => {
                self.lsn_of_write.remove(id);
            }
            Unshipped::Held(_, header) => self.held_payload_bytes -= header.payload_bytes() as usize,
            Unshipped::Header(_) => {}
        }
        Some(entry)
    }

    /// Forgets remembered records the destination already holds (shipped
    /// before a disconnection, or folded into the bitmap).
    fn forget_unshipped_through(&mut self, lsn: u64) {
        while let Some((&first, _)) = self.unshipped.first_key_value() {
            if first > lsn {
                break;
            }
            self.take_unshipped(first);
        }
    }

    /// The connection is gone: what was queued is shipped again after the
    /// reconnection, from the destination's durable LSN.
    pub fn disconnected(&mut self) {
        self.conn = None;
        self.compare = None;
        self.outbox.clear();
        self.barrier_lsn = 0;
        self.shipped_at.clear();
    }

    /// The destination acknowledged everything up to `lsn` as durable.
    pub fn acknowledged(&mut self, lsn: u64, now: Instant) {
        let mut sample = None;
        while self.shipped_at.front().is_some_and(|(shipped, _)| *shipped <= lsn) {
            sample = self.shipped_at.pop_front().map(|(_, at)| now.duration_since(at).as_micros() as f64);
        }
        if let Some(us) = sample {
            self.ack_round_trip_us_avg = super::counters::moving_average(self.ack_round_trip_us_avg, us);
        }
    }

    /// Samples the records the destination lacks (every 100 ms tick): an
    /// exponential average with a time constant of 600 ticks, one minute.
    pub fn observe_queue(&mut self, records: u64) {
        self.log_queue_length_avg += (records as f64 - self.log_queue_length_avg) / 600.0;
    }

    /// Notes whether the destination is in sync now.
    pub fn observe_sync(&mut self, in_sync: bool) {
        let now = unix_ms_now();
        if in_sync {
            self.last_in_sync_unix_ms = now;
        } else if self.last_in_sync_unix_ms >= self.last_out_of_sync_unix_ms {
            self.last_out_of_sync_unix_ms = now;
        }
    }

    /// Frames ready to send, in stream order.
    pub fn take_ready(&mut self) -> impl Iterator<Item = OutFrame> + '_ {
        std::iter::from_fn(move || {
            if self.outbox.front().is_some_and(|s| s.frame.is_some()) {
                self.outbox.pop_front().and_then(|s| s.frame)
            } else {
                None
            }
        })
    }

    fn reserve(&mut self) -> u64 {
        let id = self.next_slot_id;
        self.next_slot_id += 1;
        self.outbox.push_back(Slot { id, frame: None });
        id
    }

    pub(super) fn push(&mut self, frame: OutFrame) {
        let id = self.reserve();
        self.fill(id, frame);
    }

    fn fill(&mut self, id: u64, frame: OutFrame) {
        if let Some(slot) = self.outbox.iter_mut().find(|s| s.id == id) {
            slot.frame = Some(frame);
        }
    }

    /// Notes that the local log became durable up to `lsn` now, and forgets
    /// what the destination has.
    pub fn durable_advanced(&mut self, lsn: u64, peer_durable_lsn: u64, now: Instant) {
        let full = self.durable_times.len() >= MAX_DURABLE_TIMES;
        match self.durable_times.back_mut() {
            Some((last, _)) if *last >= lsn => {}
            // Within a millisecond of the newest entry, or with the history
            // at its bound (a destination away for long), the newest entry
            // grows: its records count as durable as early as its first, so
            // the RPO is never understated and the history stays bounded.
            Some((last, at)) if full || now.duration_since(*at) < RPO_RESOLUTION => {
                *last = lsn;
            }
            _ => self.durable_times.push_back((lsn, now)),
        }
        // An entry covers the records after its predecessor up to its LSN.
        while self.durable_times.len() > 1 && self.durable_times[1].0 <= peer_durable_lsn {
            self.durable_times.pop_front();
        }
        if self.durable_times.front().is_some_and(|(lsn, _)| *lsn <= peer_durable_lsn) {
            self.durable_times.pop_front();
        }
        self.forget_unshipped_through(peer_durable_lsn);
    }

    /// Current RPO: age of the oldest durable record the destination lacks.
    #[must_use]
    pub fn rpo_ms(&self, peer_durable_lsn: u64, now: Instant) -> u64 {
        self.durable_times
            .iter()
            .find(|(lsn, _)| *lsn > peer_durable_lsn)
            .map_or(0, |(_, at)| now.duration_since(*at).as_millis() as u64)
    }
}

impl GroupRt {
    /// Ships record `lsn` from memory if its buffer is still held, else
    /// schedules a read of `position..end_position` from the log.
    pub(super) fn ship(
        &mut self,
        io: &mut Io,
        group: usize,
        (lsn, depends_on): (u64, u64),
        position: u64,
        end_position: u64,
    ) {
        let sector = self.sector_bytes();
        let catching_up = matches!(
            self.core.replication_state(),
            Some(crate::core::ReplicationState::Recovering | crate::core::ReplicationState::BitmapCatchUp)
        );
        let link = self.source.as_mut().expect("shipping needs a source link");
        if catching_up {
            link.recovery_records_shipped += 1;
        } else {
            link.replication_records_shipped += 1;
        }
        // One sample in flight at a time is enough for an average.
        if link.shipped_at.is_empty() {
            link.shipped_at.push_back((lsn, Instant::now()));
        }
        if depends_on > link.barrier_lsn {
            link.barrier_lsn = depends_on;
            let header = FrameHeader::new(FrameKind::Barrier, 0, 0, depends_on, 0, 0);
            link.push(OutFrame::new(header.as_bytes(), None));
        }
        match link.take_unshipped(lsn) {
            Some(Unshipped::Header(header)) => link.push(OutFrame::new(header.as_bytes(), None)),
            Some(Unshipped::Held(buf, header)) => {
                assert_eq!(header.lsn, lsn, "a held record ships under its own LSN");
                let payload = SharedBytes { buf, start: sector, len: header.payload_bytes() as usize };
                link.push(OutFrame::new(header.as_bytes(), Some(payload)));
            }
            Some(Unshipped::Write(id, header)) if self.writes.get(&id).is_some_and(|w| w.pending.buf.is_some()) => {
                assert_eq!(header.lsn, lsn, "a remembered record ships under its own LSN");
                let buf = Rc::clone(self.writes[&id].pending.buf.as_ref().expect("checked"));
                let payload = SharedBytes { buf, start: sector, len: header.payload_bytes() as usize };
                link.push(OutFrame::new(header.as_bytes(), Some(payload)));
            }
            _ => {
                link.records_read_back += 1;
                let slot = link.reserve();
                let len = (end_position - position) as usize;
                let buf = AlignedBuf::zeroed(len);
                let offset = RING_OFFSET_BYTES + position % self.superblock.ring_size_bytes;
                let fd = types::Fd(self.log.file.as_raw_fd());
                io.submit(Op::LogRead { group, slot, lsn, buf }, |op| {
                    let Op::LogRead { buf, .. } = op else { unreachable!() };
                    opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(offset).build()
                });
            }
        }
    }

    /// Completion of a record read back from the log for shipping.
    pub(super) fn log_read_done(&mut self, slot: u64, lsn: u64, buf: AlignedBuf, result: i32) {
        let sector = self.sector_bytes();
        let checked = if result < 0 || result as usize != buf.len() {
            Err(format!("reading LSN {lsn} back from the log failed (result {result})"))
        } else {
            RecordHeader::decode(&buf[..64])
                .map_err(|e| e.to_string())
                .and_then(|h| {
                    let payload = &buf[sector..sector + h.payload_bytes() as usize];
                    h.verify_payload(payload).map(|()| h).map_err(|e| e.to_string())
                })
                .and_then(|h| if h.lsn == lsn { Ok(h) } else { Err(format!("found LSN {} for {lsn}", h.lsn)) })
        };
        let Some(link) = self.source.as_mut() else { return };
        match checked {
            Ok(header) => {
                let len = header.payload_bytes() as usize;
                let payload = (len > 0).then(|| SharedBytes { buf: Rc::new(buf), start: sector, len });
                link.fill(slot, OutFrame::new(header.as_bytes(), payload));
            }
            Err(reason) => {
                tracing::error!(group = %self.name, %reason, "cannot ship a record from the log");
                link.last_error = Some(format!("cannot ship LSN {lsn} from the log: {reason}"));
                link.disconnected();
                self.core.peer_lost();
                self.close_peer = true;
            }
        }
    }

    /// Reads a chunk of a volume for the initial copy; a chunk without data
    /// (a hole of a thin volume) goes out as a zero range without being read.
    pub(super) fn read_chunk(&mut self, io: &mut Io, group: usize, chunk: ChunkRequest) {
        let volume = &self.volumes[usize::from(chunk.volume_index)];
        let end = chunk.offset + u64::from(chunk.length);
        if chunk.purpose == FencePurpose::Verify {
            if super::device::has_data(&volume.file, chunk.offset, end) {
                self.submit_chunk_read(io, group, None, chunk);
            } else {
                self.verify_hole(chunk);
            }
            return;
        }
        if chunk.purpose == FencePurpose::Copy {
            self.copy_started_at.get_or_insert_with(Instant::now);
        }
        if chunk.purpose == FencePurpose::Copy && self.comparing() {
            if super::device::has_data(&volume.file, chunk.offset, end) {
                self.compare_read_for(&chunk);
                self.submit_chunk_read(io, group, None, chunk);
            } else {
                self.compare_hole(chunk);
            }
            return;
        }
        let link = self.source.as_mut().expect("copying needs a source link");
        if !super::device::has_data(&volume.file, chunk.offset, end) {
            let header = FrameHeader::new(
                FrameKind::CopyZero,
                chunk.copy_flags(),
                chunk.volume_index,
                chunk.after_lsn,
                chunk.offset,
                chunk.length,
            );
            link.push(OutFrame::new(header.as_bytes(), None));
            if chunk.purpose == FencePurpose::Repair {
                self.verify_repaired(u64::from(chunk.length));
            } else {
                self.copy_bytes_skipped += u64::from(chunk.length);
            }
            self.core.chunk_shipped(chunk.chunk_id);
            return;
        }
        let slot = link.reserve();
        self.submit_chunk_read(io, group, Some(slot), chunk);
    }

    /// Reads a chunk; its bytes go to outbox slot `slot`, or (`None`) to
    /// the comparison.
    fn submit_chunk_read(&mut self, io: &mut Io, group: usize, slot: Option<u64>, chunk: ChunkRequest) {
        let volume = &self.volumes[usize::from(chunk.volume_index)];
        let buf = AlignedBuf::zeroed(chunk.length as usize);
        let fd = types::Fd(volume.io_fd(chunk.offset, u64::from(chunk.length)));
        let offset = chunk.offset;
        io.submit(Op::ChunkRead { group, slot, chunk, buf }, |op| {
            let Op::ChunkRead { buf, .. } = op else { unreachable!() };
            opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(offset).build()
        });
    }

    /// Completion of a chunk read.
    pub(super) fn chunk_read_done(&mut self, slot: Option<u64>, chunk: ChunkRequest, buf: AlignedBuf, result: i32) {
        if result < 0 || result as usize != buf.len() {
            tracing::error!(group = %self.name, result, "initial copy read failed");
            if let Some(link) = self.source.as_mut() {
                link.last_error = Some(format!(
                    "reading volume {} at {} for the initial copy failed (result {result})",
                    chunk.volume_index, chunk.offset
                ));
                link.disconnected();
            }
            self.core.peer_lost();
            self.close_peer = true;
            return;
        }
        if chunk.purpose == FencePurpose::Verify {
            self.verify_chunk_read(chunk, &buf);
            return;
        }
        let Some(slot) = slot else {
            self.compare_chunk_read(chunk, buf);
            return;
        };
        let mut header = FrameHeader::copy_data(chunk.volume_index, chunk.after_lsn, chunk.offset, &buf);
        header.flags = chunk.copy_flags();
        let header = header.resealed();
        let len = buf.len();
        if let Some(link) = self.source.as_mut() {
            link.fill(slot, OutFrame::new(header.as_bytes(), Some(SharedBytes { buf: Rc::new(buf), start: 0, len })));
            if chunk.purpose == FencePurpose::Repair {
                self.verify_repaired(len as u64);
            } else {
                self.copy_bytes_read += len as u64;
            }
        }
        self.core.chunk_shipped(chunk.chunk_id);
    }

    /// Queues the instruction to continue after `lsn` (first on the connection).
    pub(super) fn send_rebase(&mut self, lsn: u64) {
        let header = FrameHeader::new(FrameKind::Rebase, 0, 0, lsn, 0, 0);
        self.source.as_mut().expect("source link").push(OutFrame::new(header.as_bytes(), None));
    }

    /// Writes the bitmap to its area; its completion lets spilled records go.
    pub(super) fn write_bitmap(&mut self, io: &mut Io, group: usize, spilled_up_to_lsn: Option<u64>) {
        let area = self.superblock.bitmap;
        let bytes = self.core.bitmap_bytes(area.bytes as usize).expect("only groups with a bitmap persist one");
        let mut buf = AlignedBuf::zeroed(area.bytes as usize);
        buf.copy_from_slice(&bytes);
        let fd = types::Fd(self.log.file.as_raw_fd());
        io.submit(Op::BitmapWrite { group, buf, spilled_up_to_lsn }, |op| {
            let Op::BitmapWrite { buf, .. } = op else { unreachable!() };
            opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(area.offset).build()
        });
    }

    /// Completion of a bitmap write.
    pub(super) fn bitmap_write_done(&mut self, spilled_up_to_lsn: Option<u64>, expected: usize, result: i32) {
        if result < 0 || result as usize != expected {
            // Nothing is released: writes wait for log space, nothing is lost.
            tracing::error!(group = %self.name, result, "writing the dirty-region bitmap failed; writes wait for log space");
            if let Some(link) = self.source.as_mut() {
                link.last_error = Some(format!("writing the dirty-region bitmap failed (result {result})"));
            }
            return;
        }
        if spilled_up_to_lsn.is_some() {
            tracing::warn!(group = %self.name, ?spilled_up_to_lsn, "log full without the destination: records folded into the bitmap");
        }
        self.core.bitmap_persisted(spilled_up_to_lsn);
    }

    /// Queues the end of the initial copy.
    pub(super) fn send_copy_done(&mut self, after_lsn: u64) {
        let header = FrameHeader::new(FrameKind::CopyDone, 0, 0, after_lsn, 0, 0);
        self.source.as_mut().expect("source link").push(OutFrame::new(header.as_bytes(), None));
    }
}

/// A chunk read under a fence: for the copy, for verify, or to repair.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRequest {
    pub chunk_id: u64,
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
    pub after_lsn: u64,
    pub purpose: FencePurpose,
}

impl ChunkRequest {
    /// Flags of its copy frames: a repair says so.
    #[must_use]
    pub fn copy_flags(&self) -> u8 {
        if self.purpose == FencePurpose::Repair {
            tandem_proto::COPY_FLAG_REPAIR
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_proto::RecordStamp;

    use super::*;

    fn record(lsn: u64, id: WriteId, bytes: usize) -> LogRecord {
        let stamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };
        LogRecord { header: RecordHeader::write(stamp, lsn, 0, 0, &vec![lsn as u8; bytes]), write_id: Some(id) }
    }

    /// Answered writes whose records still wait keep their buffers up to the
    /// memory bound; shipping or the destination's acknowledgement frees them.
    #[test]
    fn released_buffers_are_held_within_the_bound_and_freed() {
        let mut link = SourceLink::default();
        let big = MAX_HELD_PAYLOAD_BYTES / 2;
        link.appended(&[record(1, 10, big), record(2, 11, big), record(3, 12, 4096)]);
        let buf = Rc::new(AlignedBuf::zeroed(4096));
        link.release(10, &buf);
        link.release(11, &buf);
        assert_eq!(link.held_payload_bytes, MAX_HELD_PAYLOAD_BYTES, "two halves fill the bound");
        link.release(12, &buf);
        assert!(matches!(link.unshipped[&3], Unshipped::Write(12, _)), "beyond the bound: read back from the log");
        assert!(link.lsn_of_write.is_empty());
        assert!(matches!(link.take_unshipped(1), Some(Unshipped::Held(..))));
        assert_eq!(link.held_payload_bytes, big, "shipping frees its bytes");
        link.durable_advanced(3, 3, Instant::now());
        assert!(link.unshipped.is_empty(), "the destination holds them all");
        assert_eq!(link.held_payload_bytes, 0);
        assert_eq!(Rc::strong_count(&buf), 1, "no buffer is kept");
    }
}
