//! The source side of a topology test: an existing group, whose workload
//! comes from Tandem's own counters, or volumes and a log planned for a group
//! not created yet, whose workload comes from the block devices' statistics
//! (/sys/dev/block/MAJ:MIN/stat) while the application still writes to them
//! directly.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tandem_engine::runtime::device::FILE_SECTOR_BYTES;
use tandem_engine::runtime::status::GroupStatus;

use crate::api::{call, Request, ResponseBody};
use crate::device_facts::{group_devices, GroupDevices};

/// Where the workload is read from.
enum Meter {
    Counters {
        api: PathBuf,
        group: String,
    },
    /// Statistics files of the volumes' devices (each once) and of the log's.
    DiskStats {
        volumes: Vec<PathBuf>,
        log: Option<PathBuf>,
    },
}

/// Totals at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkloadReading {
    pub write_bytes: u64,
    /// Sum of log write latencies and their count, when known.
    pub log_latency_sum_us: f64,
    pub log_writes: u64,
}

/// The source's facts and its workload meter.
pub struct SourceSide {
    pub name: String,
    pub volume_sizes_bytes: Vec<u64>,
    pub log_sector_bytes: u32,
    pub log_size_bytes: u64,
    pub devices: GroupDevices,
    /// How the workload is measured, for the report.
    pub method: String,
    meter: Meter,
}

/// `tandem group show NAME` through the management socket.
#[must_use]
pub fn group_status(api: &Path, group: &str) -> Option<GroupStatus> {
    match call(api, &Request::GroupShow { name: group.to_owned() }) {
        Ok(ResponseBody::Groups(mut groups)) if !groups.is_empty() => Some(groups.remove(0)),
        _ => None,
    }
}

impl SourceSide {
    /// An existing group, measured through its counters.
    #[must_use]
    pub fn of_group(api: &Path, status: &GroupStatus) -> Self {
        let volumes: Vec<PathBuf> = status.volumes.iter().map(|v| PathBuf::from(&v.path)).collect();
        Self {
            name: status.name.clone(),
            volume_sizes_bytes: status.volumes.iter().map(|v| v.size_bytes).collect(),
            log_sector_bytes: status.log_sector_bytes,
            log_size_bytes: status.log_size_bytes,
            devices: group_devices(Path::new(&status.log_path), &volumes, true),
            method: format!("Tandem's counters of group {}", status.name),
            meter: Meter::Counters { api: api.to_owned(), group: status.name.clone() },
        }
    }

    /// Volumes and a log planned for group `name`, measured through their
    /// block devices' statistics.
    pub fn planned(name: &str, volumes: &[PathBuf], log: &Path) -> Result<Self, String> {
        let mut stats = BTreeSet::new();
        let mut sizes = Vec::new();
        for volume in volumes {
            let (stat, size) = device_stat(volume)?;
            let stat = stat.ok_or_else(|| {
                format!(
                    "{} is on a filesystem without a block device (tmpfs or similar): its writes cannot be measured; give the volumes the application writes",
                    volume.display()
                )
            })?;
            stats.insert(stat);
            sizes.push(size);
        }
        let (log_stat, log_size) = match device_stat(log) {
            Ok(found) => found,
            // A log file not created yet: its directory's device.
            Err(_) => (device_stat(log.parent().unwrap_or(Path::new("/")))?.0, 0),
        };
        let disks: Vec<String> = stats.iter().map(|p| p.display().to_string()).collect();
        Ok(Self {
            name: name.to_owned(),
            volume_sizes_bytes: sizes,
            log_sector_bytes: planned_sector_bytes(log),
            log_size_bytes: log_size,
            devices: group_devices(log, volumes, true),
            method: format!("block device statistics ({}): every writer of those devices counts", disks.join(", ")),
            meter: Meter::DiskStats { volumes: stats.into_iter().collect(), log: log_stat },
        })
    }

    /// The totals now.
    pub fn read(&self) -> Result<WorkloadReading, String> {
        match &self.meter {
            Meter::Counters { api, group } => {
                let status = group_status(api, group).ok_or_else(|| format!("group {group} disappeared"))?;
                let latency = &status.counters.log.log_write_latency;
                Ok(WorkloadReading {
                    write_bytes: status.counters.volumes.iter().map(|v| v.application_write_bytes).sum(),
                    log_latency_sum_us: latency.avg_us * latency.count as f64,
                    log_writes: latency.count,
                })
            }
            Meter::DiskStats { volumes, log } => {
                let mut reading = WorkloadReading::default();
                for stat in volumes {
                    reading.write_bytes += read_stat(stat)?.sectors_written * 512;
                }
                if let Some(stat) = log {
                    let log = read_stat(stat)?;
                    reading.log_latency_sum_us = log.write_ms as f64 * 1000.0;
                    reading.log_writes = log.writes;
                }
                Ok(reading)
            }
        }
    }
}

#[derive(Debug)]
struct DiskStat {
    writes: u64,
    sectors_written: u64,
    write_ms: u64,
}

/// Fields of /sys/block/*/stat (Documentation/block/stat.rst): writes
/// completed, sectors written and milliseconds spent writing are 5th, 7th
/// and 8th.
fn read_stat(path: &Path) -> Result<DiskStat, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let fields: Vec<u64> = text.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    if fields.len() < 8 {
        return Err(format!("{} has {} fields, expected at least 8", path.display(), fields.len()));
    }
    Ok(DiskStat { writes: fields[4], sectors_written: fields[6], write_ms: fields[7] })
}

/// The statistics file of the device holding `path` (none for tmpfs and
/// the like) and the bytes `path` holds.
fn device_stat(path: &Path) -> Result<(Option<PathBuf>, u64), String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot access {}: {e}", path.display()))?;
    let is_block = metadata.file_type().is_block_device();
    let dev = if is_block { metadata.rdev() } else { metadata.dev() };
    let stat = PathBuf::from(format!("/sys/dev/block/{}:{}/stat", libc::major(dev), libc::minor(dev)));
    let size = if is_block { crate::device_facts::block_size_bytes(path) } else { metadata.len() };
    Ok((stat.exists().then_some(stat), size))
}

/// The sector size a log at `path` would get: max(logical, physical) block
/// size of a block device (a partition's are its disk's), 4096 for a file.
fn planned_sector_bytes(path: &Path) -> u32 {
    let Ok(metadata) = std::fs::metadata(path) else { return FILE_SECTOR_BYTES };
    if !metadata.file_type().is_block_device() {
        return FILE_SECTOR_BYTES;
    }
    let node = format!("/sys/dev/block/{}:{}", libc::major(metadata.rdev()), libc::minor(metadata.rdev()));
    let Ok(node) = std::fs::canonicalize(node) else { return FILE_SECTOR_BYTES };
    let disk = if node.join("partition").exists() { node.parent().map(Path::to_path_buf) } else { Some(node) };
    let read = |name: &str| {
        disk.as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("queue").join(name)).ok())
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(512)
    };
    read("logical_block_size").max(read("physical_block_size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_statistics_are_read_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("stat");
        std::fs::write(&stat, "  100 0 800 5 40 2 640 12 0 9 17 0 0 0 0\n").unwrap();
        let parsed = read_stat(&stat).unwrap();
        assert_eq!((parsed.writes, parsed.sectors_written, parsed.write_ms), (40, 640, 12));
        std::fs::write(&stat, "1 2 3\n").unwrap();
        assert!(read_stat(&stat).unwrap_err().contains("expected at least 8"));
    }

    #[test]
    fn planned_volumes_on_tmpfs_are_refused_with_the_reason() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let volume = shm.path().join("v");
        std::fs::write(&volume, [0u8; 4096]).unwrap();
        let refused = SourceSide::planned("rg01", &[volume], &shm.path().join("log")).err().unwrap();
        assert!(refused.contains("without a block device"), "{refused}");
    }
}
