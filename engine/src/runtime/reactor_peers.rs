//! The reactor's replication connections: partnership messages from the
//! control plane, frames in and out, heartbeats, and loss of a peer.

use std::time::Instant;

use crossbeam_channel::Sender;
use tandem_proto::{FrameHeader, FrameKind, PartnershipEntry, ACK_FLAG_COPY_DONE, ACK_FLAG_REBASED};

use super::Reactor;
use crate::core::{CopyPosition, HeldAfter};
use crate::runtime::events::EventKind;
use crate::runtime::peer_conn::{InFrame, PeerChannel};
use crate::runtime::peer_session::PeerSession;

/// A group waiting to be idle before it becomes a destination.
pub(super) struct PendingDestination {
    group: String,
    entry: PartnershipEntry,
    baseline_lsn: u64,
    reply: Sender<Result<(), String>>,
    since: Instant,
}

impl Reactor {
    pub(super) fn become_source(&mut self, group: &str, entry: PartnershipEntry, reply: Sender<Result<u64, String>>) {
        let index = match self.served_index(group) {
            Ok(index) => index,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let defaults = self.peer_defaults;
        let rt = self.groups[index].as_mut().expect("found");
        match rt.become_source(entry, defaults) {
            Ok(baseline_lsn) => {
                // Answer with the baseline once the superblock says "source".
                let (tx, rx) = crossbeam_channel::bounded(1);
                rt.persist_partnership(tx);
                std::thread::spawn(move || {
                    let result = rx.recv().unwrap_or_else(|_| Err("the group went away".to_owned()));
                    let _ = reply.send(result.map(|()| baseline_lsn));
                });
            }
            Err(reason) => {
                let _ = reply.send(Err(reason));
            }
        }
    }

    pub(super) fn become_destination(
        &mut self,
        group: String,
        entry: PartnershipEntry,
        baseline_lsn: u64,
        reply: Sender<Result<(), String>>,
    ) {
        let index = match self.served_index(&group) {
            Ok(index) => index,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let rt = self.groups[index].as_mut().expect("found");
        if rt.superblock.role != tandem_proto::ROLE_STANDALONE {
            let _ = reply.send(Err(format!("group {group} is already in a partnership")));
            return;
        }
        if rt.connections > 0 {
            let _ = reply.send(Err(format!(
                "the volumes of {group} are in use by {} client connection(s); disconnect them first",
                rt.connections
            )));
            return;
        }
        rt.core.handle(crate::core::Event::CheckpointRequested);
        self.pending_destinations.push(PendingDestination { group, entry, baseline_lsn, reply, since: Instant::now() });
    }

    /// Groups waiting to become destinations do so once their log is empty.
    pub(super) fn progress_pending_destinations(&mut self) {
        let mut index = 0;
        while index < self.pending_destinations.len() {
            let pending = &self.pending_destinations[index];
            let Some(slot) = self.find_group(&pending.group) else {
                let pending = self.pending_destinations.swap_remove(index);
                let _ = pending.reply.send(Err(format!("group {} went away", pending.group)));
                continue;
            };
            let rt = self.groups[slot].as_mut().expect("found");
            if rt.ready_to_become_destination() {
                let pending = self.pending_destinations.swap_remove(index);
                rt.become_destination(pending.entry, pending.baseline_lsn);
                rt.persist_partnership(pending.reply);
                continue;
            }
            if pending.since.elapsed().as_secs() > 30 {
                let pending = self.pending_destinations.swap_remove(index);
                let _ = pending.reply.send(Err(format!(
                    "group {} did not become idle within 30 s (writes in flight or log not checkpointed)",
                    pending.group
                )));
                continue;
            }
            rt.core.handle(crate::core::Event::CheckpointRequested);
            index += 1;
        }
    }

    pub(super) fn attach_peer(
        &mut self,
        group: &str,
        channels: Vec<PeerChannel>,
        source_view: Option<crate::runtime::SourceView>,
    ) -> Result<(), String> {
        let index = self.served_index(group)?;
        if self.peers.iter().any(|(_, p)| p.group == index && !p.closing()) {
            return Err(format!("group {group} already has a replication connection"));
        }
        let rt = self.groups[index].as_mut().expect("found");
        // Over RDMA, channel 0 (TCP, where the TLS handshake ran) carries
        // only heartbeats and acknowledgements, and the data channels are
        // the partnership's `channels` queue pairs after it. A partnership
        // over RDMA may run over TCP channels meanwhile (its fallback).
        let over_rdma = channels.iter().any(|c| !c.wire.is_tcp());
        let expected = rt.superblock.partnership.channels as usize + usize::from(over_rdma);
        if channels.len() != expected {
            return Err(format!(
                "group {group}'s partnership has {expected} channel(s) but {} connected",
                channels.len()
            ));
        }
        let sector = rt.sector_bytes();
        for channel in &channels {
            if let crate::runtime::wire::Wire::Tcp(stream) = &channel.wire {
                let _ = stream.set_nodelay(true);
                crate::runtime::net::set_socket_buffers(stream, self.peer_defaults.socket_buffer_bytes);
            }
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        match (source_view, rt.source.as_mut(), rt.destination.as_mut()) {
            (Some(view), Some(_), None) => {
                let lost_records = view.diverged.as_ref().and_then(|(lsn, held)| lost_records_event(*lsn, held));
                rt.core.peer_connected(view.durable_lsn, view.next_lsn, view.copy, view.diverged).inspect_err(
                    |reason| {
                        if let Some(link) = rt.source.as_mut() {
                            link.last_error = Some(reason.clone());
                        }
                    },
                )?;
                rt.pending_events.extend(lost_records);
                let key = self.peers.insert(PeerSession::new(id, channels, index, sector));
                let link = rt.source.as_mut().expect("checked");
                link.conn = Some((key, id));
                link.last_error = None;
                rt.start_compare();
            }
            (None, None, Some(_)) => {
                let key = self.peers.insert(PeerSession::new(id, channels, index, sector));
                rt.source_connected(key, id);
            }
            _ => return Err(format!("group {group} does not have that role in a partnership")),
        }
        tracing::info!(group, "replication connection up");
        Ok(())
    }

    /// Closes a source group's session for a planned reconnection; sync
    /// writes wait for the next one for at most `hold`.
    pub(super) fn end_session(&mut self, group: &str, reason: &str, hold: std::time::Duration) -> Result<(), String> {
        let index = self.served_index(group)?;
        let rt = self.groups[index].as_mut().expect("found");
        if rt.source.as_ref().is_none_or(|link| link.conn.is_none()) {
            return Err(format!("group {group} is not a connected replication source"));
        }
        rt.core.hold_writes_for_reconnect(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        self.close_group_peers(index, reason);
        Ok(())
    }

    pub(super) fn leave_partnership(&mut self, group: &str, reply: Sender<Result<(), String>>) {
        let index = match self.served_index(group) {
            Ok(index) => index,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        for (_, peer) in &mut self.peers {
            if peer.group == index {
                peer.close("partnership removed");
            }
        }
        let rt = self.groups[index].as_mut().expect("found");
        rt.leave_partnership();
        rt.persist_partnership(reply);
    }

    /// Received frames go to their groups (a destination may leave some for later).
    pub(super) fn take_peer_frames(&mut self) {
        for (_, peer) in &mut self.peers {
            let Some(rt) = self.groups[peer.group].as_mut() else { continue };
            if rt.destination.is_some() {
                rt.take_frames(peer, &mut self.io, peer.group);
                continue;
            }
            while let Some(frame) = peer.take_received() {
                let InFrame::Control { header, .. } = &frame else {
                    peer.close("the destination sent a log record, which only a source sends");
                    break;
                };
                let header = *header;
                match header.frame_kind() {
                    FrameKind::Heartbeat => {}
                    FrameKind::Ack if rt.core.rebase_pending() && header.flags & ACK_FLAG_REBASED == 0 => {
                        // It describes the destination's log before the
                        // rebase this connection began with.
                    }
                    FrameKind::Ack => {
                        let current = rt.core.snapshot().current_lsn;
                        if header.lsn > current {
                            peer.close(&format!(
                                "the destination acknowledged LSN {} beyond this source's last LSN {current}",
                                header.lsn
                            ));
                            break;
                        }
                        let copy = if header.flags & ACK_FLAG_COPY_DONE != 0 {
                            CopyPosition::Done
                        } else {
                            CopyPosition::At { volume_index: header.volume_index, offset: header.offset }
                        };
                        rt.core.peer_acknowledged(header.lsn, copy);
                        rt.core.peer_applied(header.aux.min(header.lsn));
                        if let Some(link) = rt.source.as_mut() {
                            link.acknowledged(header.lsn, Instant::now());
                        }
                    }
                    FrameKind::Digest => {
                        if let Err(reason) = rt.compare_digest(&header) {
                            peer.close(&reason);
                            break;
                        }
                    }
                    FrameKind::VerifyDigest => {
                        if let Err(reason) = rt.verify_digest(&header) {
                            peer.close(&reason);
                            break;
                        }
                    }
                    FrameKind::BlockHashes => {
                        let InFrame::Control { payload: Some(payload), .. } = &frame else {
                            peer.close("block hashes without their payload");
                            break;
                        };
                        if let Err(reason) = rt.compare_blocks(&header, payload) {
                            peer.close(&reason);
                            break;
                        }
                    }
                    other => {
                        peer.close(&format!("the destination sent a {other:?} frame, which only a source sends"));
                        break;
                    }
                }
            }
        }
    }

    /// Moves outgoing frames to the connections, posts IO, and drops closed
    /// connections (the group learns it lost its peer).
    pub(super) fn progress_peers(&mut self) {
        let mut dropped = Vec::new();
        for (key, peer) in &mut self.peers {
            if let Some(rt) = self.groups[peer.group].as_mut() {
                if rt.close_peer {
                    rt.close_peer = false;
                    peer.close("an IO error on this node stopped replication");
                }
                if let Some(link) = rt.source.as_mut().filter(|l| l.conn.map(|c| c.0) == Some(key)) {
                    for frame in link.take_ready() {
                        peer.send(frame);
                    }
                }
                if let Some(frame) = rt.ack_frame() {
                    peer.send(frame);
                }
                if rt.destination.as_ref().is_some_and(|l| l.conn.map(|c| c.0) == Some(key)) {
                    rt.progress_compare(&mut self.io, peer.group);
                    for frame in rt.destination.as_mut().expect("checked").outbox.drain(..) {
                        peer.send(frame);
                    }
                }
            }
            if peer.can_drop() {
                dropped.push(key);
                continue;
            }
            peer.post_io(&mut self.io, key);
        }
        for key in dropped {
            let peer = self.peers.remove(key);
            let Some(rt) = self.groups[peer.group].as_mut() else { continue };
            let reason = peer.close_reason().to_owned();
            if peer.rejected_a_frame() {
                rt.frames_rejected += 1;
                rt.pending_events
                    .push(EventKind::FrameRejected { peer: peer.peer().to_owned(), reason: reason.clone() });
            }
            if let Some(link) = rt.source.as_mut().filter(|l| l.conn.map(|c| c.1) == Some(peer.id)) {
                link.disconnected();
                link.last_error = Some(reason.clone());
                rt.core.peer_lost();
                rt.verify_disconnected();
            }
            if let Some(link) = rt.destination.as_mut().filter(|l| l.conn.map(|c| c.1) == Some(peer.id)) {
                link.disconnected();
            }
            tracing::warn!(group = %rt.name, peer = %peer.peer(), %reason, "replication connection lost");
        }
    }

    pub(super) fn tick_peers(&mut self) {
        let now = Instant::now();
        for group in self.groups.iter_mut().flatten() {
            group.forget_recovered_lsn();
            if let Some(link) = group.destination.as_mut() {
                link.applied_ack_due = true;
            }
        }
        for (_, peer) in &mut self.peers {
            let durable =
                self.groups[peer.group].as_ref().map_or(0, crate::runtime::reactor::GroupRt::announced_durable_lsn);
            peer.tick(now, &FrameHeader::new(FrameKind::Heartbeat, 0, 0, durable, 0, 0));
        }
    }

    pub(super) fn close_group_peers(&mut self, index: usize, reason: &str) {
        for (_, peer) in &mut self.peers {
            if peer.group == index {
                peer.close(reason);
            }
        }
    }
}

/// The event of a reconnection that found the destination holding records
/// this source lost after `recovered_lsn` (none when it holds none).
fn lost_records_event(recovered_lsn: u64, held: &HeldAfter) -> Option<EventKind> {
    let (ranges, bytes, every_region) = match held {
        HeldAfter::Ranges(ranges) if ranges.is_empty() => return None,
        HeldAfter::Ranges(ranges) => (ranges.len() as u64, ranges.iter().map(|r| r.2).sum(), false),
        HeldAfter::Unknown => (0, 0, true),
    };
    Some(EventKind::LostRecordsRecopied { recovered_lsn, ranges, bytes, every_region })
}
