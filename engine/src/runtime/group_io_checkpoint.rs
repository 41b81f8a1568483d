//! Checkpoints of a group: the volumes made durable up to a settled LSN
//! (fdatasync of each volume), then the superblock that records it, after
//! which the log ring reclaims the space.

use super::*;

impl GroupRt {
    pub(super) fn start_checkpoint(
        &mut self,
        io: &mut Io,
        group: usize,
        lsn: u64,
        (tail_position, tail_lsn): (u64, u64),
    ) {
        assert!(self.checkpoint.is_none(), "one checkpoint at a time");
        let fsyncs_left = self.volumes.len();
        let partnership = self.partnership_to_persist();
        let meta_version = self.meta_version;
        self.checkpoint =
            Some(CheckpointIo { lsn, tail_position, tail_lsn, fsyncs_left, failure: None, partnership, meta_version });
        for volume in &self.volumes {
            let fd = types::Fd(volume.file.as_raw_fd());
            io.submit(Op::Fsync { group }, |_| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build());
        }
    }

    /// Completion of a checkpoint fdatasync; the last one writes the superblock.
    pub fn fsync_done(&mut self, io: &mut Io, group: usize, result: i32) {
        let checkpoint = self.checkpoint.as_mut().expect("fsync belongs to a checkpoint");
        if result < 0 {
            checkpoint.failure = Some(-result);
        }
        checkpoint.fsyncs_left -= 1;
        if checkpoint.fsyncs_left > 0 {
            return;
        }
        if checkpoint.failure.is_some() {
            self.finish_checkpoint(0);
            return;
        }
        // The volumes are durable up to the checkpoint LSN: only now may the
        // superblock say so and the ring reuse the space.
        self.superblock.checkpoint_lsn = checkpoint.lsn;
        self.superblock.tail_position = checkpoint.tail_position;
        self.superblock.tail_lsn = checkpoint.tail_lsn;
        if self.superblock.role != tandem_proto::ROLE_STANDALONE {
            self.superblock.partnership = checkpoint.partnership;
        }
        self.superblock.sequence += 1;
        let buf = sealed_slot(&mut self.superblock);
        let fd = types::Fd(self.log.file.as_raw_fd());
        let offset = self.superblock.slot_offset();
        io.submit(Op::SuperblockWrite { group, buf }, |op| {
            let Op::SuperblockWrite { buf, .. } = op else { unreachable!() };
            opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(offset).build()
        });
    }

    /// Completion of the checkpoint's superblock write.
    pub fn finish_checkpoint(&mut self, result: i32) {
        let checkpoint = self.checkpoint.take().expect("checkpoint in flight");
        let errno = checkpoint.failure.or(if result < 0 { Some(-result) } else { None });
        let result = errno.map_or(Ok(()), |errno| Err(IoFailure { errno }));
        if result.is_err() {
            tracing::error!(group = %self.name, ?result, "checkpoint failed");
        }
        if let (Some(link), Ok(())) = (self.destination.as_mut(), &result) {
            link.receiver.persisted(crate::core::CopyPosition::from_entry(&checkpoint.partnership));
            if link.rebase_persisting.is_some_and(|v| v <= checkpoint.meta_version) {
                link.rebase_persisting = None;
                link.receiver.rebased();
            }
        }
        let version = checkpoint.meta_version;
        if result.is_ok() && self.announce_cap.is_some_and(|(_, cleared_in)| cleared_in <= version) {
            self.announce_cap = None;
        }
        let reply_now: Vec<_> =
            self.persist_waiters.iter().filter(|(v, _)| *v <= version).map(|(_, r)| r.clone()).collect();
        self.persist_waiters.retain(|(v, _)| *v > version);
        for reply in reply_now {
            let _ = reply
                .send(result.map_err(|e| {
                    format!("writing the superblock failed: {}", crate::core::group::errno_text(e.errno))
                }));
        }
        self.core.handle(Event::CheckpointDone {
            lsn: checkpoint.lsn,
            tail_position: checkpoint.tail_position,
            result,
        });
    }
}
