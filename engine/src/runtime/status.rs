//! Status of a group as reported to the CLI (`tandem status`).

use serde::{Deserialize, Serialize};

use super::log_store::RecoveryReport;

/// One volume of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
}

/// Everything `tandem status` shows about a group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub state: String,
    pub current_lsn: u64,
    pub durable_lsn: u64,
    pub checkpoint_lsn: u64,
    pub log_path: String,
    /// Usable bytes of the log ring: the log minus its two 16 KiB superblock slots.
    pub log_size_bytes: u64,
    pub log_used_bytes: u64,
    pub log_free_bytes: u64,
    pub log_sector_bytes: u32,
    pub log_direct_io: bool,
    pub volumes: Vec<VolumeStatus>,
    pub writes_completed: u64,
    pub writes_waiting_for_log_space: u64,
    pub reads_completed: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub write_latency_us_avg: f64,
    pub write_latency_us_p99: u64,
    pub checkpoints: u64,
    pub connections: usize,
    pub epoch: u32,
    pub last_recovery: RecoveryReport,
}
