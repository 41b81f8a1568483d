//! The core's inbox: messages from the control plane (attach and detach
//! groups and connections, partnership changes, status and counters), each
//! carried out on the core and answered through its reply channel.

use super::*;

impl Reactor {
    pub(super) fn drain_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                CoreMsg::AttachGroup { group, config, peer_defaults } => {
                    self.peer_defaults = peer_defaults;
                    let rt = GroupRt::new(*group, config, peer_defaults);
                    let report = &rt.recovery;
                    if report.records_replayed > 0 {
                        let kind = EventKind::RecoveryReplayed {
                            records: report.records_replayed,
                            bytes: report.bytes_replayed,
                            first_lsn: report.first_lsn,
                            last_lsn: report.last_lsn,
                            elapsed_ms: report.elapsed_ms,
                        };
                        let _ = self.events.send(EngineEvent { group: rt.name.clone(), kind });
                    }
                    tracing::info!(group = %rt.name, "group online");
                    match self.groups.iter().position(Option::is_none) {
                        Some(slot) => self.groups[slot] = Some(rt),
                        None => self.groups.push(Some(rt)),
                    }
                }
                CoreMsg::AttachConnection { group, volume_index, stream, session } => {
                    self.attach_connection(&group, volume_index, stream, session);
                }
                CoreMsg::BecomeSource { group, entry, reply } => self.become_source(&group, entry, reply),
                CoreMsg::BecomeDestination { group, entry, baseline_lsn, reply } => {
                    self.become_destination(group, entry, baseline_lsn, reply);
                }
                CoreMsg::DestinationState { group, recovered_lsn, reply } => {
                    let state =
                        self.find_group(&group).and_then(|i| self.groups[i].as_ref()?.destination_state(recovered_lsn));
                    let _ = reply.send(state);
                }
                CoreMsg::AttachPeer { group, channels, source_view, reply } => {
                    let _ = reply.send(self.attach_peer(&group, channels, source_view));
                }
                CoreMsg::LeavePartnership { group, reply } => self.leave_partnership(&group, reply),
                CoreMsg::Status { reply } => {
                    let _ = reply.send(self.status());
                }
                CoreMsg::SetBatching { group, max_batch_records, max_inflight_appends, reply } => {
                    let answer = self.served_group_mut(&group).map(|rt| {
                        let before = rt.core.config();
                        rt.core.set_batching(max_batch_records, max_inflight_appends);
                        (before.max_batch_records, before.max_inflight_appends)
                    });
                    let _ = reply.send(answer);
                }
                CoreMsg::Promote { group, reply, persisted } => {
                    let answer = self.served_group_mut(&group).and_then(|rt| rt.promote(persisted));
                    let _ = reply.send(answer);
                }
                CoreMsg::SetChannelPolicy { group, network, encryption, transport, reply } => {
                    match self.served_group_mut(&group) {
                        Ok(rt) => rt.set_channel_policy(network, (encryption, transport), reply),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                CoreMsg::SetMode { group, mode, reply } => match self.served_group_mut(&group) {
                    Ok(rt) => rt.set_partnership_mode(mode, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                CoreMsg::StartVerify { group, rate_bytes_per_s, repair, reply } => {
                    let answer = self.served_group_mut(&group).and_then(|rt| rt.start_verify(rate_bytes_per_s, repair));
                    let _ = reply.send(answer);
                }
                CoreMsg::StartTestFailover { group, path, max_bytes, reply } => match self.served_group_mut(&group) {
                    Ok(rt) => rt.start_test_failover(path, max_bytes, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                CoreMsg::StopTestFailover { group, reply } => {
                    let answer = self.served_group_mut(&group).and_then(|rt| rt.stop_test_failover());
                    let _ = reply.send(answer);
                }
                CoreMsg::TestFailoverIo { group, volume_index, op, reply } => {
                    let answer = self.served_group_mut(&group).and_then(|rt| rt.test_failover_io(volume_index, op));
                    let _ = reply.send(answer);
                }
                CoreMsg::TakeSnapshot { group, name, reply } => match self.served_group_mut(&group) {
                    Ok(rt) => rt.submit_snapshot(&name, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                CoreMsg::DeleteSnapshot { group, name, reply } => {
                    let answer = self.served_group_mut(&group).and_then(|rt| rt.delete_snapshot(&name));
                    let _ = reply.send(answer);
                }
                CoreMsg::ReadSnapshot { group, name, range, reply } => {
                    let answer = self.served_group(&group).and_then(|rt| rt.read_snapshot(&name, range));
                    let _ = reply.send(answer);
                }
                CoreMsg::SetFence { group, after_lsn, reply } => match self.served_group_mut(&group) {
                    Ok(rt) => rt.set_fence(after_lsn, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                CoreMsg::EndSession { group, reason, hold, reply } => {
                    let _ = reply.send(self.end_session(&group, &reason, hold));
                }
                CoreMsg::CloseClients { group, reason, reply } => {
                    let answer = self.served_index(&group).map(|index| {
                        for (_, conn) in &mut self.conns {
                            if conn.group == index {
                                conn.close(&reason);
                            }
                        }
                    });
                    let _ = reply.send(answer);
                }
                CoreMsg::DetachGroup { group, reply } => match self.served_index(&group) {
                    Ok(index) => self.start_detach(index, Some(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                CoreMsg::Shutdown => {
                    self.shutting_down = true;
                    for index in 0..self.groups.len() {
                        if self.groups[index].as_ref().is_some_and(|g| !g.detaching) {
                            self.start_detach(index, None);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn status(&self) -> Vec<GroupStatus> {
        let mut all = Vec::new();
        for (index, group) in self.groups.iter().enumerate() {
            let Some(group) = group else { continue };
            let mut status = group.status();
            if let Some(partnership) = status.partnership.as_mut() {
                for (_, peer) in self.peers.iter().filter(|(_, p)| p.group == index) {
                    partnership.bytes_sent += peer.bytes_sent();
                    partnership.bytes_received += peer.bytes_received();
                    let (lent, read) = peer.zero_copy_bytes();
                    partnership.zero_copy_bytes_sent += lent;
                    partnership.zero_copy_bytes_received += read;
                    partnership.channels_connected = peer.channel_count() as u32;
                    partnership.channel_addresses = peer.channel_addresses();
                    let (sent, received, send_latency_us_avg) = peer.frame_counts();
                    partnership.messages_sent += sent;
                    partnership.messages_received += received;
                    partnership.send_latency_us_avg = send_latency_us_avg;
                }
                if status.role == "source" {
                    partnership.target_rpo_seconds = self.target_rpo_ms / 1000;
                }
            }
            all.push(status);
        }
        all
    }

    pub(super) fn find_group(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.as_ref().is_some_and(|g| g.name == name && !g.detaching))
    }

    /// The index of group `name`, or the answer for a message naming a group
    /// this core does not serve.
    pub(super) fn served_index(&self, name: &str) -> Result<usize, String> {
        self.find_group(name).ok_or_else(|| format!("group {name} is not served by this core"))
    }

    pub(super) fn served_group(&self, name: &str) -> Result<&GroupRt, String> {
        let index = self.served_index(name)?;
        Ok(self.groups[index].as_ref().expect("found"))
    }

    pub(super) fn served_group_mut(&mut self, name: &str) -> Result<&mut GroupRt, String> {
        let index = self.served_index(name)?;
        Ok(self.groups[index].as_mut().expect("found"))
    }

    pub(super) fn attach_connection(
        &mut self,
        group: &str,
        volume_index: u8,
        stream: TcpStream,
        session: Box<dyn BlockSession>,
    ) {
        let Some(index) = self.find_group(group) else {
            tracing::warn!(group, peer = session.peer(), "connection for a group this core does not serve; closed");
            return;
        };
        let rt = self.groups[index].as_mut().expect("found above");
        let Some(volume) = rt.volumes.get(usize::from(volume_index)) else {
            tracing::warn!(group, volume_index, "connection for a volume the group does not have; closed");
            return;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let conn = Conn::new(self.next_conn_id, stream, index, volume_index, volume.size_bytes, session);
        self.next_conn_id += 1;
        tracing::info!(group, volume_index, peer = conn.peer(), "client connected");
        rt.connections += 1;
        self.conns.insert(conn);
    }
}
