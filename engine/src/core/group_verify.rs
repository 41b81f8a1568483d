//! Online verify inside the source's state machine: once the initial copy is
//! complete, a verify pass walks every volume in chunks at a bounded rate.
//! Each chunk is read under a fence like a copy chunk (so the source's bytes
//! are those after a known LSN); its hash goes into the ordered stream, and
//! the destination hashes its chunk at the same point of the stream. A
//! differing chunk is reported and, when repairing, sent again whole under a
//! fence of its own. Chunks in flight cost nothing on the data path beyond
//! the brief fence of their read.

use std::collections::VecDeque;

use super::peer::{CopyPosition, Fence, FencePurpose};
use super::{Action, GroupCore};
use crate::core::compare::{Chunk, ChunkCursor};

/// The most bytes a pass may read ahead of its rate (a burst of a few chunks).
const BURST_CHUNKS: u64 = 4;

/// A verify pass of the source's volumes.
#[derive(Debug)]
pub struct VerifyPass {
    cursor: std::iter::Peekable<ChunkCursor>,
    pub repair: bool,
    rate_bytes_per_s: u64,
    /// Bytes the rate allows now, and when they were last topped up.
    allowance_bytes: f64,
    allowance_at_ms: u64,
    /// Bytes whose chunks were read and hashed.
    pub bytes_issued: u64,
    pub total_bytes: u64,
}

/// What status shows of verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyProgress {
    pub running: bool,
    pub repair: bool,
    pub bytes_issued: u64,
    pub total_bytes: u64,
    /// Chunks waiting to be sent again.
    pub repairs_queued: usize,
}

impl VerifyPass {
    /// Whether the rate allows reading `bytes` more at `now_ms`.
    fn allows(&mut self, bytes: u64, now_ms: u64) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.allowance_at_ms);
        self.allowance_at_ms = self.allowance_at_ms.max(now_ms);
        // A few chunks, or what the rate allows over two ticks of the core
        // (100 ms each), whichever is more: the rate holds between ticks.
        let burst = ((BURST_CHUNKS * bytes) as f64).max(self.rate_bytes_per_s as f64 * 0.2);
        self.allowance_bytes =
            (self.allowance_bytes + self.rate_bytes_per_s as f64 * elapsed_ms as f64 / 1000.0).min(burst);
        if self.allowance_bytes >= bytes as f64 {
            self.allowance_bytes -= bytes as f64;
            true
        } else {
            false
        }
    }
}

impl GroupCore {
    /// Starts a verify pass at `rate_bytes_per_s`; with `repair`, chunks
    /// found different are sent again. Refused while the initial copy or a
    /// catch-up runs, or while another pass does.
    pub fn start_verify(&mut self, rate_bytes_per_s: u64, repair: bool) -> Result<(), String> {
        let now_ms = self.now_ms;
        let remaining = self.copy_remaining_bytes();
        let shipper = self.shipper.as_mut().ok_or("this group is not the source of a partnership")?;
        if shipper.copy_acked != CopyPosition::Done {
            return Err(format!(
                "the destination does not hold the whole copy yet ({remaining} bytes to go); verify once it does"
            ));
        }
        if let Some(pass) = &shipper.verify {
            return Err(format!(
                "a verify pass is already running ({} of {} bytes)",
                pass.bytes_issued, pass.total_bytes
            ));
        }
        assert!(rate_bytes_per_s > 0, "a verify pass has a rate");
        let sizes = shipper.config.volume_sizes_bytes.clone();
        let total_bytes = sizes.iter().sum();
        let cursor = ChunkCursor::new(sizes, shipper.config.copy_chunk_bytes, 0, 0).peekable();
        shipper.verify_repair = repair;
        shipper.verify = Some(VerifyPass {
            cursor,
            repair,
            rate_bytes_per_s,
            allowance_bytes: 0.0,
            allowance_at_ms: now_ms,
            bytes_issued: 0,
            total_bytes,
        });
        Ok(())
    }

    /// The destination's chunk differs from the source's: when the pass
    /// repairs, the chunk is queued to be sent again.
    pub fn verify_mismatch(&mut self, chunk: Chunk) {
        let Some(shipper) = self.shipper.as_mut() else { return };
        if shipper.verify_repair {
            shipper.repairs.push_back(chunk);
        }
    }

    /// The pass in progress, if any.
    #[must_use]
    pub fn verify_progress(&self) -> VerifyProgress {
        let Some(shipper) = self.shipper.as_ref() else { return VerifyProgress::default() };
        shipper.verify.as_ref().map_or(
            VerifyProgress { repairs_queued: shipper.repairs.len(), ..VerifyProgress::default() },
            |pass| VerifyProgress {
                running: true,
                repair: pass.repair,
                bytes_issued: pass.bytes_issued,
                total_bytes: pass.total_bytes,
                repairs_queued: shipper.repairs.len(),
            },
        )
    }

    /// With the copy complete and no fence up: fences the next repair, or
    /// the next chunk the pass's rate allows.
    pub(super) fn advance_verify(&mut self) {
        let now_ms = self.now_ms;
        let next_lsn = self.next_lsn;
        let shipper = self.shipper.as_mut().expect("checked by ship");
        if shipper.fence.is_some() || shipper.copy != CopyPosition::Done || !shipper.copy_done_sent {
            return;
        }
        let (chunk, purpose) = if let Some(chunk) = shipper.repairs.pop_front() {
            (chunk, FencePurpose::Repair)
        } else {
            let Some(pass) = shipper.verify.as_mut() else { return };
            let Some(next) = pass.cursor.peek().copied() else {
                shipper.verify = None;
                return;
            };
            if !pass.allows(u64::from(next.length), now_ms) {
                return;
            }
            pass.cursor.next();
            pass.bytes_issued += u64::from(next.length);
            (next, FencePurpose::Verify)
        };
        let chunk_id = shipper.next_chunk_id;
        shipper.next_chunk_id += 1;
        shipper.fence = Some(Fence {
            chunk_id,
            volume_index: chunk.volume_index,
            offset: chunk.offset,
            length: chunk.length,
            after_lsn: next_lsn - 1,
            read_issued: false,
            purpose,
        });
        self.advance_copy();
    }

    /// A verify or repair chunk was queued: its fence lifts.
    pub(super) fn verify_chunk_shipped(&mut self) {
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.fence = None;
        }
        self.ship();
    }

    /// The connection ended: a pass's chunks in flight will not be
    /// answered, so the pass stops (a repair still queued is kept).
    pub(super) fn verify_peer_lost(&mut self) {
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.verify = None;
        }
    }
}

/// Chunks waiting to be sent again.
pub(super) type RepairQueue = VecDeque<Chunk>;

/// The read of a fenced chunk, as an action.
pub(super) fn read_action(fence: &Fence) -> Action {
    Action::ReadChunk {
        chunk_id: fence.chunk_id,
        volume_index: fence.volume_index,
        offset: fence.offset,
        length: fence.length,
        after_lsn: fence.after_lsn,
        purpose: fence.purpose,
    }
}
