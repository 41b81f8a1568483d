//! Test failover (like Mount-SRDestination): a writable copy-on-write
//! snapshot of a destination's volumes while replication into them goes on.
//!
//! The snapshot lives in one file in the state directory, in 64 KiB blocks:
//! a block enters it the first time either side changes it, with the
//! volume's content at the snapshot's instant (before a replicated write is
//! applied, or before a test client's write lands in it). Test clients read
//! a block from the file when it is there and from the volume otherwise; the
//! volume never sees their writes. The group's core owns the snapshot, so the
//! apply path checks it without a lock; test clients reach it by messages.
//!
//! The snapshot takes effect at a quiet instant: volume writes are held
//! until none is in flight, so every block holds exactly the writes applied
//! up to the snapshot's LSN. The file is bounded (`max_bytes`); when full the
//! snapshot breaks (test I/O fails with the reason) and replication goes on.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Bytes of a copy-on-write block.
pub const COW_BLOCK_BYTES: u64 = 64 << 10;

/// A range cut at copy-on-write block boundaries: for each piece, where it
/// starts in the range, its block, its offset in that block and its length.
pub(super) fn block_pieces(offset: u64, length: usize) -> impl Iterator<Item = (usize, u64, u64, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        (done < length).then(|| {
            let at = offset + done as u64;
            let (block, within) = (at / COW_BLOCK_BYTES, at % COW_BLOCK_BYTES);
            let take = ((COW_BLOCK_BYTES - within) as usize).min(length - done);
            let piece = (done, block, within, take);
            done += take;
            piece
        })
    })
}

/// One request of a test client, run on the group's core.
#[derive(Debug)]
pub enum SnapshotOp {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Trim or write-zeroes: the snapshot reads zeros there.
    Zero {
        offset: u64,
        length: u32,
    },
    Flush,
}

/// A test failover as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverStatus {
    /// The destination's applied LSN when the snapshot took effect.
    pub lsn: u64,
    pub file: String,
    pub used_bytes: u64,
    pub max_bytes: u64,
    /// Why the snapshot no longer serves (it filled up, or an IO error).
    pub broken: Option<String>,
}

struct CowVolume {
    base: File,
    size_bytes: u64,
    /// Block index in the volume -> slot in the snapshot file.
    slots: HashMap<u64, u64>,
}

/// The snapshot of every volume of a group.
pub struct CowSnapshot {
    file: File,
    path: PathBuf,
    volumes: Vec<CowVolume>,
    next_slot: u64,
    max_bytes: u64,
    lsn: u64,
    broken: Option<String>,
}

impl CowSnapshot {
    /// Creates the snapshot file at `path` over `volumes` (their files and sizes).
    pub fn create(path: PathBuf, volumes: Vec<(File, u64)>, max_bytes: u64, lsn: u64) -> Result<Self, String> {
        // A file left by a daemon that stopped during a test failover holds
        // nothing anyone can reach any more: it is started afresh.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("cannot create the test failover file {}: {e}", path.display()))?;
        let volumes = volumes
            .into_iter()
            .map(|(base, size_bytes)| CowVolume { base, size_bytes, slots: HashMap::new() })
            .collect();
        Ok(Self { file, path, volumes, next_slot: 0, max_bytes, lsn, broken: None })
    }

    #[must_use]
    pub fn status(&self) -> TestFailoverStatus {
        TestFailoverStatus {
            lsn: self.lsn,
            file: self.path.display().to_string(),
            used_bytes: self.next_slot * COW_BLOCK_BYTES,
            max_bytes: self.max_bytes,
            broken: self.broken.clone(),
        }
    }

    /// Before a replicated change of (`volume`, `offset`, `length`) lands in
    /// the volume: keeps the blocks it touches as they are now.
    pub fn preserve(&mut self, volume: u8, offset: u64, length: u64) {
        if self.broken.is_some() || length == 0 {
            return;
        }
        for block in offset / COW_BLOCK_BYTES..(offset + length).div_ceil(COW_BLOCK_BYTES) {
            if let Err(reason) = self.slot_for(volume, block) {
                self.broken = Some(reason);
                return;
            }
        }
    }

    /// The snapshot file's slot of `block`, copying the volume's block in
    /// first when it has none.
    fn slot_for(&mut self, volume: u8, block: u64) -> Result<u64, String> {
        let v = &mut self.volumes[usize::from(volume)];
        if let Some(&slot) = v.slots.get(&block) {
            return Ok(slot);
        }
        if (self.next_slot + 1) * COW_BLOCK_BYTES > self.max_bytes {
            return Err(format!(
                "the test failover snapshot is full ({} bytes, replication.test_failover_max_bytes); stop it and start it again with a larger limit",
                self.max_bytes
            ));
        }
        let start = block * COW_BLOCK_BYTES;
        let length = COW_BLOCK_BYTES.min(v.size_bytes - start) as usize;
        let mut bytes = vec![0u8; COW_BLOCK_BYTES as usize];
        v.base.read_exact_at(&mut bytes[..length], start).map_err(|e| format!("reading the volume failed: {e}"))?;
        let slot = self.next_slot;
        self.file
            .write_all_at(&bytes, slot * COW_BLOCK_BYTES)
            .map_err(|e| format!("writing the test failover file failed: {e}"))?;
        self.next_slot += 1;
        v.slots.insert(block, slot);
        Ok(slot)
    }

    fn check(&self, volume: u8, offset: u64, length: u64) -> Result<(), String> {
        if let Some(reason) = &self.broken {
            return Err(reason.clone());
        }
        let v = self.volumes.get(usize::from(volume)).ok_or("no such volume")?;
        if offset.checked_add(length).is_none_or(|end| end > v.size_bytes) {
            return Err(format!("{offset}+{length} is beyond the volume's {} bytes", v.size_bytes));
        }
        Ok(())
    }

    /// Runs a test client's request; a read answers its bytes.
    pub fn run(&mut self, volume: u8, op: SnapshotOp) -> Result<Vec<u8>, String> {
        match op {
            SnapshotOp::Read { offset, length } => self.read(volume, offset, length),
            SnapshotOp::Write { offset, data } => self.write(volume, offset, &data).map(|()| Vec::new()),
            SnapshotOp::Zero { offset, length } => {
                self.write(volume, offset, &vec![0u8; length as usize]).map(|()| Vec::new())
            }
            SnapshotOp::Flush => self.file.sync_data().map(|()| Vec::new()).map_err(|e| format!("flush failed: {e}")),
        }
    }

    fn read(&mut self, volume: u8, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        self.check(volume, offset, u64::from(length))?;
        let mut out = vec![0u8; length as usize];
        let v = &self.volumes[usize::from(volume)];
        for (done, block, within, take) in block_pieces(offset, out.len()) {
            let target = &mut out[done..done + take];
            let read = match v.slots.get(&block) {
                Some(slot) => self.file.read_exact_at(target, slot * COW_BLOCK_BYTES + within),
                None => v.base.read_exact_at(target, offset + done as u64),
            };
            read.map_err(|e| format!("read failed: {e}"))?;
        }
        Ok(out)
    }

    fn write(&mut self, volume: u8, offset: u64, data: &[u8]) -> Result<(), String> {
        self.check(volume, offset, data.len() as u64)?;
        for (done, block, within, take) in block_pieces(offset, data.len()) {
            let slot = self.slot_for(volume, block).inspect_err(|reason| self.broken = Some(reason.clone()))?;
            self.file
                .write_all_at(&data[done..done + take], slot * COW_BLOCK_BYTES + within)
                .map_err(|e| format!("write failed: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for CowSnapshot {
    // Stopping a test failover discards what it wrote.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dir: &std::path::Path, bytes: &[u8]) -> (File, u64) {
        let path = dir.join("volume");
        std::fs::write(&path, bytes).unwrap();
        (std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap(), bytes.len() as u64)
    }

    #[test]
    fn test_writes_stay_in_the_snapshot_and_replicated_writes_stay_out_of_it() {
        let dir = tempfile_dir();
        let original: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (base, size) = volume(&dir, &original);
        let writer = base.try_clone().unwrap();
        let mut snapshot = CowSnapshot::create(dir.join("snap"), vec![(base, size)], 1 << 20, 7).unwrap();
        // A replicated write: preserved first, then applied to the volume.
        snapshot.preserve(0, 70_000, 10_000);
        writer.write_all_at(&[0xee; 10_000], 70_000).unwrap();
        // A test write across a block boundary.
        snapshot.run(0, SnapshotOp::Write { offset: 65_000, data: vec![0x11; 2_000] }).unwrap();
        let image = snapshot.run(0, SnapshotOp::Read { offset: 0, length: size as u32 }).unwrap();
        let mut expected = original.clone();
        expected[65_000..67_000].fill(0x11);
        assert_eq!(image, expected, "the snapshot shows the instant plus its own writes");
        let volume_now = std::fs::read(dir.join("volume")).unwrap();
        assert_eq!(&volume_now[65_000..67_000], &original[65_000..67_000], "test writes never reach the volume");
        assert_eq!(snapshot.status().used_bytes, 2 * COW_BLOCK_BYTES);
        drop(snapshot);
        assert!(!dir.join("snap").exists(), "stopping discards the file");
    }

    #[test]
    fn a_full_snapshot_breaks_with_the_reason_and_refuses_io() {
        let dir = tempfile_dir();
        let (base, size) = volume(&dir, &vec![1u8; 400_000]);
        let mut snapshot = CowSnapshot::create(dir.join("snap"), vec![(base, size)], 2 * COW_BLOCK_BYTES, 1).unwrap();
        snapshot.preserve(0, 0, 3 * COW_BLOCK_BYTES);
        let status = snapshot.status();
        assert!(status.broken.as_deref().unwrap_or_default().contains("test_failover_max_bytes"), "{status:?}");
        let refused = snapshot.run(0, SnapshotOp::Read { offset: 0, length: 4096 }).unwrap_err();
        assert!(refused.contains("full"), "{refused}");
        assert!(snapshot.run(0, SnapshotOp::Read { offset: size, length: 1 }).is_err());
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-cow-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
