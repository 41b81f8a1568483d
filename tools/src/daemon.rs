//! The control plane of `tandemd`: owns the core threads, the registry of
//! groups and the exports, and answers the management API. It talks to cores by
//! message only; nothing here is on the data path, so plain locks are fine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tandem_engine::runtime::log_store::{self, OpenGroup};
use tandem_engine::runtime::status::GroupStatus;
use tandem_engine::runtime::{CoreHandle, CoreMsg};
use tandem_frontend::nbd::Export;

use crate::api::{Request, ResponseBody};
use crate::config::Config;
use crate::registry::{self, GroupRecord};

mod groups;

const CORE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const DETACH_TIMEOUT: Duration = Duration::from_secs(300);

/// A group as the control plane knows it.
#[derive(Debug, Clone)]
struct GroupEntry {
    record: GroupRecord,
    /// (name, size, path) of each volume, for exports and path conflicts.
    volumes: Vec<(String, u64, PathBuf)>,
    /// Why the group could not be opened at start-up (it is then not served).
    unavailable: Option<String>,
    /// `NODE/GROUP` of the source while this group is a replication destination.
    destination_of: Option<String>,
}

/// The daemon's state.
pub struct Daemon {
    pub config: Config,
    cores: Vec<CoreHandle>,
    groups: Mutex<BTreeMap<String, GroupEntry>>,
    /// Serialises changes (create, delete) without blocking status while a
    /// log is being formatted.
    changes: Mutex<()>,
    /// Groups whose partnership is being created or removed (the connector
    /// leaves them alone).
    changing: Mutex<std::collections::BTreeSet<String>>,
    /// Why the last reconnection of a source group failed.
    peer_errors: Mutex<BTreeMap<String, String>>,
    /// Destination groups: where their source's replication listener is.
    source_addresses: Mutex<BTreeMap<String, String>>,
    /// Numbered events of this daemon's life.
    pub events: std::sync::Arc<crate::events::EventLog>,
    /// Who may do what on the management socket besides administrators.
    pub delegations: crate::delegation::Delegations,
    /// This node's TLS identity (`[tls]`); none: replication is in clear.
    pub tls: Option<tandem_crypto::NodeTls>,
    /// Whether this node listens for RDMA data channels, or why not.
    rdma: Mutex<Result<(), String>>,
    /// Source groups over RDMA that replicate over TCP meanwhile, and why
    /// (see rdma_fallback.rs).
    pub(crate) transport_fallbacks: Mutex<BTreeMap<String, String>>,
}

/// Loads and checks `[tls]`: the key readable by its owner only, the
/// certificate naming this node.
fn load_tls(config: &Config) -> Result<Option<tandem_crypto::NodeTls>, String> {
    let Some(tls) = &config.tls else {
        tracing::warn!(
            "no [tls] section: replication connections are neither authenticated nor encrypted; create certificates with `tandem cert init-ca` and `tandem cert issue`"
        );
        return Ok(None);
    };
    let identity =
        tandem_crypto::identity::load_identity(&tls.ca, &tls.cert, &tls.key).map_err(|e| format!("[tls]: {e}"))?;
    if identity.name != config.node.name {
        return Err(format!(
            "[tls]: certificate {} names node {:?} but node.name is {:?}; issue one for this node with `tandem cert issue --node {}`",
            tls.cert.display(),
            identity.name,
            config.node.name,
            config.node.name
        ));
    }
    tandem_crypto::NodeTls::new(identity).map(Some).map_err(|e| format!("[tls]: {e}"))
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Daemon {
    /// Starts the core threads and brings every registered group online
    /// (recovering each from its log).
    pub fn start(config: Config) -> Result<Self, String> {
        std::fs::create_dir_all(&config.node.state_dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", config.node.state_dir.display()))?;
        let events = std::sync::Arc::new(crate::events::EventLog::default());
        let (event_tx, event_rx) = crossbeam_channel::unbounded::<tandem_engine::runtime::events::EngineEvent>();
        let log = std::sync::Arc::clone(&events);
        std::thread::Builder::new()
            .name("tandem-events".into())
            .spawn(move || {
                for event in event_rx {
                    log.record(&event.group, event.kind);
                }
            })
            .map_err(|e| format!("cannot start the event thread: {e}"))?;
        let target_rpo_ms = config.replication.target_rpo_seconds * 1000;
        let mut cores = Vec::new();
        for (index, &cpu) in config.node.cores.iter().enumerate() {
            cores.push(
                CoreHandle::spawn(index, cpu, event_tx.clone(), target_rpo_ms)
                    .map_err(|e| format!("cannot start core {index} on CPU {cpu}: {e}"))?,
            );
        }
        let delegations = crate::delegation::Delegations::load(&config.node.state_dir)?;
        let tls = load_tls(&config)?;
        let daemon = Self {
            config,
            cores,
            groups: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(()),
            changing: Mutex::new(std::collections::BTreeSet::new()),
            peer_errors: Mutex::new(BTreeMap::new()),
            source_addresses: Mutex::new(BTreeMap::new()),
            events,
            delegations,
            tls,
            rdma: Mutex::new(Err("the replication listener has not started".to_owned())),
            transport_fallbacks: Mutex::new(BTreeMap::new()),
        };
        for record in registry::load(&daemon.config.node.state_dir)? {
            daemon.bring_online(record);
        }
        Ok(daemon)
    }

    fn bring_online(&self, mut record: GroupRecord) {
        record.core %= self.cores.len();
        let entry = match log_store::open_group(&record.log_path, &self.snapshot_settings()) {
            Ok(open) => {
                let entry = GroupEntry {
                    record: record.clone(),
                    volumes: volumes_of(&open),
                    unavailable: None,
                    destination_of: destination_of(&open.superblock),
                };
                report_recovery(&record.name, &open);
                self.attach(record.core, open);
                entry
            }
            Err(e) => {
                tracing::error!(group = %record.name, error = %e, "group cannot be opened and is not served");
                GroupEntry {
                    record: record.clone(),
                    volumes: Vec::new(),
                    unavailable: Some(e.to_string()),
                    destination_of: None,
                }
            }
        };
        lock(&self.groups).insert(record.name, entry);
    }

    fn attach(&self, core: usize, open: OpenGroup) {
        let config = self.config.engine.group_config();
        let peer_defaults = self.config.replication.peer_defaults();
        self.cores[core].send(CoreMsg::AttachGroup { group: Box::new(open), config, peer_defaults });
    }

    /// Answers one API request of `caller`, within what it may do and see.
    pub fn handle_as(&self, caller: &crate::delegation::Caller, request: Request) -> Result<ResponseBody, String> {
        let scope = self.delegations.authorize(caller, &request)?;
        let body = self.handle(request)?;
        Ok(match (scope, body) {
            (crate::delegation::Scope::All, body) => body,
            (scope, ResponseBody::Groups(groups)) => {
                ResponseBody::Groups(groups.into_iter().filter(|g| scope.sees(&g.name)).collect())
            }
            (scope, ResponseBody::Events(events)) => {
                ResponseBody::Events(events.into_iter().filter(|e| scope.sees(&e.group)).collect())
            }
            (_, body) => body,
        })
    }

    /// Answers one API request.
    pub fn handle(&self, request: Request) -> Result<ResponseBody, String> {
        match request {
            Request::GroupCreate { name, log, log_size_bytes, volumes } => {
                self.create_group(&name, &log, log_size_bytes, &volumes).map(ResponseBody::Message)
            }
            Request::GroupDelete { name } => self.delete_group(&name).map(ResponseBody::Message),
            Request::TestFailover { name, start } => {
                let _guard = self.mark_changing(&name)?;
                crate::test_failover::run(self, &name, start).map(ResponseBody::Message)
            }
            Request::SnapshotCreate { group, name } => {
                crate::snapshot::create(self, &group, &name).map(ResponseBody::Message)
            }
            Request::SnapshotDelete { group, name } => {
                crate::snapshot::delete(self, &group, &name).map(ResponseBody::Message)
            }
            Request::GroupPromote { name } => {
                let _guard = self.mark_changing(&name)?;
                self.promote(&name).map(ResponseBody::Message)
            }
            Request::GroupMove { name, core } => {
                let _guard = self.mark_changing(&name)?;
                self.move_group(&name, core).map(ResponseBody::Message)
            }
            Request::Events { since, wait_ms } => {
                let wait = Duration::from_millis(wait_ms.min(30_000));
                Ok(ResponseBody::Events(self.events.since(since, wait)))
            }
            Request::GroupList | Request::Status => Ok(ResponseBody::Groups(self.status())),
            Request::Node => Ok(ResponseBody::Node(crate::api::NodeInfo {
                name: self.config.node.name.clone(),
                replication_listen: self.config.node.replication_listen.to_string(),
                nbd_listen: self.config.node.nbd_listen.to_string(),
            })),
            Request::EngineSet { group, max_batch_records, max_inflight_appends } => {
                self.set_batching(&group, max_batch_records, max_inflight_appends).map(ResponseBody::Message)
            }
            Request::GroupShow { name } => {
                let found: Vec<GroupStatus> = self.status().into_iter().filter(|g| g.name == name).collect();
                if found.is_empty() {
                    return Err(unknown_group(&name));
                }
                Ok(ResponseBody::Groups(found))
            }
            Request::PartnershipCreate {
                source_group,
                destination,
                destination_group,
                mode,
                channels,
                seeded,
                source_network,
                destination_network,
                encryption,
                destination_node,
                transport,
            } => {
                let channels = channels.unwrap_or(self.config.replication.channels);
                let request = crate::replication::CreateRequest {
                    source_group,
                    destination,
                    destination_group,
                    mode,
                    channels,
                    seeded,
                    source_network: source_network.unwrap_or_default(),
                    destination_network: destination_network.unwrap_or_default(),
                    encryption: encryption.unwrap_or_else(|| self.config.replication.encryption.clone()),
                    destination_node,
                    transport,
                };
                let _guard = self.mark_changing(&request.source_group)?;
                crate::replication::create(self, &request).map(ResponseBody::Message)
            }
            Request::PartnershipShow { group } => {
                let found: Vec<GroupStatus> = self
                    .status()
                    .into_iter()
                    .filter(|g| g.partnership.is_some() && group.as_ref().is_none_or(|name| &g.name == name))
                    .collect();
                if let (Some(name), true) = (&group, found.is_empty()) {
                    self.group_status(name)?;
                    return Err(format!("group {name} is not in a partnership"));
                }
                Ok(ResponseBody::Groups(found))
            }
            Request::PartnershipVerify { group, rate_bytes_per_s, repair } => {
                let rate = rate_bytes_per_s.unwrap_or(self.config.replication.verify_rate_bytes_per_s);
                self.start_verify(&group, rate, repair).map(ResponseBody::Message)
            }
            Request::DelegationGrant { user, group, role } => {
                self.group_status(&group)?;
                self.delegations.grant(&user, &group, role).map(ResponseBody::Message)
            }
            Request::DelegationRevoke { user, group } => {
                self.delegations.revoke(&user, &group).map(ResponseBody::Message)
            }
            Request::DelegationList => Ok(ResponseBody::Delegations(self.delegations.list())),
            Request::PartnershipSet { group, mode } => {
                let _guard = self.mark_changing(&group)?;
                crate::partnership_set::set_mode(self, &group, &mode).map(ResponseBody::Message)
            }
            Request::PartnershipFailback { group, preserve_diverged } => {
                let _guard = self.mark_changing(&group)?;
                crate::failback::failback(self, &group, preserve_diverged.as_deref()).map(ResponseBody::Message)
            }
            Request::PartnershipResolve { group, keep, preserve_diverged } => {
                let _guard = self.mark_changing(&group)?;
                crate::failback::resolve(self, &group, &keep, preserve_diverged.as_deref()).map(ResponseBody::Message)
            }
            Request::PartnershipSwitch { new_source } => {
                let local = crate::switch::local_group(self, &new_source)?;
                let _guard = self.mark_changing(&local)?;
                crate::switch::switch(self, &local).map(ResponseBody::Message)
            }
            Request::PartnershipRemove { group } => {
                let _guard = self.mark_changing(&group)?;
                crate::replication::remove(self, &group).map(ResponseBody::Message)
            }
        }
    }

    /// Every group's status, including groups that could not be opened.
    #[must_use]
    pub fn status(&self) -> Vec<GroupStatus> {
        let mut all = Vec::new();
        for core in &self.cores {
            let (reply, answer) = crossbeam_reply();
            core.send(CoreMsg::Status { reply });
            match answer.recv_timeout(CORE_REPLY_TIMEOUT) {
                Ok(mut statuses) => {
                    let errors = lock(&self.peer_errors);
                    let fallbacks = lock(&self.transport_fallbacks);
                    for status in &mut statuses {
                        status.core = core.index;
                        if let Some(p) = status.partnership.as_mut() {
                            p.transport_fallback = if status.role == "source" {
                                fallbacks.get(&status.name).cloned()
                            } else {
                                crate::rdma_fallback::seen_by_destination(p)
                            };
                        }
                        let partnership = status.partnership.as_mut().filter(|p| !p.connected);
                        if let (Some(p), Some(error)) = (partnership, errors.get(&status.name)) {
                            p.last_error = Some(error.clone());
                        }
                    }
                    all.extend(statuses);
                }
                Err(_) => tracing::error!(core = core.index, "core did not answer a status request"),
            }
        }
        for entry in lock(&self.groups).values() {
            if let Some(reason) = &entry.unavailable {
                all.push(GroupStatus {
                    name: entry.record.name.clone(),
                    state: format!("Unavailable: {reason}"),
                    log_path: entry.record.log_path.display().to_string(),
                    ..GroupStatus::default()
                });
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The export named `GROUP/VOLUME`, if it is served.
    #[must_use]
    pub fn find_export(&self, name: &str) -> Option<(Export, usize, u8)> {
        if let Some(target) = crate::test_failover::SnapshotExport::of(name) {
            return self.find_snapshot_export(target, name);
        }
        let (group, volume) = name.split_once('/')?;
        let groups = lock(&self.groups);
        let entry = groups.get(group).filter(|g| g.unavailable.is_none())?;
        let index = entry.volumes.iter().position(|v| v.0 == volume)?;
        let size_bytes = entry.volumes[index].1;
        let mut export = export_of(name.to_owned(), size_bytes);
        export.refusal = entry.destination_of.as_ref().map(|source| {
            format!("{group} is a replication destination of {source}; its volumes accept no client I/O while it replicates")
        });
        Some((export, entry.record.core, index as u8))
    }

    /// A test failover's export `GROUP@test/VOLUME` (while it runs) or a
    /// consistent snapshot's `GROUP@NAME/VOLUME` (read-only).
    fn find_snapshot_export(
        &self,
        target: crate::test_failover::SnapshotExport<'_>,
        name: &str,
    ) -> Option<(Export, usize, u8)> {
        use crate::test_failover::SnapshotExport;
        let group = target.group();
        let status = self.group_status(group).ok()?;
        let description = match target {
            SnapshotExport::TestFailover { .. } => {
                status.test_failover.as_ref().filter(|t| t.broken.is_none())?;
                format!("test failover of {group} (copy-on-write; discarded at stop)")
            }
            SnapshotExport::Snapshot { snapshot, .. } => {
                let taken = status.snapshots.iter().find(|s| s.name == snapshot && s.broken.is_none())?;
                format!("snapshot {snapshot} of {group} at LSN {} (read-only)", taken.lsn)
            }
        };
        let volume = name.rsplit_once('/')?.1;
        let index = status.volumes.iter().position(|v| v.name == volume)?;
        let mut export = export_of(name.to_owned(), status.volumes[index].size_bytes);
        export.description = description;
        export.read_only = matches!(target, SnapshotExport::Snapshot { .. });
        Some((export, self.core_of(group).ok()?, index as u8))
    }

    /// Every served export.
    #[must_use]
    pub fn list_exports(&self) -> Vec<Export> {
        // Status asks the cores: gather it before holding the group table.
        let test_exports = self.test_exports_listed();
        let groups = lock(&self.groups);
        groups
            .values()
            .filter(|g| g.unavailable.is_none())
            .flat_map(|g| {
                g.volumes.iter().map(move |(volume, size, _)| export_of(format!("{}/{volume}", g.record.name), *size))
            })
            .chain(test_exports)
            .collect()
    }

    /// The exports of running test failovers and of snapshots (listed by NBD clients).
    fn test_exports_listed(&self) -> Vec<Export> {
        let mut exports = Vec::new();
        for g in self.status() {
            let test = g.test_failover.as_ref().filter(|t| t.broken.is_none()).map(|_| ("test", false));
            let snapshots = g.snapshots.iter().filter(|s| s.broken.is_none()).map(|s| (s.name.as_str(), true));
            for (suffix, read_only) in test.into_iter().chain(snapshots) {
                for v in &g.volumes {
                    let mut export = export_of(format!("{}@{suffix}/{}", g.name, v.name), v.size_bytes);
                    export.read_only = read_only;
                    exports.push(export);
                }
            }
        }
        exports
    }

    /// Hands a negotiated client connection to the core that owns its group.
    pub fn attach_connection(&self, core: usize, msg: CoreMsg) {
        self.cores[core].send(msg);
    }

    /// Detaches every group (checkpointing the volumes) and stops the cores.
    pub fn shutdown(&self) {
        let _change = lock(&self.changes);
        for core in &self.cores {
            core.shutdown();
        }
    }
}

fn crossbeam_reply<T>() -> (crossbeam_channel::Sender<T>, crossbeam_channel::Receiver<T>) {
    crossbeam_channel::bounded(1)
}

/// How a volume is advertised over NBD.
fn export_of(name: String, size_bytes: u64) -> Export {
    Export { name, size_bytes, read_only: false, description: String::new(), refusal: None }
}

fn unknown_group(name: &str) -> String {
    format!("no group named {name}; `tandem group list` shows the groups of this node")
}

fn volumes_of(open: &OpenGroup) -> Vec<(String, u64, PathBuf)> {
    open.superblock
        .volumes()
        .iter()
        .map(|v| {
            let name = tandem_proto::read_fixed_str(&v.name).unwrap_or_default().to_owned();
            let path = PathBuf::from(tandem_proto::read_fixed_str(&v.path).unwrap_or_default());
            (name, v.size_bytes, path)
        })
        .collect()
}

fn destination_of(superblock: &tandem_proto::Superblock) -> Option<String> {
    let p = &superblock.partnership;
    let text = |f: &[u8]| tandem_proto::read_fixed_str(f).unwrap_or_default().to_owned();
    let peer = format!("{}/{}", text(&p.peer_node), text(&p.peer_group));
    if superblock.fence == tandem_proto::FENCE_PEER_PROMOTED {
        return Some(crate::failback::fence_text(&peer, superblock.fenced_after_lsn));
    }
    (superblock.role == tandem_proto::ROLE_DESTINATION).then_some(peer)
}

fn report_recovery(name: &str, open: &OpenGroup) {
    let report = &open.recovery;
    tracing::info!(
        group = name,
        records = report.records_replayed,
        bytes = report.bytes_replayed,
        first_lsn = report.first_lsn,
        last_lsn = report.last_lsn,
        elapsed_ms = report.elapsed_ms,
        stopped = %report.stopped,
        "recovery replayed the log"
    );
}

/// Zeroes both superblock copies so the released log is never mistaken for a
/// live one (records left in the ring belong to a group id nobody uses).
fn wipe_superblocks(log: &Path) -> Result<(), String> {
    use tandem_engine::runtime::device::{open_device, write_all_at, OpenMode};
    let device = open_device(log, OpenMode::LogWriteThrough).map_err(|e| e.to_string())?;
    let zeros = tandem_engine::runtime::buf::AlignedBuf::zeroed(tandem_proto::RING_OFFSET_BYTES as usize);
    write_all_at(&device.file, &zeros, 0).map_err(|e| format!("cannot release log {}: {e}", log.display()))
}

/// Clears a group's "changing" mark when the change ends.
pub struct ChangingGuard<'a> {
    daemon: &'a Daemon,
    group: String,
}

impl Drop for ChangingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.daemon.changing).remove(&self.group);
    }
}

/// Partnership operations on the cores.
impl Daemon {
    pub(crate) fn mark_changing(&self, group: &str) -> Result<ChangingGuard<'_>, String> {
        if !lock(&self.changing).insert(group.to_owned()) {
            return Err(format!("a partnership change of {group} is already in progress; try again when it ends"));
        }
        Ok(ChangingGuard { daemon: self, group: group.to_owned() })
    }

    /// True while a partnership of `group` is being created or removed.
    #[must_use]
    pub fn is_changing(&self, group: &str) -> bool {
        lock(&self.changing).contains(group)
    }

    /// Remembers why a source could not reach its destination (for status).
    pub fn note_peer_error(&self, group: &str, reason: String) {
        lock(&self.peer_errors).insert(group.to_owned(), reason);
    }

    fn core_of(&self, group: &str) -> Result<usize, String> {
        let groups = lock(&self.groups);
        let entry = groups.get(group).ok_or_else(|| unknown_group(group))?;
        if let Some(reason) = &entry.unavailable {
            return Err(format!("group {group} is unavailable: {reason}"));
        }
        Ok(entry.record.core)
    }

    pub(crate) fn ask<T>(
        &self,
        group: &str,
        timeout: Duration,
        msg: impl FnOnce(crossbeam_channel::Sender<T>) -> CoreMsg,
    ) -> Result<T, String> {
        let core = self.core_of(group)?;
        let (reply, answer) = crossbeam_reply();
        self.cores[core].send(msg(reply));
        answer.recv_timeout(timeout).map_err(|_| format!("group {group} did not answer within {} s", timeout.as_secs()))
    }

    /// One group's status.
    pub fn group_status(&self, name: &str) -> Result<GroupStatus, String> {
        self.status().into_iter().find(|g| g.name == name).ok_or_else(|| unknown_group(name))
    }

    /// Changes `group`'s group-commit limits while it runs (not written to
    /// the config file: `tandem tune --apply` does that).
    pub fn set_batching(
        &self,
        group: &str,
        max_batch_records: usize,
        max_inflight_appends: usize,
    ) -> Result<String, String> {
        if !(2..=1024).contains(&max_batch_records) || max_inflight_appends == 0 || max_inflight_appends > 64 {
            return Err(format!(
                "max_batch_records {max_batch_records} and max_inflight_appends {max_inflight_appends}: use 2 to 1024 records and 1 to 64 appends"
            ));
        }
        let name = group.to_owned();
        let (records, appends) = self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::SetBatching {
            group: name,
            max_batch_records,
            max_inflight_appends,
            reply,
        })??;
        Ok(format!(
            "{group}: max_batch_records {records} -> {max_batch_records}, max_inflight_appends {appends} -> {max_inflight_appends} (until tandemd restarts)"
        ))
    }

    /// Promotes the destination group `group` whose source is gone.
    pub fn promote(&self, group: &str) -> Result<String, String> {
        let source = self.group_status(group)?.partnership.map(|p| format!("{}/{}", p.peer_node, p.peer_group));
        let name = group.to_owned();
        let (persisted, durable) = crossbeam_reply();
        let report =
            self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::Promote { group: name, reply, persisted })??;
        durable.recv_timeout(CORE_REPLY_TIMEOUT).map_err(|_| {
            format!("the promotion of {group} was not made durable within {} s", CORE_REPLY_TIMEOUT.as_secs())
        })??;
        self.set_destination_of(group, None);
        let source = source.unwrap_or_default();
        self.events.record(
            group,
            tandem_engine::runtime::events::EventKind::GroupPromoted {
                former_source: source.clone(),
                last_lsn: report.last_lsn,
                records_missing: report.records_missing,
                source_silent_ms: report.source_silent_ms.unwrap_or(0),
            },
        );
        let rpo = if report.records_missing == 0 {
            format!("every write {source} reported before contact was lost is here (up to LSN {})", report.last_lsn)
        } else {
            format!(
                "{} record(s) {source} reported (LSN {}..{}) never arrived: that is the RPO of this promotion",
                report.records_missing,
                report.last_lsn + 1,
                report.source_last_known_lsn
            )
        };
        let silence = match report.source_silent_ms {
            Some(ms) => {
                format!("; {source} was last heard {ms} ms before this promotion: what it wrote after that is not here")
            }
            None => format!("; {source} was not heard since this daemon started"),
        };
        let warning = if report.copy_complete {
            String::new()
        } else {
            "; WARNING: the initial copy was not complete, the volumes are not a consistent image of the source"
                .to_owned()
        };
        Ok(format!(
            "{group} promoted: it serves writes under a new generation and is no longer a destination of {source}; {rpo}{silence}{warning}"
        ))
    }

    /// Sets how the partnership of `group` runs its channels on this node:
    /// the network constraint ("" clears it), the encryption
    /// (`ENCRYPTION_*`) and the data channels' transport (`TRANSPORT_*`);
    /// durable when it returns.
    pub fn set_channel_policy(
        &self,
        group: &str,
        network: &str,
        encryption: u32,
        transport: u32,
    ) -> Result<(), String> {
        let fixed = tandem_proto::fixed_str(network)
            .ok_or_else(|| format!("network constraint {network:?} is longer than 63 bytes"))?;
        self.ask_core(group, |reply| CoreMsg::SetChannelPolicy {
            group: group.to_owned(),
            network: fixed,
            encryption,
            transport,
            reply,
        })
    }

    /// Whether this node listens for RDMA data channels, or why not.
    pub fn rdma_state(&self) -> Result<(), String> {
        lock(&self.rdma).clone()
    }

    pub(crate) fn set_rdma_state(&self, state: Result<(), String>) {
        *lock(&self.rdma) = state;
    }

    /// Sends `msg` to the core serving `group` and waits for its answer.
    pub fn ask_core(
        &self,
        group: &str,
        msg: impl FnOnce(crossbeam_channel::Sender<Result<(), String>>) -> CoreMsg,
    ) -> Result<(), String> {
        self.ask(group, CORE_REPLY_TIMEOUT, msg)?
    }

    /// Starts an online verify pass of the source group `group`.
    pub fn start_verify(&self, group: &str, rate_bytes_per_s: u64, repair: bool) -> Result<String, String> {
        if rate_bytes_per_s == 0 {
            return Err("--rate must be above 0; e.g. --rate 200MiB".to_owned());
        }
        let status = self.group_status(group)?;
        if status.role != "source" {
            return Err(format!(
                "group {group} is {}: verify runs on the source of a partnership",
                if status.role == "destination" { "a replication destination" } else { "not in a partnership" }
            ));
        }
        let name = group.to_owned();
        self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::StartVerify {
            group: name,
            rate_bytes_per_s,
            repair,
            reply,
        })??;
        Ok(format!(
            "verify of {group} started at {}/s{}",
            crate::size::format_size(rate_bytes_per_s),
            if repair { ", repairing what differs" } else { "" }
        ))
    }

    /// Makes `group` a source; returns the LSN after which records are shipped.
    pub fn become_source(&self, group: &str, entry: tandem_proto::PartnershipEntry) -> Result<u64, String> {
        let group_name = group.to_owned();
        self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::BecomeSource { group: group_name, entry, reply })?
    }

    /// Makes `group` a destination continuing after `baseline_lsn`.
    pub fn become_destination(
        &self,
        group: &str,
        entry: tandem_proto::PartnershipEntry,
        baseline_lsn: u64,
    ) -> Result<(), String> {
        let group_name = group.to_owned();
        let source = format!(
            "{}/{}",
            tandem_proto::read_fixed_str(&entry.peer_node).unwrap_or_default(),
            tandem_proto::read_fixed_str(&entry.peer_group).unwrap_or_default()
        );
        // Refuse new clients from now on; the core refuses if some are connected.
        self.set_destination_of(group, Some(source));
        let result = self.ask(group, Duration::from_secs(40), |reply| CoreMsg::BecomeDestination {
            group: group_name,
            entry,
            baseline_lsn,
            reply,
        });
        if !matches!(result, Ok(Ok(()))) {
            self.set_destination_of(group, None);
        }
        result?
    }

    /// Turns a group's exports read-only (with who writes instead) or
    /// writable again, for clients connecting from now on.
    pub fn fence_clients(&self, group: &str, writer: Option<String>) {
        self.set_destination_of(group, writer);
    }

    /// Where the source of destination group `group` listens (learned when
    /// it last connected).
    #[must_use]
    pub fn source_address(&self, group: &str) -> Option<String> {
        lock(&self.source_addresses).get(group).cloned()
    }

    pub fn remember_source_address(&self, group: &str, address: String) {
        lock(&self.source_addresses).insert(group.to_owned(), address);
    }

    fn set_destination_of(&self, group: &str, source: Option<String>) {
        if let Some(entry) = lock(&self.groups).get_mut(group) {
            entry.destination_of = source;
        }
    }

    /// What a destination group holds (and after `recovered_lsn`, if given).
    pub fn destination_state(
        &self,
        group: &str,
        recovered_lsn: Option<u64>,
    ) -> Result<Option<tandem_engine::runtime::DestinationState>, String> {
        let group_name = group.to_owned();
        self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::DestinationState {
            group: group_name,
            recovered_lsn,
            reply,
        })
    }

    /// Hands a replication connection to the group's core.
    pub fn attach_peer(
        &self,
        group: &str,
        channels: Vec<tandem_engine::runtime::peer_conn::PeerChannel>,
        source_view: Option<tandem_engine::runtime::SourceView>,
    ) -> Result<(), String> {
        // The handshake's timeouts end where the core's heartbeats take over.
        for channel in &channels {
            if let tandem_engine::runtime::wire::Wire::Tcp(stream) = &channel.wire {
                let _ = stream.set_read_timeout(None);
                let _ = stream.set_write_timeout(None);
            }
        }
        let group_name = group.to_owned();
        let result = self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::AttachPeer {
            group: group_name,
            channels,
            source_view,
            reply,
        })?;
        if result.is_ok() {
            lock(&self.peer_errors).remove(group);
        }
        result
    }

    /// Ends a source group's replication session so that it reconnects
    /// (the transport changes); sync writes wait up to `hold` for the next.
    pub fn end_session(&self, group: &str, reason: String, hold: std::time::Duration) -> Result<(), String> {
        let group_name = group.to_owned();
        self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::EndSession { group: group_name, reason, hold, reply })?
    }

    /// Ends the partnership of `group` on this node.
    pub fn leave_partnership(&self, group: &str) -> Result<(), String> {
        let group_name = group.to_owned();
        self.ask(group, CORE_REPLY_TIMEOUT, |reply| CoreMsg::LeavePartnership { group: group_name, reply })??;
        self.set_destination_of(group, None);
        lock(&self.peer_errors).remove(group);
        lock(&self.transport_fallbacks).remove(group);
        Ok(())
    }
}
