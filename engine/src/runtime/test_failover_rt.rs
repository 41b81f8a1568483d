//! The group runtime's side of a test failover: starting the snapshot at a
//! quiet instant, keeping blocks before volume writes, and running test
//! clients' requests (see `test_failover.rs`).

use std::path::PathBuf;

use crossbeam_channel::Sender;

use super::buf::AlignedBuf;
use super::group_io::GroupRt;
use super::io::Io;
use super::test_failover::{CowSnapshot, SnapshotOp};
use crate::core::{ApplyOp, CopyPosition};

/// A test failover asked for, waiting for volume writes in flight.
pub struct PendingTestFailover {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub reply: Sender<Result<u64, String>>,
}

/// A volume write held while a test failover starts.
pub(super) enum HeldVolumeWrite {
    Apply(ApplyOp),
    Copy { range: (u8, u64, u32), payload: Option<AlignedBuf>, end: CopyPosition },
}

impl GroupRt {
    /// Asks for a test failover of this destination; it starts once no
    /// volume write is in flight (see [`Self::progress_test_failover`]).
    pub fn start_test_failover(&mut self, path: PathBuf, max_bytes: u64, reply: Sender<Result<u64, String>>) {
        let refusal = if self.superblock.role != tandem_proto::ROLE_DESTINATION {
            Some(format!("group {} is not a replication destination; test failover is for a destination", self.name))
        } else if self.test_failover.is_some() || self.test_failover_pending.is_some() {
            Some(format!("group {} already has a test failover; stop it first", self.name))
        } else {
            None
        };
        match refusal {
            Some(reason) => {
                let _ = reply.send(Err(reason));
            }
            None => self.test_failover_pending = Some(PendingTestFailover { path, max_bytes, reply }),
        }
    }

    /// Ends the test failover, discarding its file.
    pub fn stop_test_failover(&mut self) -> Result<(), String> {
        self.test_failover.take().map(drop).ok_or_else(|| format!("group {} has no test failover", self.name))
    }

    /// Whether the volume write of this range must wait (a test failover is
    /// starting); else keeps its blocks in the snapshot first, if any.
    pub(super) fn hold_or_preserve(&mut self, volume: u8, offset: u64, length: u64) -> bool {
        if self.test_failover_pending.is_some() {
            return true;
        }
        if let Some(snapshot) = self.test_failover.as_mut() {
            snapshot.preserve(volume, offset, length);
        }
        false
    }

    /// Starts a pending test failover once no volume write is in flight,
    /// then lets the held writes go (keeping their blocks first).
    pub(super) fn progress_test_failover(&mut self, io: &mut Io, group: usize) {
        if self.volume_writes_in_flight > 0 {
            return;
        }
        let Some(pending) = self.test_failover_pending.take() else { return };
        let lsn = self.core.applied_prefix_lsn();
        let volumes: Result<Vec<_>, String> = self
            .volumes
            .iter()
            .map(|v| v.file.try_clone().map(|f| (f, v.size_bytes)).map_err(|e| e.to_string()))
            .collect();
        let created = volumes.and_then(|v| CowSnapshot::create(pending.path, v, pending.max_bytes, lsn));
        let _ = pending.reply.send(created.as_ref().map(|_| lsn).map_err(Clone::clone));
        self.test_failover = created.ok();
        for held in std::mem::take(&mut self.held_volume_writes) {
            match held {
                HeldVolumeWrite::Apply(apply) => self.apply(io, group, apply, 0),
                HeldVolumeWrite::Copy { range, payload, end } => self.write_copy(io, group, range, payload, end),
            }
        }
    }

    /// Runs a test client's request on the snapshot.
    pub fn test_failover_io(&mut self, volume: u8, op: SnapshotOp) -> Result<Vec<u8>, String> {
        let snapshot =
            self.test_failover.as_mut().ok_or_else(|| format!("group {} has no test failover (stopped)", self.name))?;
        snapshot.run(volume, op)
    }
}
