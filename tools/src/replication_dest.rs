//! The destination's side of the replication handshake: accepting
//! connections (TLS when this node has `[tls]`), validating and carrying out
//! each step, and gathering a session's data channels for the core.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use tandem_engine::core::CopyPosition;
use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::peer_conn::PeerChannel;
use tandem_engine::runtime::peer_session::MAX_CHANNELS;
use tandem_engine::runtime::status::GroupStatus;
use tandem_engine::runtime::wire::Wire;
use tandem_proto::{fixed_str, PartnershipEntry, MODE_ASYNC, MODE_SYNC, WIRE_VERSION};

use crate::channel_join::JoiningSessions;
use crate::daemon::Daemon;
use crate::replication::{check_channels, hex, read_line, write_line, Answer, Hello, HelloAction, HANDSHAKE_TIMEOUT};
use crate::secure_channel::{self, ControlStream};

/// Accepts replication connections; each handshake runs on its own thread.
pub fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let sessions = Arc::new(JoiningSessions::new(HANDSHAKE_TIMEOUT));
    crate::rdma_link::start_listener(&daemon, &sessions);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let daemon = Arc::clone(&daemon);
        let sessions = Arc::clone(&sessions);
        let spawned = std::thread::Builder::new().name("tandem-repl-handshake".into()).spawn(move || {
            let peer = stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
            if let Err(reason) = answer(&daemon, &sessions, stream) {
                tracing::warn!(%peer, %reason, "replication handshake refused");
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a replication handshake thread");
        }
    }
}

fn answer(daemon: &Daemon, sessions: &JoiningSessions, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let peer = stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let mut first = [0u8; 1];
    if stream.peek(&mut first).map_err(|e| format!("reading the handshake failed: {e}"))? == 0 {
        return Err("the peer closed the connection before its handshake".to_owned());
    }
    let control = if first[0] == tandem_crypto::tls::TLS_HANDSHAKE_BYTE {
        let Some(tls) = &daemon.tls else {
            return Err(refuse_peer(daemon, &peer, format!(
                "the peer offers TLS but {} has no [tls] section; configure it with the same CA, or use --encryption none on both",
                daemon.config.node.name
            )));
        };
        ControlStream::Tls(Box::new(tls.accept(stream).map_err(|e| refuse_peer(daemon, &peer, e))?))
    } else {
        ControlStream::Plain(stream)
    };
    serve_control(daemon, sessions, control, &peer)
}

/// Records a refused peer (a node-wide event: no group is known yet) and
/// returns the reason.
fn refuse_peer(daemon: &Daemon, peer: &str, reason: String) -> String {
    daemon.events.record("", EventKind::PeerRefused { peer: peer.to_owned(), reason: reason.clone() });
    reason
}

/// Serves the handshake lines of one control connection.
fn serve_control(
    daemon: &Daemon,
    sessions: &JoiningSessions,
    mut control: ControlStream,
    peer: &str,
) -> Result<(), String> {
    loop {
        let hello: Hello = read_line(&mut control)?;
        if let ControlStream::Plain(stream) = control {
            match hello.action {
                // A data channel joins in clear; the session decides whether
                // its proof is needed (it is when the session is over TLS).
                HelloAction::Join => return join(daemon, sessions, stream, &hello),
                _ if daemon.tls.is_some() => {
                    let reason = format!(
                        "{} accepts replication only over TLS, and {peer} connected in clear: configure [tls] on {} with a certificate of this node's CA",
                        daemon.config.node.name,
                        if hello.source_node.is_empty() { "the peer" } else { &hello.source_node }
                    );
                    let mut stream = stream;
                    let refusal = Answer { error: Some(reason.clone()), ..Answer::default() };
                    let _ = write_line(&mut stream, &refusal);
                    return Err(refuse_peer(daemon, peer, reason));
                }
                HelloAction::Probe => return crate::probe::answer(daemon, ControlStream::Plain(stream), &hello),
                _ => control = ControlStream::Plain(stream),
            }
        } else if matches!(hello.action, HelloAction::Probe) {
            return crate::probe::answer(daemon, control, &hello);
        } else if matches!(hello.action, HelloAction::Join) {
            return Err("a data channel joins in clear with its proof, not over TLS".to_owned());
        }
        let local = control.tcp().local_addr().ok().map(|a| a.ip());
        let source_ip = control.tcp().peer_addr().ok().map(|a| a.ip());
        if matches!(hello.action, HelloAction::SwitchRequest) {
            let reply = crate::switch::answer_switch_request(daemon, &hello, control.peer_node(), source_ip);
            return write_line(&mut control, &reply);
        }
        if matches!(hello.action, HelloAction::FailbackRequest) {
            let reply = crate::failback::answer_failback_request(daemon, &hello, control.peer_node(), source_ip);
            return write_line(&mut control, &reply);
        }
        if matches!(hello.action, HelloAction::KeepSource) {
            let reply = crate::failback::answer_keep_source(daemon, &hello, control.peer_node());
            return write_line(&mut control, &reply);
        }
        let result = destination_step(daemon, &hello, local, control.peer_node(), source_ip);
        let mut reply = match &result {
            Ok(reply) => reply.clone(),
            Err(reason) => Answer { error: Some(reason.clone()), ..Answer::default() },
        };
        reply.destination_node.clone_from(&daemon.config.node.name);
        if hello.transport == "rdma" && result.is_err() {
            // The source may fall back to TCP when this side's RDMA is away.
            reply.rdma_unavailable = daemon.rdma_state().err();
        }
        if matches!(hello.action, HelloAction::Resume) && result.is_err() {
            if let Some((after_lsn, generation)) = promoted_out_of(daemon, &hello) {
                reply.promoted_after_lsn = Some(after_lsn);
                reply.promoted_generation = generation;
            }
        }
        let opens_session = result.is_ok() && matches!(hello.action, HelloAction::Create | HelloAction::Resume);
        if opens_session {
            if let (Some(ip), 1..) = (source_ip, hello.replication_port) {
                let address = std::net::SocketAddr::new(ip, hello.replication_port).to_string();
                daemon.remember_source_address(&hello.destination_group, address);
            }
            let count = crate::replication::session_channel_count(&hello);
            let keys = control.session_keys(&hello.encryption, count)?;
            reply.session = sessions.open(&hello.destination_group, &hello.partnership_id, count, keys);
        }
        write_line(&mut control, &reply)?;
        let reason = result.err();
        match (&hello.action, reason) {
            (HelloAction::Check | HelloAction::Create, Some(reason)) => {
                daemon
                    .events
                    .record(&hello.destination_group, EventKind::PartnershipRefused { reason: reason.clone() });
                return Err(reason);
            }
            (_, Some(reason)) => return Err(reason),
            (HelloAction::Check, None) => continue,
            (HelloAction::Remove | HelloAction::SetMode | HelloAction::Switch, None) => return Ok(()),
            (HelloAction::Create | HelloAction::Resume, None) => {
                let stream = Wire::Tcp(control.into_tcp());
                let joined =
                    sessions.add(&hello.destination_group, &hello.partnership_id, reply.session, 0, stream, None)?;
                return attach_joined(daemon, &hello.destination_group, joined);
            }
            (
                HelloAction::Join
                | HelloAction::Probe
                | HelloAction::SwitchRequest
                | HelloAction::FailbackRequest
                | HelloAction::KeepSource,
                None,
            ) => {
                unreachable!("answered by join(), probe::answer() and switch::answer_switch_request()")
            }
        }
    }
}

/// A data channel joining the session its Create or Resume opened.
fn join(daemon: &Daemon, sessions: &JoiningSessions, mut stream: TcpStream, hello: &Hello) -> Result<(), String> {
    let group = &hello.destination_group;
    let network = daemon.group_status(group).ok().and_then(|s| s.partnership).map(|p| p.network).unwrap_or_default();
    let local = stream.local_addr().ok().map(|a| a.ip());
    let joined = crate::network::arrived_within(&network, local)
        .and_then(|()| {
            if hello.channel == 0 {
                return Err("channel 0 is the control connection; it does not join".to_owned());
            }
            stream.try_clone().map_err(|e| format!("cannot keep data channel {} of {group}: {e}", hello.channel))
        })
        .and_then(|kept| {
            let proof = Some(hello.join_proof.as_str());
            sessions.add(group, &hello.partnership_id, hello.session, hello.channel, Wire::Tcp(kept), proof)
        });
    let reply = Answer::join_outcome(&daemon.config.node.name, &joined);
    write_line(&mut stream, &reply)?;
    attach_joined(daemon, group, joined?)
}

/// Hands a session to the group's core once all its channels joined.
fn attach_joined(daemon: &Daemon, group: &str, joined: Option<Vec<PeerChannel>>) -> Result<(), String> {
    let Some(channels) = joined else { return Ok(()) };
    daemon.attach_peer(group, channels, None)
}

/// The source must be the node its certificate names (with TLS), and offer
/// the encryption this side requires (a new partnership) or keeps (an
/// existing one).
fn check_source(daemon: &Daemon, hello: &Hello, certified: Option<&str>, kept: Option<&str>) -> Result<(), String> {
    let node = &daemon.config.node.name;
    if let Some(certified) = certified {
        if certified != hello.source_node {
            return Err(format!(
                "the source introduces itself as node {:?} but its certificate names {certified:?}; refused",
                hello.source_node
            ));
        }
    }
    let required = kept.unwrap_or(&daemon.config.replication.encryption);
    if hello.encryption != required {
        let offered = &hello.encryption;
        return Err(match kept {
            Some(_) => format!("the source offers encryption {offered} but this partnership uses {required} on {node}"),
            None => format!(
                "the source offers encryption {offered} but {node} requires {required} (its replication.encryption); use --encryption {required}"
            ),
        });
    }
    if required != "none" && daemon.tls.is_none() {
        return Err(format!("{node} requires encryption {required} but has no [tls] section to authenticate with"));
    }
    Ok(())
}

/// The LSN after which the group a Resume names was promoted out of that
/// partnership, and its generation since (none when it was not).
fn promoted_out_of(daemon: &Daemon, hello: &Hello) -> Option<(u64, String)> {
    let status = daemon.group_status(&hello.destination_group).ok()?;
    (!status.promoted_from.is_empty() && status.promoted_from == hello.partnership_id)
        .then_some((status.promoted_after_lsn, status.generation))
}

/// Validates a handshake step on the destination and carries it out.
fn destination_step(
    daemon: &Daemon,
    hello: &Hello,
    local: Option<std::net::IpAddr>,
    certified: Option<&str>,
    source_ip: Option<std::net::IpAddr>,
) -> Result<Answer, String> {
    if hello.wire_version != WIRE_VERSION {
        return Err(format!(
            "the source speaks replication protocol {} and this node {WIRE_VERSION}; run the same Tandem version on both",
            hello.wire_version
        ));
    }
    let name = &hello.destination_group;
    check_channels(hello.channels).map_err(|_| {
        format!("the source asks for {} data channels; a partnership has 1 to {MAX_CHANNELS}", hello.channels)
    })?;
    let status =
        daemon.group_status(name).map_err(|_| format!("group {name} does not exist on {}", daemon.config.node.name))?;
    let ok = |durable_lsn, next_lsn, copy: CopyPosition| Answer {
        ok: true,
        durable_lsn,
        next_lsn,
        copy_at: match copy {
            CopyPosition::Done => None,
            CopyPosition::At { volume_index, offset } => Some((volume_index, offset)),
        },
        ..Answer::default()
    };
    match hello.action {
        HelloAction::Check | HelloAction::Create => {
            check_source(daemon, hello, certified, None)?;
            check_new_destination(daemon, &status, hello)?;
            if !hello.destination_network.is_empty() {
                crate::network::local_addresses(&hello.destination_network).map_err(|e| {
                    format!("--destination-network {}: {e} (on {})", hello.destination_network, daemon.config.node.name)
                })?;
                crate::network::arrived_within(&hello.destination_network, local)?;
            }
            if matches!(hello.action, HelloAction::Check) {
                return Ok(Answer { ok: true, rdma_unavailable: daemon.rdma_state().err(), ..Answer::default() });
            }
            check_rdma(daemon, hello)?;
            let mut entry = PartnershipEntry::default_zeroed();
            entry.id = parse_id(&hello.partnership_id)?;
            entry.mode = if hello.mode == "sync" { MODE_SYNC } else { MODE_ASYNC };
            entry.channels = hello.channels;
            entry.copy_state = tandem_proto::COPY_IN_PROGRESS;
            entry.peer_node = fixed_str(&hello.source_node).ok_or("source node name too long")?;
            entry.peer_group = fixed_str(&hello.source_group).ok_or("source group name too long")?;
            daemon.become_destination(name, entry, hello.baseline_lsn)?;
            let encryption = secure_channel::encryption_code(&hello.encryption)?;
            let transport = crate::rdma_link::transport_code(&hello.transport);
            daemon.set_channel_policy(name, &hello.destination_network, encryption, transport)?;
            let source = format!("{}/{}", hello.source_node, hello.source_group);
            daemon.events.record(name, EventKind::DestinationAttached { source });
            Ok(ok(hello.baseline_lsn, hello.baseline_lsn + 1, CopyPosition::At { volume_index: 0, offset: 0 }))
        }
        HelloAction::Join => Err("a data channel joins only a session that Create or Resume opened".to_owned()),
        HelloAction::Probe => Err("a probe is answered by probe::answer()".to_owned()),
        HelloAction::SwitchRequest | HelloAction::FailbackRequest | HelloAction::KeepSource => {
            Err("switch and failback requests are answered by their modules".to_owned())
        }
        HelloAction::Resume if promoted_out_of(daemon, hello).is_some() => Err(format!(
            "group {name} on {} was promoted after LSN {} and serves writes itself: the source must not write any more; it is fenced now, and `tandem partnership failback` on it makes it {name}'s destination",
            daemon.config.node.name, status.promoted_after_lsn
        )),
        HelloAction::Switch if crate::switch::already_taken_over(&status, hello) => {
            Ok(Answer { ok: true, ..Answer::default() })
        }
        HelloAction::Resume | HelloAction::Remove | HelloAction::SetMode | HelloAction::Switch => {
            let state = daemon.destination_state(name, hello.recovered_lsn)?.ok_or_else(|| {
                format!("group {name} on {} is not a replication destination; remove the partnership on the source and create it again", daemon.config.node.name)
            })?;
            if hex(&state.partnership_id) != hello.partnership_id {
                return Err(format!("group {name} is the destination of another partnership"));
            }
            let partnership = status.partnership.as_ref().ok_or_else(|| format!("group {name} has no partnership"))?;
            if partnership.peer_node != hello.source_node {
                return Err(format!(
                    "group {name} is the destination of node {:?}, not {:?}",
                    partnership.peer_node, hello.source_node
                ));
            }
            check_source(daemon, hello, certified, Some(&partnership.encryption))?;
            let network = partnership.network.clone();
            crate::network::arrived_within(&network, local)?;
            if matches!(hello.action, HelloAction::SetMode) {
                crate::partnership_set::take_mode(daemon, name, &hello.mode)?;
                return Ok(Answer { ok: true, ..Answer::default() });
            }
            if matches!(hello.action, HelloAction::Switch) {
                crate::switch::take_over(daemon, name, hello, &state, partnership, source_ip)?;
                return Ok(Answer { ok: true, ..Answer::default() });
            }
            if matches!(hello.action, HelloAction::Remove) {
                daemon.leave_partnership(name)?;
                let peer = format!("{}/{}", hello.source_node, hello.source_group);
                daemon.events.record(name, EventKind::PartnershipRemoved { peer });
                return Ok(Answer { ok: true, ..Answer::default() });
            }
            if state.connected {
                return Err(format!("group {name} already has a connected source"));
            }
            check_transport(daemon, name, &partnership.transport, &hello.transport)?;
            check_rdma(daemon, hello)?;
            Ok(Answer { held_after: state.held_after, ..ok(state.durable_lsn, state.next_lsn, state.copy) })
        }
    }
}

/// A Resume offers the partnership's transport, or TCP for one over RDMA
/// whose RDMA path is gone when this node's `replication.rdma_fallback`
/// allows it.
fn check_transport(daemon: &Daemon, group: &str, kept: &str, offered: &str) -> Result<(), String> {
    let fallback = kept == "rdma" && offered == "tcp";
    if kept == offered || fallback && daemon.config.replication.rdma_fallback == "tcp" {
        return Ok(());
    }
    let why = if fallback {
        format!(
            "; {} has replication.rdma_fallback = \"none\" and waits for RDMA (set \"tcp\" to take TCP channels meanwhile)",
            daemon.config.node.name
        )
    } else {
        String::new()
    };
    Err(format!("the partnership of {group} runs over {kept} here but the source resumes over {offered}{why}"))
}

/// A session over RDMA needs this node's RDMA listener.
fn check_rdma(daemon: &Daemon, hello: &Hello) -> Result<(), String> {
    if hello.transport != "rdma" {
        return Ok(());
    }
    daemon.rdma_state().map_err(|reason| format!("{} takes no RDMA data channels: {reason}", daemon.config.node.name))
}

pub(crate) fn parse_id(text: &str) -> Result<[u8; 16], String> {
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| "malformed partnership id".to_owned())?;
    bytes.try_into().map_err(|_| "malformed partnership id".to_owned())
}

/// Every refusal of a new destination, with the numbers.
fn check_new_destination(daemon: &Daemon, status: &GroupStatus, hello: &Hello) -> Result<(), String> {
    let name = &status.name;
    let node = &daemon.config.node.name;
    if status.state != "Online" {
        return Err(format!("group {name} on {node} is not online ({})", status.state));
    }
    if status.role != "standalone" {
        return Err(format!("group {name} on {node} is already in a partnership ({})", status.role));
    }
    let sizes: Vec<u64> = status.volumes.iter().map(|v| v.size_bytes).collect();
    if sizes.len() != hello.volume_sizes_bytes.len() {
        return Err(format!(
            "group {name} on {node} has {} volume(s) but {} has {}; a destination needs the same volumes",
            sizes.len(),
            hello.source_group,
            hello.volume_sizes_bytes.len()
        ));
    }
    for (index, (here, there)) in sizes.iter().zip(&hello.volume_sizes_bytes).enumerate() {
        if here != there {
            return Err(format!(
                "volume {index} of {name} on {node} is {here} bytes but volume {index} of {} is {there} bytes; sizes must be equal",
                hello.source_group
            ));
        }
    }
    if status.log_sector_bytes != hello.log_sector_bytes {
        return Err(format!(
            "the log of {name} on {node} has {}-byte sectors but the source's has {}-byte sectors; put both logs on storage with the same sector size",
            status.log_sector_bytes, hello.log_sector_bytes
        ));
    }
    if status.connections > 0 {
        return Err(format!(
            "the volumes of {name} on {node} are in use by {} client connection(s); disconnect them first",
            status.connections
        ));
    }
    if hello.seeded {
        check_seeded(status, node)?;
    }
    Ok(())
}

/// A seeded destination holds data: a volume that is all holes cannot hold
/// an older copy (block devices are taken at their word).
fn check_seeded(status: &GroupStatus, node: &str) -> Result<(), String> {
    for (index, volume) in status.volumes.iter().enumerate() {
        let Ok(metadata) = std::fs::metadata(&volume.path) else { continue };
        if metadata.is_file() && std::os::unix::fs::MetadataExt::blocks(&metadata) == 0 {
            return Err(format!(
                "--seeded, but volume {index} of {} on {node} ({}) holds no data (all holes); restore the older copy there first, or drop --seeded to copy everything",
                status.name, volume.path
            ));
        }
    }
    Ok(())
}
