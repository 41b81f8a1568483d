//! Partnerships on the control plane: the handshake between two daemons (JSON
//! lines on the replication connection before it turns into binary frames),
//! creation from the source, reconnection with backoff, and removal.
//!
//! The handshake is read byte by byte: right after it, the same socket carries
//! frames that belong to the core, and no buffered reader may swallow them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_engine::core::CopyPosition;
use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::peer_session::MAX_CHANNELS;
use tandem_engine::runtime::status::GroupStatus;
use tandem_proto::{fixed_str, PartnershipEntry, MODE_ASYNC, MODE_SYNC, WIRE_VERSION};

use crate::channel_join::JoiningSessions;
use crate::daemon::Daemon;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HANDSHAKE_LINE_BYTES: usize = 16 * 1024;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the source asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelloAction {
    /// Validate a new partnership (nothing changes yet).
    Check,
    /// Commit it: become the destination, continuing after `baseline_lsn`.
    Create,
    /// Reconnect an existing partnership.
    Resume,
    /// End the partnership on the destination.
    Remove,
    /// Add data channel `channel` to the session a Create or Resume opened.
    Join,
    /// Measure the path and ask about `destination_group` (see probe.rs).
    Probe,
    /// The partnership's mode changed on the source: take `mode`.
    SetMode,
}

/// The source's handshake line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub wire_version: u8,
    pub action: HelloAction,
    pub partnership_id: String,
    pub source_node: String,
    pub source_group: String,
    pub destination_group: String,
    pub mode: String,
    pub channels: u32,
    pub volume_sizes_bytes: Vec<u64>,
    pub log_sector_bytes: u32,
    pub baseline_lsn: u64,
    /// Join: the session the destination named in its answer, and the
    /// channel (1..channels) this connection becomes.
    #[serde(default)]
    pub session: u64,
    #[serde(default)]
    pub channel: u32,
    /// Probe: measure the group's devices too (about a second).
    #[serde(default)]
    pub measure_devices: bool,
    /// Check and Create: the destination already holds an older copy of the
    /// source (its volumes must hold data).
    #[serde(default)]
    pub seeded: bool,
    /// Check and Create: the interface or address the destination's side of
    /// the partnership must use (empty: any).
    #[serde(default)]
    pub destination_network: String,
    /// Probe: the socket buffer size the daemon sets on its end (0: default).
    #[serde(default)]
    pub socket_buffer_bytes: u32,
}

impl Hello {
    /// A probe's handshake, asking about `group` when one is named.
    #[must_use]
    pub fn probe(group: Option<&str>, measure_devices: bool, socket_buffer_bytes: u32) -> Self {
        Self {
            wire_version: WIRE_VERSION,
            action: HelloAction::Probe,
            partnership_id: String::new(),
            source_node: String::new(),
            source_group: String::new(),
            destination_group: group.unwrap_or_default().to_owned(),
            mode: String::new(),
            channels: 0,
            volume_sizes_bytes: Vec::new(),
            log_sector_bytes: 0,
            baseline_lsn: 0,
            session: 0,
            channel: 0,
            measure_devices,
            socket_buffer_bytes,
            seeded: false,
            destination_network: String::new(),
        }
    }
}

/// The destination's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub error: Option<String>,
    pub destination_node: String,
    pub durable_lsn: u64,
    /// The LSN the destination takes next.
    pub next_lsn: u64,
    /// `None` when the initial copy is complete.
    pub copy_at: Option<(u8, u64)>,
    /// Create and Resume with several channels: the session the other
    /// channels join.
    #[serde(default)]
    pub session: u64,
    /// Probe: what the daemon says about the group the probe named.
    #[serde(default)]
    pub probe: Option<crate::probe::ProbeFacts>,
}

pub(crate) fn write_line<T: Serialize>(stream: &mut TcpStream, value: &T) -> Result<(), String> {
    let mut text = serde_json::to_string(value).expect("handshake serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(|e| format!("sending the handshake failed: {e}"))
}

fn read_line<T: for<'a> Deserialize<'a>>(stream: &mut TcpStream) -> Result<T, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err("the peer closed the connection during the handshake".to_owned()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_HANDSHAKE_LINE_BYTES => {
                return Err("handshake line longer than 16 KiB".to_owned())
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("reading the handshake failed: {e}")),
        }
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed handshake: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn copy_position(copy_at: Option<(u8, u64)>) -> CopyPosition {
    copy_at.map_or(CopyPosition::Done, |(volume_index, offset)| CopyPosition::At { volume_index, offset })
}

/// What `tandem partnership create` asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub source_group: String,
    pub destination: String,
    pub destination_group: String,
    pub mode: String,
    pub channels: u32,
    /// The destination already holds an older copy (see `Hello::seeded`).
    pub seeded: bool,
    /// Network constraints: the interface or local address replication uses
    /// on this node and on the destination (empty: any).
    pub source_network: String,
    pub destination_network: String,
}

impl CreateRequest {
    /// The request that names the existing partnership of source group
    /// `group` (for resume, removal and mode changes).
    #[must_use]
    pub fn existing(group: &str, partnership: &tandem_engine::runtime::status::PartnershipStatus) -> Self {
        Self {
            source_group: group.to_owned(),
            destination: partnership.peer_address.clone(),
            destination_group: partnership.peer_group.clone(),
            mode: partnership.mode.clone(),
            channels: partnership.channels,
            seeded: false,
            source_network: partnership.network.clone(),
            destination_network: String::new(),
        }
    }
}

/// Resolves `HOST[:PORT]` with the default replication port.
fn resolve(destination: &str) -> Result<std::net::SocketAddr, String> {
    let with_port = if destination.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        destination.to_owned()
    } else {
        format!("{destination}:5445")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve destination {destination}: {e}"))?
        .next()
        .ok_or_else(|| format!("destination {destination} resolves to no address"))
}

/// Connects to a daemon's replication listener at `address` (`HOST[:PORT]`),
/// with the handshake's timeouts.
pub fn connect_replication(address: &str) -> Result<TcpStream, String> {
    connect(address, "")
}

/// Sends a handshake line and reads the answer; a refusal is an error.
pub fn exchange_with(stream: &mut TcpStream, hello: &Hello) -> Result<Answer, String> {
    exchange(stream, hello)
}

/// Connects to `address` through the network constraint `network` (an
/// interface or local address; empty: any).
pub(crate) fn connect(address: &str, network: &str) -> Result<TcpStream, String> {
    let addr = resolve(address)?;
    let through = if network.is_empty() { String::new() } else { format!(" through {network}") };
    let stream = crate::network::connect(addr, network, CONNECT_TIMEOUT).map_err(|e| {
        format!("cannot connect to the destination's replication listener at {addr}{through}: {e} (is tandemd running there, with replication_listen on that address?)")
    })?;
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    Ok(stream)
}

pub(crate) fn hello_for(
    daemon: &Daemon,
    status: &GroupStatus,
    request: &CreateRequest,
    action: HelloAction,
    id: &str,
) -> Hello {
    Hello {
        wire_version: WIRE_VERSION,
        action,
        partnership_id: id.to_owned(),
        source_node: daemon.config.node.name.clone(),
        source_group: request.source_group.clone(),
        destination_group: request.destination_group.clone(),
        mode: request.mode.clone(),
        channels: request.channels,
        volume_sizes_bytes: status.volumes.iter().map(|v| v.size_bytes).collect(),
        log_sector_bytes: status.log_sector_bytes,
        baseline_lsn: 0,
        session: 0,
        channel: 0,
        measure_devices: false,
        socket_buffer_bytes: 0,
        seeded: request.seeded,
        destination_network: request.destination_network.clone(),
    }
}

fn exchange(stream: &mut TcpStream, hello: &Hello) -> Result<Answer, String> {
    write_line(stream, hello)?;
    let answer: Answer = read_line(stream)?;
    if answer.ok {
        Ok(answer)
    } else {
        Err(answer.error.unwrap_or_else(|| "the destination refused without a reason".to_owned()))
    }
}

/// Creates a partnership from this (source) node.
pub fn create(daemon: &Daemon, request: &CreateRequest) -> Result<String, String> {
    let mode = match request.mode.as_str() {
        "sync" => MODE_SYNC,
        "async" => MODE_ASYNC,
        other => return Err(format!("--mode {other}: use sync or async")),
    };
    check_channels(request.channels)?;
    let status = daemon.group_status(&request.source_group)?;
    if status.role != "standalone" {
        return Err(format!("group {} is already in a partnership ({})", request.source_group, status.role));
    }
    if !request.source_network.is_empty() {
        crate::network::local_addresses(&request.source_network)
            .map_err(|e| format!("--source-network {}: {e}", request.source_network))?;
    }
    let id: [u8; 16] = rand::random();
    let id_hex = hex(&id);
    let mut stream = connect(&request.destination, &request.source_network)?;
    let hello = hello_for(daemon, &status, request, HelloAction::Check, &id_hex);
    let checked = exchange(&mut stream, &hello)?;
    let mut entry = PartnershipEntry::default_zeroed();
    entry.id = id;
    entry.mode = mode;
    entry.channels = request.channels;
    entry.peer_node = fixed_str(&checked.destination_node).unwrap_or([0; 64]);
    entry.peer_group = fixed_str(&request.destination_group).ok_or("destination group name too long")?;
    entry.peer_address = fixed_str(&request.destination).ok_or("destination address longer than 127 bytes")?;
    let baseline_lsn = daemon.become_source(&request.source_group, entry)?;
    if let Err(reason) = daemon.set_network(&request.source_group, &request.source_network) {
        let _ = daemon.leave_partnership(&request.source_group);
        return Err(reason);
    }
    let mut commit = hello;
    commit.action = HelloAction::Create;
    commit.baseline_lsn = baseline_lsn;
    let answer = match exchange(&mut stream, &commit) {
        Ok(answer) => answer,
        Err(reason) => {
            let _ = daemon.leave_partnership(&request.source_group);
            return Err(format!("the destination refused the partnership: {reason}"));
        }
    };
    let streams = match join_channels(stream, &request.destination, &request.source_network, &commit, answer.session) {
        Ok(streams) => streams,
        Err(reason) => {
            // The destination keeps the partnership; the connector resumes it.
            daemon.note_peer_error(&request.source_group, reason.clone());
            return Err(format!("the partnership was created but its data channels could not connect ({reason}); it reconnects by itself"));
        }
    };
    daemon.attach_peer(
        &request.source_group,
        streams,
        Some((answer.durable_lsn, answer.next_lsn, copy_position(answer.copy_at))),
    )?;
    let peer = format!("{}/{}", checked.destination_node, request.destination_group);
    daemon.events.record(&request.source_group, EventKind::PartnershipCreated { peer, mode: request.mode.clone() });
    Ok(format!(
        "partnership {} created: {}/{} -> {}/{} ({}, {} channel(s)); initial sync started: {}",
        &id_hex[..8],
        daemon.config.node.name,
        request.source_group,
        checked.destination_node,
        request.destination_group,
        request.mode,
        request.channels,
        if request.seeded {
            "the seeded destination is compared block by block and only differences are sent"
        } else {
            "the destination is compared block by block (what it already holds is not sent again)"
        }
    ))
}

/// Reconnects a source group to its destination (one attempt).
fn resume(daemon: &Daemon, status: &GroupStatus) -> Result<(), String> {
    let partnership = status.partnership.as_ref().ok_or("no partnership")?;
    let request = CreateRequest::existing(&status.name, partnership);
    let mut stream = connect(&request.destination, &request.source_network)?;
    let hello = hello_for(daemon, status, &request, HelloAction::Resume, &partnership.id);
    let answer = exchange(&mut stream, &hello)?;
    let streams = join_channels(stream, &request.destination, &request.source_network, &hello, answer.session)?;
    daemon.attach_peer(
        &status.name,
        streams,
        Some((answer.durable_lsn, answer.next_lsn, copy_position(answer.copy_at))),
    )
}

fn check_channels(channels: u32) -> Result<(), String> {
    if (1..=MAX_CHANNELS as u32).contains(&channels) {
        Ok(())
    } else {
        Err(format!("--channels {channels}: a partnership has 1 to {MAX_CHANNELS} data channels (2 by default)"))
    }
}

/// Opens the other data channels of the session that `first` (channel 0)
/// opened with `hello`; all of them, in channel order, ready for the core.
fn join_channels(
    first: TcpStream,
    address: &str,
    network: &str,
    hello: &Hello,
    session: u64,
) -> Result<Vec<TcpStream>, String> {
    let mut streams = vec![first];
    for channel in 1..hello.channels {
        let mut stream = connect(address, network)?;
        let join = Hello { action: HelloAction::Join, session, channel, ..hello.clone() };
        exchange(&mut stream, &join).map_err(|reason| format!("data channel {channel} was refused: {reason}"))?;
        streams.push(stream);
    }
    end_handshake(&streams);
    Ok(streams)
}

/// The handshake's timeouts end where the core's heartbeats take over.
fn end_handshake(streams: &[TcpStream]) {
    for stream in streams {
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
    }
}

/// Keeps every source group connected: tries again with a growing backoff.
pub fn run_connector(daemon: Arc<Daemon>) {
    let mut next_attempt: std::collections::HashMap<String, (Instant, Duration)> = std::collections::HashMap::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        for status in daemon.status() {
            let Some(partnership) = status.partnership.as_ref() else { continue };
            if status.role != "source" || partnership.connected || daemon.is_changing(&status.name) {
                next_attempt.remove(&status.name);
                continue;
            }
            let (at, backoff) = next_attempt.get(&status.name).copied().unwrap_or((Instant::now(), Duration::ZERO));
            if Instant::now() < at {
                continue;
            }
            match resume(&daemon, &status) {
                Ok(()) => {
                    tracing::info!(group = %status.name, "reconnected to the destination");
                    next_attempt.remove(&status.name);
                }
                Err(reason) => {
                    let backoff = (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
                    tracing::warn!(group = %status.name, %reason, retry_in_ms = backoff.as_millis() as u64, "cannot reach the destination");
                    daemon.note_peer_error(&status.name, reason);
                    next_attempt.insert(status.name.clone(), (Instant::now() + backoff, backoff));
                }
            }
        }
    }
}

/// Removes the partnership of `group` on this node, and on the destination
/// too when this is the source and the destination answers.
pub fn remove(daemon: &Daemon, group: &str) -> Result<String, String> {
    let status = daemon.group_status(group)?;
    let partnership = status.partnership.clone().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    let mut remote = String::new();
    if status.role == "source" {
        let request = CreateRequest::existing(group, &partnership);
        let hello = hello_for(daemon, &status, &request, HelloAction::Remove, &partnership.id);
        remote = match connect(&request.destination, &request.source_network).and_then(|mut s| exchange(&mut s, &hello))
        {
            Ok(_) => format!("; {}/{} is standalone again", partnership.peer_node, partnership.peer_group),
            Err(reason) => format!(
                "; the destination could not be told ({reason}): run `tandem partnership remove --group {}` on {}",
                partnership.peer_group, partnership.peer_node
            ),
        };
    }
    daemon.leave_partnership(group)?;
    let peer = format!("{}/{}", partnership.peer_node, partnership.peer_group);
    daemon.events.record(group, EventKind::PartnershipRemoved { peer });
    Ok(format!("partnership of {group} removed; {group} is standalone{remote}"))
}

/// Accepts replication connections; each handshake runs on its own thread.
pub fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let sessions = Arc::new(JoiningSessions::new(HANDSHAKE_TIMEOUT));
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

fn answer(daemon: &Daemon, sessions: &JoiningSessions, mut stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    loop {
        let hello: Hello = read_line(&mut stream)?;
        if matches!(hello.action, HelloAction::Join) {
            return join(daemon, sessions, stream, &hello);
        }
        if matches!(hello.action, HelloAction::Probe) {
            return crate::probe::answer(daemon, stream, &hello);
        }
        let local = stream.local_addr().ok().map(|a| a.ip());
        let result = destination_step(daemon, &hello, local);
        let mut reply = match &result {
            Ok(reply) => reply.clone(),
            Err(reason) => Answer { error: Some(reason.clone()), ..Answer::default() },
        };
        reply.destination_node.clone_from(&daemon.config.node.name);
        let opens_session = result.is_ok() && matches!(hello.action, HelloAction::Create | HelloAction::Resume);
        if opens_session {
            reply.session = sessions.open(&hello.destination_group, &hello.partnership_id, hello.channels);
        }
        write_line(&mut stream, &reply)?;
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
            (HelloAction::Remove | HelloAction::SetMode, None) => return Ok(()),
            (HelloAction::Create | HelloAction::Resume, None) => {
                let joined = sessions.add(&hello.destination_group, &hello.partnership_id, reply.session, 0, stream)?;
                return attach_joined(daemon, &hello.destination_group, joined);
            }
            (HelloAction::Join | HelloAction::Probe, None) => unreachable!("answered by join() and probe::answer()"),
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
            stream.try_clone().map_err(|e| format!("cannot keep data channel {} of {group}: {e}", hello.channel))
        })
        .and_then(|kept| sessions.add(group, &hello.partnership_id, hello.session, hello.channel, kept));
    let reply = Answer {
        ok: joined.is_ok(),
        error: joined.as_ref().err().cloned(),
        destination_node: daemon.config.node.name.clone(),
        ..Answer::default()
    };
    write_line(&mut stream, &reply)?;
    attach_joined(daemon, group, joined?)
}

/// Hands a session to the group's core once all its channels joined.
fn attach_joined(daemon: &Daemon, group: &str, joined: Option<Vec<TcpStream>>) -> Result<(), String> {
    let Some(streams) = joined else { return Ok(()) };
    end_handshake(&streams);
    daemon.attach_peer(group, streams, None)
}

/// Validates a handshake step on the destination and carries it out.
fn destination_step(daemon: &Daemon, hello: &Hello, local: Option<std::net::IpAddr>) -> Result<Answer, String> {
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
            check_new_destination(daemon, &status, hello)?;
            if !hello.destination_network.is_empty() {
                crate::network::local_addresses(&hello.destination_network).map_err(|e| {
                    format!("--destination-network {}: {e} (on {})", hello.destination_network, daemon.config.node.name)
                })?;
                crate::network::arrived_within(&hello.destination_network, local)?;
            }
            if matches!(hello.action, HelloAction::Check) {
                return Ok(Answer { ok: true, ..Answer::default() });
            }
            let mut entry = PartnershipEntry::default_zeroed();
            entry.id = parse_id(&hello.partnership_id)?;
            entry.mode = if hello.mode == "sync" { MODE_SYNC } else { MODE_ASYNC };
            entry.channels = hello.channels;
            entry.copy_state = tandem_proto::COPY_IN_PROGRESS;
            entry.peer_node = fixed_str(&hello.source_node).ok_or("source node name too long")?;
            entry.peer_group = fixed_str(&hello.source_group).ok_or("source group name too long")?;
            daemon.become_destination(name, entry, hello.baseline_lsn)?;
            daemon.set_network(name, &hello.destination_network)?;
            let source = format!("{}/{}", hello.source_node, hello.source_group);
            daemon.events.record(name, EventKind::DestinationAttached { source });
            Ok(ok(hello.baseline_lsn, hello.baseline_lsn + 1, CopyPosition::At { volume_index: 0, offset: 0 }))
        }
        HelloAction::Join => Err("a data channel joins only a session that Create or Resume opened".to_owned()),
        HelloAction::Probe => Err("a probe is answered by probe::answer()".to_owned()),
        HelloAction::Resume | HelloAction::Remove | HelloAction::SetMode => {
            let state = daemon.destination_state(name)?.ok_or_else(|| {
                format!("group {name} on {} is not a replication destination; remove the partnership on the source and create it again", daemon.config.node.name)
            })?;
            if hex(&state.partnership_id) != hello.partnership_id {
                return Err(format!("group {name} is the destination of another partnership"));
            }
            let network = status.partnership.as_ref().map(|p| p.network.clone()).unwrap_or_default();
            crate::network::arrived_within(&network, local)?;
            if matches!(hello.action, HelloAction::SetMode) {
                crate::partnership_set::take_mode(daemon, name, &hello.mode)?;
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
            Ok(ok(state.durable_lsn, state.next_lsn, state.copy))
        }
    }
}

fn parse_id(text: &str) -> Result<[u8; 16], String> {
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
