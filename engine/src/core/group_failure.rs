//! What the write path does once an IO error has failed the group: every
//! write is answered with the error, none is acknowledged as durable.

use super::{Action, ApplyOp, GroupCore, WriteError};

impl GroupCore {
    pub(super) fn fail(&mut self, reason: String) {
        if self.failed.is_none() {
            self.failed = Some(reason);
        }
    }

    pub(super) fn fail_pending_if_failed(&mut self) {
        let Some(reason) = self.failed.clone() else { return };
        for (request, _) in self.pending.drain(..) {
            self.actions
                .push(Action::Complete { id: request.id, result: Err(WriteError::GroupFailed(reason.clone())) });
        }
    }

    /// After a failure, writes whose IO has finished are answered with the error;
    /// those still in flight are answered when their IO reports back.
    pub(super) fn fail_placed(&mut self) {
        let reason = self.failed.clone().expect("only called when failed");
        let apply_waiting: Vec<ApplyOp> = self.apply_queue.drain(..).collect();
        for apply in &apply_waiting {
            self.forget_unapplied(apply);
        }
        let apply_waiting: Vec<u64> = apply_waiting.iter().map(|a| a.lsn).collect();
        for record in self.placed.iter_mut() {
            if apply_waiting.contains(&record.lsn) {
                record.applied = true;
            }
        }
        let batches_in_flight = !self.batches.is_empty();
        for record in self.placed.iter_mut() {
            if record.completed || !record.applied || batches_in_flight {
                continue;
            }
            record.completed = true;
            let result = Err(WriteError::GroupFailed(reason.clone()));
            self.actions.push(Action::Complete { id: record.write_id, result });
        }
        self.placed.retain(|r| !r.completed || !r.applied);
    }
}
