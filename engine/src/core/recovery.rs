//! The recovery scan, sans IO: the runtime reads what the scanner asks for and
//! feeds it back. The scan starts at the checkpoint's tail and accepts a record
//! only if it continues the chain exactly: valid checksums, this log's group id,
//! LSN = previous + 1, the superblock's epoch, and a placement that does not
//! straddle the ring's end. The first record that breaks the chain is the torn
//! tail: the scan stops there and says why.
//!
//! Why the epoch: every open of the log replays it and persists a new epoch
//! and the position where that incarnation starts appending
//! (`epoch_start_position`) before the first append, and only that incarnation
//! appends until the next open. So every valid record from that position on
//! carries exactly the superblock's epoch; a record there with an older epoch
//! was left behind by a crashed incarnation and may continue the LSN chain
//! exactly, yet must never be replayed. Records before that position (kept for
//! a replication peer) are the chain the open validated and keep their older
//! epochs. (A rule that only compared neighbouring records was found wrong by
//! the simulator: after a checkpoint moved the tail next to such stale records,
//! nothing was left to compare with.)

use tandem_proto::{record_span_bytes, RecordDecodeError, RecordHeader, RecordKind};

/// Why the scan stopped. `EndOfLog` is the normal end: the next slot holds no
/// record of this chain (never written, or stale from an earlier lap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// The header did not decode: unwritten space, torn write or corruption.
    EndOfLog { position: u64, reason: RecordDecodeError },
    /// A valid record of another log (an earlier format of this device).
    ForeignGroup { position: u64, group_id: u32 },
    /// A record from an earlier lap or a crashed incarnation.
    LsnBreak { position: u64, expected: u64, found: u64 },
    /// A record of an earlier incarnation: left over from a crashed
    /// incarnation beyond its torn tail.
    StaleEpoch { position: u64, found: u32, current: u32 },
    /// An epoch newer than the superblock's: cannot belong to this log's history.
    EpochFromFuture { position: u64, found: u32, current: u32 },
    /// A record of the current epoch before the position where that epoch
    /// began: cannot belong to this log's history.
    MisplacedEpoch { position: u64, found: u32 },
    /// The header is valid but the payload's checksum is not: a torn record.
    TornPayload { position: u64, lsn: u64 },
    /// The record would cross the end of the ring, which the writer never does.
    BadPlacement { position: u64, lsn: u64 },
    /// A whole ring of records was read; the log cannot hold more.
    RingFull { position: u64 },
}

impl std::fmt::Display for ScanStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EndOfLog { position, reason } => {
                write!(f, "end of log at position {position} (the next sector holds no record of this chain: {reason})")
            }
            Self::ForeignGroup { position, group_id } => {
                write!(f, "record of another log (group id {group_id:#x}) at position {position}")
            }
            Self::LsnBreak { position, expected, found } => {
                write!(f, "stale record at position {position}: LSN {found} where {expected} was expected")
            }
            Self::StaleEpoch { position, found, current } => write!(
                f,
                "stale record of a crashed incarnation at position {position}: epoch {found}, the log is at epoch {current}"
            ),
            Self::EpochFromFuture { position, found, current } => {
                write!(f, "record at position {position} has epoch {found}, newer than the log's {current}")
            }
            Self::MisplacedEpoch { position, found } => {
                write!(f, "record at position {position} has epoch {found}, which began only later in the log")
            }
            Self::TornPayload { position, lsn } => {
                write!(f, "torn record at position {position}: payload of LSN {lsn} fails its checksum")
            }
            Self::BadPlacement { position, lsn } => {
                write!(f, "record LSN {lsn} at position {position} would cross the end of the ring")
            }
            Self::RingFull { position } => write!(f, "a whole ring was scanned, stopping at position {position}"),
        }
    }
}

/// What to do after a header was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderVerdict {
    /// A pad record: skipped, the scan continues at the start of the ring.
    Pad,
    /// A Trim or WriteZeroes record: complete, replay it.
    Complete(RecordHeader),
    /// A write: read `padded_bytes` at `ring_offset` and call
    /// [`Scanner::check_payload`] with the first `header.payload_bytes()` of them.
    NeedPayload { header: RecordHeader, ring_offset: u64, padded_bytes: u64 },
}

/// Where a scan starts and what it holds records to: the superblock's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanStart {
    pub ring_size_bytes: u64,
    pub sector_bytes: u32,
    pub group_id: u32,
    /// The superblock's epoch: the incarnation that last opened the log.
    pub epoch: u32,
    pub tail_position: u64,
    /// LSN of the record at `tail_position`.
    pub tail_lsn: u64,
    pub epoch_start_position: u64,
}

impl ScanStart {
    /// The scan a superblock calls for.
    #[must_use]
    pub fn from_superblock(sb: &tandem_proto::Superblock) -> Self {
        Self {
            ring_size_bytes: sb.ring_size_bytes,
            sector_bytes: sb.sector_size,
            group_id: sb.group_id,
            epoch: sb.epoch,
            tail_position: sb.tail_position,
            tail_lsn: sb.tail_lsn,
            epoch_start_position: sb.epoch_start_position,
        }
    }
}

/// State of the scan.
#[derive(Debug, Clone)]
pub struct Scanner {
    ring_size_bytes: u64,
    sector_bytes: u64,
    group_id: u32,
    current_epoch: u32,
    epoch_start_position: u64,
    start_position: u64,
    position: u64,
    expected_lsn: u64,
}

impl Scanner {
    /// A scan from the tail of the log.
    #[must_use]
    pub fn new(start: ScanStart) -> Self {
        Self {
            ring_size_bytes: start.ring_size_bytes,
            sector_bytes: u64::from(start.sector_bytes),
            group_id: start.group_id,
            current_epoch: start.epoch,
            epoch_start_position: start.epoch_start_position,
            start_position: start.tail_position,
            position: start.tail_position,
            expected_lsn: start.tail_lsn,
        }
    }

    /// Ring offset of the next header to read (one sector).
    pub fn next_header_offset(&self) -> Result<u64, ScanStop> {
        if self.position - self.start_position >= self.ring_size_bytes {
            return Err(ScanStop::RingFull { position: self.position });
        }
        Ok(self.position % self.ring_size_bytes)
    }

    /// Unwrapped position of the next record: the head of the log once the scan stops.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.position
    }

    /// LSN of the last accepted record.
    #[must_use]
    pub fn last_lsn(&self) -> u64 {
        self.expected_lsn - 1
    }

    /// Checks the header sector read at [`Scanner::next_header_offset`].
    pub fn check_header(&mut self, sector: &[u8]) -> Result<HeaderVerdict, ScanStop> {
        let position = self.position;
        let header = RecordHeader::decode(sector).map_err(|reason| ScanStop::EndOfLog { position, reason })?;
        if header.group_id != self.group_id {
            return Err(ScanStop::ForeignGroup { position, group_id: header.group_id });
        }
        if header.lsn != self.expected_lsn {
            return Err(ScanStop::LsnBreak { position, expected: self.expected_lsn, found: header.lsn });
        }
        // From the epoch start on, only the current incarnation wrote; before it
        // lies the chain validated at the last open, written by earlier ones.
        let in_current_epoch = position >= self.epoch_start_position;
        if in_current_epoch && header.epoch < self.current_epoch {
            return Err(ScanStop::StaleEpoch { position, found: header.epoch, current: self.current_epoch });
        }
        if !in_current_epoch && header.epoch == self.current_epoch {
            return Err(ScanStop::MisplacedEpoch { position, found: header.epoch });
        }
        if header.epoch > self.current_epoch {
            return Err(ScanStop::EpochFromFuture { position, found: header.epoch, current: self.current_epoch });
        }
        let to_end = self.ring_size_bytes - position % self.ring_size_bytes;
        let kind = header.record_kind();
        let record_bytes = match kind {
            RecordKind::Pad => u64::from(header.length),
            _ => record_span_bytes(header.payload_bytes(), self.sector_bytes),
        };
        let placement_ok = if kind == RecordKind::Pad { record_bytes == to_end } else { record_bytes <= to_end };
        if !placement_ok || record_bytes % self.sector_bytes != 0 {
            return Err(ScanStop::BadPlacement { position, lsn: header.lsn });
        }
        match kind {
            RecordKind::Write | RecordKind::Snapshot => Ok(HeaderVerdict::NeedPayload {
                header,
                ring_offset: (position + self.sector_bytes) % self.ring_size_bytes,
                padded_bytes: record_bytes - self.sector_bytes,
            }),
            RecordKind::Pad => {
                // A pad carries the next record's LSN and does not consume it.
                self.position += record_bytes;
                Ok(HeaderVerdict::Pad)
            }
            RecordKind::Trim | RecordKind::WriteZeroes => {
                self.accept(&header, record_bytes);
                Ok(HeaderVerdict::Complete(header))
            }
        }
    }

    /// Checks the payload of a write whose header was accepted.
    pub fn check_payload(&mut self, header: &RecordHeader, payload: &[u8]) -> Result<(), ScanStop> {
        assert_eq!(header.lsn, self.expected_lsn, "payload checked for the header just accepted");
        header
            .verify_payload(payload)
            .map_err(|_| ScanStop::TornPayload { position: self.position, lsn: header.lsn })?;
        let record_bytes = record_span_bytes(header.payload_bytes(), self.sector_bytes);
        self.accept(header, record_bytes);
        Ok(())
    }

    fn accept(&mut self, header: &RecordHeader, record_bytes: u64) {
        debug_assert!(header.epoch <= self.current_epoch, "no record of a future epoch is accepted");
        self.position += record_bytes;
        self.expected_lsn += 1;
    }
}

/// A record the scan accepted: its LSN, where it lies in the ring, and the
/// range of the volume it changes (for the dirty-region bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    pub lsn: u64,
    pub position: u64,
    pub end_position: u64,
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
    /// The highest LSN completed when the record's write was submitted: a
    /// destination applies it only after every record up to there. Records
    /// read back from a log after a restart do not know it and depend on
    /// the record before them.
    pub depends_on: u64,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Records applied to the volumes (those after `apply_after_lsn`).
    pub records: u64,
    pub payload_bytes: u64,
    pub last_lsn: u64,
    /// Unwrapped position where the scan stopped: the new head.
    pub end_position: u64,
    /// Every record accepted, in LSN order (pads excluded).
    pub scanned: Vec<ScannedRecord>,
    pub stop: ScanStop,
}

/// Drives `scanner` to the end of the chain and replays every accepted record
/// with an LSN after `apply_after_lsn` (the checkpoint: older records are in
/// the volumes already and are only kept for a replication peer). The closures
/// do the IO, so the runtime (files) and the simulator (memory) run this same
/// logic: `read(ring_offset, len)` returns `len` bytes of the ring,
/// `apply(header, payload)` replays one record into the volumes.
pub fn replay<B: AsRef<[u8]>, E>(
    scanner: &mut Scanner,
    apply_after_lsn: u64,
    mut read: impl FnMut(u64, usize) -> Result<B, E>,
    mut apply: impl FnMut(&RecordHeader, &[u8]) -> Result<(), E>,
) -> Result<ReplayOutcome, E> {
    let sector = scanner.sector_bytes as usize;
    let (mut records, mut payload_bytes, mut scanned) = (0, 0, Vec::new());
    let stop = loop {
        let offset = match scanner.next_header_offset() {
            Ok(offset) => offset,
            Err(stop) => break stop,
        };
        let position = scanner.position();
        let header_sector = read(offset, sector)?;
        let (header, payload) = match scanner.check_header(header_sector.as_ref()) {
            Ok(HeaderVerdict::Pad) => continue,
            Ok(HeaderVerdict::Complete(header)) => (header, None),
            Ok(HeaderVerdict::NeedPayload { header, ring_offset, padded_bytes }) => {
                let padded = read(ring_offset, padded_bytes as usize)?;
                let payload = &padded.as_ref()[..header.payload_bytes() as usize];
                if let Err(stop) = scanner.check_payload(&header, payload) {
                    break stop;
                }
                (header, Some(padded))
            }
            Err(stop) => break stop,
        };
        let payload = payload.as_ref().map_or(&[][..], |p| &p.as_ref()[..header.payload_bytes() as usize]);
        scanned.push(ScannedRecord {
            lsn: header.lsn,
            position,
            end_position: scanner.position(),
            volume_index: header.volume_index,
            offset: header.offset,
            length: header.changed_bytes(),
            depends_on: header.lsn - 1,
        });
        if header.lsn > apply_after_lsn {
            apply(&header, payload)?;
            records += 1;
            payload_bytes += payload.len() as u64;
        }
    };
    let (last_lsn, end_position) = (scanner.last_lsn(), scanner.position());
    Ok(ReplayOutcome { records, payload_bytes, last_lsn, end_position, scanned, stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::RecordStamp;

    const SECTOR: u32 = 4096;
    const RING: u64 = 16 * 4096;

    fn stamp(epoch: u32) -> RecordStamp {
        RecordStamp { group_id: 9, epoch, generation_tag: 0 }
    }

    /// A scan whose epoch started at the tail (what every open sets up).
    fn start(ring: u64, sector: u32, group_id: u32, epoch: u32, tail: u64, checkpoint_lsn: u64) -> ScanStart {
        ScanStart {
            ring_size_bytes: ring,
            sector_bytes: sector,
            group_id,
            epoch,
            tail_position: tail,
            tail_lsn: checkpoint_lsn + 1,
            epoch_start_position: tail,
        }
    }

    fn sector_of(header: &RecordHeader) -> Vec<u8> {
        let mut sector = vec![0u8; SECTOR as usize];
        sector[..64].copy_from_slice(header.as_bytes());
        sector
    }

    #[test]
    fn accepts_a_chain_and_stops_at_unwritten_space() {
        let mut scan = Scanner::new(start(RING, SECTOR, 9, 1, 0, 0));
        let payload = vec![7u8; 5000];
        let write = RecordHeader::write(stamp(1), 1, 0, 0, &payload);
        let verdict = scan.check_header(&sector_of(&write)).unwrap();
        let HeaderVerdict::NeedPayload { ring_offset, padded_bytes, .. } = verdict else { panic!("{verdict:?}") };
        assert_eq!((ring_offset, padded_bytes), (4096, 8192));
        scan.check_payload(&write, &payload).unwrap();
        let trim = RecordHeader::without_payload(stamp(1), RecordKind::Trim, 0, 2, 0, 0, 4096);
        assert_eq!(scan.check_header(&sector_of(&trim)).unwrap(), HeaderVerdict::Complete(trim));
        assert_eq!(scan.next_header_offset().unwrap(), 4 * 4096);
        assert!(matches!(scan.check_header(&[0u8; 4096]), Err(ScanStop::EndOfLog { position: 16384, .. })));
        assert_eq!((scan.position(), scan.last_lsn()), (4 * 4096, 2));
    }

    #[test]
    fn stale_and_foreign_records_end_the_chain() {
        let mut scan = Scanner::new(start(RING, SECTOR, 9, 3, 0, 10));
        let old_lap = RecordHeader::without_payload(stamp(3), RecordKind::Trim, 0, 3, 0, 0, 512);
        assert!(matches!(
            scan.check_header(&sector_of(&old_lap)),
            Err(ScanStop::LsnBreak { expected: 11, found: 3, .. })
        ));
        let foreign = RecordHeader::without_payload(
            RecordStamp { group_id: 1, epoch: 1, generation_tag: 0 },
            RecordKind::Trim,
            0,
            11,
            0,
            0,
            512,
        );
        assert!(matches!(scan.check_header(&sector_of(&foreign)), Err(ScanStop::ForeignGroup { group_id: 1, .. })));
        let future = RecordHeader::without_payload(stamp(4), RecordKind::Trim, 0, 11, 0, 0, 512);
        assert!(matches!(scan.check_header(&sector_of(&future)), Err(ScanStop::EpochFromFuture { found: 4, .. })));
    }

    #[test]
    fn records_of_an_earlier_incarnation_are_rejected_even_first_after_the_tail() {
        // First record after the tail: nothing before it to compare with.
        let mut first = Scanner::new(start(RING, SECTOR, 9, 3, 0, 0));
        let stale = RecordHeader::without_payload(stamp(2), RecordKind::Trim, 0, 1, 0, 0, 512);
        assert!(matches!(
            first.check_header(&sector_of(&stale)),
            Err(ScanStop::StaleEpoch { found: 2, current: 3, .. })
        ));
        // After a record of the current incarnation.
        let mut scan = Scanner::new(start(RING, SECTOR, 9, 3, 0, 0));
        let newer = RecordHeader::without_payload(stamp(3), RecordKind::Trim, 0, 1, 0, 0, 512);
        scan.check_header(&sector_of(&newer)).unwrap();
        let older = RecordHeader::without_payload(stamp(2), RecordKind::Trim, 0, 2, 0, 0, 512);
        assert!(matches!(scan.check_header(&sector_of(&older)), Err(ScanStop::StaleEpoch { found: 2, .. })));
    }

    #[test]
    fn records_kept_before_the_epoch_start_keep_their_older_epochs() {
        // Two records of epoch 2 kept for a peer, then the epoch-3 incarnation.
        let mut begin = start(RING, SECTOR, 9, 3, 0, 0);
        begin.epoch_start_position = 2 * 4096;
        let mut scan = Scanner::new(begin);
        for lsn in 1..=2 {
            let kept = RecordHeader::without_payload(stamp(2), RecordKind::Trim, 0, lsn, 0, 0, 512);
            scan.check_header(&sector_of(&kept)).unwrap();
        }
        let stale = RecordHeader::without_payload(stamp(2), RecordKind::Trim, 0, 3, 0, 0, 512);
        assert!(matches!(scan.check_header(&sector_of(&stale)), Err(ScanStop::StaleEpoch { .. })));
        let current = RecordHeader::without_payload(stamp(3), RecordKind::Trim, 0, 3, 0, 0, 512);
        scan.check_header(&sector_of(&current)).unwrap();
        // The current epoch cannot appear before its own start.
        let mut early = Scanner::new(begin);
        let misplaced = RecordHeader::without_payload(stamp(3), RecordKind::Trim, 0, 1, 0, 0, 512);
        assert!(matches!(early.check_header(&sector_of(&misplaced)), Err(ScanStop::MisplacedEpoch { found: 3, .. })));
    }

    #[test]
    fn torn_payload_and_bad_pads_are_detected() {
        let mut scan = Scanner::new(start(RING, SECTOR, 9, 1, 14 * 4096, 0));
        let payload = vec![1u8; 4096];
        let write = RecordHeader::write(stamp(1), 1, 0, 0, &payload);
        scan.check_header(&sector_of(&write)).unwrap();
        let mut torn = payload.clone();
        torn[4095] = 0;
        assert!(matches!(scan.check_payload(&write, &torn), Err(ScanStop::TornPayload { lsn: 1, .. })));
        // A pad must reach exactly the end of the ring (2 sectors from 14).
        let short_pad = RecordHeader::without_payload(stamp(1), RecordKind::Pad, 0, 1, 0, 0, 4096);
        assert!(matches!(scan.check_header(&sector_of(&short_pad)), Err(ScanStop::BadPlacement { .. })));
        let pad = RecordHeader::without_payload(stamp(1), RecordKind::Pad, 0, 1, 0, 0, 8192);
        assert_eq!(scan.check_header(&sector_of(&pad)).unwrap(), HeaderVerdict::Pad);
        assert_eq!(scan.next_header_offset().unwrap(), 0, "after the pad the scan wraps");
        assert_eq!(scan.last_lsn(), 0, "the pad consumed no LSN");
        let after = RecordHeader::without_payload(stamp(1), RecordKind::Trim, 0, 1, 0, 0, 512);
        assert_eq!(scan.check_header(&sector_of(&after)).unwrap(), HeaderVerdict::Complete(after));
    }
}
