//! The log superblock: group identity, volumes, log geometry, checkpoint and
//! generation history. Two copies live at the start of the log in two fixed slots;
//! writes alternate between them (slot = sequence % 2), so a torn superblock write
//! always leaves the previous copy intact. On open, the valid copy with the
//! higher sequence wins.

use bytemuck::{Pod, Zeroable};
use thiserror::Error;

use crate::checksum::{xxh3_128_bytes, Checksum128};
use crate::read_fixed_str;

/// "TANDEMSB" as a little-endian u64.
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"TANDEMSB");
/// Format version of the superblock.
pub const SUPERBLOCK_VERSION: u32 = 1;
/// Bytes of one superblock slot. 16 KiB is a multiple of every common sector size
/// (512, 4096, 16384), so a slot is always written whole with O_DIRECT.
pub const SUPERBLOCK_SLOT_BYTES: usize = 16384;
/// Byte offset of the log ring: right after the two superblock slots.
pub const RING_OFFSET_BYTES: u64 = 2 * SUPERBLOCK_SLOT_BYTES as u64;
/// Most volumes one group may hold (fixed by the superblock layout).
pub const MAX_VOLUMES: usize = 32;
/// Entries of generation history kept in the superblock.
pub const MAX_GENERATION_HISTORY: usize = 16;
/// Largest sector size accepted (a slot must hold whole sectors).
pub const MAX_SECTOR_BYTES: u32 = SUPERBLOCK_SLOT_BYTES as u32;

/// Role of the group: no partnership.
pub const ROLE_STANDALONE: u32 = 0;
/// The group is the source of a partnership: it accepts writes and ships them.
pub const ROLE_SOURCE: u32 = 1;
/// The group is the destination of a partnership: it refuses client writes and
/// applies what its source ships.
pub const ROLE_DESTINATION: u32 = 2;
/// Partnership mode: a write is acknowledged once both logs hold it.
pub const MODE_SYNC: u32 = 1;
/// Partnership mode: a write is acknowledged once the local log holds it.
pub const MODE_ASYNC: u32 = 2;
/// Partnership frames travel as they are (a trusted network).
pub const ENCRYPTION_NONE: u32 = 0;
/// Partnership frames are encrypted and authenticated (AES-128-GCM).
pub const ENCRYPTION_AES_128_GCM: u32 = 1;
/// Partnership frames are authenticated only (GMAC).
pub const ENCRYPTION_SIGN: u32 = 2;
/// Partnership data channels are TCP connections.
pub const TRANSPORT_TCP: u32 = 0;
/// Partnership data channels are RDMA queue pairs (channel 0, TCP, carries
/// the TLS handshake, heartbeats and acknowledgements).
pub const TRANSPORT_RDMA: u32 = 1;
/// The source's destination was promoted: client I/O is fenced off.
pub const FENCE_PEER_PROMOTED: u32 = 1;
/// Initial block copy not finished (or never started).
pub const COPY_IN_PROGRESS: u32 = 1;
/// Initial block copy finished: the destination followed every record since.
pub const COPY_DONE: u32 = 2;

/// The partnership of a group (all zero for a standalone group). Both sides
/// persist it, so a restart of either resumes where it stopped.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct PartnershipEntry {
    /// Random identity chosen at `partnership create`; both sides hold the same.
    pub id: Checksum128,
    /// [`MODE_SYNC`] or [`MODE_ASYNC`].
    pub mode: u32,
    /// Data channels the source opens.
    pub channels: u32,
    /// Source: the last LSN the destination acknowledged as durable (persisted
    /// at checkpoints; a restart learns the exact value when it reconnects).
    pub peer_durable_lsn: u64,
    /// Destination: [`COPY_IN_PROGRESS`] or [`COPY_DONE`]; the copy cursor
    /// below is durable (the volumes were fdatasync'ed before it was written).
    /// Source: [`COPY_DONE`] once the destination acknowledged the whole copy
    /// (sync mode then waits for the destination even right after a restart), else 0.
    pub copy_state: u32,
    /// Destination: volume the initial copy has reached.
    pub copy_volume: u32,
    /// Destination: byte offset in `copy_volume` below which the copy is done.
    pub copy_offset: u64,
    /// The other node's name, NUL-padded.
    pub peer_node: [u8; 64],
    /// The other group's name, NUL-padded.
    pub peer_group: [u8; 64],
    /// Source: `HOST:PORT` of the destination's replication listener.
    pub peer_address: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<PartnershipEntry>() == 304);

impl PartnershipEntry {
    /// No partnership.
    #[must_use]
    pub fn default_zeroed() -> Self {
        Self::zeroed()
    }
}

/// One volume of the group.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct VolumeEntry {
    pub size_bytes: u64,
    /// Logical sector size of the volume; the size is a multiple of it.
    pub sector_size: u32,
    pub reserved: u32,
    /// Export name inside the group (`GROUP/NAME`), NUL-padded.
    pub name: [u8; 48],
    /// Path of the file or block device, NUL-padded.
    pub path: [u8; 192],
}
const _: () = assert!(std::mem::size_of::<VolumeEntry>() == 256);

/// A generation and the first LSN written under it.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct GenerationEntry {
    pub generation: Checksum128,
    pub first_lsn: u64,
    pub reserved: u64,
}
const _: () = assert!(std::mem::size_of::<GenerationEntry>() == 32);

const FIXED_FIELDS_BYTES: usize = 248;
const TABLES_BYTES: usize = MAX_VOLUMES * 256 + MAX_GENERATION_HISTORY * 32;
const PARTNERSHIP_BYTES: usize = std::mem::size_of::<PartnershipEntry>();
const BITMAP_ENTRY_BYTES: usize = std::mem::size_of::<BitmapEntry>();
const RESERVED_BYTES: usize = SUPERBLOCK_SLOT_BYTES
    - FIXED_FIELDS_BYTES
    - TABLES_BYTES
    - PARTNERSHIP_BYTES
    - BITMAP_ENTRY_BYTES
    - 64
    - 8
    - 40
    - 16
    - 16;

/// Where the group's dirty-region bitmap lives: at the end of the log device,
/// after the ring. One bit per `region_bytes` of every volume, volume after
/// volume; a set bit means the destination may lack that region (its records
/// left the log before the destination had them). All zero: no bitmap (logs
/// formatted without one; a full log then holds writes back instead).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Byte offset of the bitmap area in the log device.
    pub offset: u64,
    /// Bytes of the area (whole sectors).
    pub bytes: u64,
    /// Bytes of volume one bit covers (a power of two).
    pub region_bytes: u64,
    pub reserved: u64,
}
const _: () = assert!(std::mem::size_of::<BitmapEntry>() == 32);

/// Most bits a bitmap holds (1 MiB of bitmap): larger groups get larger regions.
pub const MAX_BITMAP_BITS: u64 = 8 << 20;
/// Smallest region one bit covers.
pub const MIN_BITMAP_REGION_BYTES: u64 = 64 << 10;

impl BitmapEntry {
    /// The region size for volumes of `total_volume_bytes`: the smallest power
    /// of two of at least 64 KiB that keeps the bitmap within 1 MiB.
    #[must_use]
    pub fn region_bytes_for(total_volume_bytes: u64) -> u64 {
        let needed = total_volume_bytes.div_ceil(MAX_BITMAP_BITS).max(MIN_BITMAP_REGION_BYTES);
        needed.next_power_of_two()
    }

    /// Bits for volumes of these sizes with `region_bytes` regions.
    #[must_use]
    pub fn bits_for(volume_sizes: impl IntoIterator<Item = u64>, region_bytes: u64) -> u64 {
        volume_sizes.into_iter().map(|size| size.div_ceil(region_bytes)).sum()
    }
}

/// The superblock, exactly one slot long.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub magic: u64,
    pub version: u32,
    /// Logical sector size of the log device: the unit of every log write.
    pub sector_size: u32,
    /// Incremented on every superblock write; decides the slot and the newest copy.
    pub sequence: u64,
    /// Random identity of this log (see `RecordHeader::group_id`).
    pub group_id: u32,
    /// Current incarnation of the log (see `RecordHeader::epoch`).
    pub epoch: u32,
    pub log_size_bytes: u64,
    pub ring_offset: u64,
    pub ring_size_bytes: u64,
    /// Every record with an LSN up to this one is durable in the volumes.
    pub checkpoint_lsn: u64,
    /// Position, in the unwrapped byte stream of the ring, of the oldest record
    /// the log still holds: the first one not yet checkpointed, or an older
    /// one kept for a replication peer that has not acknowledged it (or the
    /// head when none). The ring offset is `ring_offset + tail_position % ring_size_bytes`.
    pub tail_position: u64,
    /// LSN of the record at `tail_position`; at most `checkpoint_lsn + 1`.
    pub tail_lsn: u64,
    /// Where the current incarnation began appending (the end of the scan at
    /// its open). Records from here on carry exactly `epoch`; records before it
    /// are the chain that open validated, kept (for a peer) with older epochs.
    /// Checkpoints may move the tail beyond it.
    pub epoch_start_position: u64,
    pub created_unix_s: u64,
    /// Current 128-bit generation of the group's history.
    pub generation: Checksum128,
    pub group_name: [u8; 64],
    pub node_name: [u8; 64],
    pub volume_count: u32,
    pub role: u32,
    pub volumes: [VolumeEntry; MAX_VOLUMES],
    pub generation_history: [GenerationEntry; MAX_GENERATION_HISTORY],
    /// The partnership when `role` is source or destination, else zero.
    pub partnership: PartnershipEntry,
    /// The dirty-region bitmap area (zero: none).
    pub bitmap: BitmapEntry,
    /// The partnership's network constraint on this side: the interface or
    /// local address its replication traffic must use, NUL-padded (all zero:
    /// none; taken from what was reserved, so older superblocks read as none).
    pub network_constraint: [u8; 64],
    /// How the partnership's frames are protected on the wire:
    /// [`ENCRYPTION_NONE`], [`ENCRYPTION_AES_128_GCM`] or [`ENCRYPTION_SIGN`]
    /// (taken from what was reserved: older superblocks read as none, which
    /// is what their partnerships used).
    pub encryption: u32,
    /// The partnership's data channels: [`TRANSPORT_TCP`] or
    /// [`TRANSPORT_RDMA`] (taken from what was reserved: older superblocks
    /// read as TCP, which is what they used).
    pub transport: u32,
    /// After an unplanned promotion: the partnership this group was the
    /// destination of, and the last LSN it held then (all zero: never
    /// promoted). A returning source of that partnership learns it.
    pub promoted_from: Checksum128,
    pub promoted_after_lsn: u64,
    /// [`FENCE_PEER_PROMOTED`]: this source learned its destination was
    /// promoted after LSN `fenced_after_lsn`; it takes no client I/O until
    /// it fails back (zero: not fenced). Taken from the reserved area.
    pub fence: u32,
    pub fence_reserved: u32,
    pub fenced_after_lsn: u64,
    /// A source that may have lost records its destination holds: 1 when it
    /// opened (recovered) since its destination last connected, and
    /// `recovered_lsn` is the lowest LSN such an open recovered to. Records
    /// up to it are the same on both sides; after it, the destination's may
    /// be ones this log lost (shipped while their append was in flight). Zero:
    /// every record the destination holds is in this log. Taken from the
    /// reserved area.
    pub recovered_since_connect: u32,
    pub recovered_reserved: u32,
    pub recovered_lsn: u64,
    /// Zero; room for later fields.
    pub reserved: [u8; RESERVED_BYTES],
    /// xxh3-128 of every preceding byte of the slot.
    pub checksum: Checksum128,
}
const _: () = assert!(std::mem::size_of::<Superblock>() == SUPERBLOCK_SLOT_BYTES);
const _: () = assert!(std::mem::offset_of!(Superblock, volumes) == FIXED_FIELDS_BYTES);

/// Why a superblock copy was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SuperblockDecodeError {
    #[error("superblock needs {SUPERBLOCK_SLOT_BYTES} bytes, got {0}")]
    Truncated(usize),
    #[error("no Tandem superblock (magic {found:#018x}); is this a Tandem log? format it with `tandem group create`")]
    BadMagic { found: u64 },
    #[error("unsupported superblock version {0} (this build reads version {SUPERBLOCK_VERSION})")]
    UnsupportedVersion(u32),
    #[error("superblock checksum mismatch (the copy is torn or corrupted)")]
    Checksum,
    #[error("superblock field {field} is invalid: {detail}")]
    Field { field: &'static str, detail: String },
}

fn field_error(field: &'static str, detail: impl Into<String>) -> SuperblockDecodeError {
    SuperblockDecodeError::Field { field, detail: detail.into() }
}

impl Superblock {
    /// Recomputes the checksum; call after changing any field and before writing.
    pub fn seal(&mut self) {
        self.checksum = xxh3_128_bytes(&bytemuck::bytes_of(self)[..SUPERBLOCK_SLOT_BYTES - 16]);
    }

    /// The slot bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// The lowest LSN this log recovered to since its destination was last
    /// connected, when it opened since then (see `recovered_since_connect`).
    #[must_use]
    pub fn recovered_lsn_since_connect(&self) -> Option<u64> {
        (self.recovered_since_connect != 0).then_some(self.recovered_lsn)
    }

    /// Which slot (0 or 1) this copy belongs in.
    #[must_use]
    pub fn slot(&self) -> usize {
        (self.sequence % 2) as usize
    }

    /// Byte offset of this copy's slot in the log.
    #[must_use]
    pub fn slot_offset(&self) -> u64 {
        self.slot() as u64 * SUPERBLOCK_SLOT_BYTES as u64
    }

    /// The group name.
    #[must_use]
    pub fn group_name(&self) -> &str {
        read_fixed_str(&self.group_name).expect("validated at decode or build")
    }

    /// The volumes in use.
    #[must_use]
    pub fn volumes(&self) -> &[VolumeEntry] {
        &self.volumes[..self.volume_count as usize]
    }

    /// Parses and validates one slot.
    pub fn decode(bytes: &[u8]) -> Result<Self, SuperblockDecodeError> {
        let raw = bytes.get(..SUPERBLOCK_SLOT_BYTES).ok_or(SuperblockDecodeError::Truncated(bytes.len()))?;
        let sb: Self = bytemuck::pod_read_unaligned(raw);
        if sb.magic != SUPERBLOCK_MAGIC {
            return Err(SuperblockDecodeError::BadMagic { found: sb.magic });
        }
        if sb.version != SUPERBLOCK_VERSION {
            return Err(SuperblockDecodeError::UnsupportedVersion(sb.version));
        }
        if xxh3_128_bytes(&raw[..SUPERBLOCK_SLOT_BYTES - 16]) != sb.checksum {
            return Err(SuperblockDecodeError::Checksum);
        }
        sb.validate()?;
        Ok(sb)
    }

    /// Checks every field; used by `decode` and before formatting.
    pub fn validate(&self) -> Result<(), SuperblockDecodeError> {
        self.validate_geometry()?;
        if self.group_id == 0 {
            return Err(field_error("group_id", "zero is reserved"));
        }
        match read_fixed_str(&self.group_name) {
            Some(name) if !name.is_empty() => {}
            _ => return Err(field_error("group_name", "empty or not UTF-8")),
        }
        if read_fixed_str(&self.node_name).is_none() {
            return Err(field_error("node_name", "not UTF-8"));
        }
        self.validate_partnership()?;
        self.validate_volumes()?;
        if self.bitmap.bytes > 0 {
            let bits = BitmapEntry::bits_for(self.volumes().iter().map(|v| v.size_bytes), self.bitmap.region_bytes);
            if bits > self.bitmap.bytes * 8 {
                return Err(field_error("bitmap", format!("{bits} regions do not fit in {} bytes", self.bitmap.bytes)));
            }
        }
        if self.reserved.iter().any(|&b| b != 0) {
            return Err(field_error("reserved", "must be zero in version 1"));
        }
        Ok(())
    }

    fn validate_partnership(&self) -> Result<(), SuperblockDecodeError> {
        let p = &self.partnership;
        if self.fence > FENCE_PEER_PROMOTED || self.fence_reserved != 0 {
            return Err(field_error("fence", format!("unknown fence {}", self.fence)));
        }
        if self.encryption > ENCRYPTION_SIGN {
            return Err(field_error("encryption", format!("unknown encryption {}", self.encryption)));
        }
        if self.transport > TRANSPORT_RDMA {
            return Err(field_error("transport", format!("unknown transport {}", self.transport)));
        }
        match self.role {
            ROLE_STANDALONE => {
                if *p != PartnershipEntry::zeroed() {
                    return Err(field_error("partnership", "a standalone group holds no partnership"));
                }
                return Ok(());
            }
            ROLE_SOURCE | ROLE_DESTINATION => {}
            role => return Err(field_error("role", format!("unknown role {role}"))),
        }
        if p.id == [0; 16] {
            return Err(field_error("partnership", "id is zero"));
        }
        if p.mode != MODE_SYNC && p.mode != MODE_ASYNC {
            return Err(field_error("partnership", format!("unknown mode {}", p.mode)));
        }
        if !(1..=16).contains(&p.channels) {
            return Err(field_error("partnership", format!("{} channels is outside 1..=16", p.channels)));
        }
        let copy_state_ok = match self.role {
            ROLE_DESTINATION => p.copy_state == COPY_IN_PROGRESS || p.copy_state == COPY_DONE,
            _ => p.copy_state == 0 || p.copy_state == COPY_DONE,
        };
        if !copy_state_ok {
            return Err(field_error("partnership", format!("unknown copy state {}", p.copy_state)));
        }
        let names_ok = [&p.peer_node[..], &p.peer_group[..], &p.peer_address[..]]
            .iter()
            .all(|field| read_fixed_str(field).is_some());
        if !names_ok {
            return Err(field_error("partnership", "peer names are not UTF-8"));
        }
        Ok(())
    }

    fn validate_geometry(&self) -> Result<(), SuperblockDecodeError> {
        let sector = self.sector_size;
        if !sector.is_power_of_two() || !(512..=MAX_SECTOR_BYTES).contains(&sector) {
            return Err(field_error(
                "sector_size",
                format!("{sector} is not a power of two in 512..={MAX_SECTOR_BYTES}"),
            ));
        }
        if self.ring_offset != RING_OFFSET_BYTES {
            return Err(field_error("ring_offset", format!("{} (expected {RING_OFFSET_BYTES})", self.ring_offset)));
        }
        let sector = u64::from(sector);
        if self.ring_size_bytes == 0 || !self.ring_size_bytes.is_multiple_of(sector) {
            return Err(field_error(
                "ring_size_bytes",
                format!("{} is not a positive multiple of the sector", self.ring_size_bytes),
            ));
        }
        let ring_end = self.ring_offset.checked_add(self.ring_size_bytes);
        if ring_end.and_then(|end| end.checked_add(self.bitmap.bytes)) != Some(self.log_size_bytes) {
            return Err(field_error("log_size_bytes", "does not equal ring offset + ring size + bitmap"));
        }
        let bitmap = &self.bitmap;
        if bitmap.bytes > 0
            && (Some(bitmap.offset) != ring_end
                || !bitmap.bytes.is_multiple_of(sector)
                || !bitmap.region_bytes.is_power_of_two()
                || bitmap.region_bytes < MIN_BITMAP_REGION_BYTES)
        {
            return Err(field_error(
                "bitmap",
                "area must follow the ring in whole sectors, regions a power of two ≥ 64 KiB",
            ));
        }
        if !self.tail_position.is_multiple_of(sector) || !self.epoch_start_position.is_multiple_of(sector) {
            return Err(field_error("tail_position", "tail and epoch start positions must be sector-aligned"));
        }
        if self.tail_lsn == 0 || self.tail_lsn > self.checkpoint_lsn + 1 {
            return Err(field_error(
                "tail_lsn",
                format!("{} must be in 1..={} (checkpoint LSN + 1)", self.tail_lsn, self.checkpoint_lsn + 1),
            ));
        }
        Ok(())
    }

    fn validate_volumes(&self) -> Result<(), SuperblockDecodeError> {
        let count = self.volume_count as usize;
        if count == 0 || count > MAX_VOLUMES {
            return Err(field_error("volume_count", format!("{count} is outside 1..={MAX_VOLUMES}")));
        }
        for (index, volume) in self.volumes.iter().enumerate() {
            if index >= count {
                if *volume != VolumeEntry::zeroed() {
                    return Err(field_error("volumes", format!("unused entry {index} is not zero")));
                }
                continue;
            }
            let sector = volume.sector_size;
            if !sector.is_power_of_two() || !(512..=MAX_SECTOR_BYTES).contains(&sector) {
                return Err(field_error("volumes", format!("volume {index} sector size {sector} is invalid")));
            }
            if volume.size_bytes == 0 || volume.size_bytes % u64::from(sector) != 0 {
                return Err(field_error(
                    "volumes",
                    format!("volume {index} size {} is not a multiple of {sector}", volume.size_bytes),
                ));
            }
            let named = matches!(read_fixed_str(&volume.name), Some(n) if !n.is_empty());
            let pathed = matches!(read_fixed_str(&volume.path), Some(p) if !p.is_empty());
            if !named || !pathed {
                return Err(field_error("volumes", format!("volume {index} has an empty or non-UTF-8 name or path")));
            }
        }
        Ok(())
    }

    /// Chooses the current copy from the two slots: the valid one with the higher
    /// sequence. Returns both errors when neither is valid.
    pub fn choose(
        slot0: Result<Self, SuperblockDecodeError>,
        slot1: Result<Self, SuperblockDecodeError>,
    ) -> Result<Self, (SuperblockDecodeError, SuperblockDecodeError)> {
        match (slot0, slot1) {
            (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(a), Err(b)) => Err((a, b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixed_str;

    pub(crate) fn sample() -> Superblock {
        let mut sb = Superblock::zeroed();
        sb.magic = SUPERBLOCK_MAGIC;
        sb.version = SUPERBLOCK_VERSION;
        sb.sector_size = 4096;
        sb.sequence = 7;
        sb.group_id = 0x1234_5678;
        sb.epoch = 2;
        sb.ring_offset = RING_OFFSET_BYTES;
        sb.tail_lsn = 1;
        sb.ring_size_bytes = 64 << 20;
        sb.log_size_bytes = RING_OFFSET_BYTES + (64 << 20);
        sb.group_name = fixed_str("rg01").unwrap();
        sb.node_name = fixed_str("sr-srv05").unwrap();
        sb.volume_count = 1;
        sb.volumes[0] = VolumeEntry {
            size_bytes: 1 << 30,
            sector_size: 4096,
            reserved: 0,
            name: fixed_str("data").unwrap(),
            path: fixed_str("/srv/data.img").unwrap(),
        };
        sb.seal();
        sb
    }

    #[test]
    fn round_trips_and_reports_fields() {
        let sb = sample();
        let decoded = Superblock::decode(sb.as_bytes()).unwrap();
        assert_eq!(decoded, sb);
        assert_eq!(decoded.group_name(), "rg01");
        assert_eq!(decoded.volumes().len(), 1);
        assert_eq!(decoded.slot(), 1);
        assert_eq!(decoded.slot_offset(), SUPERBLOCK_SLOT_BYTES as u64);
    }

    #[test]
    fn corruption_and_bad_fields_are_rejected() {
        let sb = sample();
        let mut torn = sb.as_bytes().to_vec();
        torn[5000] ^= 1;
        assert_eq!(Superblock::decode(&torn), Err(SuperblockDecodeError::Checksum));
        assert!(matches!(Superblock::decode(&[0; SUPERBLOCK_SLOT_BYTES]), Err(SuperblockDecodeError::BadMagic { .. })));
        assert_eq!(Superblock::decode(&[0; 100]), Err(SuperblockDecodeError::Truncated(100)));
        let check = |mutate: &dyn Fn(&mut Superblock), field: &str| {
            let mut bad = sample();
            mutate(&mut bad);
            bad.seal();
            match Superblock::decode(bad.as_bytes()) {
                Err(SuperblockDecodeError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected a {field} error, got {other:?}"),
            }
        };
        check(&|s| s.sector_size = 1000, "sector_size");
        check(&|s| s.ring_size_bytes = 4097, "ring_size_bytes");
        check(&|s| s.log_size_bytes += 1, "log_size_bytes");
        check(&|s| s.group_id = 0, "group_id");
        check(&|s| s.volume_count = 0, "volume_count");
        check(&|s| s.volumes[0].size_bytes = 1000, "volumes");
        check(&|s| s.volumes[3].size_bytes = 1, "volumes");
        check(&|s| s.tail_position = 100, "tail_position");
        check(&|s| s.tail_lsn = 0, "tail_lsn");
        check(&|s| s.tail_lsn = 5, "tail_lsn");
        check(&|s| s.role = 9, "role");
        check(&|s| s.reserved[0] = 1, "reserved");
    }

    #[test]
    fn choose_prefers_newest_valid_copy() {
        let older = sample();
        let mut newer = sample();
        newer.sequence = 8;
        newer.seal();
        assert_eq!(Superblock::choose(Ok(newer), Ok(older)).unwrap().sequence, 8);
        assert_eq!(Superblock::choose(Err(SuperblockDecodeError::Checksum), Ok(older)).unwrap().sequence, 7);
        assert!(Superblock::choose(Err(SuperblockDecodeError::Checksum), Err(SuperblockDecodeError::Checksum)).is_err());
    }
}
