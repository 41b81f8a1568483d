//! What storage a group's log and volumes live on, and how fast it answers:
//! the facts behind the topology test's "log on its own device" and "log
//! faster than data" requirements. Computed on each node for its own groups.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tandem_engine::runtime::buf::AlignedBuf;
use tandem_engine::runtime::counters::latency_histogram;

const PROBE_IO_BYTES: usize = 4096;
const PROBE_MAX_IOS: u32 = 200;
const PROBE_MAX_TIME: Duration = Duration::from_millis(500);
const SCRATCH_FILE_BYTES: u64 = 1 << 20;

/// One path's storage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceFacts {
    pub path: String,
    pub is_block: bool,
    /// What holds it, e.g. "vda" or "tmpfs on /dev/shm (0:26)".
    pub device: String,
    /// The physical disks underneath (partitions, device-mapper and md
    /// resolved to their members); two paths share a device when these meet.
    pub disks: BTreeSet<String>,
    pub allocated_bytes: u64,
    /// Measured latency of 4 KiB I/O, when asked for.
    pub latency_us_avg: Option<f64>,
    pub latency_us_p99: Option<u64>,
    pub latency_method: String,
}

/// A group's log and volumes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupDevices {
    pub log: DeviceFacts,
    pub volumes: Vec<DeviceFacts>,
}

impl GroupDevices {
    /// The volumes whose disks the log shares, with the shared disks.
    #[must_use]
    pub fn log_shares_with(&self) -> Vec<(usize, String)> {
        self.volumes
            .iter()
            .enumerate()
            .filter_map(|(index, volume)| {
                let shared: Vec<&str> = self.log.disks.intersection(&volume.disks).map(String::as_str).collect();
                (!shared.is_empty()).then(|| (index, shared.join(", ")))
            })
            .collect()
    }
}

/// Facts about `log` and `volumes`; with `measure`, their latency too (a
/// second or so). When every path is a file (or a file not created yet),
/// durable writes go to a scratch file beside each; when any is a block
/// device, which is never written, all are compared by O_DIRECT reads (of
/// the device, or of a scratch file beside a file).
#[must_use]
pub fn group_devices(log: &Path, volumes: &[PathBuf], measure: bool) -> GroupDevices {
    let mut devices = GroupDevices { log: identify(log), volumes: volumes.iter().map(|path| identify(path)).collect() };
    if measure {
        let all_files = !devices.log.is_block && devices.volumes.iter().all(|v| !v.is_block);
        for facts in std::iter::once(&mut devices.log).chain(devices.volumes.iter_mut()) {
            measure_latency(facts, all_files);
        }
    }
    devices
}

fn identify(path: &Path) -> DeviceFacts {
    let mut facts = DeviceFacts { path: path.display().to_string(), ..DeviceFacts::default() };
    // A file not created yet (a planned log) lives where its directory does.
    let metadata = std::fs::metadata(path).or_else(|_| std::fs::metadata(scratch_directory(path)));
    let Ok(metadata) = metadata else {
        facts.device = "missing".to_owned();
        return facts;
    };
    facts.is_block = metadata.file_type().is_block_device();
    let dev = if facts.is_block { metadata.rdev() } else { metadata.dev() };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    facts.allocated_bytes = match (facts.is_block, metadata.is_file()) {
        (true, _) => block_size_bytes(path),
        (false, true) => metadata.blocks() * 512,
        (false, false) => 0,
    };
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    match std::fs::canonicalize(&sys) {
        Ok(node) => {
            let disk = if node.join("partition").exists() { node.parent().map(Path::to_path_buf) } else { Some(node) };
            let name = disk
                .as_deref()
                .and_then(Path::file_name)
                .map_or_else(|| format!("{major}:{minor}"), |n| n.to_string_lossy().into_owned());
            facts.disks = leaf_disks(&name, 0);
            facts.device = name;
        }
        Err(_) => {
            // No block device behind it (tmpfs, overlay, network filesystems):
            // the filesystem itself is the device.
            facts.device = mount_of(major, minor).unwrap_or_else(|| format!("filesystem {major}:{minor}"));
            facts.disks = BTreeSet::from([format!("{major}:{minor}")]);
        }
    }
    facts
}

/// The members of device-mapper and md devices, down to real disks.
fn leaf_disks(name: &str, depth: u32) -> BTreeSet<String> {
    let slaves = std::fs::read_dir(format!("/sys/block/{name}/slaves"))
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_else(|_| Vec::new());
    if slaves.is_empty() || depth > 8 {
        return BTreeSet::from([name.to_owned()]);
    }
    slaves.iter().flat_map(|slave| leaf_disks(&parent_disk(slave), depth + 1)).collect()
}

fn parent_disk(name: &str) -> String {
    let node = std::fs::canonicalize(format!("/sys/class/block/{name}")).ok();
    match node {
        Some(node) if node.join("partition").exists() => {
            node.parent().and_then(Path::file_name).map_or_else(|| name.to_owned(), |n| n.to_string_lossy().into())
        }
        _ => name.to_owned(),
    }
}

/// "tmpfs on /dev/shm (0:26)" from /proc/self/mountinfo.
fn mount_of(major: u32, minor: u32) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = format!("{major}:{minor}");
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(2) != Some(&wanted.as_str()) {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        Some(format!("{} on {} ({wanted})", fields.get(dash + 1)?, fields.get(4)?))
    })
}

/// Bytes of a block device (or file), by seeking to its end.
pub(crate) fn block_size_bytes(path: &Path) -> u64 {
    std::fs::File::open(path)
        .and_then(|mut file| std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)))
        .unwrap_or(0)
}

fn measure_latency(facts: &mut DeviceFacts, write_scratch: bool) {
    let path = PathBuf::from(&facts.path);
    let measured = match (write_scratch, facts.is_block) {
        (true, _) => scratch_latency(&path, ScratchIo::DurableWrites),
        (false, true) => direct_read_latency(&path),
        (false, false) => scratch_latency(&path, ScratchIo::DirectReads),
    };
    match measured {
        Ok((histogram, method)) => {
            facts.latency_us_avg = Some(histogram.mean());
            facts.latency_us_p99 = Some(histogram.value_at_quantile(0.99));
            facts.latency_method = method;
        }
        Err(reason) => facts.latency_method = format!("not measured: {reason}"),
    }
}

fn scratch_directory(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// What is timed on a scratch file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScratchIo {
    DurableWrites,
    DirectReads,
}

/// 4 KiB I/O on a preallocated scratch file in the same directory as
/// `path` (O_DIRECT when the filesystem allows it; O_DSYNC for writes),
/// removed afterwards.
fn scratch_latency(path: &Path, io: ScratchIo) -> Result<(Histogram<u64>, String), String> {
    let directory = scratch_directory(path);
    let scratch = directory.join(format!(".tandem-latency-probe-{}", std::process::id()));
    let open = |flags| OpenOptions::new().read(true).write(true).create(true).custom_flags(flags).open(&scratch);
    let (file, direct) = match open(libc::O_DSYNC | libc::O_DIRECT) {
        Ok(file) => (file, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(libc::O_DSYNC).map_err(|e| e.to_string())?, false),
        Err(e) => return Err(format!("cannot create a scratch file in {}: {e}", directory.display())),
    };
    let result = (|| {
        file.set_len(SCRATCH_FILE_BYTES).map_err(|e| e.to_string())?;
        let mut buf = AlignedBuf::zeroed(PROBE_IO_BYTES);
        rand::rng().fill(&mut buf[..]);
        // One pass first allocates every block, so the timed I/O never meets a hole.
        for offset in (0..SCRATCH_FILE_BYTES).step_by(PROBE_IO_BYTES) {
            std::os::unix::fs::FileExt::write_all_at(&file, &buf, offset).map_err(|e| e.to_string())?;
        }
        timed(|rng| {
            let offset = rng.random_range(0..SCRATCH_FILE_BYTES / PROBE_IO_BYTES as u64) * PROBE_IO_BYTES as u64;
            match io {
                ScratchIo::DurableWrites => std::os::unix::fs::FileExt::write_all_at(&file, &buf, offset),
                ScratchIo::DirectReads => std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset),
            }
            .map_err(|e| e.to_string())
        })
    })();
    let _ = std::fs::remove_file(&scratch);
    let what = match (io, direct) {
        (ScratchIo::DurableWrites, true) => "durable 4 KiB writes (O_DIRECT, O_DSYNC)",
        (ScratchIo::DurableWrites, false) => "durable 4 KiB writes (O_DSYNC)",
        (ScratchIo::DirectReads, true) => "4 KiB O_DIRECT reads",
        (ScratchIo::DirectReads, false) => "4 KiB reads (the filesystem refuses O_DIRECT)",
    };
    result.map(|h| (h, format!("{what} on a scratch file in {}", directory.display())))
}

/// 4 KiB O_DIRECT reads at random offsets (the device is in use: not written).
fn direct_read_latency(path: &Path) -> Result<(Histogram<u64>, String), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("cannot open {} for direct reads: {e}", path.display()))?;
    let blocks = block_size_bytes(path) / PROBE_IO_BYTES as u64;
    if blocks == 0 {
        return Err(format!("{} is smaller than 4 KiB", path.display()));
    }
    let mut buf = AlignedBuf::zeroed(PROBE_IO_BYTES);
    let histogram = timed(|rng| {
        let offset = rng.random_range(0..blocks) * PROBE_IO_BYTES as u64;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset).map_err(|e| e.to_string())
    })?;
    Ok((histogram, "4 KiB O_DIRECT reads at random offsets (not written: it is in use)".to_owned()))
}

fn timed(mut io: impl FnMut(&mut rand::rngs::ThreadRng) -> Result<(), String>) -> Result<Histogram<u64>, String> {
    let mut latency_us = latency_histogram();
    let mut rng = rand::rng();
    let started = Instant::now();
    while latency_us.len() < u64::from(PROBE_MAX_IOS) && started.elapsed() < PROBE_MAX_TIME {
        let at = Instant::now();
        io(&mut rng)?;
        let _ = latency_us.record(at.elapsed().as_micros().max(1) as u64);
    }
    Ok(latency_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_one_directory_share_a_device_and_tmpfs_is_told_apart() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (log, volume) = (dir.path().join("log"), dir.path().join("volume"));
        std::fs::write(&log, [1u8; 8192]).unwrap();
        std::fs::write(&volume, [2u8; 4096]).unwrap();
        let devices = group_devices(&log, std::slice::from_ref(&volume), true);
        assert_eq!(devices.log_shares_with().len(), 1, "{devices:?}");
        assert!(devices.log.latency_us_avg.is_some(), "{devices:?}");
        assert!(devices.log.allocated_bytes >= 8192);
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let shm_log = shm.path().join("log");
        std::fs::write(&shm_log, [1u8; 4096]).unwrap();
        let apart = group_devices(&shm_log, &[volume], false);
        assert!(apart.log_shares_with().is_empty(), "{apart:?}");
        assert!(apart.log.device.starts_with("tmpfs on /dev/shm"), "{apart:?}");
    }
}
