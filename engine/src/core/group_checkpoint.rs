//! When the write path checkpoints: the volumes are made durable up to the
//! settled LSN and the ring's tail moves, as far as a replication peer allows.

use super::{errno_text, Action, GroupCore, IoFailure};

impl GroupCore {
    /// Where a checkpoint now would put the tail: after the settled records,
    /// or at the first record still retained for the peer.
    pub(super) fn checkpoint_tail(&self) -> (u64, u64) {
        let settled = (self.settled_end_position, self.settled_lsn + 1);
        self.retention.as_ref().map_or(settled, |r| r.tail(settled))
    }

    pub(super) fn maybe_checkpoint(&mut self) {
        let (tail_position, tail_lsn) = self.checkpoint_tail();
        // Worth a checkpoint: more records to make durable in the volumes, or
        // a peer's acknowledgement that lets the tail move.
        let progress =
            self.settled_lsn > self.checkpoint_lsn || tail_position > self.ring.tail() || self.unlogged_changes;
        if self.checkpoint_in_flight || self.failed.is_some() || !progress {
            if self.settled_lsn == self.checkpoint_lsn && self.placed.is_empty() && !self.unlogged_changes {
                self.checkpoint_requested = false;
            }
            return;
        }
        let used_percent = self.ring.used_bytes() * 100 / self.ring.ring_size_bytes();
        let due = self.checkpoint_requested
            || self.waiting_for_space
            || used_percent >= self.config.checkpoint_used_percent
            || self.now_ms.saturating_sub(self.last_checkpoint_ms) >= self.config.checkpoint_interval_ms;
        if due {
            self.checkpoint_in_flight = true;
            self.unlogged_changes = false;
            self.actions.push(Action::Checkpoint { lsn: self.settled_lsn, tail_position, tail_lsn });
        }
    }

    pub(super) fn checkpoint_done(&mut self, lsn: u64, tail_position: u64, result: Result<(), IoFailure>) {
        assert!(self.checkpoint_in_flight, "checkpoint done without one in flight");
        self.checkpoint_in_flight = false;
        self.last_checkpoint_ms = self.now_ms;
        match result {
            Ok(()) => {
                assert!(lsn >= self.checkpoint_lsn && lsn <= self.settled_lsn, "checkpoint LSN {lsn} out of order");
                self.checkpoint_lsn = lsn;
                self.checkpoints += 1;
                self.ring.reclaim_to(tail_position);
            }
            Err(failure) => self.fail(format!("checkpoint failed: {}", errno_text(failure.errno))),
        }
    }
}
