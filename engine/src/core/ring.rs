//! Space accounting of the circular log.
//!
//! Positions are byte offsets in the unwrapped stream of everything ever written
//! to the ring; the ring offset is `position % ring_size`. Using unwrapped
//! positions makes "used = head - tail" exact and makes it impossible to confuse
//! a full ring with an empty one.

use tandem_proto::record_span_bytes;

/// Where a new record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Bytes of ring skipped by a pad record before the record (0 = no pad). The
    /// pad starts at `position - pad_bytes`.
    pub pad_bytes: u64,
    /// Unwrapped position of the record's header sector.
    pub position: u64,
}

/// Head and tail of the ring.
#[derive(Debug, Clone)]
pub struct LogRing {
    ring_size_bytes: u64,
    sector_bytes: u64,
    head: u64,
    tail: u64,
}

impl LogRing {
    /// A ring whose live region is `[tail, head)`.
    #[must_use]
    pub fn new(ring_size_bytes: u64, sector_bytes: u32, tail: u64, head: u64) -> Self {
        let sector_bytes = u64::from(sector_bytes);
        assert!(sector_bytes.is_power_of_two(), "sector size must be a power of two");
        assert!(ring_size_bytes > 0 && ring_size_bytes.is_multiple_of(sector_bytes), "ring must hold whole sectors");
        assert!(tail <= head && head - tail <= ring_size_bytes, "live region larger than the ring");
        assert!(
            tail.is_multiple_of(sector_bytes) && head.is_multiple_of(sector_bytes),
            "positions must be sector-aligned"
        );
        Self { ring_size_bytes, sector_bytes, head, tail }
    }

    /// Bytes a record with `payload_bytes` of payload occupies: one header sector
    /// plus the payload padded to whole sectors.
    #[must_use]
    pub fn record_bytes(&self, payload_bytes: u32) -> u64 {
        record_span_bytes(payload_bytes, self.sector_bytes)
    }

    /// Largest record the ring accepts: a record, plus the pad that may precede
    /// it, must fit in an empty ring, so no write can wait forever for space.
    #[must_use]
    pub fn max_record_bytes(&self) -> u64 {
        self.ring_size_bytes / 2
    }

    #[must_use]
    pub fn ring_size_bytes(&self) -> u64 {
        self.ring_size_bytes
    }

    #[must_use]
    pub fn head(&self) -> u64 {
        self.head
    }

    #[must_use]
    pub fn tail(&self) -> u64 {
        self.tail
    }

    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        self.head - self.tail
    }

    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        self.ring_size_bytes - self.used_bytes()
    }

    /// Ring offset (not counting the superblock area) of an unwrapped position.
    #[must_use]
    pub fn ring_offset(&self, position: u64) -> u64 {
        position % self.ring_size_bytes
    }

    /// Reserves `bytes` for a record. A record never straddles the end of the
    /// ring: when it does not fit before the end, the rest of the ring is given to
    /// a pad record. Returns `None` when the free space is too small (the caller
    /// waits for a checkpoint); never overwrites unreclaimed bytes.
    pub fn try_place(&mut self, bytes: u64) -> Option<Placement> {
        assert!(bytes.is_multiple_of(self.sector_bytes), "record sizes are whole sectors");
        assert!(bytes <= self.max_record_bytes(), "record of {bytes} bytes exceeds the ring's limit");
        let to_end = self.ring_size_bytes - self.ring_offset(self.head);
        let pad_bytes = if bytes > to_end { to_end } else { 0 };
        if pad_bytes + bytes > self.free_bytes() {
            return None;
        }
        self.head += pad_bytes;
        let position = self.head;
        self.head += bytes;
        Some(Placement { pad_bytes, position })
    }

    /// Releases everything before `position` (after a checkpoint).
    pub fn reclaim_to(&mut self, position: u64) {
        assert!(
            position >= self.tail && position <= self.head,
            "reclaim to {position} outside [{}, {}]",
            self.tail,
            self.head
        );
        self.tail = position;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_records_and_accounts_space() {
        let mut ring = LogRing::new(64 * 4096, 4096, 0, 0);
        assert_eq!(ring.record_bytes(4096), 8192);
        assert_eq!(ring.record_bytes(1), 8192);
        assert_eq!(ring.record_bytes(4097), 12288);
        let placement = ring.try_place(8192).unwrap();
        assert_eq!(placement, Placement { pad_bytes: 0, position: 0 });
        assert_eq!(ring.used_bytes(), 8192);
        assert_eq!(ring.free_bytes(), 62 * 4096);
    }

    #[test]
    fn pads_to_the_end_instead_of_straddling() {
        let mut ring = LogRing::new(16 * 4096, 4096, 0, 0);
        ring.try_place(6 * 4096).unwrap();
        ring.try_place(6 * 4096).unwrap();
        ring.reclaim_to(12 * 4096);
        // 4 sectors remain before the end; a 6-sector record wraps after a pad.
        let placement = ring.try_place(6 * 4096).unwrap();
        assert_eq!(placement, Placement { pad_bytes: 4 * 4096, position: 16 * 4096 });
        assert_eq!(ring.ring_offset(placement.position), 0);
        assert_eq!(ring.used_bytes(), 10 * 4096);
    }

    #[test]
    fn refuses_to_overwrite_unreclaimed_bytes() {
        let mut ring = LogRing::new(16 * 4096, 4096, 0, 0);
        ring.try_place(8 * 4096).unwrap();
        ring.try_place(6 * 4096).unwrap();
        assert!(ring.try_place(4 * 4096).is_none(), "only 2 sectors are free");
        ring.reclaim_to(8 * 4096);
        // 2 sectors to the end are padded, the record lands at offset 0.
        let placement = ring.try_place(4 * 4096).unwrap();
        assert_eq!(placement.pad_bytes, 2 * 4096);
        assert_eq!(ring.used_bytes(), 12 * 4096);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn reclaim_beyond_head_is_an_invariant_violation() {
        let mut ring = LogRing::new(16 * 4096, 4096, 0, 0);
        ring.reclaim_to(4096);
    }
}
