//! The 64-byte record header. One header describes a log record and, unchanged, a
//! replication frame: a record received from a peer is written to the destination
//! log as it came, so the two formats must never diverge.
//!
//! On-disk layout of a log record: the header occupies the first 64 bytes of one
//! sector (the rest of that sector is zero), the payload starts at the next sector
//! boundary and is zero-padded to a whole sector. Payloads are sector-aligned so
//! they can be written with O_DIRECT straight from the buffer they arrived in.

use bytemuck::{Pod, Zeroable};
use thiserror::Error;

use crate::checksum::{xxh3_128_bytes, xxh3_128_low64, Checksum128};

/// "TNDR" read as a little-endian u32.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TNDR");
/// Format version of the header. Bumped only with a migration path.
pub const RECORD_VERSION: u8 = 1;
/// Size of the header in bytes.
pub const RECORD_HEADER_BYTES: usize = 64;
/// Largest payload of one record: the NBD maximum request size. Larger client
/// writes are refused by the front end before they reach the log.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;

/// Bytes a record with `payload_bytes` of payload occupies in a log with
/// `sector_bytes` sectors: one header sector plus the payload padded to whole
/// sectors (a pad's span is its `length` instead).
#[must_use]
pub const fn record_span_bytes(payload_bytes: u32, sector_bytes: u64) -> u64 {
    sector_bytes + crate::align_up(payload_bytes as u64, sector_bytes)
}

/// Flag of a `WriteZeroes` record: the range must stay allocated (NBD_CMD_FLAG_NO_HOLE).
pub const FLAG_NO_HOLE: u8 = 0x01;

/// What a record does to its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// `length` bytes of payload written at `offset`.
    Write = 1,
    /// `length` bytes at `offset` discarded (a hole is punched); no payload.
    Trim = 2,
    /// `length` bytes at `offset` become zero; no payload.
    WriteZeroes = 3,
    /// Filler that skips `length` bytes of the log ring (to its end) so that no
    /// record straddles the end of the ring. It carries the LSN of the record
    /// that follows it and does not consume it: where a log wraps is local to
    /// that log, so pads are never replicated and each log places its own.
    Pad = 4,
    /// A consistent snapshot of every volume of the group at this LSN: a
    /// barrier in the stream. Each log that holds it (the source's and the
    /// destination's) takes a copy-on-write snapshot when every record
    /// before it is in the volumes and none after it, so both are equal.
    /// Payload: the snapshot's name (UTF-8, 1 to [`MAX_SNAPSHOT_NAME_BYTES`]).
    Snapshot = 5,
}

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME_BYTES: u32 = 64;

impl RecordKind {
    /// Parses the on-disk kind byte.
    #[must_use]
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Write),
            2 => Some(Self::Trim),
            3 => Some(Self::WriteZeroes),
            4 => Some(Self::Pad),
            5 => Some(Self::Snapshot),
            _ => None,
        }
    }

    fn allowed_flags(self) -> u8 {
        match self {
            Self::WriteZeroes => FLAG_NO_HOLE,
            Self::Write | Self::Trim | Self::Pad | Self::Snapshot => 0,
        }
    }

    /// Whether records of this kind carry a payload after the header sector.
    #[must_use]
    pub fn has_payload(self) -> bool {
        matches!(self, Self::Write | Self::Snapshot)
    }
}

/// The record / frame header. Field order keeps every field naturally aligned so
/// `repr(C)` adds no padding; the size is asserted below.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// [`RECORD_MAGIC`].
    pub magic: u32,
    /// [`RECORD_VERSION`].
    pub version: u8,
    /// A [`RecordKind`].
    pub kind: u8,
    /// Kind-specific flags ([`FLAG_NO_HOLE`]).
    pub flags: u8,
    /// Index of the volume in its group (a group holds at most 255 volumes).
    pub volume_index: u8,
    /// Random identity of the group's log, chosen at format time. Records left
    /// behind by an earlier format of the same device never match it.
    pub group_id: u32,
    /// Incarnation of the log: bumped and persisted every time the log is opened
    /// for writing. Along the log the epoch never decreases, so a record left from
    /// a crashed incarnation beyond its torn tail (with a plausible LSN) is not
    /// mistaken for a newer record written at the same place after recovery.
    pub epoch: u32,
    /// Log sequence number: +1 per record, across all volumes of the group.
    pub lsn: u64,
    /// Byte offset in the volume (Write, Trim, WriteZeroes); 0 for Pad and Snapshot.
    pub offset: u64,
    /// Write: payload bytes. Trim/WriteZeroes: length of the range. Pad: bytes
    /// of ring skipped, header sector included. Snapshot: bytes of its name.
    pub length: u32,
    /// Low 32 bits of the group's 128-bit generation when the record was written.
    pub generation_tag: u32,
    /// xxh3-128 of the payload (unpadded); all zero for kinds without payload.
    pub payload_checksum: Checksum128,
    /// xxh3-128 of the preceding 56 header bytes, folded to 64 bits.
    pub header_checksum: u64,
}

const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
const _: () = assert!(std::mem::align_of::<RecordHeader>() == 8);

/// Why a header was rejected. Each variant carries what an operator or a log line
/// needs to see.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordDecodeError {
    #[error("record header needs {RECORD_HEADER_BYTES} bytes, got {0}")]
    Truncated(usize),
    #[error("bad record magic {found:#010x} (expected {RECORD_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("unsupported record version {0} (this build reads version {RECORD_VERSION})")]
    UnsupportedVersion(u8),
    #[error("record header checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record kind {kind:?} does not allow flags {flags:#04x}")]
    BadFlags { kind: RecordKind, flags: u8 },
    #[error("record length {length} is invalid for kind {kind:?}")]
    BadLength { kind: RecordKind, length: u32 },
    #[error("record LSN 0 is reserved")]
    ZeroLsn,
    #[error("record of kind {kind:?} has offset {offset} + length {length} overflowing u64")]
    RangeOverflow { kind: RecordKind, offset: u64, length: u32 },
    #[error("{kind:?} record carries a volume or offset, which must be zero")]
    PadNotEmpty { kind: RecordKind },
    #[error("payload checksum of a kind without payload must be zero")]
    UnexpectedPayloadChecksum,
    #[error("payload checksum mismatch at LSN {lsn}")]
    PayloadChecksum { lsn: u64 },
}

/// The identity fields every record of a log carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordStamp {
    pub group_id: u32,
    pub epoch: u32,
    pub generation_tag: u32,
}

impl RecordHeader {
    /// A sealed header for a `Write` record carrying `payload`.
    #[must_use]
    pub fn write(stamp: RecordStamp, lsn: u64, volume_index: u8, offset: u64, payload: &[u8]) -> Self {
        let length = u32::try_from(payload.len()).expect("payload length checked by the front end");
        Self::seal_with(stamp, RecordKind::Write, 0, lsn, volume_index, offset, length, xxh3_128_bytes(payload))
    }

    /// A sealed header for a record without payload (Trim, WriteZeroes, Pad).
    #[must_use]
    pub fn without_payload(
        stamp: RecordStamp,
        kind: RecordKind,
        flags: u8,
        lsn: u64,
        volume_index: u8,
        offset: u64,
        length: u32,
    ) -> Self {
        assert!(!kind.has_payload(), "{kind:?} records carry a payload");
        Self::seal_with(stamp, kind, flags, lsn, volume_index, offset, length, [0; 16])
    }

    /// Builds a header whose payload checksum was computed earlier (when the
    /// payload arrived, off the LSN-ordering path).
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn seal_with(
        stamp: RecordStamp,
        kind: RecordKind,
        flags: u8,
        lsn: u64,
        volume_index: u8,
        offset: u64,
        length: u32,
        payload_checksum: Checksum128,
    ) -> Self {
        let mut header = Self {
            magic: RECORD_MAGIC,
            version: RECORD_VERSION,
            kind: kind as u8,
            flags,
            volume_index,
            group_id: stamp.group_id,
            epoch: stamp.epoch,
            lsn,
            offset,
            length,
            generation_tag: stamp.generation_tag,
            payload_checksum,
            header_checksum: 0,
        };
        header.header_checksum = header.compute_header_checksum();
        header
    }

    fn compute_header_checksum(&self) -> u64 {
        xxh3_128_low64(&bytemuck::bytes_of(self)[..RECORD_HEADER_BYTES - 8])
    }

    /// The record's kind. Only valid on a decoded (validated) header.
    #[must_use]
    pub fn record_kind(&self) -> RecordKind {
        RecordKind::from_u8(self.kind).expect("decoded headers hold a valid kind")
    }

    /// Bytes of payload that follow the header sector (0 for kinds without payload).
    #[must_use]
    pub fn payload_bytes(&self) -> u32 {
        if RecordKind::from_u8(self.kind).is_some_and(RecordKind::has_payload) {
            self.length
        } else {
            0
        }
    }

    /// Bytes of its volume the record changes from `offset` on (0 for
    /// pads and snapshots, which change no volume).
    #[must_use]
    pub fn changed_bytes(&self) -> u32 {
        match RecordKind::from_u8(self.kind) {
            Some(RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes) => self.length,
            _ => 0,
        }
    }

    /// The same record with another log's identity: a destination writes a
    /// received frame to its own log with its own group id and epoch, so that its
    /// recovery scan can hold every record to its own superblock. LSN, volume,
    /// range and payload checksum are kept; the header checksum is resealed.
    #[must_use]
    pub fn restamped(&self, stamp: RecordStamp) -> Self {
        let mut header = *self;
        header.group_id = stamp.group_id;
        header.epoch = stamp.epoch;
        header.generation_tag = stamp.generation_tag;
        header.header_checksum = header.compute_header_checksum();
        header
    }

    /// Identity fields of the record.
    #[must_use]
    pub fn stamp(&self) -> RecordStamp {
        RecordStamp { group_id: self.group_id, epoch: self.epoch, generation_tag: self.generation_tag }
    }

    /// The 64 header bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// Parses and validates a header from the first 64 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordDecodeError> {
        let raw = bytes.get(..RECORD_HEADER_BYTES).ok_or(RecordDecodeError::Truncated(bytes.len()))?;
        let header: Self = bytemuck::pod_read_unaligned(raw);
        if header.magic != RECORD_MAGIC {
            return Err(RecordDecodeError::BadMagic { found: header.magic });
        }
        if header.version != RECORD_VERSION {
            return Err(RecordDecodeError::UnsupportedVersion(header.version));
        }
        let computed = header.compute_header_checksum();
        if computed != header.header_checksum {
            return Err(RecordDecodeError::HeaderChecksum { stored: header.header_checksum, computed });
        }
        header.validate_fields()?;
        Ok(header)
    }

    fn validate_fields(&self) -> Result<(), RecordDecodeError> {
        let kind = RecordKind::from_u8(self.kind).ok_or(RecordDecodeError::UnknownKind(self.kind))?;
        if self.flags & !kind.allowed_flags() != 0 {
            return Err(RecordDecodeError::BadFlags { kind, flags: self.flags });
        }
        if self.lsn == 0 {
            return Err(RecordDecodeError::ZeroLsn);
        }
        let length_ok = match kind {
            RecordKind::Write => self.length > 0 && self.length <= MAX_PAYLOAD_BYTES,
            RecordKind::Trim | RecordKind::WriteZeroes | RecordKind::Pad => self.length > 0,
            RecordKind::Snapshot => self.length > 0 && self.length <= MAX_SNAPSHOT_NAME_BYTES,
        };
        if !length_ok {
            return Err(RecordDecodeError::BadLength { kind, length: self.length });
        }
        if self.offset.checked_add(u64::from(self.length)).is_none() {
            return Err(RecordDecodeError::RangeOverflow { kind, offset: self.offset, length: self.length });
        }
        if matches!(kind, RecordKind::Pad | RecordKind::Snapshot) && (self.offset != 0 || self.volume_index != 0) {
            return Err(RecordDecodeError::PadNotEmpty { kind });
        }
        if !kind.has_payload() && self.payload_checksum != [0; 16] {
            return Err(RecordDecodeError::UnexpectedPayloadChecksum);
        }
        Ok(())
    }

    /// Checks `payload` (unpadded, `payload_bytes()` long) against the header.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), RecordDecodeError> {
        let expected_len = self.payload_bytes() as usize;
        let matches =
            payload.len() == expected_len && (expected_len == 0 || xxh3_128_bytes(payload) == self.payload_checksum);
        if !matches {
            return Err(RecordDecodeError::PayloadChecksum { lsn: self.lsn });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: RecordStamp = RecordStamp { group_id: 0xdead_beef, epoch: 3, generation_tag: 77 };

    #[test]
    fn write_header_round_trips() {
        let payload = vec![0xabu8; 4096];
        let header = RecordHeader::write(STAMP, 42, 1, 8192, &payload);
        let decoded = RecordHeader::decode(header.as_bytes()).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(decoded.record_kind(), RecordKind::Write);
        assert_eq!(decoded.payload_bytes(), 4096);
        assert_eq!(decoded.stamp(), STAMP);
        decoded.verify_payload(&payload).unwrap();
        let mut flipped = payload.clone();
        flipped[7] ^= 0x80;
        assert_eq!(decoded.verify_payload(&flipped), Err(RecordDecodeError::PayloadChecksum { lsn: 42 }));
    }

    #[test]
    fn restamping_keeps_the_record_and_changes_only_the_identity() {
        let payload = vec![3u8; 512];
        let source = RecordHeader::write(STAMP, 42, 2, 4096, &payload);
        let other = RecordStamp { group_id: 99, epoch: 7, generation_tag: 5 };
        let destination = RecordHeader::decode(source.restamped(other).as_bytes()).unwrap();
        assert_eq!(destination.stamp(), other);
        assert_eq!((destination.lsn, destination.volume_index, destination.offset), (42, 2, 4096));
        destination.verify_payload(&payload).unwrap();
    }

    #[test]
    fn payloadless_kinds_round_trip() {
        for (kind, flags) in [(RecordKind::Trim, 0), (RecordKind::WriteZeroes, FLAG_NO_HOLE), (RecordKind::Pad, 0)] {
            let offset = if kind == RecordKind::Pad { 0 } else { 1 << 20 };
            let header = RecordHeader::without_payload(STAMP, kind, flags, 9, 0, offset, 65536);
            let decoded = RecordHeader::decode(header.as_bytes()).unwrap();
            assert_eq!(decoded.record_kind(), kind);
            assert_eq!(decoded.payload_bytes(), 0);
            decoded.verify_payload(&[]).unwrap();
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let header = RecordHeader::write(STAMP, 5, 0, 0, b"hello");
        let bytes = header.as_bytes().to_vec();
        for bit in 0..RECORD_HEADER_BYTES * 8 {
            let mut copy = bytes.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&copy).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn invalid_fields_get_typed_errors() {
        assert_eq!(RecordHeader::decode(&[0; 10]), Err(RecordDecodeError::Truncated(10)));
        assert!(matches!(RecordHeader::decode(&[0; 64]), Err(RecordDecodeError::BadMagic { .. })));
        let reseal = |mutate: &dyn Fn(&mut RecordHeader)| {
            let mut header = RecordHeader::write(STAMP, 5, 0, 0, b"x");
            mutate(&mut header);
            header.header_checksum = header.compute_header_checksum();
            RecordHeader::decode(header.as_bytes())
        };
        assert_eq!(reseal(&|h| h.version = 9), Err(RecordDecodeError::UnsupportedVersion(9)));
        assert_eq!(reseal(&|h| h.kind = 99), Err(RecordDecodeError::UnknownKind(99)));
        assert_eq!(reseal(&|h| h.lsn = 0), Err(RecordDecodeError::ZeroLsn));
        assert!(matches!(reseal(&|h| h.flags = 1), Err(RecordDecodeError::BadFlags { .. })));
        assert!(matches!(reseal(&|h| h.length = 0), Err(RecordDecodeError::BadLength { .. })));
        assert!(matches!(reseal(&|h| h.length = MAX_PAYLOAD_BYTES + 1), Err(RecordDecodeError::BadLength { .. })));
        assert!(matches!(reseal(&|h| h.offset = u64::MAX), Err(RecordDecodeError::RangeOverflow { .. })));
        assert_eq!(
            reseal(&|h| {
                h.kind = RecordKind::Pad as u8;
                h.payload_checksum = [0; 16];
                h.offset = 4;
            }),
            Err(RecordDecodeError::PadNotEmpty { kind: RecordKind::Pad })
        );
        assert_eq!(reseal(&|h| h.kind = RecordKind::Trim as u8), Err(RecordDecodeError::UnexpectedPayloadChecksum));
    }

    #[test]
    fn snapshot_records_carry_their_name_and_nothing_else() {
        let name = b"before-upgrade";
        let stamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };
        let checksum = xxh3_128_bytes(name);
        let header = RecordHeader::seal_with(stamp, RecordKind::Snapshot, 0, 9, 0, 0, name.len() as u32, checksum);
        let decoded = RecordHeader::decode(header.as_bytes()).unwrap();
        assert_eq!((decoded.record_kind(), decoded.payload_bytes()), (RecordKind::Snapshot, 14));
        decoded.verify_payload(name).unwrap();
        let reseal = |change: &dyn Fn(&mut RecordHeader)| {
            let mut h = header;
            change(&mut h);
            h.header_checksum = h.compute_header_checksum();
            RecordHeader::decode(h.as_bytes())
        };
        let too_long = reseal(&|h| h.length = MAX_SNAPSHOT_NAME_BYTES + 1);
        assert!(matches!(too_long, Err(RecordDecodeError::BadLength { .. })), "{too_long:?}");
        let on_a_volume = reseal(&|h| h.volume_index = 1);
        assert_eq!(on_a_volume, Err(RecordDecodeError::PadNotEmpty { kind: RecordKind::Snapshot }));
    }

    #[test]
    fn decode_never_panics_on_random_bytes() {
        // A small deterministic xorshift so the unit test needs no extra crates;
        // the fuzz target under fuzz/ explores this space far more thoroughly.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut bytes = [0u8; 64];
            for chunk in bytes.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes());
            }
            assert!(RecordHeader::decode(&bytes).is_err());
        }
    }
}
