//! The destination side of a partnership on the group's core: records go
//! into the log in the source's LSN order, copy frames are written to the
//! volumes between them in stream order, and acknowledgements report what is
//! durable here.

use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{opcode, types};
use tandem_proto::{FrameHeader, FrameKind, RecordKind, ACK_FLAG_COPY_DONE, FLAG_NO_HOLE};

use super::buf::AlignedBuf;
use super::group_io::{GroupRt, PendingWrite};
use super::io::{Io, Op};
use super::log_store::fallocate_mode;
use super::peer_conn::{InFrame, OutFrame, PeerConn};
use crate::core::{CopyPosition, Event, WriteOp};

/// Marks a write that came from the source: it has no client to answer.
pub const REPLICATED_WRITE_CONN: usize = usize::MAX;

/// Receiving state of a destination group.
#[derive(Debug)]
pub struct DestinationLink {
    /// The connection from the source (reactor key and id), when connected.
    pub conn: Option<(usize, u64)>,
    /// Initial copy written so far (in the volumes, durable at the next checkpoint).
    pub copy_written: CopyPosition,
    /// The copy is complete once the checkpoint that follows it is durable.
    pub copy_done_received: bool,
    /// The copy state last persisted in the superblock.
    pub copy_persisted: CopyPosition,
    copy_write_in_flight: bool,
    acked: Option<(u64, CopyPosition)>,
    pub last_frame_at: Option<Instant>,
}

impl DestinationLink {
    #[must_use]
    pub fn new(copy_persisted: CopyPosition) -> Self {
        Self {
            conn: None,
            copy_written: copy_persisted,
            copy_done_received: copy_persisted == CopyPosition::Done,
            copy_persisted,
            copy_write_in_flight: false,
            acked: None,
            last_frame_at: None,
        }
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        self.conn = None;
        self.acked = None;
    }

    /// What the next checkpoint may persist: the copy written before it began.
    #[must_use]
    pub fn copy_to_persist(&self) -> CopyPosition {
        if self.copy_done_received && !self.copy_write_in_flight {
            CopyPosition::Done
        } else {
            self.copy_written
        }
    }
}

impl GroupRt {
    /// Takes received frames in order while the group can: a record while a
    /// copy write is in flight, or a copy frame while records are still being
    /// applied, waits (stream order is apply order).
    pub(super) fn take_frames(&mut self, conn: &mut PeerConn, io: &mut Io, group: usize) {
        while let Some(frame) = conn.take_received() {
            let link = self.destination.as_mut().expect("destination link");
            link.last_frame_at = Some(Instant::now());
            let busy_copying = link.copy_write_in_flight;
            match frame {
                InFrame::Record { header, buf } => {
                    if busy_copying {
                        conn.put_back(InFrame::Record { header, buf });
                        return;
                    }
                    let op = match header.record_kind() {
                        RecordKind::Write => WriteOp::Write { payload_checksum: header.payload_checksum },
                        RecordKind::Trim => WriteOp::Trim,
                        RecordKind::WriteZeroes => WriteOp::WriteZeroes { no_hole: header.flags & FLAG_NO_HOLE != 0 },
                        RecordKind::Pad => {
                            conn.close("the source shipped a pad record, which stays local to each log");
                            return;
                        }
                    };
                    if let Err(reason) = self.check_range(header.volume_index, header.offset, header.length) {
                        conn.close(&format!("record LSN {}: {reason}", header.lsn));
                        return;
                    }
                    let payload_bytes = header.payload_bytes() as usize;
                    let pending = PendingWrite {
                        conn: REPLICATED_WRITE_CONN,
                        conn_id: 0,
                        cookie: 0,
                        buf: buf.map(std::rc::Rc::new),
                        payload_bytes,
                        started: Instant::now(),
                    };
                    self.account_write(payload_bytes as u32);
                    self.submit_replicated(pending, header, op);
                }
                InFrame::Control { header, payload } => {
                    if !self.take_control(conn, io, group, header, payload) {
                        return;
                    }
                }
            }
        }
    }

    fn check_range(&self, volume_index: u8, offset: u64, length: u32) -> Result<(), String> {
        let volume = self
            .volumes
            .get(usize::from(volume_index))
            .ok_or_else(|| format!("volume {volume_index} does not exist here ({} volumes)", self.volumes.len()))?;
        if offset + u64::from(length) > volume.size_bytes {
            return Err(format!(
                "range {offset}+{length} is beyond volume {volume_index} ({} bytes)",
                volume.size_bytes
            ));
        }
        Ok(())
    }

    /// Returns false when the frame had to wait (or the connection closes).
    fn take_control(
        &mut self,
        conn: &mut PeerConn,
        io: &mut Io,
        group: usize,
        header: FrameHeader,
        payload: Option<AlignedBuf>,
    ) -> bool {
        let kind = header.frame_kind();
        let link = self.destination.as_mut().expect("destination link");
        let must_wait = match kind {
            FrameKind::CopyData | FrameKind::CopyZero => link.copy_write_in_flight || self.core.has_unapplied(),
            FrameKind::CopyDone => link.copy_write_in_flight,
            FrameKind::Heartbeat => false,
            FrameKind::Ack => {
                conn.close("the source sent an acknowledgement, which only a destination sends");
                return false;
            }
        };
        if must_wait {
            conn.put_back(InFrame::Control { header, payload });
            return false;
        }
        match kind {
            FrameKind::CopyData | FrameKind::CopyZero => {
                if let Err(reason) = self.check_range(header.volume_index, header.offset, header.length) {
                    conn.close(&format!("copy frame: {reason}"));
                    return false;
                }
                self.write_copy(io, group, header, payload);
            }
            FrameKind::CopyDone => {
                link.copy_done_received = true;
                self.persist_soon();
            }
            FrameKind::Heartbeat | FrameKind::Ack => {}
        }
        true
    }

    fn write_copy(&mut self, io: &mut Io, group: usize, header: FrameHeader, payload: Option<AlignedBuf>) {
        let volume = &self.volumes[usize::from(header.volume_index)];
        let link = self.destination.as_mut().expect("destination link");
        link.copy_write_in_flight = true;
        let end =
            CopyPosition::At { volume_index: header.volume_index, offset: header.offset + u64::from(header.length) };
        let offset = header.offset;
        match payload {
            Some(buf) => {
                let sector = u64::from(volume.sector_bytes);
                let aligned = offset.is_multiple_of(sector) && (buf.len() as u64).is_multiple_of(sector);
                let file = volume.direct_file.as_ref().filter(|_| aligned).unwrap_or(&volume.file);
                let fd = types::Fd(file.as_raw_fd());
                io.submit(Op::CopyWrite { group, end, buf: Some(buf) }, |op| {
                    let Op::CopyWrite { buf: Some(buf), .. } = op else { unreachable!() };
                    opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(offset).build()
                });
            }
            None => {
                let fd = types::Fd(volume.file.as_raw_fd());
                let mode = fallocate_mode(RecordKind::Trim, 0);
                io.submit(Op::CopyWrite { group, end, buf: None }, |_| {
                    opcode::Fallocate::new(fd, u64::from(header.length)).offset(offset).mode(mode).build()
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
        let link = self.destination.as_mut().expect("destination link");
        link.copy_write_in_flight = false;
        let complete = match buf_len {
            Some(len) => result >= 0 && result as usize == len,
            None => result >= 0,
        };
        if !complete {
            return Err(format!("initial copy write failed (result {result}); the copy resumes after reconnection"));
        }
        link.copy_written = end;
        self.core.handle(Event::VolumesChangedOutsideLog);
        Ok(())
    }

    /// An acknowledgement when the durable LSN or the copy moved.
    pub(super) fn ack_frame(&mut self) -> Option<OutFrame> {
        let durable_lsn = self.core.snapshot().durable_lsn;
        let link = self.destination.as_mut()?;
        link.conn?;
        let copy = if link.copy_persisted == CopyPosition::Done { CopyPosition::Done } else { link.copy_written };
        if link.acked == Some((durable_lsn, copy)) {
            return None;
        }
        link.acked = Some((durable_lsn, copy));
        let header = match copy {
            CopyPosition::Done => FrameHeader::new(FrameKind::Ack, ACK_FLAG_COPY_DONE, 0, durable_lsn, 0, 0),
            CopyPosition::At { volume_index, offset } => {
                FrameHeader::new(FrameKind::Ack, 0, volume_index, durable_lsn, offset, 0)
            }
        };
        Some(OutFrame::new(header.as_bytes(), None))
    }
}
