//! The destination side of a partnership on the group's core: received frames
//! go through the sans-IO [`Receiver`] (stream order, protocol checks), whose
//! actions are executed here: records into the log, copy ranges into the
//! volumes, acknowledgements back to the source.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use io_uring::{opcode, types};
use tandem_proto::{
    FrameHeader, FrameKind, RecordKind, ACK_FLAG_COPY_DONE, ACK_FLAG_REBASED, COMPARE_FLAG_ON_REQUEST, COPY_FLAG_REPAIR,
};

use super::buf::AlignedBuf;
use super::compare_dest::DigestStream;
use super::group_io::{GroupRt, PendingWrite};
use super::io::{Io, Op};
use super::log_store::fallocate_mode;
use super::peer_conn::{InFrame, OutFrame};
use super::peer_session::PeerSession;
use crate::core::compare::Chunk;
use crate::core::{CopyPosition, Event, Incoming, Receiver, ReceiverAction, UnconfirmedRecords, WriteOp};

/// Marks a write that came from the source: it has no client to answer.
pub const REPLICATED_WRITE_CONN: usize = usize::MAX;
/// Frames the receiver holds before the connection stops reading.
const MAX_QUEUED_FRAMES: usize = 1024;

/// Receiving state of a destination group.
#[derive(Debug)]
pub struct DestinationLink {
    /// The connection from the source (reactor key and id), when connected.
    pub conn: Option<(usize, u64)>,
    pub receiver: Receiver,
    /// The last durable LSN the source reported (its progress heartbeats).
    pub source_durable_lsn: u64,
    /// Records taken that the source has not yet reported durable.
    pub unconfirmed: UnconfirmedRecords,
    /// When anything last arrived from the source (the time bound of the
    /// RPO of a promotion: its writes after that are unknown here).
    pub last_heard: Option<std::time::Instant>,
    /// A rebase waiting for the group to be idle with an empty log.
    pub pending_rebase: Option<u64>,
    /// The metadata version whose persistence completes the rebase.
    pub rebase_persisting: Option<u64>,
    /// Payloads of frames queued in the receiver, by id.
    payloads: HashMap<u64, AlignedBuf>,
    next_payload_id: u64,
    /// The digest stream of a compared copy on this connection.
    pub compare: Option<DigestStream>,
    /// Comparison answers (digests, block hashes) to send to the source.
    pub outbox: Vec<OutFrame>,
    /// Bytes read from the volumes to compare them (holes are not read).
    pub compare_bytes_read: u64,
    /// Set by the tick: the next ack may carry a move of the applied LSN alone.
    pub applied_ack_due: bool,
}

impl DestinationLink {
    #[must_use]
    pub fn new(volume_sizes_bytes: Vec<u64>, copy_persisted: CopyPosition, unconfirmed: UnconfirmedRecords) -> Self {
        Self {
            conn: None,
            receiver: Receiver::new(volume_sizes_bytes, copy_persisted),
            source_durable_lsn: 0,
            unconfirmed,
            last_heard: None,
            pending_rebase: None,
            rebase_persisting: None,
            payloads: HashMap::new(),
            next_payload_id: 1,
            compare: None,
            outbox: Vec::new(),
            applied_ack_due: false,
            compare_bytes_read: 0,
        }
    }

    /// The connection is gone, and with it a rebase it asked for but that
    /// did not start (the next connection asks again if still needed).
    pub fn disconnected(&mut self) {
        self.conn = None;
        self.pending_rebase = None;
        self.compare = None;
        self.outbox.clear();
        // A rebase already performed stays performed; the next connection's
        // stream does not wait for its persistence (see `Receiver::connected`).
        self.rebase_persisting = None;
    }

    /// The source's copy reached the end of this frame's range: the digest
    /// stream may run further ahead.
    fn copy_frame_arrived(&mut self, header: &FrameHeader) {
        if let Some(stream) = self.compare.as_mut() {
            stream.source_reached(header.volume_index, header.offset + u64::from(header.length));
        }
    }

    fn keep(&mut self, payload: Option<AlignedBuf>) -> Option<u64> {
        let buf = payload?;
        let id = self.next_payload_id;
        self.next_payload_id += 1;
        self.payloads.insert(id, buf);
        Some(id)
    }
}

impl GroupRt {
    /// A source connected: its stream continues after the last record this
    /// log took (as `destination_state` told it).
    pub(super) fn source_connected(&mut self, key: usize, id: u64) {
        let next_lsn = self.core.last_taken_lsn() + 1;
        let link = self.destination.as_mut().expect("destination link");
        link.conn = Some((key, id));
        link.payloads.clear();
        link.compare = None;
        link.outbox.clear();
        link.receiver.connected(next_lsn);
    }

    /// Carries out a pending rebase once the group is idle with an empty log:
    /// a new epoch starts at the head, and the superblock (with the copy
    /// restarted) is persisted before anything after the rebase is taken.
    fn progress_rebase(&mut self) {
        let Some(lsn) = self.destination.as_ref().and_then(|l| l.pending_rebase) else { return };
        if !(self.core.is_fully_checkpointed() && self.core.snapshot().log_used_bytes == 0) {
            self.core.handle(Event::CheckpointRequested);
            return;
        }
        self.superblock.epoch += 1;
        self.superblock.epoch_start_position = self.core.head_position();
        self.core.rebase(lsn, self.superblock.epoch);
        let version = self.persist_soon();
        let link = self.destination.as_mut().expect("checked");
        link.unconfirmed.rebased(lsn);
        link.receiver.rebase_performed();
        link.pending_rebase = None;
        link.rebase_persisting = Some(version);
        tracing::info!(group = %self.name, lsn, "bitmap catch-up: the log continues after the source's LSN {lsn}");
    }

    /// Moves received frames into the receiver and executes what it decides.
    pub(super) fn take_frames(&mut self, conn: &mut PeerSession, io: &mut Io, group: usize) {
        self.progress_rebase();
        let link = self.destination.as_mut().expect("destination link");
        while link.receiver.queued() < MAX_QUEUED_FRAMES {
            let Some(frame) = conn.take_received() else { break };
            link.last_heard = Some(std::time::Instant::now());
            let incoming = match frame {
                InFrame::Record { header, buf } => Incoming::Record { header, payload_id: link.keep(buf) },
                InFrame::Control { header, payload } => match header.frame_kind() {
                    FrameKind::CopyData | FrameKind::CopyZero if header.flags & COPY_FLAG_REPAIR != 0 => {
                        Incoming::Repair {
                            volume_index: header.volume_index,
                            offset: header.offset,
                            length: header.length,
                            payload_id: link.keep(payload),
                        }
                    }
                    FrameKind::VerifyChunk => Incoming::Verify {
                        volume_index: header.volume_index,
                        offset: header.offset,
                        length: header.length,
                    },
                    FrameKind::CopyData | FrameKind::CopyZero => {
                        link.copy_frame_arrived(&header);
                        Incoming::Copy {
                            volume_index: header.volume_index,
                            offset: header.offset,
                            length: header.length,
                            payload_id: link.keep(payload),
                        }
                    }
                    FrameKind::CopyVerified => {
                        link.copy_frame_arrived(&header);
                        Incoming::CopyVerified {
                            volume_index: header.volume_index,
                            offset: header.offset,
                            length: header.length,
                        }
                    }
                    FrameKind::CompareStart => {
                        let sizes = self.volumes.iter().map(|v| v.size_bytes).collect();
                        let Ok(block_bytes) = u32::try_from(header.aux) else {
                            conn.close("a comparison block size beyond 4 GiB");
                            return;
                        };
                        let session = link.conn.map_or(0, |c| c.1);
                        // On request only: a cursor past the last volume streams nothing.
                        let start = if header.flags & COMPARE_FLAG_ON_REQUEST != 0 {
                            (u8::try_from(self.volumes.len()).unwrap_or(u8::MAX), 0)
                        } else {
                            (header.volume_index, header.offset)
                        };
                        link.compare = Some(DigestStream::new(session, sizes, start, header.length, block_bytes));
                        continue;
                    }
                    FrameKind::RequestBlocks => {
                        let chunk =
                            Chunk { volume_index: header.volume_index, offset: header.offset, length: header.length };
                        match link.compare.as_mut() {
                            Some(stream) => stream.blocks_requested(chunk),
                            None => {
                                conn.close("the source asked for block hashes without starting a comparison");
                                return;
                            }
                        }
                        continue;
                    }
                    FrameKind::Digest | FrameKind::BlockHashes | FrameKind::VerifyDigest => {
                        conn.close("the source sent comparison answers, which only a destination sends");
                        return;
                    }
                    FrameKind::CopyDone => Incoming::CopyDone,
                    FrameKind::Rebase => Incoming::Rebase { lsn: header.lsn },
                    FrameKind::Barrier => Incoming::Barrier { lsn: header.lsn },
                    FrameKind::Heartbeat => {
                        link.source_durable_lsn = link.source_durable_lsn.max(header.lsn);
                        link.unconfirmed.source_durable(header.lsn);
                        continue;
                    }
                    FrameKind::Ack => {
                        conn.close("the source sent an acknowledgement, which only a destination sends");
                        return;
                    }
                },
            };
            link.receiver.push(incoming);
        }
        let unapplied = self.core.has_unapplied();
        let actions = self.destination.as_mut().expect("destination link").receiver.drive(unapplied);
        for action in actions {
            match action {
                ReceiverAction::Submit { lsn, volume_index, offset, length, op, payload_id, depends_on } => {
                    let link = self.destination.as_mut().expect("destination link");
                    let changed_bytes = if matches!(op, WriteOp::Snapshot { .. }) { 0 } else { u64::from(length) };
                    link.unconfirmed.taken(lsn, (volume_index, offset, changed_bytes));
                    let buf = payload_id.and_then(|id| link.payloads.remove(&id));
                    let payload_bytes = buf.as_ref().map_or(0, |_| length as usize);
                    let pending = PendingWrite {
                        conn: REPLICATED_WRITE_CONN,
                        conn_id: 0,
                        cookie: 0,
                        buf: buf.map(Rc::new),
                        payload_bytes,
                        started: Instant::now(),
                        volume_index,
                    };
                    self.account_write(payload_bytes as u32);
                    self.submit_replicated(pending, lsn, (volume_index, offset, length), op, depends_on);
                }
                ReceiverAction::WriteCopy { volume_index, offset, length, payload_id, end } => {
                    let link = self.destination.as_mut().expect("destination link");
                    let buf = payload_id.and_then(|id| link.payloads.remove(&id));
                    self.write_copy(io, group, (volume_index, offset, length), buf, end);
                }
                ReceiverAction::Persist => {
                    self.persist_soon();
                }
                ReceiverAction::Verify { volume_index, offset, length } => {
                    let chunk = Chunk { volume_index, offset, length };
                    self.hash_for_verify(io, group, chunk);
                }
                ReceiverAction::Rebase { lsn } => {
                    self.destination.as_mut().expect("destination link").pending_rebase = Some(lsn);
                }
                ReceiverAction::Refuse(reason) => {
                    conn.close(&reason);
                    return;
                }
            }
        }
    }

    pub(super) fn write_copy(
        &mut self,
        io: &mut Io,
        group: usize,
        range: (u8, u64, u32),
        payload: Option<AlignedBuf>,
        end: CopyPosition,
    ) {
        let (volume_index, offset, length) = range;
        if self.hold_or_preserve(volume_index, offset, u64::from(length)) {
            let held = super::test_failover_rt::HeldVolumeWrite::Copy { range, payload, end };
            self.held_volume_writes.push(held);
            return;
        }
        self.keep_in_snapshots(std::iter::once((volume_index, offset, u64::from(length))));
        self.volume_writes_in_flight += 1;
        let volume = &self.volumes[usize::from(volume_index)];
        match payload {
            Some(buf) => {
                let fd = types::Fd(volume.io_fd(offset, buf.len() as u64));
                io.submit(Op::CopyWrite { group, end, buf: Some(buf) }, |op| {
                    let Op::CopyWrite { buf: Some(buf), .. } = op else { unreachable!() };
                    opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(offset).build()
                });
            }
            None => {
                let fd = types::Fd(volume.file.as_raw_fd());
                let mode = fallocate_mode(RecordKind::Trim, 0);
                io.submit(Op::CopyWrite { group, end, buf: None }, |_| {
                    opcode::Fallocate::new(fd, u64::from(length)).offset(offset).mode(mode).build()
                });
            }
        }
    }

    /// Completion of a copy write (or hole punch).
    pub(super) fn copy_write_done(
        &mut self,
        end: CopyPosition,
        buf_len: Option<usize>,
        result: i32,
    ) -> Result<(), String> {
        self.volume_writes_in_flight -= 1;
        let link = self.destination.as_mut().expect("destination link");
        let complete = match buf_len {
            Some(len) => result >= 0 && result as usize == len,
            None => result >= 0,
        };
        if !complete {
            link.receiver.copy_failed(end);
            return Err(format!("initial copy write failed (result {result}); the copy resumes after reconnection"));
        }
        link.receiver.copy_written(end);
        self.core.handle(Event::VolumesChangedOutsideLog);
        Ok(())
    }

    /// An acknowledgement when the durable LSN or the copy moved.
    pub(super) fn ack_frame(&mut self) -> Option<OutFrame> {
        let durable_lsn = self.core.snapshot().durable_lsn;
        let link = self.destination.as_mut()?;
        link.conn?;
        let applied_lsn = self.core.applied_prefix_lsn();
        let link = self.destination.as_mut()?;
        let applied_alone_due = std::mem::take(&mut link.applied_ack_due);
        let (lsn, applied_lsn, copy) = link.receiver.ack(durable_lsn, applied_lsn, applied_alone_due)?;
        let rebased = if link.receiver.rebased_on_connection() { ACK_FLAG_REBASED } else { 0 };
        let mut header = match copy {
            CopyPosition::Done => FrameHeader::new(FrameKind::Ack, ACK_FLAG_COPY_DONE | rebased, 0, lsn, 0, 0),
            CopyPosition::At { volume_index, offset } => {
                FrameHeader::new(FrameKind::Ack, rebased, volume_index, lsn, offset, 0)
            }
        };
        header.aux = applied_lsn;
        let header = header.resealed();
        Some(OutFrame::new(header.as_bytes(), None))
    }
}
