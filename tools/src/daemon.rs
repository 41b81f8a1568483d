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
mod partnerships;

pub use partnerships::ChangingGuard;

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
