//! Records kept in the log for a replication peer until it acknowledges them.
//!
//! While a peer is attached, the ring's tail may not pass the first record the
//! peer has not made durable, even though the volumes are checkpointed beyond
//! it: catch-up after a disconnect reads those records back from the log.

use std::collections::VecDeque;

use super::recovery::ScannedRecord;

/// The peer's progress and the records it still lacks, in LSN order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    peer_durable_lsn: u64,
    records: VecDeque<ScannedRecord>,
}

impl Retention {
    /// A peer that holds everything up to `peer_durable_lsn`, and the records
    /// after it that the log holds (from recovery's scan, in LSN order).
    #[must_use]
    pub fn new(peer_durable_lsn: u64, kept: impl IntoIterator<Item = ScannedRecord>) -> Self {
        let records: VecDeque<ScannedRecord> = kept.into_iter().filter(|r| r.lsn > peer_durable_lsn).collect();
        for pair in records.iter().zip(records.iter().skip(1)) {
            assert_eq!(pair.0.lsn + 1, pair.1.lsn, "retained records are consecutive");
        }
        if let Some(first) = records.front() {
            assert_eq!(first.lsn, peer_durable_lsn + 1, "the log holds every record the peer lacks");
        }
        Self { peer_durable_lsn, records }
    }

    #[must_use]
    pub fn peer_durable_lsn(&self) -> u64 {
        self.peer_durable_lsn
    }

    /// The retained records, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &ScannedRecord> {
        self.records.iter()
    }

    /// The retained record `lsn`, if the log still keeps it for the peer.
    #[must_use]
    pub fn get(&self, lsn: u64) -> Option<&ScannedRecord> {
        let first = self.records.front()?.lsn;
        let index = usize::try_from(lsn.checked_sub(first)?).ok()?;
        self.records.get(index)
    }

    /// A new record was placed in the log.
    pub fn placed(&mut self, record: ScannedRecord) {
        if let Some(last) = self.records.back() {
            assert_eq!(last.lsn + 1, record.lsn, "records are retained in LSN order");
        }
        self.records.push_back(record);
    }

    /// The peer made everything up to `lsn` durable.
    pub fn peer_durable(&mut self, lsn: u64) {
        self.peer_durable_lsn = self.peer_durable_lsn.max(lsn);
        while self.records.front().is_some_and(|r| r.lsn <= self.peer_durable_lsn) {
            self.records.pop_front();
        }
    }

    /// The tail a checkpoint may move to: `settled` (position and LSN of the
    /// first record not yet checkpointed), unless an older record is retained.
    #[must_use]
    pub fn tail(&self, settled: (u64, u64)) -> (u64, u64) {
        match self.records.front() {
            Some(first) if first.position < settled.0 => (first.position, first.lsn),
            _ => settled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lsn: u64) -> ScannedRecord {
        ScannedRecord {
            lsn,
            position: lsn * 8192,
            end_position: (lsn + 1) * 8192,
            volume_index: 0,
            offset: lsn * 4096,
            length: 4096,
            depends_on: lsn - 1,
        }
    }

    #[test]
    fn holds_the_tail_until_the_peer_acknowledges() {
        let mut retention = Retention::new(2, (1..=4).map(record));
        assert_eq!(retention.records().map(|r| r.lsn).collect::<Vec<_>>(), vec![3, 4]);
        retention.placed(record(5));
        assert_eq!(retention.tail((6 * 8192, 6)), (3 * 8192, 3), "the peer still lacks LSN 3");
        retention.peer_durable(4);
        assert_eq!(retention.tail((6 * 8192, 6)), (5 * 8192, 5));
        retention.peer_durable(9);
        assert_eq!(retention.tail((6 * 8192, 6)), (6 * 8192, 6), "nothing retained: the checkpoint decides");
        assert_eq!(retention.peer_durable_lsn(), 9);
    }

    #[test]
    #[should_panic(expected = "every record the peer lacks")]
    fn a_gap_before_the_first_retained_record_is_an_invariant_violation() {
        let _ = Retention::new(1, (3..=4).map(record));
    }
}
