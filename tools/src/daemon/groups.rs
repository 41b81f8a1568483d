//! Creating, deleting and moving groups: formatting the log, the registry,
//! and attaching to or detaching from core threads.

use std::path::{Path, PathBuf};

use tandem_engine::runtime::log_store::{self, FormatRequest, VolumeSpec};
use tandem_engine::runtime::CoreMsg;

use super::{crossbeam_reply, lock, unknown_group, volumes_of, wipe_superblocks, Daemon, GroupEntry, DETACH_TIMEOUT};
use crate::api::VolumeArg;
use crate::registry::{self, GroupRecord};
use crate::size::format_size;

impl Daemon {
    pub(super) fn create_group(
        &self,
        name: &str,
        log: &Path,
        log_size_bytes: u64,
        volumes: &[VolumeArg],
    ) -> Result<String, String> {
        let _change = lock(&self.changes);
        if lock(&self.groups).contains_key(name) {
            return Err(format!("group {name} already exists; choose another name or delete it first"));
        }
        self.check_paths(log, volumes)?;
        let request = FormatRequest {
            group_name: name.to_owned(),
            node_name: self.config.node.name.clone(),
            log_path: log.to_owned(),
            log_size_bytes,
            volumes: volumes.iter().map(|v| VolumeSpec { name: v.name.clone(), path: v.path.clone() }).collect(),
        };
        let superblock = log_store::format_log(&request).map_err(|e| format!("cannot create group {name}: {e}"))?;
        let open = log_store::open_group(log, &self.snapshot_settings())
            .map_err(|e| format!("group {name} was formatted but cannot be opened: {e}"))?;
        let core = self.least_loaded_core();
        let record = GroupRecord { name: name.to_owned(), log_path: log.to_owned(), core };
        let entry =
            GroupEntry { record: record.clone(), volumes: volumes_of(&open), unavailable: None, destination_of: None };
        let mut records: Vec<GroupRecord> = lock(&self.groups).values().map(|g| g.record.clone()).collect();
        records.push(record);
        if let Err(e) = registry::save(&self.config.node.state_dir, &records) {
            drop(open);
            // Release the new log so that creating the group again is possible.
            let _ = wipe_superblocks(log);
            return Err(e);
        }
        self.attach(core, open);
        lock(&self.groups).insert(name.to_owned(), entry);
        self.events.record(name, tandem_engine::runtime::events::EventKind::GroupCreated { volumes: volumes.len() });
        Ok(format!(
            "group {name} created: log {} ({} ring, {}-byte sectors), {} volume(s), served by core {core}",
            log.display(),
            format_size(superblock.ring_size_bytes),
            superblock.sector_size,
            volumes.len()
        ))
    }

    /// Refuses relative paths and paths that another group (or this request)
    /// already uses. Paths are compared after resolving symbolic links.
    fn check_paths(&self, log: &Path, volumes: &[VolumeArg]) -> Result<(), String> {
        let mut requested: Vec<&Path> = vec![log];
        requested.extend(volumes.iter().map(|v| v.path.as_path()));
        if let Some(relative) = requested.iter().find(|p| !p.is_absolute()) {
            return Err(format!("path {} is not absolute", relative.display()));
        }
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let mut seen: Vec<PathBuf> = Vec::new();
        for path in &requested {
            let resolved = canonical(path);
            if seen.contains(&resolved) {
                return Err(format!(
                    "{} is given twice (the log and every volume need their own path)",
                    path.display()
                ));
            }
            seen.push(resolved);
        }
        for entry in lock(&self.groups).values() {
            let mut used: Vec<PathBuf> = entry.volumes.iter().map(|v| canonical(&v.2)).collect();
            used.push(canonical(&entry.record.log_path));
            if let Some(path) = requested.iter().find(|p| used.contains(&canonical(p))) {
                return Err(format!("{} is already used by group {}", path.display(), entry.record.name));
            }
        }
        Ok(())
    }

    fn least_loaded_core(&self) -> usize {
        let groups = lock(&self.groups);
        (0..self.cores.len()).min_by_key(|&core| groups.values().filter(|g| g.record.core == core).count()).unwrap_or(0)
    }

    pub(super) fn delete_group(&self, name: &str) -> Result<String, String> {
        let _change = lock(&self.changes);
        let entry = lock(&self.groups).get(name).cloned().ok_or_else(|| unknown_group(name))?;
        if let Ok(status) = self.group_status(name) {
            if let Some(p) = status.partnership.filter(|_| status.role != "standalone") {
                return Err(format!(
                    "group {name} is the {} of a partnership with {}/{}; remove it first (`tandem partnership remove --group {name}`)",
                    status.role, p.peer_node, p.peer_group
                ));
            }
        }
        if entry.unavailable.is_none() {
            let (reply, answer) = crossbeam_reply();
            self.cores[entry.record.core].send(CoreMsg::DetachGroup { group: name.to_owned(), reply });
            answer.recv_timeout(DETACH_TIMEOUT).map_err(|_| {
                format!("group {name} did not drain within {} s; try again", DETACH_TIMEOUT.as_secs())
            })??;
            wipe_superblocks(&entry.record.log_path)?;
        }
        let snapshots_deleted = self.delete_snapshot_dirs(name)?;
        let mut groups = lock(&self.groups);
        groups.remove(name);
        let records: Vec<GroupRecord> = groups.values().map(|g| g.record.clone()).collect();
        registry::save(&self.config.node.state_dir, &records)?;
        self.events.record(name, tandem_engine::runtime::events::EventKind::GroupDeleted);
        Ok(format!(
            "group {name} deleted: its volumes hold every acknowledged write; the log {} was released{}",
            entry.record.log_path.display(),
            if snapshots_deleted > 0 {
                format!("; its {snapshots_deleted} snapshot(s) were deleted")
            } else {
                String::new()
            }
        ))
    }

    /// Where groups keep their snapshots, from the configuration.
    pub(crate) fn snapshot_settings(&self) -> log_store::SnapshotSettings {
        log_store::SnapshotSettings {
            state_dir: self.config.node.state_dir.clone(),
            max_bytes: self.config.replication.snapshot_max_bytes,
        }
    }

    /// Deletes the snapshot directory of every group once named `name`
    /// (`NAME-xxxxxxxx`, the log's identity); returns how many snapshots
    /// they held.
    fn delete_snapshot_dirs(&self, name: &str) -> Result<usize, String> {
        let root = self.config.node.state_dir.join("snapshots");
        let Ok(entries) = std::fs::read_dir(&root) else { return Ok(0) };
        let mut deleted = 0;
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let ours = file_name
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|id| id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            if ours {
                deleted += std::fs::read_dir(entry.path()).map_or(0, |d| d.count());
                std::fs::remove_dir_all(entry.path())
                    .map_err(|e| format!("cannot delete the snapshots in {}: {e}", entry.path().display()))?;
            }
        }
        Ok(deleted)
    }

    /// Serves `name` from core `core` instead: its connections close, it
    /// drains and checkpoints, and it is opened again on the other core
    /// (clients reconnect; a partnership resumes by itself). The choice is
    /// kept in the registry.
    pub(super) fn move_group(&self, name: &str, core: usize) -> Result<String, String> {
        let _change = lock(&self.changes);
        if core >= self.cores.len() {
            return Err(format!(
                "core {core} does not exist: this node runs cores 0 to {} (node.cores = {:?})",
                self.cores.len() - 1,
                self.config.node.cores
            ));
        }
        let entry = lock(&self.groups).get(name).cloned().ok_or_else(|| unknown_group(name))?;
        if let Some(reason) = &entry.unavailable {
            return Err(format!("group {name} is unavailable ({reason}); it cannot move"));
        }
        if entry.record.core == core {
            return Ok(format!("group {name} is already served by core {core}"));
        }
        let (reply, answer) = crossbeam_reply();
        self.cores[entry.record.core].send(CoreMsg::DetachGroup { group: name.to_owned(), reply });
        answer
            .recv_timeout(DETACH_TIMEOUT)
            .map_err(|_| format!("group {name} did not drain within {} s; try again", DETACH_TIMEOUT.as_secs()))??;
        let record = GroupRecord { core, ..entry.record.clone() };
        let mut records: Vec<GroupRecord> =
            lock(&self.groups).values().filter(|g| g.record.name != name).map(|g| g.record.clone()).collect();
        records.push(record.clone());
        let saved = registry::save(&self.config.node.state_dir, &records);
        // Served again either way: on the new core when the registry kept it.
        self.bring_online(if saved.is_ok() { record } else { entry.record.clone() });
        saved?;
        Ok(format!(
            "group {name} moved from core {} to core {core} (CPU {})",
            entry.record.core, self.config.node.cores[core]
        ))
    }
}
