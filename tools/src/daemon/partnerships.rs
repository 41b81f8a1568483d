//! Partnership operations of the control plane: each asks the core that
//! owns the group, by message, and waits for its answer.

use super::*;

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

    pub(super) fn core_of(&self, group: &str) -> Result<usize, String> {
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

    pub(super) fn set_destination_of(&self, group: &str, source: Option<String>) {
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
