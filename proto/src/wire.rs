//! Replication frames that are not log records. On a replication connection a
//! frame starts with 64 bytes: either a [`crate::RecordHeader`] (magic `TNDR`,
//! a log record shipped as it is, payload after it) or a [`FrameHeader`]
//! (magic `TNDF`: acknowledgements, heartbeats and the initial block copy).
//! The magic tells them apart, so the log scanner never meets a wire-only kind.

use bytemuck::{Pod, Zeroable};
use thiserror::Error;

use crate::checksum::{xxh3_128_bytes, xxh3_128_low64, Checksum128};

/// "TNDF" as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TNDF");
/// Version of the replication protocol (frames and the JSON handshake).
pub const WIRE_VERSION: u8 = 3;
/// Largest payload of a copy frame.
pub const MAX_COPY_PAYLOAD_BYTES: u32 = 4 << 20;
/// Largest payload of a BlockHashes frame: the hashes of a largest copy
/// chunk (4 MiB) in 512-byte blocks.
pub const MAX_BLOCK_HASHES_PAYLOAD_BYTES: u64 = (MAX_COPY_PAYLOAD_BYTES as u64 / 512) * 16;
/// CompareStart flag: stream no digests, answer block-hash requests only
/// (a bitmap catch-up, whose chunks only the source knows).
pub const COMPARE_FLAG_ON_REQUEST: u8 = 0x01;
/// CopyData / CopyZero flag: a repair found by online verify, written after
/// the copy is complete without moving its position.
pub const COPY_FLAG_REPAIR: u8 = 0x02;
/// Ack flag: the destination's initial copy is complete and durable.
pub const ACK_FLAG_COPY_DONE: u8 = 0x01;
/// Ack flag: the destination performed the rebase its connection began
/// with; a source waiting for that ignores acknowledgements without it
/// (they describe the log before the rebase).
pub const ACK_FLAG_REBASED: u8 = 0x02;

/// Whether the 64-byte frame header `header` (record or frame) belongs to
/// the session's ordered stream (see [`FrameKind::is_ordered`]); records do.
#[must_use]
pub fn header_is_ordered(header: &[u8]) -> bool {
    let magic = u32::from_le_bytes(header[..4].try_into().expect("a frame header has a magic"));
    magic != FRAME_MAGIC || FrameKind::from_u8(header[5]).is_none_or(FrameKind::is_ordered)
}

/// What a [`FrameHeader`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Nothing else to send for a while; `lsn` is the sender's durable LSN.
    Heartbeat = 1,
    /// Destination to source: durable through `lsn`; the initial copy is written
    /// up to (`volume_index`, `offset`), complete when [`ACK_FLAG_COPY_DONE`].
    Ack = 2,
    /// Source to destination: `length` bytes of `volume_index` at `offset`,
    /// payload follows; the state of that range after LSN `lsn`.
    CopyData = 3,
    /// Source to destination: the range holds no data (a hole or zeros).
    CopyZero = 4,
    /// Source to destination: the initial copy is complete after LSN `lsn`.
    CopyDone = 5,
    /// Source to destination, first on a connection: records up to `lsn` left
    /// the source's log for its bitmap; continue the log after `lsn` and
    /// start a copy of the marked regions from the beginning.
    Rebase = 6,
    /// Source to destination: the records after this frame are applied only
    /// once every record up to `lsn` is (their writes were issued after those
    /// completed); keeps write order on the destination at every instant.
    Barrier = 7,
    /// Source to destination, before the first chunk of a compared copy:
    /// hash the volumes from (`volume_index`, `offset`) on in chunks of
    /// `length` bytes and blocks of `aux` bytes, and stream their digests.
    CompareStart = 8,
    /// Destination to source: the digest of the chunk (`volume_index`,
    /// `offset`, `length`) is `payload_checksum` (no payload).
    Digest = 9,
    /// Source to destination: send the block hashes of that chunk (its
    /// digest differs).
    RequestBlocks = 10,
    /// Destination to source: the block hashes of that chunk, 16 bytes each,
    /// in an `aux`-byte payload.
    BlockHashes = 11,
    /// Source to destination: the chunk (`volume_index`, `offset`, `length`)
    /// now equals the source's after LSN `lsn` (its differences, if any,
    /// came just before); the copy has reached its end.
    CopyVerified = 12,
    /// Source to destination, online verify: hash the chunk (`volume_index`,
    /// `offset`, `length`) as it stands once every record up to `lsn` is
    /// applied, before any later one, and answer with a VerifyDigest.
    VerifyChunk = 13,
    /// Destination to source: the digest of a chunk a VerifyChunk named, in
    /// `payload_checksum`.
    VerifyDigest = 14,
}

impl FrameKind {
    /// Whether the frame belongs to the session's ordered stream. Heartbeats
    /// and acknowledgements do not: they keep one channel alive or carry
    /// values that only grow, so they go on any channel and are used on
    /// arrival; nor do the comparison's questions and answers (digests, block
    /// hash requests and block hashes), which name their chunk and change no
    /// volume. Every other frame is delivered in the order it was sent.
    #[must_use]
    pub fn is_ordered(self) -> bool {
        !matches!(
            self,
            Self::Heartbeat | Self::Ack | Self::Digest | Self::RequestBlocks | Self::BlockHashes | Self::VerifyDigest
        )
    }

    #[must_use]
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Heartbeat),
            2 => Some(Self::Ack),
            3 => Some(Self::CopyData),
            4 => Some(Self::CopyZero),
            5 => Some(Self::CopyDone),
            6 => Some(Self::Rebase),
            7 => Some(Self::Barrier),
            8 => Some(Self::CompareStart),
            9 => Some(Self::Digest),
            10 => Some(Self::RequestBlocks),
            11 => Some(Self::BlockHashes),
            12 => Some(Self::CopyVerified),
            13 => Some(Self::VerifyChunk),
            14 => Some(Self::VerifyDigest),
            _ => None,
        }
    }
}

/// The header of a non-record frame; same size and checksum scheme as a record.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u8,
    pub kind: u8,
    pub flags: u8,
    pub volume_index: u8,
    /// Ack: the destination's applied LSN (every record up to it is in its
    /// volumes); CompareStart: the block size; BlockHashes: the payload's
    /// bytes; zero in other frames.
    pub aux: u64,
    pub lsn: u64,
    pub offset: u64,
    pub length: u32,
    pub reserved2: u32,
    /// xxh3-128 of the payload (CopyData, BlockHashes); Digest: the chunk's
    /// digest; else zero.
    pub payload_checksum: Checksum128,
    /// xxh3-128 of the preceding 56 bytes folded to 64 bits.
    pub header_checksum: u64,
}
const _: () = assert!(std::mem::size_of::<FrameHeader>() == 64);

/// Why a frame header was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameDecodeError {
    #[error("frame header needs 64 bytes, got {0}")]
    Truncated(usize),
    #[error("bad frame magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported replication protocol version {0} (this build speaks version {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame {kind:?} has an invalid length {length}")]
    BadLength { kind: FrameKind, length: u32 },
    #[error("frame payload fails its checksum")]
    PayloadChecksum,
}

impl FrameHeader {
    /// A sealed header.
    #[must_use]
    pub fn new(kind: FrameKind, flags: u8, volume_index: u8, lsn: u64, offset: u64, length: u32) -> Self {
        let mut header = Self {
            magic: FRAME_MAGIC,
            version: WIRE_VERSION,
            kind: kind as u8,
            flags,
            volume_index,
            aux: 0,
            lsn,
            offset,
            length,
            reserved2: 0,
            payload_checksum: [0; 16],
            header_checksum: 0,
        };
        header.header_checksum = header.compute_checksum();
        header
    }

    /// A sealed BlockHashes header carrying `hashes` for a chunk.
    #[must_use]
    pub fn block_hashes(volume_index: u8, offset: u64, length: u32, hashes: &[u8]) -> Self {
        let mut header = Self::new(FrameKind::BlockHashes, 0, volume_index, 0, offset, length);
        header.aux = hashes.len() as u64;
        header.payload_checksum = xxh3_128_bytes(hashes);
        header.resealed()
    }

    /// A sealed Digest (or VerifyDigest, `kind`) header for a chunk.
    #[must_use]
    pub fn digest_of(kind: FrameKind, volume_index: u8, offset: u64, length: u32, digest: Checksum128) -> Self {
        let mut header = Self::new(kind, 0, volume_index, 0, offset, length);
        header.payload_checksum = digest;
        header.resealed()
    }

    /// A sealed Digest header for a chunk.
    #[must_use]
    pub fn digest(volume_index: u8, offset: u64, length: u32, digest: Checksum128) -> Self {
        let mut header = Self::new(FrameKind::Digest, 0, volume_index, 0, offset, length);
        header.payload_checksum = digest;
        header.resealed()
    }

    /// A sealed CopyData header for `payload`.
    #[must_use]
    pub fn copy_data(volume_index: u8, lsn: u64, offset: u64, payload: &[u8]) -> Self {
        let length = u32::try_from(payload.len()).expect("copy chunks are bounded");
        let mut header = Self::new(FrameKind::CopyData, 0, volume_index, lsn, offset, length);
        header.payload_checksum = xxh3_128_bytes(payload);
        header.header_checksum = header.compute_checksum();
        header
    }

    /// The header with its checksum computed again (after changing a field).
    #[must_use]
    pub fn resealed(mut self) -> Self {
        self.header_checksum = self.compute_checksum();
        self
    }

    fn compute_checksum(&self) -> u64 {
        xxh3_128_low64(&bytemuck::bytes_of(self)[..56])
    }

    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// The kind of a decoded header.
    #[must_use]
    pub fn frame_kind(&self) -> FrameKind {
        FrameKind::from_u8(self.kind).expect("decoded headers hold a valid kind")
    }

    /// Bytes of payload after the header.
    #[must_use]
    pub fn payload_bytes(&self) -> u32 {
        if self.kind == FrameKind::CopyData as u8 {
            self.length
        } else if self.kind == FrameKind::BlockHashes as u8 {
            u32::try_from(self.aux).expect("decoded BlockHashes payloads are bounded")
        } else {
            0
        }
    }

    /// Parses and validates the first 64 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameDecodeError> {
        let raw = bytes.get(..64).ok_or(FrameDecodeError::Truncated(bytes.len()))?;
        let header: Self = bytemuck::pod_read_unaligned(raw);
        if header.magic != FRAME_MAGIC {
            return Err(FrameDecodeError::BadMagic { found: header.magic });
        }
        if header.version != WIRE_VERSION {
            return Err(FrameDecodeError::UnsupportedVersion(header.version));
        }
        if header.compute_checksum() != header.header_checksum {
            return Err(FrameDecodeError::HeaderChecksum);
        }
        let kind = FrameKind::from_u8(header.kind).ok_or(FrameDecodeError::UnknownKind(header.kind))?;
        let length_ok = match kind {
            FrameKind::CopyData => header.length > 0 && header.length <= MAX_COPY_PAYLOAD_BYTES,
            FrameKind::CopyZero
            | FrameKind::Digest
            | FrameKind::RequestBlocks
            | FrameKind::CopyVerified
            | FrameKind::VerifyChunk
            | FrameKind::VerifyDigest => header.length > 0,
            FrameKind::CompareStart => header.length > 0 && header.aux > 0 && header.aux <= u64::from(header.length),
            FrameKind::BlockHashes => {
                header.length > 0
                    && header.aux > 0
                    && header.aux <= MAX_BLOCK_HASHES_PAYLOAD_BYTES
                    && header.aux.is_multiple_of(16)
            }
            FrameKind::Heartbeat | FrameKind::Ack | FrameKind::CopyDone | FrameKind::Rebase | FrameKind::Barrier => {
                header.length == 0
            }
        };
        if !length_ok || header.offset.checked_add(u64::from(header.length)).is_none() {
            return Err(FrameDecodeError::BadLength { kind, length: header.length });
        }
        Ok(header)
    }

    /// Checks a CopyData or BlockHashes payload against the header.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), FrameDecodeError> {
        if payload.len() == self.payload_bytes() as usize && xxh3_128_bytes(payload) == self.payload_checksum {
            Ok(())
        } else {
            Err(FrameDecodeError::PayloadChecksum)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_corruption() {
        let payload = vec![7u8; 8192];
        let header = FrameHeader::copy_data(2, 99, 1 << 20, &payload);
        let decoded = FrameHeader::decode(header.as_bytes()).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(decoded.frame_kind(), FrameKind::CopyData);
        decoded.verify_payload(&payload).unwrap();
        assert_eq!(decoded.verify_payload(&payload[1..]), Err(FrameDecodeError::PayloadChecksum));
        for bit in 0..64 * 8 {
            let mut bytes = header.as_bytes().to_vec();
            bytes[bit / 8] ^= 1 << (bit % 8);
            assert!(FrameHeader::decode(&bytes).is_err(), "bit {bit} flipped went unnoticed");
        }
        let ack = FrameHeader::new(FrameKind::Ack, ACK_FLAG_COPY_DONE, 0, 5, 0, 0);
        assert_eq!(FrameHeader::decode(ack.as_bytes()).unwrap().payload_bytes(), 0);
        let bad = FrameHeader::new(FrameKind::Heartbeat, 0, 0, 5, 0, 12);
        assert!(matches!(FrameHeader::decode(bad.as_bytes()), Err(FrameDecodeError::BadLength { .. })));
    }

    #[test]
    fn comparison_frames_carry_digests_and_bounded_hashes() {
        let digest = FrameHeader::digest(1, 4096, 1 << 20, [9; 16]);
        let decoded = FrameHeader::decode(digest.as_bytes()).unwrap();
        assert_eq!(
            (decoded.frame_kind(), decoded.payload_checksum, decoded.payload_bytes()),
            (FrameKind::Digest, [9; 16], 0)
        );
        let hashes = vec![3u8; 256 * 16];
        let header = FrameHeader::block_hashes(0, 0, 1 << 20, &hashes);
        let decoded = FrameHeader::decode(header.as_bytes()).unwrap();
        assert_eq!(decoded.payload_bytes(), 4096);
        decoded.verify_payload(&hashes).unwrap();
        let mut odd = header;
        odd.aux = 17;
        assert!(FrameHeader::decode(odd.resealed().as_bytes()).is_err(), "hashes come in 16-byte units");
        let mut huge = header;
        huge.aux = MAX_BLOCK_HASHES_PAYLOAD_BYTES + 16;
        assert!(FrameHeader::decode(huge.resealed().as_bytes()).is_err(), "the payload is bounded");
        let mut start = FrameHeader::new(FrameKind::CompareStart, 0, 0, 0, 0, 1 << 20);
        start.aux = 4096;
        assert!(FrameHeader::decode(start.resealed().as_bytes()).is_ok());
        start.aux = 0;
        assert!(FrameHeader::decode(start.resealed().as_bytes()).is_err(), "a block size is required");
    }

    #[test]
    fn only_heartbeats_acks_and_comparison_questions_leave_the_ordered_stream() {
        for kind in 1..=12u8 {
            let kind = FrameKind::from_u8(kind).unwrap();
            let header = FrameHeader::new(kind, 0, 0, 1, 0, 0);
            let expected = !matches!(
                kind,
                FrameKind::Heartbeat
                    | FrameKind::Ack
                    | FrameKind::Digest
                    | FrameKind::RequestBlocks
                    | FrameKind::BlockHashes
            );
            assert_eq!(header_is_ordered(header.as_bytes()), expected, "{kind:?}");
        }
        let mut record = [0u8; 64];
        record[..4].copy_from_slice(&crate::RECORD_MAGIC.to_le_bytes());
        record[5] = FrameKind::Heartbeat as u8;
        assert!(header_is_ordered(&record), "records are always ordered, whatever their byte 5");
    }
}
