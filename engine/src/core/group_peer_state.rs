//! What the source side of a partnership reports and decides from: the
//! replication state, the copy's progress, the destination's LSNs, and the
//! LSN up to which writes may be acknowledged.

use super::*;

impl GroupCore {
    /// True while the destination has yet to continue its log after a rebase.
    #[must_use]
    pub fn rebase_pending(&self) -> bool {
        self.shipper.as_ref().is_some_and(|s| s.rebase_to.is_some() || s.awaiting_rebase.is_some())
    }

    /// The destination's last acknowledged applied LSN.
    #[must_use]
    pub fn peer_applied_lsn(&self) -> Option<u64> {
        self.shipper.as_ref().map(|s| s.applied_lsn)
    }

    /// The partnership's state for status.
    #[must_use]
    pub fn replication_state(&self) -> Option<ReplicationState> {
        let shipper = self.shipper.as_ref()?;
        let peer_durable = self.retention.as_ref().map_or(0, crate::core::Retention::peer_durable_lsn);
        Some(if !shipper.connected {
            ReplicationState::WaitingForDestination
        } else if shipper.copy_acked != CopyPosition::Done && shipper.pass() == CopyPass::Bitmap {
            ReplicationState::BitmapCatchUp
        } else if shipper.copy_acked != CopyPosition::Done {
            ReplicationState::InitialBlockCopy
        } else if peer_durable < shipper.catch_up_target_lsn {
            ReplicationState::Recovering
        } else {
            ReplicationState::ContinuouslyReplicating
        })
    }

    /// A planned reconnection (its transport changes): for `hold_ms` from
    /// now, sync writes wait for the destination while the session is down,
    /// whatever `hold_writes_when_lost` says, so none completes on this log
    /// alone; then the policy applies again. A new connection ends the hold.
    pub fn hold_writes_for_reconnect(&mut self, hold_ms: u64) {
        let until_ms = self.now_ms.saturating_add(hold_ms);
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.reconnect_hold_until_ms = Some(until_ms);
        }
    }

    /// Changes the mode of the partnership while it runs: from async to
    /// sync, writes acknowledged from now on wait for the destination too;
    /// from sync to async, writes waiting for it are acknowledged at once.
    pub fn set_mode(&mut self, mode: ReplicationMode) {
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.config.mode = mode;
        }
    }

    /// Where this connection's copy starts, its chunk size, and whether it
    /// covers every region (a full copy) or only the bitmap's (a catch-up);
    /// `None` when no copy is under way.
    #[must_use]
    pub fn copy_start(&self) -> Option<CopyStart> {
        let shipper = self.shipper.as_ref()?;
        match shipper.copy {
            CopyPosition::At { volume_index, offset } if shipper.connected => Some(CopyStart {
                position: (volume_index, offset),
                chunk_bytes: shipper.config.copy_chunk_bytes,
                full: shipper.pass() == CopyPass::Full,
            }),
            _ => None,
        }
    }

    /// True once the destination acknowledged the whole initial copy as durable.
    #[must_use]
    pub fn copy_acknowledged(&self) -> bool {
        self.shipper.as_ref().is_some_and(|s| s.copy_acked == CopyPosition::Done)
    }

    /// Bytes of the initial copy still to be acknowledged by the destination.
    #[must_use]
    pub fn copy_remaining_bytes(&self) -> u64 {
        let Some(s) = self.shipper.as_ref() else { return 0 };
        match (s.pass(), s.copy_acked) {
            (_, CopyPosition::Done) => 0,
            (CopyPass::Full, acked) => s.linear(CopyPosition::Done) - s.linear(acked),
            (CopyPass::Bitmap, CopyPosition::At { volume_index, offset }) => {
                self.bitmap.as_ref().map_or(0, |b| b.dirty_bytes_from(volume_index, offset))
            }
        }
    }

    /// The destination's last acknowledged durable LSN.
    #[must_use]
    pub fn peer_durable_lsn(&self) -> Option<u64> {
        self.shipper.as_ref().map(|s| s.acked_lsn)
    }

    /// Sync mode waits for the destination before a write is acknowledged
    /// (once it holds the whole copy, or while it is away under
    /// `hold_writes_when_lost`); the returned LSN bounds what may complete.
    pub(crate) fn completion_limit_lsn(&self) -> u64 {
        let Some(shipper) = self.shipper.as_ref() else { return self.durable_lsn };
        // Connected: the destination counts once it holds the whole copy.
        // Disconnected with `hold_writes_when_lost`: hold, whatever this side
        // remembers of the copy (a restart may have forgotten that it completed).
        let gated = shipper.config.mode == ReplicationMode::Sync
            && if shipper.connected {
                shipper.copy_acked == CopyPosition::Done
            } else {
                shipper.config.hold_writes_when_lost
                    || shipper.reconnect_hold_until_ms.is_some_and(|until| self.now_ms < until)
            };
        if gated {
            self.durable_lsn.min(self.peer_durable_lsn().unwrap_or(0))
        } else {
            self.durable_lsn
        }
    }
}
