//! The source side of a partnership inside the group's state machine: which
//! records to ship and when, the initial block copy interleaved with them in
//! one ordered stream, and the acknowledgement rule of sync mode.
//!
//! Records are shipped as soon as their append is issued, in parallel with it:
//! in sync mode the network and the destination's append take no time of their
//! own beyond the local append. The destination may therefore hold records a
//! crash of the source loses; the reconnection after it repairs that (see
//! `peer_connected` and `core::unconfirmed`).
//!
//! The copy reads the source volumes chunk by chunk. A chunk is read under a
//! fence: writes placed before it that overlap the chunk are applied first,
//! later overlapping writes wait until the read is done, and the chunk enters
//! the stream right after the last record placed before the fence. The
//! destination applies the stream in order, so a newer write never loses to an
//! older copy of its blocks.

use super::{Action, ApplyOp, GroupCore};
use crate::core::bitmap::DirtyBitmap;
use crate::core::unconfirmed::HeldAfter;

/// When a client write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// After the local log and the destination's log hold it.
    Sync,
    /// After the local log holds it; the destination follows.
    Async,
}

/// How a source replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub mode: ReplicationMode,
    /// Sync mode without a destination: hold writes (`true`, RPO 0 across
    /// disconnects) or go on acknowledging after the local log (`false`).
    pub hold_writes_when_lost: bool,
    /// Bytes per initial-copy chunk.
    pub copy_chunk_bytes: u32,
    /// Size of every volume of the group, in order.
    pub volume_sizes_bytes: Vec<u64>,
    /// Log bytes shipped but not yet acknowledged before shipping pauses.
    pub max_unacked_log_bytes: u64,
    /// Copy bytes shipped but not yet acknowledged before copying pauses.
    pub max_unacked_copy_bytes: u64,
    /// The destination completed the initial copy before (persisted on this
    /// side): sync mode holds writes for it from the start, even before the
    /// first connection after a restart.
    pub copy_complete: bool,
}

/// A copy about to start on a connection (see `GroupCore::copy_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStart {
    pub position: (u8, u64),
    pub chunk_bytes: u32,
    /// Every region (the initial sync), or the bitmap's (a catch-up).
    pub full: bool,
}

/// How far the destination's initial copy has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPosition {
    /// The next chunk starts here.
    At { volume_index: u8, offset: u64 },
    /// Every volume is copied (and the destination made it durable).
    Done,
}

impl CopyPosition {
    /// The copy progress a destination's superblock holds.
    #[must_use]
    pub fn from_entry(entry: &tandem_proto::PartnershipEntry) -> Self {
        if entry.copy_state == tandem_proto::COPY_DONE {
            Self::Done
        } else {
            let volume_index = u8::try_from(entry.copy_volume).unwrap_or(u8::MAX);
            Self::At { volume_index, offset: entry.copy_offset }
        }
    }
}

/// What status calls the partnership's state (as Storage Replica does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationState {
    WaitingForDestination,
    InitialBlockCopy,
    BitmapCatchUp,
    Recovering,
    ContinuouslyReplicating,
}

impl ReplicationState {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::WaitingForDestination => "WaitingForDestination",
            Self::InitialBlockCopy => "InitialBlockCopy",
            Self::BitmapCatchUp => "BitmapCatchUp",
            Self::Recovering => "Recovering",
            Self::ContinuouslyReplicating => "ContinuouslyReplicating",
        }
    }
}

/// A chunk being read under a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fence {
    pub chunk_id: u64,
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
    /// The chunk shows the state after this LSN.
    pub after_lsn: u64,
    pub read_issued: bool,
    pub purpose: FencePurpose,
}

/// Why a chunk is read under a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencePurpose {
    /// The initial copy or a bitmap catch-up.
    Copy,
    /// Online verify: hash it for comparison with the destination's.
    Verify,
    /// Send it again whole: verify found it different.
    Repair,
}

impl Fence {
    pub(super) fn holds(&self, apply: &ApplyOp) -> bool {
        apply.lsn > self.after_lsn && self.overlaps(apply)
    }

    fn overlaps(&self, apply: &ApplyOp) -> bool {
        apply.volume_index == self.volume_index
            && apply.offset < self.offset + u64::from(self.length)
            && self.offset < apply.offset + u64::from(apply.length)
    }
}

/// Source-side shipping state.
#[derive(Debug)]
pub(super) struct Shipper {
    pub config: PeerConfig,
    pub connected: bool,
    pub next_ship_lsn: u64,
    /// Where the next chunk starts, as far as this side has shipped.
    pub copy: CopyPosition,
    /// The destination's durable copy progress (from its acknowledgements).
    pub copy_acked: CopyPosition,
    pub copy_done_sent: bool,
    pub fence: Option<Fence>,
    pub next_chunk_id: u64,
    /// The local durable LSN when the connection came up: until the peer has
    /// it, the partnership is catching up (`Recovering`).
    pub catch_up_target_lsn: u64,
    /// The destination's acknowledged durable LSN (the retention floor may be
    /// higher: records folded into the bitmap left the log unacknowledged).
    pub acked_lsn: u64,
    /// The destination completed a copy once: any later copy is a bitmap pass.
    pub copy_ever_completed: bool,
    /// Tell the destination first to continue after this LSN (bitmap catch-up).
    pub rebase_to: Option<u64>,
    /// A rebase to this LSN was sent: acknowledgements below it predate it
    /// and say nothing about the new copy.
    pub awaiting_rebase: Option<u64>,
    /// Chunks sent and not yet acknowledged: (end, as a linear position; bytes).
    /// A bitmap pass skips clean regions, so positions alone do not tell
    /// how much is in flight.
    pub copy_in_flight: std::collections::VecDeque<(u64, u64)>,
    /// The destination's applied LSN (its volumes hold every record up to it).
    pub applied_lsn: u64,
    /// Until then (`now_ms`) sync writes wait for the destination while it
    /// is away (a planned reconnection; see `hold_writes_for_reconnect`).
    pub reconnect_hold_until_ms: Option<u64>,
    /// The verify pass in progress, whether its mismatches are repaired, and
    /// the chunks waiting to be sent again.
    pub verify: Option<super::verify::VerifyPass>,
    pub verify_repair: bool,
    pub repairs: super::verify::RepairQueue,
}

/// Which regions a copy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyPass {
    /// Every region: the initial copy.
    Full,
    /// The regions the bitmap marks.
    Bitmap,
}

impl Shipper {
    fn linear(&self, position: CopyPosition) -> u64 {
        match position {
            CopyPosition::Done => self.config.volume_sizes_bytes.iter().sum(),
            CopyPosition::At { volume_index, offset } => {
                self.config.volume_sizes_bytes[..usize::from(volume_index)].iter().sum::<u64>() + offset
            }
        }
    }

    /// The destination's log continues after `lsn`, and the copy starts
    /// over (the bitmap's regions, or every region before a first complete copy).
    fn start_rebase(&mut self, lsn: u64) {
        self.rebase_to = Some(lsn);
        self.awaiting_rebase = Some(lsn);
        self.next_ship_lsn = lsn + 1;
        self.copy = CopyPosition::At { volume_index: 0, offset: 0 };
        self.copy_acked = self.copy;
        self.copy_done_sent = false;
    }

    pub(super) fn pass(&self) -> CopyPass {
        if self.copy_ever_completed {
            CopyPass::Bitmap
        } else {
            CopyPass::Full
        }
    }

    /// The chunk after `position`, or `None` when the copy is complete.
    fn chunk_at(&self, bitmap: Option<&DirtyBitmap>, position: CopyPosition) -> Option<(u8, u64, u32)> {
        let CopyPosition::At { mut volume_index, mut offset } = position else { return None };
        if self.pass() == CopyPass::Bitmap {
            let (volume_index, start, end) = bitmap?.next_dirty(volume_index, offset)?;
            let length = (end - start).min(u64::from(self.config.copy_chunk_bytes)) as u32;
            return Some((volume_index, start, length));
        }
        loop {
            let size = *self.config.volume_sizes_bytes.get(usize::from(volume_index))?;
            if offset < size {
                let length = (size - offset).min(u64::from(self.config.copy_chunk_bytes)) as u32;
                return Some((volume_index, offset, length));
            }
            volume_index += 1;
            offset = 0;
        }
    }
}

impl GroupCore {
    /// Makes this group a replication source whose destination holds (or will
    /// hold, through the initial copy) everything up to the returned LSN; every
    /// later record is kept in the log until the destination acknowledges it.
    pub fn attach_peer(&mut self, config: PeerConfig) -> u64 {
        assert!(self.shipper.is_none(), "a group has at most one partnership");
        let baseline_lsn = self.next_lsn - 1;
        if self.retention.is_none() {
            self.retention = Some(super::Retention::new(baseline_lsn, std::iter::empty()));
        }
        let baseline_lsn = self.retention.as_ref().expect("set above").peer_durable_lsn();
        self.set_apply_after_durable(true);
        let config_copy_complete = config.copy_complete;
        let copy_acked =
            if config.copy_complete { CopyPosition::Done } else { CopyPosition::At { volume_index: 0, offset: 0 } };
        self.shipper = Some(Shipper {
            config,
            connected: false,
            next_ship_lsn: baseline_lsn + 1,
            copy: CopyPosition::At { volume_index: 0, offset: 0 },
            copy_acked,
            copy_done_sent: false,
            fence: None,
            next_chunk_id: 1,
            catch_up_target_lsn: 0,
            acked_lsn: baseline_lsn,
            copy_ever_completed: config_copy_complete,
            rebase_to: None,
            awaiting_rebase: None,
            copy_in_flight: std::collections::VecDeque::new(),
            applied_lsn: 0,
            reconnect_hold_until_ms: None,
            verify: None,
            verify_repair: false,
            repairs: std::collections::VecDeque::new(),
        });
        baseline_lsn
    }

    /// Ends the partnership: nothing is retained or shipped any more.
    pub fn detach_peer(&mut self) {
        self.shipper = None;
        self.retention = None;
        self.set_apply_after_durable(false);
    }

    /// The destination is connected, holds every record up to
    /// `peer_durable_lsn` durably (and up to `next_lsn - 1` on its way to its
    /// log) and the copy up to `copy`. `diverged`: this source recovered only
    /// up to LSN S since the destination was last connected, and the
    /// destination holds records after S (shipped while their append here was
    /// in flight, then lost in a crash), whose ranges it lists. Refused (with
    /// the reason) when this log no longer holds what the destination lacks,
    /// or when the destination claims records this source never wrote.
    pub fn peer_connected(
        &mut self,
        peer_durable_lsn: u64,
        next_lsn: u64,
        copy: CopyPosition,
        diverged: Option<(u64, HeldAfter)>,
    ) -> Result<(), String> {
        if let Some((recovered_lsn, held)) = diverged {
            return self.peer_connected_diverged(peer_durable_lsn, recovered_lsn, &held);
        }
        let last_lsn = self.next_lsn - 1;
        if next_lsn <= peer_durable_lsn || next_lsn - 1 > last_lsn {
            return Err(format!(
                "the destination continues at LSN {next_lsn} with LSN {peer_durable_lsn} durable, but this source \
                 has written only up to LSN {last_lsn}; its log does not follow this group (remove and re-create the \
                 partnership)"
            ));
        }
        let retention = self.retention.as_mut().expect("connected without a partnership");
        let floor = retention.peer_durable_lsn();
        let bitmap_dirty = self.bitmap.as_ref().is_some_and(|b| !b.is_clean());
        if peer_durable_lsn < floor && !bitmap_dirty {
            return Err(format!(
                "the destination holds records up to LSN {peer_durable_lsn} but this source's log keeps records \
                 only from LSN {} on; remove and re-create the partnership to copy the volumes again",
                floor + 1
            ));
        }
        retention.peer_durable(peer_durable_lsn);
        self.connected_at(peer_durable_lsn);
        let shipper = self.shipper.as_mut().expect("connected without a partnership");
        if peer_durable_lsn < floor {
            // Records up to the floor left the log for the bitmap: the
            // destination continues after the floor and copies the marked
            // regions (or everything, if it never had a complete copy).
            shipper.start_rebase(floor);
            return Ok(());
        }
        shipper.rebase_to = None;
        shipper.awaiting_rebase = None;
        shipper.next_ship_lsn = next_lsn;
        shipper.copy = copy;
        shipper.copy_acked = copy;
        shipper.copy_done_sent = copy == CopyPosition::Done;
        if copy == CopyPosition::Done && bitmap_dirty && !self.spill_in_flight() {
            // A pass completed before the bitmap's clearing was persisted.
            self.clear_bitmap();
        }
        Ok(())
    }

    /// Reconnection after this source lost records the destination holds
    /// (see `peer_connected`): their ranges go into the bitmap (every
    /// region when the destination cannot list them), the destination's log
    /// continues once the bitmap is durable, after the recovered LSN or the
    /// destination's durable LSN, whichever is lower (what it took beyond
    /// that may not survive its own crash; this log ships it again), or
    /// after the retention floor if that is later; and the bitmap catch-up
    /// copies the regions.
    fn peer_connected_diverged(
        &mut self,
        peer_durable_lsn: u64,
        recovered_lsn: u64,
        held: &HeldAfter,
    ) -> Result<(), String> {
        let last_lsn = self.next_lsn - 1;
        assert!(recovered_lsn <= last_lsn, "recovered LSN {recovered_lsn} is after the last placed {last_lsn}");
        let shipper = self.shipper.as_ref().expect("connected without a partnership");
        let volume_sizes = shipper.config.volume_sizes_bytes.clone();
        match self.bitmap.as_mut() {
            Some(bitmap) => match held {
                HeldAfter::Ranges(ranges) => {
                    for &(volume_index, offset, length) in ranges {
                        let Some(&size) = volume_sizes.get(usize::from(volume_index)) else {
                            return Err(format!(
                                "the destination reported records in volume {volume_index}, but this group has {} \
                                 volumes; its log does not follow this group (remove and re-create the partnership)",
                                volume_sizes.len()
                            ));
                        };
                        // Ranges come widened to aligned blocks: the last
                        // one may reach past the end of its volume.
                        if offset < size {
                            bitmap.mark(volume_index, offset, length.min(size - offset));
                        }
                    }
                }
                HeldAfter::Unknown => {
                    for (volume_index, size) in (0u8..).zip(&volume_sizes) {
                        bitmap.mark(volume_index, 0, *size);
                    }
                }
            },
            // Without a bitmap only a copy that starts over can help, and
            // only the initial copy starts over from the first block.
            None if shipper.pass() == CopyPass::Bitmap => {
                return Err(format!(
                    "the destination holds records after LSN {recovered_lsn}, which this source lost in a crash, \
                     and this group's log has no dirty-region bitmap to copy them again; remove and re-create the \
                     partnership"
                ))
            }
            None => {}
        }
        self.request_bitmap_write(None);
        let retention = self.retention.as_mut().expect("connected without a partnership");
        let rebase_lsn = retention.peer_durable_lsn().max(recovered_lsn.min(peer_durable_lsn));
        retention.peer_durable(rebase_lsn);
        self.connected_at(rebase_lsn);
        self.shipper.as_mut().expect("checked above").start_rebase(rebase_lsn);
        Ok(())
    }

    /// The connection state every reconnection starts from.
    fn connected_at(&mut self, peer_durable_lsn: u64) {
        self.cancel_spill();
        let durable_lsn = self.durable_lsn;
        let shipper = self.shipper.as_mut().expect("connected without a partnership");
        shipper.connected = true;
        shipper.reconnect_hold_until_ms = None;
        shipper.fence = None;
        shipper.copy_in_flight.clear();
        shipper.catch_up_target_lsn = durable_lsn;
        shipper.acked_lsn = peer_durable_lsn;
    }

    /// The connection to the destination is gone; a chunk being read is
    /// abandoned (it is read again after reconnection).
    pub fn peer_lost(&mut self) {
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.connected = false;
            shipper.fence = None;
        }
        self.verify_peer_lost();
    }

    /// The destination acknowledged its durable LSN and copy progress.
    pub fn peer_acknowledged(&mut self, durable_lsn: u64, copy: CopyPosition) {
        self.handle(super::Event::PeerDurable { lsn: durable_lsn });
        let Some(shipper) = self.shipper.as_mut() else { return };
        shipper.acked_lsn = shipper.acked_lsn.max(durable_lsn);
        match shipper.awaiting_rebase {
            Some(floor) if durable_lsn < floor => return,
            Some(_) => shipper.awaiting_rebase = None,
            None => {}
        }
        let completed = copy == CopyPosition::Done && shipper.copy_acked != CopyPosition::Done;
        shipper.copy_acked = copy;
        if completed {
            // Whatever the pass, the destination now holds every region.
            shipper.copy_ever_completed = true;
            if self.bitmap.as_ref().is_some_and(|b| !b.is_clean()) {
                self.clear_bitmap();
            }
        }
    }

    /// The chunk `chunk_id` was read and queued for sending after its records.
    pub fn chunk_shipped(&mut self, chunk_id: u64) {
        let Some(shipper) = self.shipper.as_mut() else { return };
        let Some(fence) = shipper.fence.filter(|f| f.chunk_id == chunk_id) else { return };
        if fence.purpose != FencePurpose::Copy {
            self.verify_chunk_shipped();
            return;
        }
        shipper.fence = None;
        let next =
            CopyPosition::At { volume_index: fence.volume_index, offset: fence.offset + u64::from(fence.length) };
        let end = shipper.linear(next);
        shipper.copy_in_flight.push_back((end, u64::from(fence.length)));
        shipper.copy = match shipper.chunk_at(self.bitmap.as_ref(), next) {
            Some((volume_index, offset, _)) => CopyPosition::At { volume_index, offset },
            None => CopyPosition::Done,
        };
        // The next chunk may start now, without waiting for another event.
        self.ship();
    }

    /// The destination's volumes hold every record up to `lsn`.
    pub fn peer_applied(&mut self, lsn: u64) {
        if let Some(shipper) = self.shipper.as_mut() {
            shipper.applied_lsn = shipper.applied_lsn.max(lsn);
        }
    }

    /// Emits Ship actions for durable records (up to a fence), and starts,
    /// issues and finishes the initial copy's chunks.
    pub(super) fn ship(&mut self) {
        let Some(shipper) = self.shipper.as_mut() else { return };
        if !shipper.connected || self.failed.is_some() {
            return;
        }
        if shipper.rebase_to.is_some() && (self.bitmap_write_in_flight || self.bitmap_write_again) {
            // The regions a rebase leaves to the copy are durable in the
            // bitmap before the destination forgets its records.
            return;
        }
        if let Some(lsn) = shipper.rebase_to.take() {
            self.actions.push(Action::SendRebase { lsn });
        }
        let retention = self.retention.as_ref().expect("a shipper has retention");
        // A record ships once its append is issued (placed records are in a
        // batch on its way to the log), in parallel with that append.
        let placed_lsn = self.next_lsn - 1;
        let ship_limit = shipper.fence.map_or(placed_lsn, |f| f.after_lsn.min(placed_lsn));
        let first_unacked = retention.records().next().map(|r| r.position);
        while shipper.next_ship_lsn <= ship_limit {
            let record = *retention.get(shipper.next_ship_lsn).expect("unacknowledged records are retained");
            let unacked = first_unacked.map_or(0, |first| record.position - first);
            if unacked >= shipper.config.max_unacked_log_bytes {
                break;
            }
            self.actions.push(Action::Ship {
                lsn: record.lsn,
                position: record.position,
                end_position: record.end_position,
                depends_on: record.depends_on,
            });
            shipper.next_ship_lsn += 1;
        }
        self.advance_copy();
    }

    pub(super) fn advance_copy(&mut self) {
        let next_lsn = self.next_lsn;
        let shipper = self.shipper.as_mut().expect("checked by ship");
        match shipper.fence {
            None => {
                let acked = shipper.linear(shipper.copy_acked);
                while shipper.copy_in_flight.front().is_some_and(|(end, _)| *end <= acked) {
                    shipper.copy_in_flight.pop_front();
                }
                let unacked: u64 = shipper.copy_in_flight.iter().map(|(_, bytes)| bytes).sum();
                if unacked >= shipper.config.max_unacked_copy_bytes {
                    return;
                }
                match shipper.chunk_at(self.bitmap.as_ref(), shipper.copy) {
                    Some((volume_index, offset, length)) => {
                        let chunk_id = shipper.next_chunk_id;
                        shipper.next_chunk_id += 1;
                        let after_lsn = next_lsn - 1;
                        shipper.fence = Some(Fence {
                            chunk_id,
                            volume_index,
                            offset,
                            length,
                            after_lsn,
                            read_issued: false,
                            purpose: FencePurpose::Copy,
                        });
                        // Issue its read at once when nothing holds it back.
                        self.advance_copy();
                    }
                    None if !shipper.copy_done_sent && shipper.next_ship_lsn == next_lsn => {
                        shipper.copy_done_sent = true;
                        shipper.copy = CopyPosition::Done;
                        self.actions.push(Action::SendCopyDone { after_lsn: shipper.next_ship_lsn - 1 });
                    }
                    None if shipper.copy_acked == CopyPosition::Done => self.advance_verify(),
                    None => {}
                }
            }
            Some(fence) if !fence.read_issued => {
                let shipped = shipper.next_ship_lsn > fence.after_lsn;
                let applied = !self
                    .apply_inflight
                    .iter()
                    .chain(self.apply_queue.iter())
                    .any(|a| a.lsn <= fence.after_lsn && fence.overlaps(a));
                if shipped && applied {
                    shipper.fence = Some(Fence { read_issued: true, ..fence });
                    self.actions.push(super::verify::read_action(&fence));
                }
            }
            Some(_) => {}
        }
    }

    /// The fence of the chunk being copied, which holds back overlapping applies.
    pub(super) fn fence(&self) -> Option<Fence> {
        self.shipper.as_ref().and_then(|s| s.fence)
    }
}

#[path = "group_peer_state.rs"]
mod state;
