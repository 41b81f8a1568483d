//! Bytes that outlive a process: the 64-byte record header (which is also the
//! replication frame header), the log superblock, and their checksums.
//!
//! Everything here is little-endian on disk and on the wire. The structs are
//! `#[repr(C)]` plain-old-data read and written with `bytemuck`, so the crate
//! only builds for little-endian targets; a big-endian port would add explicit
//! byte swapping in `decode`/`encode` rather than change the formats.

#[cfg(not(target_endian = "little"))]
compile_error!("tandem-proto stores integers in host order and therefore requires a little-endian target");

pub mod checksum;
pub mod record;
pub mod superblock;
pub mod wire;

pub use checksum::{xxh3_128_bytes, Checksum128};
pub use record::{
    record_span_bytes, RecordDecodeError, RecordHeader, RecordKind, RecordStamp, FLAG_NO_HOLE, MAX_PAYLOAD_BYTES,
    MAX_SNAPSHOT_NAME_BYTES, RECORD_HEADER_BYTES, RECORD_MAGIC,
};
pub use superblock::{
    BitmapEntry, GenerationEntry, PartnershipEntry, Superblock, SuperblockDecodeError, VolumeEntry, COPY_DONE,
    COPY_IN_PROGRESS, ENCRYPTION_AES_128_GCM, ENCRYPTION_NONE, ENCRYPTION_SIGN, FENCE_PEER_PROMOTED, MAX_VOLUMES,
    MODE_ASYNC, MODE_SYNC, RING_OFFSET_BYTES, ROLE_DESTINATION, ROLE_SOURCE, ROLE_STANDALONE, SUPERBLOCK_MAGIC,
    SUPERBLOCK_SLOT_BYTES, SUPERBLOCK_VERSION, TRANSPORT_RDMA, TRANSPORT_TCP,
};
pub use wire::{
    header_is_ordered, FrameDecodeError, FrameHeader, FrameKind, ACK_FLAG_COPY_DONE, ACK_FLAG_REBASED,
    COMPARE_FLAG_ON_REQUEST, COPY_FLAG_REPAIR, FRAME_MAGIC, MAX_COPY_PAYLOAD_BYTES, WIRE_VERSION,
};

/// Rounds `value` up to the next multiple of `align` (a power of two).
#[must_use]
pub const fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// Copies `text` into a fixed, NUL-padded field; returns `None` when it does not fit
/// (one byte is kept for the terminating NUL so the field is always a C string).
#[must_use]
pub fn fixed_str<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() >= N || bytes.contains(&0) {
        return None;
    }
    let mut field = [0u8; N];
    field[..bytes.len()].copy_from_slice(bytes);
    Some(field)
}

/// Reads a NUL-padded field back; `None` when it is not UTF-8 or has bytes after the NUL.
#[must_use]
pub fn read_fixed_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if field[end..].iter().any(|&b| b != 0) {
        return None;
    }
    std::str::from_utf8(&field[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_str_round_trips_and_rejects_overflow() {
        let field: [u8; 8] = fixed_str("rg01").unwrap();
        assert_eq!(read_fixed_str(&field), Some("rg01"));
        assert!(fixed_str::<4>("rg01").is_none(), "no room for the NUL");
        assert!(fixed_str::<8>("a\0b").is_none());
        let mut bad = field;
        bad[6] = b'x';
        assert_eq!(read_fixed_str(&bad), None, "bytes after the NUL are rejected");
    }

    #[test]
    fn align_up_rounds_to_sector() {
        assert_eq!(align_up(0, 4096), 0);
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(4097, 512), 4608);
    }
}
