//! What a destination holds beyond its source's durable log.
//!
//! A source ships a record as soon as its append is issued, so that the
//! network and the destination's append run while its own append does. Until
//! that append completes, the destination may hold a record the source has
//! not: should the source crash then, it loses the record and gives its LSN to
//! a new write after its restart. The two logs then differ after the last LSN
//! the source recovered, and the destination's volumes may hold the lost
//! writes. On reconnection the source names that LSN; the destination reports
//! the ranges of every record it holds after it, and the source marks them in
//! its dirty-region bitmap and copies them again from its volumes, while the
//! destination's log continues after that LSN (a rebase).
//!
//! This index keeps those ranges: every record the destination took after
//! `covered_after_lsn`, until the source announces it durable (the source's
//! progress heartbeats), at which point it can never be lost any more.

use std::collections::VecDeque;

/// A range of a volume: (volume index, byte offset, bytes).
pub type VolumeRange = (u8, u64, u64);

/// What a destination holds after a given LSN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HeldAfter {
    /// The ranges of its records after that LSN (merged, in volume order).
    Ranges(Vec<VolumeRange>),
    /// It cannot list them (it restarted and checkpointed beyond that LSN):
    /// every region must be copied again.
    Unknown,
}

/// Records a destination took that its source has not yet announced durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnconfirmedRecords {
    /// Every record taken after this LSN is listed (or announced durable).
    covered_after_lsn: u64,
    /// (LSN, volume range), in LSN order.
    records: VecDeque<(u64, VolumeRange)>,
}

impl UnconfirmedRecords {
    /// An index that lists every record after `covered_after_lsn`, starting
    /// with `records` (recovery's scan of the log after the checkpoint, in
    /// LSN order).
    #[must_use]
    pub fn new(covered_after_lsn: u64, records: impl IntoIterator<Item = (u64, VolumeRange)>) -> Self {
        let mut index = Self { covered_after_lsn, records: VecDeque::new() };
        for (lsn, range) in records {
            index.taken(lsn, range);
        }
        index
    }

    /// The destination took record `lsn` (its changed range; length 0 for
    /// records that change no blocks).
    pub fn taken(&mut self, lsn: u64, range: VolumeRange) {
        if lsn <= self.covered_after_lsn {
            return;
        }
        if let Some(&(last, _)) = self.records.back() {
            assert!(lsn > last, "records are taken in LSN order ({lsn} after {last})");
        }
        if range.2 > 0 {
            self.records.push_back((lsn, range));
        }
    }

    /// The source announced every record up to `lsn` durable in its log.
    pub fn source_durable(&mut self, lsn: u64) {
        while self.records.front().is_some_and(|&(first, _)| first <= lsn) {
            self.records.pop_front();
        }
        self.covered_after_lsn = self.covered_after_lsn.max(lsn);
    }

    /// The log continues after `lsn` (a rebase): nothing after it is held.
    pub fn rebased(&mut self, lsn: u64) {
        self.records.clear();
        self.covered_after_lsn = lsn;
    }

    /// Records listed (for status and tests).
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// What this destination holds after `lsn`: its ranges merged, and
    /// widened to aligned blocks of 64 KiB, 128 KiB, ... until at most
    /// `max_ranges` remain, or one per volume (a wider range only copies more).
    #[must_use]
    pub fn held_after(&self, lsn: u64, max_ranges: usize) -> HeldAfter {
        if lsn < self.covered_after_lsn {
            return HeldAfter::Unknown;
        }
        let ranges: Vec<VolumeRange> =
            self.records.iter().filter(|(record_lsn, _)| *record_lsn > lsn).map(|(_, range)| *range).collect();
        let mut merged = merge_ranges(&ranges, 1);
        let mut block_bytes = 64 << 10;
        // Each volume keeps at least one range, however wide.
        let volumes = merged.iter().map(|r| r.0).collect::<std::collections::BTreeSet<u8>>().len();
        while merged.len() > max_ranges.max(volumes) {
            merged = merge_ranges(&merged, block_bytes);
            block_bytes *= 2;
        }
        HeldAfter::Ranges(merged)
    }
}

/// The ranges widened to multiples of `block_bytes` (1: as they are),
/// sorted, and those that overlap or touch in one volume merged.
#[must_use]
pub fn merge_ranges(ranges: &[VolumeRange], block_bytes: u64) -> Vec<VolumeRange> {
    let mut widened: Vec<VolumeRange> = ranges
        .iter()
        .map(|&(volume, offset, length)| {
            let start = offset / block_bytes * block_bytes;
            let end = (offset + length).div_ceil(block_bytes) * block_bytes;
            (volume, start, end - start)
        })
        .collect();
    widened.sort_unstable();
    let mut merged: Vec<VolumeRange> = Vec::with_capacity(widened.len());
    for (volume, offset, length) in widened {
        if let Some(last) = merged.last_mut().filter(|l| l.0 == volume && offset <= l.1 + l.2) {
            last.2 = last.2.max(offset + length - last.1);
            continue;
        }
        merged.push((volume, offset, length));
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_merged_ranges_after_an_lsn() {
        let mut index = UnconfirmedRecords::new(10, [(11, (0, 0, 4096)), (12, (1, 8192, 4096))]);
        index.taken(13, (0, 4096, 4096));
        index.taken(14, (0, 65536, 0));
        index.taken(15, (1, 0, 512));
        assert_eq!(index.held_after(10, 16), HeldAfter::Ranges(vec![(0, 0, 8192), (1, 0, 512), (1, 8192, 4096)]));
        assert_eq!(index.held_after(12, 16), HeldAfter::Ranges(vec![(0, 4096, 4096), (1, 0, 512)]));
        assert_eq!(index.held_after(15, 16), HeldAfter::Ranges(vec![]));
        assert_eq!(
            index.held_after(10, 2),
            HeldAfter::Ranges(vec![(0, 0, 65536), (1, 0, 65536)]),
            "too many ranges: widened to 64 KiB blocks"
        );
        assert_eq!(index.held_after(10, 1), HeldAfter::Ranges(vec![(0, 0, 65536), (1, 0, 65536)]), "one per volume");
    }

    #[test]
    fn an_lsn_before_what_is_covered_is_unknown() {
        let mut index = UnconfirmedRecords::new(10, []);
        assert_eq!(index.held_after(9, 16), HeldAfter::Unknown);
        index.taken(11, (0, 0, 4096));
        index.taken(12, (0, 4096, 4096));
        index.source_durable(11);
        assert_eq!(index.len(), 1);
        assert_eq!(index.held_after(10, 16), HeldAfter::Unknown, "record 11 was forgotten once durable");
        assert_eq!(index.held_after(11, 16), HeldAfter::Ranges(vec![(0, 4096, 4096)]));
        index.rebased(11);
        assert!(index.is_empty());
        assert_eq!(index.held_after(11, 16), HeldAfter::Ranges(vec![]));
    }

    #[test]
    fn records_up_to_the_covered_lsn_are_ignored() {
        let mut index = UnconfirmedRecords::new(20, []);
        index.taken(19, (0, 0, 4096));
        assert!(index.is_empty());
    }
}
