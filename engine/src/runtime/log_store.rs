//! Formatting a log, opening a group from its log, and crash recovery. These run
//! once per group at creation or start-up, before the group's core takes over, so
//! they use plain positioned IO rather than io_uring.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use bytemuck::Zeroable;
use rand::Rng;
use tandem_proto::{
    fixed_str, GenerationEntry, RecordHeader, RecordKind, Superblock, VolumeEntry, FLAG_NO_HOLE, MAX_VOLUMES,
    RING_OFFSET_BYTES, ROLE_DESTINATION, ROLE_SOURCE, ROLE_STANDALONE, SUPERBLOCK_MAGIC, SUPERBLOCK_SLOT_BYTES,
    SUPERBLOCK_VERSION,
};

use super::buf::AlignedBuf;
use super::device::{self, open_device, Device, OpenMode};
use crate::core::{ScanStart, Scanner};

/// Smallest log accepted: the ring must hold two of the largest records (32 MiB
/// NBD requests) plus a pad, so no write can wait forever for space.
pub const MIN_LOG_SIZE_BYTES: u64 = 128 << 20;
/// Default log size, as Storage Replica recommends for a start.
pub const DEFAULT_LOG_SIZE_BYTES: u64 = 8 << 30;
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// A volume to register in a new group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub path: PathBuf,
}

/// Everything `tandem group create` decides.
#[derive(Debug, Clone)]
pub struct FormatRequest {
    pub group_name: String,
    pub node_name: String,
    pub log_path: PathBuf,
    /// Size of a file log; block-device logs use the whole device.
    pub log_size_bytes: u64,
    pub volumes: Vec<VolumeSpec>,
}

/// A group's log and volumes, opened and recovered, ready for a core.
#[derive(Debug)]
pub struct OpenGroup {
    pub superblock: Superblock,
    pub log_path: PathBuf,
    pub log: Device,
    pub volumes: Vec<Device>,
    pub recovery: RecoveryReport,
    /// Where the next record goes (the end of the recovery scan).
    pub head_position: u64,
    /// A source's records kept in the log for its destination (from the
    /// tail on); empty for other groups, whose log is empty after open.
    pub retained: Vec<crate::core::ScannedRecord>,
    /// The records replayed after the last checkpoint (a destination's
    /// source may have lost some of them).
    pub unconfirmed: crate::core::UnconfirmedRecords,
    /// The group's consistent snapshots (`tandem group snapshot`).
    pub snapshots: super::snapshots::SnapshotSet,
}

/// Where groups keep their snapshots, and how large each may grow.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub state_dir: PathBuf,
    pub max_bytes: u64,
}

impl SnapshotSettings {
    /// The snapshot directory of a group: its name and log identity, so a
    /// group formatted again under the same name never sees old snapshots.
    #[must_use]
    pub fn root_of(&self, superblock: &Superblock) -> PathBuf {
        self.state_dir.join("snapshots").join(format!("{}-{:08x}", superblock.group_name(), superblock.group_id))
    }
}

/// What recovery found and replayed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecoveryReport {
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// Why the scan stopped (the end of the log or the torn tail).
    pub stopped: String,
    pub elapsed_ms: u64,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Formats the log of a new group and returns its first superblock.
pub fn format_log(request: &FormatRequest) -> io::Result<Superblock> {
    validate_name(&request.group_name, "group")?;
    if request.volumes.is_empty() || request.volumes.len() > MAX_VOLUMES {
        return Err(invalid(format!("a group holds 1 to {MAX_VOLUMES} volumes, got {}", request.volumes.len())));
    }
    for (index, spec) in request.volumes.iter().enumerate() {
        if request.volumes[..index].iter().any(|other| other.name == spec.name) {
            return Err(invalid(format!(
                "two volumes are named {:?}; each volume needs its own name (--volume NAME=PATH)",
                spec.name
            )));
        }
    }
    let mut superblock = new_superblock(request)?;
    for (index, spec) in request.volumes.iter().enumerate() {
        superblock.volumes[index] = volume_entry(spec)?;
    }
    let log = prepare_log_device(&request.log_path, request.log_size_bytes)?;
    let sector = u64::from(log.sector_bytes);
    // The dirty-region bitmap takes the end of the log device.
    let sizes: Vec<u64> = superblock.volumes().iter().map(|v| v.size_bytes).collect();
    let region_bytes = tandem_proto::BitmapEntry::region_bytes_for(sizes.iter().sum());
    let bits = tandem_proto::BitmapEntry::bits_for(sizes, region_bytes);
    let bitmap_bytes = tandem_proto::align_up(bits.div_ceil(8), sector);
    let ring_size = (log.size_bytes - RING_OFFSET_BYTES - bitmap_bytes) / sector * sector;
    superblock.sector_size = log.sector_bytes;
    superblock.ring_size_bytes = ring_size;
    superblock.bitmap = tandem_proto::BitmapEntry {
        offset: RING_OFFSET_BYTES + ring_size,
        bytes: bitmap_bytes,
        region_bytes,
        reserved: 0,
    };
    superblock.log_size_bytes = RING_OFFSET_BYTES + ring_size + bitmap_bytes;
    superblock.validate().map_err(|e| invalid(e.to_string()))?;
    if !log.is_block {
        zero_fill(&log)?;
    }
    write_superblock(&log.file, &mut superblock)?;
    Ok(superblock)
}

fn validate_name(name: &str, what: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 47
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("{what} name {name:?} must be 1 to 47 characters of A-Z a-z 0-9 - _ .")))
    }
}

fn new_superblock(request: &FormatRequest) -> io::Result<Superblock> {
    let mut rng = rand::rng();
    let mut superblock = Superblock::zeroed();
    superblock.magic = SUPERBLOCK_MAGIC;
    superblock.version = SUPERBLOCK_VERSION;
    superblock.group_id = rng.random_range(1..=u32::MAX);
    superblock.ring_offset = RING_OFFSET_BYTES;
    superblock.tail_lsn = 1;
    superblock.role = ROLE_STANDALONE;
    superblock.created_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    superblock.generation = rng.random();
    superblock.generation_history[0] = GenerationEntry { generation: superblock.generation, first_lsn: 1, reserved: 0 };
    superblock.group_name = fixed_str(&request.group_name).expect("validated above");
    superblock.node_name = fixed_str(&request.node_name)
        .ok_or_else(|| invalid(format!("node name {:?} is longer than 63 bytes", request.node_name)))?;
    superblock.volume_count = request.volumes.len() as u32;
    Ok(superblock)
}

fn volume_entry(spec: &VolumeSpec) -> io::Result<VolumeEntry> {
    validate_name(&spec.name, "volume")?;
    let path =
        spec.path.to_str().ok_or_else(|| invalid(format!("volume path {} is not UTF-8", spec.path.display())))?;
    let device = open_device(&spec.path, OpenMode::VolumeBuffered)?;
    let sector = u64::from(device.sector_bytes);
    if device.size_bytes == 0 || device.size_bytes % sector != 0 {
        return Err(invalid(format!(
            "volume {} is {} bytes, not a positive multiple of its {sector}-byte sector; resize it to {} bytes",
            spec.path.display(),
            device.size_bytes,
            (device.size_bytes / sector + 1) * sector
        )));
    }
    Ok(VolumeEntry {
        size_bytes: device.size_bytes,
        sector_size: device.sector_bytes,
        reserved: 0,
        name: fixed_str(&spec.name).expect("validated above"),
        path: fixed_str(path).ok_or_else(|| invalid(format!("volume path {path} is longer than 191 bytes")))?,
    })
}

/// Creates a file log of `size` bytes (or checks a block device) and refuses to
/// overwrite anything that might be data.
fn prepare_log_device(path: &Path, size: u64) -> io::Result<Device> {
    if size < MIN_LOG_SIZE_BYTES {
        return Err(invalid(format!(
            "log size {size} bytes is below the minimum of {} MiB; use --log-size 128MiB or more (default 8GiB)",
            MIN_LOG_SIZE_BYTES >> 20
        )));
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create log file {}: {e}", path.display())))?;
            file.set_len(size)?;
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot access {}: {e}", path.display()))),
        Ok(meta) if meta.is_file() => {
            let file = std::fs::File::options().read(true).write(true).open(path)?;
            refuse_unless_blank(&file, path)?;
            file.set_len(size)?;
        }
        Ok(_) => {}
    }
    let device = open_device(path, OpenMode::LogWriteThrough)?;
    if device.is_block {
        if let Ok(existing) = read_superblock(&device) {
            return Err(invalid(format!(
                "{} already holds the log of group {}; delete that group first",
                path.display(),
                existing.group_name()
            )));
        }
        if device.size_bytes < MIN_LOG_SIZE_BYTES {
            return Err(invalid(format!(
                "log device {} has {} bytes, below the minimum of {} MiB",
                path.display(),
                device.size_bytes,
                MIN_LOG_SIZE_BYTES >> 20
            )));
        }
    }
    Ok(device)
}

/// An existing file may become a log only when its superblock area is blank:
/// a log released by `tandem group delete`, or a new preallocated file.
/// Anything else might be someone's data.
fn refuse_unless_blank(file: &File, path: &Path) -> io::Result<()> {
    let mut head = vec![0u8; RING_OFFSET_BYTES as usize];
    let read = std::os::unix::fs::FileExt::read_at(file, &mut head, 0)?;
    if head[..read].iter().all(|&b| b == 0) {
        return Ok(());
    }
    let slot0 = Superblock::decode(&head[..SUPERBLOCK_SLOT_BYTES]);
    let slot1 = Superblock::decode(&head[SUPERBLOCK_SLOT_BYTES..]);
    let message = match Superblock::choose(slot0, slot1) {
        Ok(existing) => format!(
            "{} already holds the log of group {}; delete that group first (`tandem group delete {}`)",
            path.display(),
            existing.group_name(),
            existing.group_name()
        ),
        Err(_) => {
            format!("log file {} already exists and holds data; remove it or choose another path", path.display())
        }
    };
    Err(invalid(message))
}

/// Writes zeros over a file log so the blocks are allocated and initialised:
/// write-through appends then never pay for extent conversion in the journal.
fn zero_fill(log: &Device) -> io::Result<()> {
    let chunk = AlignedBuf::zeroed(ZERO_FILL_CHUNK_BYTES);
    let mut offset = 0u64;
    while offset < log.size_bytes {
        let len = (log.size_bytes - offset).min(chunk.len() as u64) as usize;
        device::write_all_at(&log.file, &chunk[..len], offset)?;
        offset += len as u64;
    }
    Ok(())
}

/// Seals and writes `superblock` into its slot (alternating with each sequence).
/// The log is opened write-through, so the copy is durable on return.
pub fn write_superblock(log: &File, superblock: &mut Superblock) -> io::Result<()> {
    let buf = sealed_slot(superblock);
    device::write_all_at(log, &buf, superblock.slot_offset())
}

/// Seals `superblock` and copies it into a slot-sized buffer aligned for
/// O_DIRECT, ready to be written at `superblock.slot_offset()`.
#[must_use]
pub fn sealed_slot(superblock: &mut Superblock) -> AlignedBuf {
    superblock.seal();
    let mut buf = AlignedBuf::zeroed(SUPERBLOCK_SLOT_BYTES);
    buf.copy_from_slice(superblock.as_bytes());
    buf
}

/// Reads both slots and returns the newest valid copy.
pub fn read_superblock(log: &Device) -> io::Result<Superblock> {
    let mut buf = AlignedBuf::zeroed(2 * SUPERBLOCK_SLOT_BYTES);
    device::read_exact_at(&log.file, &mut buf, 0)?;
    let slot0 = Superblock::decode(&buf[..SUPERBLOCK_SLOT_BYTES]);
    let slot1 = Superblock::decode(&buf[SUPERBLOCK_SLOT_BYTES..]);
    Superblock::choose(slot0, slot1).map_err(|(a, b)| invalid(format!("no valid superblock: copy 0: {a}; copy 1: {b}")))
}

/// Opens a group from its log: reads the superblock, opens and checks the
/// volumes, replays the log from the checkpoint up to its torn tail, makes the
/// volumes durable and records a new checkpoint and epoch.
pub fn open_group(log_path: &Path, snapshot_settings: &SnapshotSettings) -> io::Result<OpenGroup> {
    let started = std::time::Instant::now();
    let log = open_device(log_path, OpenMode::LogWriteThrough)?;
    let mut superblock =
        read_superblock(&log).map_err(|e| io::Error::new(e.kind(), format!("log {}: {e}", log_path.display())))?;
    if log.size_bytes < superblock.log_size_bytes || log.sector_bytes > superblock.sector_size {
        return Err(invalid(format!(
            "log {} is {} bytes with {}-byte sectors but was formatted as {} bytes with {}-byte sectors",
            log_path.display(),
            log.size_bytes,
            log.sector_bytes,
            superblock.log_size_bytes,
            superblock.sector_size
        )));
    }
    let volumes = open_volumes(&superblock)?;
    let root = snapshot_settings.root_of(&superblock);
    let mut snapshots =
        super::snapshots::SnapshotSet::open(root, snapshot_settings.max_bytes, superblock.checkpoint_lsn)?;
    let checkpoint_before_lsn = superblock.checkpoint_lsn;
    let (mut recovery, end_position, scanned) = replay(&log, &superblock, &volumes, &mut snapshots)?;
    // A destination lists what it replayed: its source may have lost some
    // of it (see core::unconfirmed). No other role uses the list.
    let unconfirmed = if superblock.role == ROLE_DESTINATION {
        crate::core::UnconfirmedRecords::new(
            checkpoint_before_lsn,
            scanned
                .iter()
                .filter(|r| r.lsn > checkpoint_before_lsn)
                .map(|r| (r.lsn, (r.volume_index, r.offset, u64::from(r.length)))),
        )
    } else {
        crate::core::UnconfirmedRecords::default()
    };
    snapshots.replay_done();
    for volume in &volumes {
        device::fdatasync(&volume.file)?;
    }
    // A source keeps every record from the tail for its destination (which
    // says at reconnection what it already holds); any other log is empty now.
    let retained = if superblock.role == ROLE_SOURCE {
        // Its destination may hold records shipped while their append was in
        // flight and lost now: the lowest LSN recovered since it was last
        // connected tells the destination where the two logs may differ.
        superblock.recovered_lsn =
            superblock.recovered_lsn_since_connect().map_or(recovery.last_lsn, |lsn| lsn.min(recovery.last_lsn));
        superblock.recovered_since_connect = 1;
        scanned
    } else {
        superblock.tail_position = end_position;
        superblock.tail_lsn = recovery.last_lsn + 1;
        Vec::new()
    };
    superblock.checkpoint_lsn = recovery.last_lsn;
    superblock.epoch_start_position = end_position;
    superblock.epoch += 1;
    superblock.sequence += 1;
    write_superblock(&log.file, &mut superblock)?;
    recovery.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(OpenGroup {
        superblock,
        log_path: log_path.to_owned(),
        log,
        volumes,
        recovery,
        head_position: end_position,
        retained,
        unconfirmed,
        snapshots,
    })
}

fn open_volumes(superblock: &Superblock) -> io::Result<Vec<Device>> {
    let mut volumes = Vec::new();
    for entry in superblock.volumes() {
        let path = Path::new(tandem_proto::read_fixed_str(&entry.path).expect("validated superblock"));
        let device = open_device(path, OpenMode::VolumeBuffered)?;
        if device.size_bytes != entry.size_bytes {
            return Err(invalid(format!(
                "volume {} is {} bytes but group {} registered it with {} bytes; restore its size",
                path.display(),
                device.size_bytes,
                superblock.group_name(),
                entry.size_bytes
            )));
        }
        volumes.push(device);
    }
    Ok(volumes)
}

/// Replays every record after the checkpoint into the volumes; returns the report
/// and the position where the scan stopped (the new head and tail of the log).
fn replay(
    log: &Device,
    superblock: &Superblock,
    volumes: &[Device],
    snapshots: &mut super::snapshots::SnapshotSet,
) -> io::Result<(RecoveryReport, u64, Vec<crate::core::ScannedRecord>)> {
    let mut scanner = Scanner::new(ScanStart::from_superblock(superblock));
    let read = |ring_offset: u64, len: usize| -> io::Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(len);
        device::read_exact_at(&log.file, &mut buf, RING_OFFSET_BYTES + ring_offset)?;
        Ok(buf)
    };
    let apply = |header: &RecordHeader, payload: &[u8]| apply_record(header, payload, (superblock, volumes), snapshots);
    let outcome = crate::core::replay(&mut scanner, superblock.checkpoint_lsn, read, apply)?;
    let report = RecoveryReport {
        records_replayed: outcome.records,
        bytes_replayed: outcome.payload_bytes,
        first_lsn: superblock.checkpoint_lsn + 1,
        last_lsn: outcome.last_lsn,
        stopped: outcome.stop.to_string(),
        elapsed_ms: 0,
    };
    Ok((report, outcome.end_position, outcome.scanned))
}

/// fallocate mode that realises a Trim or WriteZeroes record.
#[must_use]
pub fn fallocate_mode(kind: RecordKind, flags: u8) -> libc::c_int {
    let keep_allocated = kind == RecordKind::WriteZeroes && flags & FLAG_NO_HOLE != 0;
    if keep_allocated {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn apply_record(
    header: &RecordHeader,
    payload: &[u8],
    (superblock, volumes): (&Superblock, &[Device]),
    snapshots: &mut super::snapshots::SnapshotSet,
) -> io::Result<()> {
    if header.record_kind() == RecordKind::Snapshot {
        let name = String::from_utf8_lossy(payload);
        // A snapshot the replay cannot take is reported, not fatal: the
        // group's data is whole without it.
        if let Err(reason) = snapshots.take(&name, header.lsn, volumes) {
            tracing::error!(group = superblock.group_name(), lsn = header.lsn, %reason, "snapshot not taken");
        }
        return Ok(());
    }
    let index = usize::from(header.volume_index);
    let entry = superblock.volumes().get(index).ok_or_else(|| {
        invalid(format!("log record LSN {} names volume {index}, but the group has {}", header.lsn, volumes.len()))
    })?;
    let end = header.offset + u64::from(header.length);
    if end > entry.size_bytes {
        return Err(invalid(format!(
            "log record LSN {} ends at byte {end}, beyond volume {index} ({} bytes)",
            header.lsn, entry.size_bytes
        )));
    }
    let file = &volumes[index].file;
    snapshots.preserve(
        volumes,
        (header.volume_index, header.offset, u64::from(header.changed_bytes())),
        Some(header.lsn),
    );
    snapshots.commit();
    match header.record_kind() {
        RecordKind::Write => device::write_all_at(file, payload, header.offset),
        kind @ (RecordKind::Trim | RecordKind::WriteZeroes) => {
            device::fallocate(file, fallocate_mode(kind, header.flags), header.offset, u64::from(header.length))
        }
        RecordKind::Pad | RecordKind::Snapshot => Ok(()),
    }
}
