//! The destination side of a partnership, sans IO: the replication stream in
//! order (records into the group's log with the source's LSNs, initial-copy
//! frames written between them in stream order), what may be acknowledged,
//! and what the initial copy has durably reached.
//!
//! Stream order is apply order: a copy frame shows its range after a given
//! LSN, so it is written only once every record before it is applied, and no
//! record after it is submitted until it is written. A frame that breaks the
//! protocol (a gap or a repeat in LSNs, a range outside the volumes) is
//! refused: the runtime closes the connection, nothing of it is applied.

use std::collections::VecDeque;

use tandem_proto::{RecordHeader, RecordKind, FLAG_NO_HOLE};

use super::group::peer::CopyPosition;
use super::WriteOp;

/// A frame as the receiver sees it; payloads stay with the runtime, named by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Record {
        header: RecordHeader,
        payload_id: Option<u64>,
    },
    /// A range of the initial copy; `payload_id` `None` is a zero range (hole).
    Copy {
        volume_index: u8,
        offset: u64,
        length: u32,
        payload_id: Option<u64>,
    },
    /// A compared chunk now equals the source's: the copy reached its end
    /// without writing (its differing ranges, if any, came before it).
    CopyVerified {
        volume_index: u8,
        offset: u64,
        length: u32,
    },
    CopyDone,
    /// Online verify: hash this range once the records before it are
    /// applied, before any later one.
    Verify {
        volume_index: u8,
        offset: u64,
        length: u32,
    },
    /// A range verify found different, sent again (after the copy is
    /// complete; the copy's position does not move).
    Repair {
        volume_index: u8,
        offset: u64,
        length: u32,
        payload_id: Option<u64>,
    },
    /// Continue after `lsn` and start the copy over (bitmap catch-up).
    Rebase {
        lsn: u64,
    },
    /// Records after this apply only once every record up to `lsn` is applied.
    Barrier {
        lsn: u64,
    },
}

/// What the runtime does for the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// Submit the source's record `lsn` to the group's core.
    Submit {
        lsn: u64,
        volume_index: u8,
        offset: u64,
        length: u32,
        op: WriteOp,
        payload_id: Option<u64>,
        /// Apply only after every record up to this LSN is applied.
        depends_on: u64,
    },
    /// Write (or punch, without payload) a copy range; report `copy_written(end)`.
    WriteCopy { volume_index: u8, offset: u64, length: u32, payload_id: Option<u64>, end: CopyPosition },
    /// Persist the copy state soon (the copy is complete).
    Persist,
    /// Hash the range and answer the source; report `verified` (nothing
    /// later is taken until then).
    Verify { volume_index: u8, offset: u64, length: u32 },
    /// Once the group is idle and its log empty, continue its log after `lsn`
    /// (a new epoch), persist that with the copy restarted, and report
    /// `rebased`. Nothing after it is taken until then.
    Rebase { lsn: u64 },
    /// The stream broke the protocol: close the connection.
    Refuse(String),
}

/// Copy writes a receiver lets run at once.
pub const MAX_COPY_WRITES_IN_FLIGHT: usize = 16;

/// A copy write in flight.
#[derive(Debug, Clone, Copy)]
struct CopyWrite {
    end: CopyPosition,
    done: bool,
    /// A repair: it moves no copy position and runs alone.
    repair: bool,
    /// A copy write before it failed: it moves no copy position either (the
    /// range is written again after reconnection).
    abandoned: bool,
}

/// The destination's receiving state.
#[derive(Debug)]
pub struct Receiver {
    volume_sizes_bytes: Vec<u64>,
    queue: VecDeque<Incoming>,
    next_lsn: u64,
    copy_written: CopyPosition,
    copy_done_received: bool,
    copy_persisted: CopyPosition,
    /// Copy writes in flight, in stream order (several at once: the ranges
    /// of a compared chunk never overlap); the copy position moves to the
    /// end of the last one whose predecessors are all written.
    copy_writes: VecDeque<CopyWrite>,
    verify_in_flight: bool,
    rebase_in_flight: bool,
    acked: Option<(u64, u64, CopyPosition)>,
    /// The last barrier of the stream.
    barrier_lsn: u64,
    /// Something of this connection's stream was taken: a rebase may move
    /// the stream back only as the first frame of a connection (the source
    /// lost records this log holds; see `core::unconfirmed`).
    taken_on_connection: bool,
    /// A rebase of this connection is durable: acknowledgements say so.
    rebased_on_connection: bool,
}

impl Receiver {
    /// A destination whose copy progress persisted is `copy_persisted`.
    #[must_use]
    pub fn new(volume_sizes_bytes: Vec<u64>, copy_persisted: CopyPosition) -> Self {
        Self {
            volume_sizes_bytes,
            queue: VecDeque::new(),
            next_lsn: 1,
            copy_written: copy_persisted,
            copy_done_received: copy_persisted == CopyPosition::Done,
            copy_persisted,
            copy_writes: VecDeque::new(),
            verify_in_flight: false,
            rebase_in_flight: false,
            acked: None,
            barrier_lsn: 0,
            taken_on_connection: false,
            rebased_on_connection: false,
        }
    }

    /// A source connected; its stream continues at `next_lsn` (after what
    /// this log holds). Frames of an earlier connection are forgotten.
    pub fn connected(&mut self, next_lsn: u64) {
        self.queue.clear();
        self.next_lsn = next_lsn;
        self.acked = None;
        // A rebase belongs to its connection; the next one asks again if needed.
        self.rebase_in_flight = false;
        self.verify_in_flight = false;
        self.barrier_lsn = 0;
        self.taken_on_connection = false;
        self.rebased_on_connection = false;
    }

    /// True once a rebase taken on this connection is durable (its
    /// acknowledgements carry `ACK_FLAG_REBASED`).
    #[must_use]
    pub fn rebased_on_connection(&self) -> bool {
        self.rebased_on_connection
    }

    /// The copy position to report to a connecting source: complete only
    /// once that is durable here (a source relies on it from then on).
    #[must_use]
    pub fn copy_position(&self) -> CopyPosition {
        if self.copy_complete() {
            CopyPosition::Done
        } else {
            self.copy_written
        }
    }

    /// A frame arrived.
    pub fn push(&mut self, frame: Incoming) {
        self.queue.push_back(frame);
    }

    /// Frames waiting.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Takes frames in stream order while it may; `core_has_unapplied` says
    /// whether the group still applies records submitted earlier.
    pub fn drive(&mut self, core_has_unapplied: bool) -> Vec<ReceiverAction> {
        let mut actions = Vec::new();
        let mut unapplied = core_has_unapplied;
        while let Some(frame) = self.queue.front() {
            if self.rebase_in_flight || self.verify_in_flight {
                break;
            }
            // Copy ranges may overlap their writes with each other; anything
            // else waits until every copy write before it is done.
            let busy = match frame {
                Incoming::Copy { .. } => {
                    self.copy_writes.len() >= MAX_COPY_WRITES_IN_FLIGHT || self.copy_writes.iter().any(|w| w.repair)
                }
                _ => !self.copy_writes.is_empty(),
            };
            if busy {
                break;
            }
            let frame = frame.clone();
            let action = match frame {
                Incoming::Record { header, payload_id } => {
                    unapplied = true;
                    self.record(&header, payload_id)
                }
                Incoming::Copy { .. } if unapplied => break,
                Incoming::Copy { volume_index, offset, length, payload_id } => {
                    self.copy(volume_index, offset, length, payload_id)
                }
                // Like a copy write, it describes the range after the records
                // before it: it counts once they are applied.
                Incoming::Verify { .. } | Incoming::Repair { .. } if unapplied => break,
                Incoming::Verify { volume_index, offset, length } => {
                    match self.check_range(volume_index, offset, length) {
                        Ok(()) => {
                            self.verify_in_flight = true;
                            ReceiverAction::Verify { volume_index, offset, length }
                        }
                        Err(reason) => ReceiverAction::Refuse(format!("verify frame: {reason}")),
                    }
                }
                Incoming::Repair { volume_index, offset, length, payload_id } => {
                    self.repair(volume_index, offset, length, payload_id)
                }
                Incoming::CopyVerified { .. } if unapplied => break,
                Incoming::CopyVerified { volume_index, offset, length } => {
                    match self.verified(volume_index, offset, length) {
                        Ok(()) => {
                            self.queue.pop_front();
                            continue;
                        }
                        Err(reason) => ReceiverAction::Refuse(reason),
                    }
                }
                Incoming::CopyDone => {
                    self.copy_done_received = true;
                    ReceiverAction::Persist
                }
                Incoming::Barrier { lsn } => {
                    self.queue.pop_front();
                    self.barrier_lsn = self.barrier_lsn.max(lsn);
                    continue;
                }
                Incoming::Rebase { .. } if unapplied => break,
                Incoming::Rebase { lsn } if lsn + 1 < self.next_lsn && self.taken_on_connection => {
                    ReceiverAction::Refuse(format!(
                        "a rebase to LSN {lsn} would move the stream back (this log continues at LSN {}) after \
                         records of the same connection",
                        self.next_lsn
                    ))
                }
                Incoming::Rebase { lsn } => {
                    self.rebase_in_flight = true;
                    self.next_lsn = lsn + 1;
                    self.copy_written = CopyPosition::At { volume_index: 0, offset: 0 };
                    self.copy_done_received = false;
                    ReceiverAction::Rebase { lsn }
                }
            };
            self.queue.pop_front();
            self.taken_on_connection = true;
            let refused = matches!(action, ReceiverAction::Refuse(_));
            actions.push(action);
            if refused {
                self.queue.clear();
                break;
            }
        }
        actions
    }

    fn check_range(&self, volume_index: u8, offset: u64, length: u32) -> Result<(), String> {
        let size = self.volume_sizes_bytes.get(usize::from(volume_index)).ok_or_else(|| {
            format!("volume {volume_index} does not exist here ({} volumes)", self.volume_sizes_bytes.len())
        })?;
        if offset + u64::from(length) > *size {
            return Err(format!("range {offset}+{length} is beyond volume {volume_index} ({size} bytes)"));
        }
        Ok(())
    }

    fn record(&mut self, header: &RecordHeader, payload_id: Option<u64>) -> ReceiverAction {
        if header.lsn != self.next_lsn {
            return ReceiverAction::Refuse(format!(
                "record LSN {} arrived where LSN {} was expected (a gap or a repeat in the stream)",
                header.lsn, self.next_lsn
            ));
        }
        let op = match header.record_kind() {
            RecordKind::Write => WriteOp::Write { payload_checksum: header.payload_checksum },
            RecordKind::Trim => WriteOp::Trim,
            RecordKind::WriteZeroes => WriteOp::WriteZeroes { no_hole: header.flags & FLAG_NO_HOLE != 0 },
            RecordKind::Snapshot => WriteOp::Snapshot { payload_checksum: header.payload_checksum },
            RecordKind::Pad => return ReceiverAction::Refuse("a pad record was shipped; pads stay local".to_owned()),
        };
        if let Err(reason) = self.check_range(header.volume_index, header.offset, header.changed_bytes()) {
            return ReceiverAction::Refuse(format!("record LSN {}: {reason}", header.lsn));
        }
        self.next_lsn += 1;
        let (lsn, volume_index, offset, length) = (header.lsn, header.volume_index, header.offset, header.length);
        let depends_on = self.barrier_lsn.min(lsn - 1);
        ReceiverAction::Submit { lsn, volume_index, offset, length, op, payload_id, depends_on }
    }

    fn copy(&mut self, volume_index: u8, offset: u64, length: u32, payload_id: Option<u64>) -> ReceiverAction {
        if self.copy_done_received {
            return ReceiverAction::Refuse("a copy frame arrived after the copy was complete".to_owned());
        }
        if let Err(reason) = self.check_range(volume_index, offset, length) {
            return ReceiverAction::Refuse(format!("copy frame: {reason}"));
        }
        let end = CopyPosition::At { volume_index, offset: offset + u64::from(length) };
        self.copy_writes.push_back(CopyWrite { end, done: false, repair: false, abandoned: false });
        ReceiverAction::WriteCopy { volume_index, offset, length, payload_id, end }
    }

    fn repair(&mut self, volume_index: u8, offset: u64, length: u32, payload_id: Option<u64>) -> ReceiverAction {
        if !self.copy_done_received {
            return ReceiverAction::Refuse("a repair arrived before the copy was complete".to_owned());
        }
        if let Err(reason) = self.check_range(volume_index, offset, length) {
            return ReceiverAction::Refuse(format!("repair frame: {reason}"));
        }
        self.copy_writes.push_back(CopyWrite { end: self.copy_written, done: false, repair: true, abandoned: false });
        ReceiverAction::WriteCopy { volume_index, offset, length, payload_id, end: self.copy_written }
    }

    /// The hash of a verify range was sent: later frames may be taken.
    pub fn verified_range(&mut self) {
        self.verify_in_flight = false;
    }

    fn verified(&mut self, volume_index: u8, offset: u64, length: u32) -> Result<(), String> {
        if self.copy_done_received {
            return Err("a verified chunk arrived after the copy was complete".to_owned());
        }
        self.check_range(volume_index, offset, length).map_err(|reason| format!("verified chunk: {reason}"))?;
        self.copy_written = CopyPosition::At { volume_index, offset: offset + u64::from(length) };
        Ok(())
    }

    /// The group's log now continues after the rebase LSN: the copy is
    /// restarted from here on (whatever a connection does next), and its
    /// completion is no longer reported.
    pub fn rebase_performed(&mut self) {
        self.copy_persisted = CopyPosition::At { volume_index: 0, offset: 0 };
    }

    /// The rebase is durable: frames after it may be taken.
    pub fn rebased(&mut self) {
        self.rebase_in_flight = false;
        self.rebased_on_connection = true;
    }

    /// A copy write finished (`end` from its action).
    pub fn copy_written(&mut self, end: CopyPosition) {
        self.copy_write_finished(end, false);
    }

    fn copy_write_finished(&mut self, end: CopyPosition, failed: bool) {
        let write = self
            .copy_writes
            .iter_mut()
            .find(|w| !w.done && w.end == end)
            .unwrap_or_else(|| panic!("a copy write ending at {end:?} is in flight"));
        write.done = true;
        if failed {
            for write in &mut self.copy_writes {
                write.abandoned = true;
            }
        }
        while self.copy_writes.front().is_some_and(|w| w.done) {
            let write = self.copy_writes.pop_front().expect("checked");
            if !write.repair && !write.abandoned {
                self.copy_written = write.end;
            }
        }
    }

    /// A copy write failed: neither it nor the writes issued with it move
    /// the copy position; the range is written again after reconnection.
    pub fn copy_failed(&mut self, end: CopyPosition) {
        self.copy_write_finished(end, true);
    }

    /// What a checkpoint starting now may persist: the copy written before it.
    #[must_use]
    pub fn copy_to_persist(&self) -> CopyPosition {
        if self.copy_done_received && self.copy_writes.iter().all(|w| w.repair) {
            CopyPosition::Done
        } else {
            self.copy_written
        }
    }

    /// A checkpoint persisted `copy` (one that began before a rebase says
    /// nothing about the copy that the rebase restarts).
    pub fn persisted(&mut self, copy: CopyPosition) {
        if !self.rebase_in_flight {
            self.copy_persisted = copy;
        }
    }

    /// True once the whole copy is durable here.
    #[must_use]
    pub fn copy_complete(&self) -> bool {
        self.copy_persisted == CopyPosition::Done
    }

    /// The acknowledgement to send when something moved: the durable LSN, and
    /// the copy written so far (`Done` only once durable), with the applied
    /// LSN. A move of the applied LSN alone is sent only when
    /// `applied_alone_due` (the runtime's tick): the source shows it and waits
    /// for it only in a role switch or a snapshot, while an ack of its own
    /// for every volume write would wake the source once more per write.
    pub fn ack(
        &mut self,
        durable_lsn: u64,
        applied_lsn: u64,
        applied_alone_due: bool,
    ) -> Option<(u64, u64, CopyPosition)> {
        if self.rebase_in_flight {
            // The log may already continue after the rebase while the copy it
            // restarts is not yet durable: say nothing until it is.
            return None;
        }
        let copy = if self.copy_complete() { CopyPosition::Done } else { self.copy_written };
        if self.acked == Some((durable_lsn, applied_lsn, copy)) {
            return None;
        }
        let applied_alone =
            self.acked.is_some_and(|(durable, _, acked_copy)| durable == durable_lsn && acked_copy == copy);
        if applied_alone && !applied_alone_due {
            return None;
        }
        self.acked = Some((durable_lsn, applied_lsn, copy));
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::RecordStamp;

    const STAMP: RecordStamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };

    fn record(lsn: u64, offset: u64) -> Incoming {
        Incoming::Record { header: RecordHeader::write(STAMP, lsn, 0, offset, &[1u8; 512]), payload_id: Some(lsn) }
    }

    #[test]
    fn copy_frames_wait_for_earlier_records_and_hold_later_ones() {
        let mut receiver = Receiver::new(vec![1 << 20], CopyPosition::At { volume_index: 0, offset: 0 });
        receiver.connected(5);
        receiver.push(record(5, 0));
        receiver.push(Incoming::Copy { volume_index: 0, offset: 0, length: 4096, payload_id: Some(100) });
        receiver.push(record(6, 0));
        let actions = receiver.drive(false);
        assert_eq!(actions.len(), 1, "the copy waits for LSN 5 to be applied: {actions:?}");
        assert!(matches!(actions[0], ReceiverAction::Submit { lsn: 5, .. }));
        let actions = receiver.drive(false);
        assert!(matches!(actions[..], [ReceiverAction::WriteCopy { .. }]), "{actions:?}");
        assert!(receiver.drive(false).is_empty(), "LSN 6 waits for the copy write");
        receiver.copy_written(CopyPosition::At { volume_index: 0, offset: 4096 });
        assert!(matches!(receiver.drive(true)[..], [ReceiverAction::Submit { lsn: 6, .. }]));
        assert_eq!(receiver.ack(6, 5, false), Some((6, 5, CopyPosition::At { volume_index: 0, offset: 4096 })));
        assert_eq!(receiver.ack(6, 5, false), None, "nothing moved");
        assert_eq!(receiver.ack(6, 6, false), None, "the applied LSN alone waits for the tick");
        assert_eq!(receiver.ack(6, 6, true), Some((6, 6, CopyPosition::At { volume_index: 0, offset: 4096 })));
        assert_eq!(receiver.ack(7, 6, false), Some((7, 6, CopyPosition::At { volume_index: 0, offset: 4096 })));
    }

    /// Copy ranges are written several at once; the position moves only over
    /// the prefix that is written, and a record after them waits for all.
    #[test]
    fn copy_writes_overlap_and_the_position_follows_the_written_prefix() {
        let mut receiver = Receiver::new(vec![1 << 20], CopyPosition::At { volume_index: 0, offset: 0 });
        receiver.connected(5);
        for index in 0..3u64 {
            receiver.push(Incoming::Copy { volume_index: 0, offset: index * 4096, length: 4096, payload_id: None });
        }
        receiver.push(record(5, 0));
        let actions = receiver.drive(false);
        assert_eq!(actions.len(), 3, "three copy writes at once, the record waits: {actions:?}");
        let end = |n: u64| CopyPosition::At { volume_index: 0, offset: n * 4096 };
        receiver.copy_written(end(3));
        receiver.copy_written(end(2));
        assert_eq!(receiver.copy_position(), end(0), "the first range is not written yet");
        assert!(receiver.drive(false).is_empty(), "the record waits for every copy write");
        receiver.copy_written(end(1));
        assert_eq!(receiver.copy_position(), end(3));
        assert!(matches!(receiver.drive(false)[..], [ReceiverAction::Submit { lsn: 5, .. }]));
    }

    /// A failed copy write holds the position where it was, whatever the
    /// writes issued with it do.
    #[test]
    fn a_failed_copy_write_holds_the_position() {
        let mut receiver = Receiver::new(vec![1 << 20], CopyPosition::At { volume_index: 0, offset: 0 });
        receiver.connected(1);
        for index in 0..2u64 {
            receiver.push(Incoming::Copy { volume_index: 0, offset: index * 4096, length: 4096, payload_id: None });
        }
        assert_eq!(receiver.drive(false).len(), 2);
        let end = |n: u64| CopyPosition::At { volume_index: 0, offset: n * 4096 };
        receiver.copy_failed(end(1));
        receiver.copy_written(end(2));
        assert_eq!(receiver.copy_position(), end(0), "nothing after a failure counts");
    }

    /// A verified chunk moves the copy without a write, once the records
    /// before it are applied; outside the volumes or after the copy's end it
    /// is refused.
    #[test]
    fn verified_chunks_move_the_copy_after_earlier_records() {
        let mut receiver = Receiver::new(vec![1 << 20], CopyPosition::At { volume_index: 0, offset: 0 });
        receiver.connected(5);
        receiver.push(record(5, 0));
        receiver.push(Incoming::CopyVerified { volume_index: 0, offset: 0, length: 65536 });
        receiver.push(record(6, 0));
        let actions = receiver.drive(false);
        assert!(matches!(actions[..], [ReceiverAction::Submit { lsn: 5, .. }]), "{actions:?}");
        assert_eq!(receiver.copy_position(), CopyPosition::At { volume_index: 0, offset: 0 }, "LSN 5 is not applied");
        let actions = receiver.drive(false);
        assert!(matches!(actions[..], [ReceiverAction::Submit { lsn: 6, .. }]), "no write for the chunk: {actions:?}");
        assert_eq!(receiver.copy_position(), CopyPosition::At { volume_index: 0, offset: 65536 });
        receiver.push(Incoming::CopyVerified { volume_index: 0, offset: 1 << 20, length: 4096 });
        assert!(matches!(receiver.drive(false)[..], [ReceiverAction::Refuse(_)]), "beyond the volume");
    }

    #[test]
    fn gaps_repeats_and_ranges_outside_the_volumes_are_refused() {
        let mut receiver = Receiver::new(vec![1 << 20], CopyPosition::Done);
        receiver.connected(3);
        receiver.push(record(3, 0));
        receiver.push(record(3, 0));
        let actions = receiver.drive(false);
        assert!(matches!(&actions[1], ReceiverAction::Refuse(r) if r.contains("LSN 3 arrived where LSN 4")));
        receiver.connected(4);
        receiver.push(record(4, 1 << 20));
        assert!(matches!(&receiver.drive(false)[0], ReceiverAction::Refuse(r) if r.contains("beyond volume 0")));
        receiver.connected(4);
        receiver.push(Incoming::Copy { volume_index: 0, offset: 0, length: 512, payload_id: None });
        assert!(matches!(&receiver.drive(false)[0], ReceiverAction::Refuse(r) if r.contains("after the copy")));
    }
}
