//! Consistent snapshots (`tandem group snapshot`): read-only copy-on-write
//! snapshots of every volume of a group, taken where a Snapshot record sits
//! in the LSN stream. The source and its destination each take theirs when
//! they apply that record, so both hold exactly the records before it.
//!
//! Each snapshot is a directory under the group's snapshot root:
//! - `meta.json`: name, LSN, time, limit; rewritten atomically (temporary
//!   file, fsync, rename) and marked `deleted` when deleted;
//! - `data`: 64 KiB blocks, each the volume's content at the snapshot;
//! - `journal`: 32-byte entries (volume, block, slot, checksum) naming the
//!   blocks in `data`.
//!
//! Durability: a block enters the snapshot before the volume write that
//! changes it is issued. Its bytes are written and `data` is fdatasynced
//! before the journal entry naming them is written and fdatasynced, so a
//! journal entry that survives a crash always names whole bytes, and a torn
//! journal tail only loses blocks whose volume writes never started. After a
//! crash the log replays the records since the checkpoint: the records
//! before a snapshot's LSN land in the volume (where the snapshot reads
//! them) and those after it are preserved first, as the first time.
//!
//! A deleted snapshot keeps its `meta.json` (marked deleted) until the
//! checkpoint passes its LSN, so a replay never takes it again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::device::{self, Device};

/// Bytes of a copy-on-write block (the test failover's block size).
pub const SNAPSHOT_BLOCK_BYTES: u64 = super::test_failover::COW_BLOCK_BYTES;
/// Snapshots a group keeps at most (each volume write checks every one).
pub const MAX_SNAPSHOTS_PER_GROUP: usize = 16;
const JOURNAL_ENTRY_BYTES: usize = 32;

/// A snapshot as status and `tandem group snapshot list` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The LSN of its Snapshot record: it holds every record before it.
    pub lsn: u64,
    pub created_unix_ms: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    /// Why it can no longer be read (it filled up, or an IO error).
    pub broken: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    name: String,
    lsn: u64,
    created_unix_ms: u64,
    max_bytes: u64,
    volume_sizes_bytes: Vec<u64>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    broken: Option<String>,
}

#[derive(Debug)]
struct Snapshot {
    dir: PathBuf,
    meta: Meta,
    data: File,
    journal: File,
    /// (volume, block) -> slot in `data`.
    slots: HashMap<(u8, u64), u64>,
    next_slot: u64,
    /// Journal entries whose blocks are written but not yet durable.
    unsynced: Vec<[u8; JOURNAL_ENTRY_BYTES]>,
}

/// The snapshots of one group.
#[derive(Debug)]
pub struct SnapshotSet {
    root: PathBuf,
    max_bytes: u64,
    snapshots: Vec<Snapshot>,
    /// Deleted snapshots' (name, LSN) whose record may still be replayed.
    deleted: Vec<(String, u64)>,
    /// During the replay at open: snapshots whose record is still ahead in
    /// the log take no blocks from records before it.
    replay_checkpoint_lsn: Option<u64>,
    /// Snapshots that broke since [`Self::take_newly_broken`] last looked.
    newly_broken: Vec<SnapshotInfo>,
}

impl SnapshotSet {
    /// Opens the snapshots under `root` (created if missing); `checkpoint_lsn`
    /// is the log's checkpoint, from which the replay that follows starts.
    pub fn open(root: PathBuf, max_bytes: u64, checkpoint_lsn: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&root).map_err(|e| annotate(&root, &e, "cannot create the snapshot directory"))?;
        let mut set = Self {
            root,
            max_bytes,
            snapshots: Vec::new(),
            deleted: Vec::new(),
            replay_checkpoint_lsn: None,
            newly_broken: Vec::new(),
        };
        for entry in std::fs::read_dir(&set.root)? {
            let dir = entry?.path();
            let meta_path = dir.join("meta.json");
            if !meta_path.exists() {
                // A snapshot whose creation was interrupted: never taken.
                std::fs::remove_dir_all(&dir)?;
                continue;
            }
            let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path)?)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", meta_path.display())))?;
            if meta.deleted {
                if meta.lsn <= checkpoint_lsn {
                    std::fs::remove_dir_all(&dir)?;
                } else {
                    set.deleted.push((meta.name, meta.lsn));
                }
                continue;
            }
            set.snapshots.push(Snapshot::load(dir, meta)?);
        }
        set.snapshots.sort_by_key(|s| s.meta.lsn);
        set.replay_checkpoint_lsn = Some(checkpoint_lsn);
        Ok(set)
    }

    /// The replay at open is over: every later volume change is preserved.
    pub fn replay_done(&mut self) {
        self.replay_checkpoint_lsn = None;
    }

    #[must_use]
    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(Snapshot::info).collect()
    }

    /// Whether a new snapshot may be named `name` here.
    pub fn check_new_name(&self, name: &str) -> Result<(), String> {
        validate_name(name)?;
        if self.snapshots.iter().any(|s| s.meta.name == name) {
            return Err(format!("a snapshot named {name} exists already; choose another name or delete it first"));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS_PER_GROUP {
            return Err(format!(
                "the group keeps {} snapshots, the most it can; delete one first (`tandem group snapshot list` shows them)",
                self.snapshots.len()
            ));
        }
        Ok(())
    }

    /// Takes the snapshot of the record `lsn` named `name`; every volume
    /// write in flight is done and none after the record has started. A
    /// record replayed again finds its snapshot taken (or deleted). A name
    /// taken by an older snapshot here is kept with `-lsnN` appended.
    /// Returns the name it is kept under.
    pub fn take(&mut self, name: &str, lsn: u64, volumes: &[Device]) -> Result<String, String> {
        let renamed = format!("{name}-lsn{lsn}");
        let same = |n: &str, l: u64| l == lsn && (n == name || n == renamed);
        if let Some(existing) = self.snapshots.iter().find(|s| same(&s.meta.name, s.meta.lsn)) {
            return Ok(existing.meta.name.clone());
        }
        if self.deleted.iter().any(|(n, l)| same(n, *l)) {
            return Ok(name.to_owned());
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS_PER_GROUP {
            return Err(format!("snapshot {name} at LSN {lsn} not taken: the group keeps {MAX_SNAPSHOTS_PER_GROUP} snapshots already; delete one"));
        }
        let kept_as = if self.snapshots.iter().any(|s| s.meta.name == name) { renamed } else { name.to_owned() };
        let meta = Meta {
            name: kept_as.clone(),
            lsn,
            created_unix_ms: unix_ms(),
            max_bytes: self.max_bytes,
            volume_sizes_bytes: volumes.iter().map(|v| v.size_bytes).collect(),
            deleted: false,
            broken: None,
        };
        let snapshot = Snapshot::create(&self.root, meta).map_err(|e| format!("snapshot {kept_as}: {e}"))?;
        self.snapshots.push(snapshot);
        Ok(kept_as)
    }

    /// Before a change of `length` bytes at `offset` of `volume` lands in
    /// the volume (the change of record `lsn`, or `None` outside the log):
    /// copies the blocks it touches into every snapshot that lacks them.
    /// [`Self::commit`] makes them durable; the change waits for it.
    pub fn preserve(&mut self, volumes: &[Device], (volume, offset, length): (u8, u64, u64), lsn: Option<u64>) {
        if length == 0 {
            return;
        }
        let checkpoint = self.replay_checkpoint_lsn;
        for snapshot in &mut self.snapshots {
            // During the replay, the records before a snapshot still ahead
            // in the log belong in it: they go to the volume unpreserved.
            let ahead = checkpoint.is_some_and(|c| snapshot.meta.lsn > c);
            if ahead && lsn.is_some_and(|l| l < snapshot.meta.lsn) {
                continue;
            }
            let was_broken = snapshot.meta.broken.is_some();
            snapshot.preserve(volumes, volume, offset, length);
            if !was_broken && snapshot.meta.broken.is_some() {
                self.newly_broken.push(snapshot.info());
            }
        }
    }

    /// The snapshots that broke since the last call.
    pub fn take_newly_broken(&mut self) -> Vec<SnapshotInfo> {
        std::mem::take(&mut self.newly_broken)
    }

    /// Makes the blocks preserved since the last commit durable.
    pub fn commit(&mut self) {
        for snapshot in &mut self.snapshots {
            let was_broken = snapshot.meta.broken.is_some();
            snapshot.commit();
            if !was_broken && snapshot.meta.broken.is_some() {
                self.newly_broken.push(snapshot.info());
            }
        }
    }

    /// Whether some block waits for [`Self::commit`].
    #[cfg(test)]
    #[must_use]
    pub fn has_uncommitted(&self) -> bool {
        self.snapshots.iter().any(|s| !s.unsynced.is_empty())
    }

    /// `length` bytes at `offset` of `volume` as snapshot `name` holds them.
    pub fn read(
        &self,
        volumes: &[Device],
        name: &str,
        (volume, offset, length): (u8, u64, u32),
    ) -> Result<Vec<u8>, String> {
        let snapshot = self.find(name)?;
        snapshot.read(volumes, volume, offset, length)
    }

    /// Deletes snapshot `name` and frees its blocks.
    pub fn delete(&mut self, name: &str) -> Result<SnapshotInfo, String> {
        let index = self.snapshots.iter().position(|s| s.meta.name == name).ok_or_else(|| self.unknown(name))?;
        let mut snapshot = self.snapshots.remove(index);
        let info = snapshot.info();
        snapshot.meta.deleted = true;
        write_meta(&snapshot.dir, &snapshot.meta).map_err(|e| format!("deleting snapshot {name}: {e}"))?;
        let _ = std::fs::remove_file(snapshot.dir.join("data"));
        let _ = std::fs::remove_file(snapshot.dir.join("journal"));
        self.deleted.push((snapshot.meta.name, snapshot.meta.lsn));
        Ok(info)
    }

    fn find(&self, name: &str) -> Result<&Snapshot, String> {
        let snapshot = self.snapshots.iter().find(|s| s.meta.name == name).ok_or_else(|| self.unknown(name))?;
        match &snapshot.meta.broken {
            Some(reason) => Err(format!("snapshot {name} is broken: {reason}")),
            None => Ok(snapshot),
        }
    }

    fn unknown(&self, name: &str) -> String {
        let names: Vec<&str> = self.snapshots.iter().map(|s| s.meta.name.as_str()).collect();
        format!(
            "no snapshot named {name} (this group has: {})",
            if names.is_empty() { "none".to_owned() } else { names.join(", ") }
        )
    }
}

impl Snapshot {
    fn create(root: &Path, meta: Meta) -> io::Result<Self> {
        let dir = root.join(format!("{:020}-{}", meta.lsn, meta.name));
        let building = root.join(format!(".{:020}-{}", meta.lsn, meta.name));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building)?;
        for file in ["data", "journal"] {
            File::create(building.join(file))?.sync_all()?;
        }
        write_meta(&building, &meta)?;
        std::fs::rename(&building, &dir)?;
        File::open(root)?.sync_all()?;
        Self::load(dir, meta)
    }

    fn load(dir: PathBuf, meta: Meta) -> io::Result<Self> {
        let open = |name: &str| OpenOptions::new().read(true).write(true).open(dir.join(name));
        let (data, journal) = (open("data")?, open("journal")?);
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &journal, &mut bytes)?;
        let mut slots = HashMap::new();
        let mut next_slot = 0;
        for entry in bytes.chunks_exact(JOURNAL_ENTRY_BYTES) {
            // A torn tail ends the journal: its blocks' volume writes never began.
            let Some((volume, block, slot)) = decode_entry(entry) else { break };
            slots.insert((volume, block), slot);
            next_slot = next_slot.max(slot + 1);
        }
        let valid_bytes = slots.len() * JOURNAL_ENTRY_BYTES;
        journal.set_len(valid_bytes as u64)?;
        Ok(Self { dir, meta, data, journal, slots, next_slot, unsynced: Vec::new() })
    }

    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            name: self.meta.name.clone(),
            lsn: self.meta.lsn,
            created_unix_ms: self.meta.created_unix_ms,
            used_bytes: self.next_slot * SNAPSHOT_BLOCK_BYTES,
            max_bytes: self.meta.max_bytes,
            broken: self.meta.broken.clone(),
        }
    }

    fn preserve(&mut self, volumes: &[Device], volume: u8, offset: u64, length: u64) {
        if self.meta.broken.is_some() {
            return;
        }
        for block in offset / SNAPSHOT_BLOCK_BYTES..(offset + length).div_ceil(SNAPSHOT_BLOCK_BYTES) {
            if self.slots.contains_key(&(volume, block)) {
                continue;
            }
            if let Err(reason) = self.copy_in(volumes, volume, block) {
                self.mark_broken(reason);
                return;
            }
        }
    }

    fn copy_in(&mut self, volumes: &[Device], volume: u8, block: u64) -> Result<(), String> {
        if (self.next_slot + 1) * SNAPSHOT_BLOCK_BYTES > self.meta.max_bytes {
            return Err(format!(
                "it is full ({} bytes, replication.snapshot_max_bytes): the volumes changed more since LSN {} than it can hold",
                self.meta.max_bytes, self.meta.lsn
            ));
        }
        let base = &volumes[usize::from(volume)];
        let start = block * SNAPSHOT_BLOCK_BYTES;
        let length = SNAPSHOT_BLOCK_BYTES.min(base.size_bytes - start) as usize;
        let mut bytes = vec![0u8; SNAPSHOT_BLOCK_BYTES as usize];
        device::read_exact_at(&base.file, &mut bytes[..length], start)
            .map_err(|e| format!("reading the volume failed: {e}"))?;
        let slot = self.next_slot;
        self.data
            .write_all_at(&bytes, slot * SNAPSHOT_BLOCK_BYTES)
            .map_err(|e| format!("writing {} failed: {e}", self.dir.join("data").display()))?;
        self.next_slot += 1;
        self.slots.insert((volume, block), slot);
        self.unsynced.push(encode_entry(volume, block, slot));
        Ok(())
    }

    fn commit(&mut self) {
        if self.unsynced.is_empty() {
            return;
        }
        let entries: Vec<u8> = self.unsynced.drain(..).flatten().collect();
        let at = (self.slots.len() * JOURNAL_ENTRY_BYTES - entries.len()) as u64;
        let durable = device::fdatasync(&self.data)
            .and_then(|()| self.journal.write_all_at(&entries, at))
            .and_then(|()| device::fdatasync(&self.journal));
        if let Err(e) = durable {
            self.mark_broken(format!("making its blocks durable failed: {e}"));
        }
    }

    /// A snapshot that cannot keep a block is broken for good, and says so
    /// across restarts; replication goes on.
    fn mark_broken(&mut self, reason: String) {
        tracing::error!(snapshot = %self.meta.name, %reason, "snapshot broken");
        self.meta.broken = Some(reason);
        self.unsynced.clear();
        if let Err(e) = write_meta(&self.dir, &self.meta) {
            tracing::error!(snapshot = %self.meta.name, error = %e, "recording the broken snapshot failed");
        }
    }

    fn read(&self, volumes: &[Device], volume: u8, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        let size = *self.meta.volume_sizes_bytes.get(usize::from(volume)).ok_or("no such volume")?;
        if offset.checked_add(u64::from(length)).is_none_or(|end| end > size) {
            return Err(format!("{offset}+{length} is beyond the volume's {size} bytes"));
        }
        let mut out = vec![0u8; length as usize];
        for (done, block, within, take) in super::test_failover::block_pieces(offset, out.len()) {
            let target = &mut out[done..done + take];
            let read = match self.slots.get(&(volume, block)) {
                Some(slot) => self.data.read_exact_at(target, slot * SNAPSHOT_BLOCK_BYTES + within),
                None => volumes[usize::from(volume)].file.read_exact_at(target, offset + done as u64),
            };
            read.map_err(|e| format!("read failed: {e}"))?;
        }
        Ok(out)
    }
}

/// Snapshot names: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a dot;
/// `test` names the test failover's exports.
pub fn validate_name(name: &str) -> Result<(), String> {
    let max = tandem_proto::MAX_SNAPSHOT_NAME_BYTES as usize;
    let charset_ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > max || !charset_ok || name.starts_with('.') {
        return Err(format!(
            "snapshot name {name:?} is not valid: use 1 to {max} letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    if name == "test" {
        return Err("snapshot name \"test\" is reserved for test failover exports (GROUP@test/VOLUME); choose another"
            .to_owned());
    }
    Ok(())
}

fn encode_entry(volume: u8, block: u64, slot: u64) -> [u8; JOURNAL_ENTRY_BYTES] {
    let mut entry = [0u8; JOURNAL_ENTRY_BYTES];
    entry[0] = volume;
    entry[8..16].copy_from_slice(&block.to_le_bytes());
    entry[16..24].copy_from_slice(&slot.to_le_bytes());
    let checksum = xxhash_rust::xxh3::xxh3_64(&entry[..24]);
    entry[24..].copy_from_slice(&checksum.to_le_bytes());
    entry
}

fn decode_entry(entry: &[u8]) -> Option<(u8, u64, u64)> {
    let checksum = u64::from_le_bytes(entry[24..32].try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(&entry[..24]) != checksum || entry[1..8] != [0; 7] {
        return None;
    }
    let block = u64::from_le_bytes(entry[8..16].try_into().ok()?);
    let slot = u64::from_le_bytes(entry[16..24].try_into().ok()?);
    Some((entry[0], block, slot))
}

fn write_meta(dir: &Path, meta: &Meta) -> io::Result<()> {
    let temporary = dir.join("meta.json.new");
    let bytes = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    let file = File::create(&temporary)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join("meta.json"))?;
    File::open(dir)?.sync_all()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn annotate(path: &Path, error: &io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

#[cfg(test)]
#[path = "snapshots_tests.rs"]
mod tests;
