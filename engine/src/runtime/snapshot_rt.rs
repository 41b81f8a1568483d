//! The group runtime's side of consistent snapshots: writing the Snapshot
//! record, taking the snapshot when the core applies it (on the source and,
//! from the same record, on the destination), reading and deleting them.

use std::rc::Rc;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::buf::AlignedBuf;
use super::events::EventKind;
use super::group_io::{GroupRt, PendingWrite};
use super::io::Io;
use super::snapshots::SnapshotInfo;
use crate::core::{ApplyOp, WriteOp};

/// The pseudo-connection of the Snapshot records a source writes itself.
pub const SNAPSHOT_WRITE_CONN: usize = usize::MAX - 1;

impl GroupRt {
    /// Writes the Snapshot record named `name`; `reply` hears its LSN once
    /// the snapshot is taken here (or why not).
    pub fn submit_snapshot(&mut self, name: &str, reply: Sender<Result<u64, String>>) {
        if let Err(reason) = self.snapshot_refusal(name) {
            let _ = reply.send(Err(reason));
            return;
        }
        let sector = self.sector_bytes();
        let mut buf = AlignedBuf::zeroed(sector + tandem_proto::align_up(name.len() as u64, sector as u64) as usize);
        buf[sector..sector + name.len()].copy_from_slice(name.as_bytes());
        let payload_checksum = tandem_proto::xxh3_128_bytes(name.as_bytes());
        let pending = PendingWrite {
            conn: SNAPSHOT_WRITE_CONN,
            conn_id: 0,
            cookie: 0,
            buf: Some(Rc::new(buf)),
            payload_bytes: name.len(),
            started: Instant::now(),
            volume_index: 0,
        };
        let id = self.submit(pending, 0, name.len() as u32, 0, WriteOp::Snapshot { payload_checksum });
        self.snapshot_waiters.push((id, reply));
    }

    fn snapshot_refusal(&self, name: &str) -> Result<(), String> {
        if self.superblock.role == tandem_proto::ROLE_DESTINATION {
            return Err(format!(
                "group {} is a replication destination: take the snapshot on its source, and both sides take it at the same LSN",
                self.name
            ));
        }
        if let Some(reason) = self.core.failure() {
            return Err(format!("group {} failed ({reason}) and takes no snapshot", self.name));
        }
        self.snapshots.check_new_name(name)
    }

    /// The core applies a Snapshot record: every record before it is in
    /// the volumes and none after it has started.
    pub(super) fn take_snapshot(&mut self, io: &mut Io, group: usize, apply: ApplyOp) {
        let sector = self.sector_bytes();
        let write = &self.writes[&apply.write_id].pending;
        let buf = write.buf.as_ref().expect("a snapshot record carries its name");
        let name = String::from_utf8_lossy(&buf[sector..sector + write.payload_bytes]).into_owned();
        let taken = self.snapshots.take(&name, apply.lsn, &self.volumes);
        let event = match &taken {
            Ok(kept_as) => EventKind::SnapshotTaken { name: kept_as.clone(), lsn: apply.lsn },
            Err(reason) => EventKind::SnapshotFailed { name: name.clone(), lsn: apply.lsn, reason: reason.clone() },
        };
        self.pending_events.push(event);
        self.answer_snapshot_waiter(apply.write_id, taken.map(|_| apply.lsn));
        // A snapshot that could not be taken is an event, never a failure
        // of the group: the volumes are whole without it.
        self.volume_writes_in_flight += 1;
        self.apply_done(io, group, apply, 0, 0);
    }

    /// A Snapshot record of this source failed before it was applied.
    pub(super) fn snapshot_write_failed(&mut self, id: crate::core::WriteId, reason: String) {
        self.answer_snapshot_waiter(id, Err(reason));
    }

    /// Tells whoever asked for the Snapshot record of write `id`.
    fn answer_snapshot_waiter(&mut self, id: crate::core::WriteId, answer: Result<u64, String>) {
        if let Some(index) = self.snapshot_waiters.iter().position(|(waiting, _)| *waiting == id) {
            let (_, reply) = self.snapshot_waiters.swap_remove(index);
            let _ = reply.send(answer);
        }
    }

    /// Before volume changes of `ranges` (volume, offset, length) are
    /// issued: their blocks go into every snapshot that lacks them, durably
    /// (see `snapshots.rs`); snapshots that broke doing so become events.
    pub(super) fn keep_in_snapshots(&mut self, ranges: impl Iterator<Item = (u8, u64, u64)>) {
        for range in ranges {
            self.snapshots.preserve(&self.volumes, range, None);
        }
        self.snapshots.commit();
        for info in self.snapshots.take_newly_broken() {
            let reason = info.broken.unwrap_or_default();
            self.pending_events.push(EventKind::SnapshotFailed { name: info.name, lsn: info.lsn, reason });
        }
    }

    pub fn delete_snapshot(&mut self, name: &str) -> Result<SnapshotInfo, String> {
        let info = self.snapshots.delete(name)?;
        self.pending_events.push(EventKind::SnapshotDeleted { name: info.name.clone(), lsn: info.lsn });
        Ok(info)
    }

    /// Bytes of `volume` as snapshot `name` holds them.
    pub fn read_snapshot(&self, name: &str, range: (u8, u64, u32)) -> Result<Vec<u8>, String> {
        self.snapshots.read(&self.volumes, name, range)
    }
}
