//! A source whose destination is away must not hold writes back forever when
//! its log fills with records the destination lacks (unless the operator
//! chose to, `hold_writes_when_lost`). Those records are folded into the
//! dirty-region bitmap instead: their regions are marked, the bitmap is made
//! durable, and only then may the log reclaim them. When the destination
//! returns it continues after them and copies the marked regions.

use super::{Action, GroupCore};
use crate::core::bitmap::DirtyBitmap;

impl GroupCore {
    /// Gives the group its bitmap (read back from the log device at open).
    pub fn set_bitmap(&mut self, bitmap: DirtyBitmap) {
        self.bitmap = Some(bitmap);
    }

    /// The bitmap's area bytes for the runtime to write.
    #[must_use]
    pub fn bitmap_bytes(&self, len: usize) -> Option<Vec<u8>> {
        self.bitmap.as_ref().map(|b| b.to_bytes(len))
    }

    /// Bytes of the volumes the bitmap marks.
    #[must_use]
    pub fn bitmap_dirty_bytes(&self) -> u64 {
        self.bitmap.as_ref().map_or(0, |b| b.dirty_bytes_from(0, 0))
    }

    /// The marked regions as (volume, offset, length), in order.
    #[must_use]
    pub fn bitmap_regions(&self) -> Vec<(u8, u64, u64)> {
        let mut regions = Vec::new();
        let Some(bitmap) = self.bitmap.as_ref() else { return regions };
        let (mut volume, mut offset) = (0u8, 0u64);
        while let Some((v, start, end)) = bitmap.next_dirty(volume, offset) {
            regions.push((v, start, end - start));
            (volume, offset) = (v, end);
        }
        regions
    }

    /// Times records were folded into the bitmap since this group was opened.
    #[must_use]
    pub fn bitmap_spills(&self) -> u64 {
        self.spills
    }

    /// True when regions are marked (a bitmap catch-up is owed).
    #[must_use]
    pub fn bitmap_dirty(&self) -> bool {
        self.bitmap.as_ref().is_some_and(|b| !b.is_clean())
    }

    /// A destination connected: a spill still being persisted keeps its
    /// records in the log (the connection ships them).
    pub(super) fn cancel_spill(&mut self) {
        if self.spill_in_flight {
            self.spill_cancelled = true;
        }
    }

    /// True while records are being folded into the bitmap.
    pub(super) fn spill_in_flight(&self) -> bool {
        self.spill_in_flight
    }

    /// Clears the bitmap (the destination holds every region) and persists it.
    pub fn clear_bitmap(&mut self) {
        if let Some(bitmap) = self.bitmap.as_mut() {
            bitmap.clear();
            self.request_bitmap_write(None);
        }
    }

    pub(super) fn request_bitmap_write(&mut self, spilled_up_to_lsn: Option<u64>) {
        if self.bitmap_write_in_flight {
            // The next write carries this change; a spill waits for its own.
            self.bitmap_write_again = true;
            return;
        }
        self.bitmap_write_in_flight = true;
        self.actions.push(Action::PersistBitmap { spilled_up_to_lsn });
    }

    /// The bitmap write finished: records it covers may leave the log.
    pub fn bitmap_persisted(&mut self, spilled_up_to_lsn: Option<u64>) {
        assert!(self.bitmap_write_in_flight, "a bitmap write was in flight");
        self.bitmap_write_in_flight = false;
        if let Some(lsn) = spilled_up_to_lsn {
            self.spill_in_flight = false;
            // A destination that connected meanwhile receives the records
            // after all: they stay (the marked regions are merely copied
            // again by a later catch-up, should one be needed).
            if !std::mem::take(&mut self.spill_cancelled) {
                self.retention.as_mut().expect("spills happen on sources").peer_durable(lsn);
                self.spills += 1;
            }
        }
        if std::mem::take(&mut self.bitmap_write_again) {
            self.request_bitmap_write(None);
        }
    }

    /// Folds the retained records into the bitmap when writes wait for log
    /// space that only the absent destination's acknowledgement would free.
    pub(super) fn maybe_spill(&mut self) {
        let Some(shipper) = self.shipper.as_ref() else { return };
        let blocked = self.waiting_for_space
            && !shipper.connected
            && !shipper.config.hold_writes_when_lost
            && !self.spill_in_flight
            && !self.bitmap_write_in_flight
            && self.failed.is_none();
        let Some(bitmap) = self.bitmap.as_mut().filter(|_| blocked) else { return };
        let retention = self.retention.as_ref().expect("a shipper has retention");
        let durable = self.durable_lsn;
        let mut up_to = None;
        for record in retention.records().take_while(|r| r.lsn <= durable) {
            // A record that changes no blocks (a snapshot point) still marks
            // the region at its offset: a reconnection tells records that
            // left the log for the bitmap by a bitmap that is not clean, and
            // refuses a destination behind the log's floor otherwise.
            bitmap.mark(record.volume_index, record.offset, u64::from(record.length).max(1));
            up_to = Some(record.lsn);
        }
        if let Some(lsn) = up_to {
            self.spill_in_flight = true;
            self.request_bitmap_write(Some(lsn));
        }
    }
}
