//! Partnerships on the control plane: the handshake between two daemons (JSON
//! lines on the replication connection before it turns into binary frames),
//! creation from the source, reconnection with backoff, and removal.
//!
//! The handshake is read byte by byte: right after it, the same socket carries
//! frames that belong to the core, and no buffered reader may swallow them.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_engine::core::CopyPosition;
use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::peer_session::MAX_CHANNELS;
use tandem_engine::runtime::status::GroupStatus;
use tandem_engine::runtime::SourceView;
use tandem_proto::{fixed_str, PartnershipEntry, MODE_ASYNC, MODE_SYNC, WIRE_VERSION};

use tandem_crypto::Side;
use tandem_engine::runtime::peer_conn::PeerChannel;
use tandem_engine::runtime::wire::Wire;

use crate::daemon::Daemon;
use crate::rdma_fallback::{self, ResumeFailure};
use crate::secure_channel::{self, ControlStream};

pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HANDSHAKE_LINE_BYTES: usize = 16 * 1024;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

mod handshake;
pub(crate) use handshake::{hex, read_line, write_line};
pub use handshake::{Answer, Hello, HelloAction};

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
    /// aes-128-gcm, sign or none.
    pub encryption: String,
    /// The node the destination's certificate must name (with TLS; `None`:
    /// any node of the CA, whose name is then kept).
    pub destination_node: Option<String>,
    /// The data channels' transport: rdma, tcp or auto (create only).
    pub transport: String,
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
            encryption: partnership.encryption.clone(),
            destination_node: Some(partnership.peer_node.clone()),
            transport: if partnership.transport.is_empty() { "tcp".to_owned() } else { partnership.transport.clone() },
        }
    }
}

/// Resolves `HOST[:PORT]` with the default replication port.
pub(crate) fn resolve(destination: &str) -> Result<std::net::SocketAddr, String> {
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
pub fn exchange_with(stream: &mut (impl Read + Write), hello: &Hello) -> Result<Answer, String> {
    exchange(stream, hello)
}

/// Opens the control connection of `request`'s partnership (TLS when this
/// node has `[tls]`).
pub(crate) fn open_control(daemon: &Daemon, request: &CreateRequest) -> Result<ControlStream, String> {
    let stream = connect(&request.destination, &request.source_network)?;
    secure_channel::client(daemon, stream, request.destination_node.as_deref())
        .map_err(|e| format!("cannot authenticate the destination at {}: {e}", request.destination))
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
        recovered_lsn: status.partnership.as_ref().and_then(|p| p.recovered_lsn),
        session: 0,
        channel: 0,
        measure_devices: false,
        socket_buffer_bytes: 0,
        seeded: request.seeded,
        destination_network: request.destination_network.clone(),
        encryption: request.encryption.clone(),
        join_proof: String::new(),
        replication_port: daemon.config.node.replication_listen.port(),
        transport: request.transport.clone(),
    }
}

fn exchange(stream: &mut (impl Read + Write), hello: &Hello) -> Result<Answer, String> {
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
    let encryption = secure_channel::encryption_code(&request.encryption).map_err(|e| format!("--{e}"))?;
    if encryption != tandem_proto::ENCRYPTION_NONE && daemon.tls.is_none() {
        return Err(format!(
            "--encryption {} needs TLS, but {} has no [tls] section: create certificates with `tandem cert init-ca` and `tandem cert issue`, or use --encryption none on a trusted network",
            request.encryption, daemon.config.node.name
        ));
    }
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
    let hello = hello_for(daemon, &status, request, HelloAction::Check, &id_hex);
    // A refusal (by either side: authentication, policy, sizes) is an event
    // on this node too.
    let (mut stream, checked) = open_control(daemon, request)
        .and_then(|mut stream| {
            let checked = exchange(&mut stream, &hello)?;
            secure_channel::check_answering_node(&stream, &checked.destination_node)?;
            Ok((stream, checked))
        })
        .inspect_err(|reason| {
            let refused = EventKind::PartnershipRefused { reason: reason.clone() };
            daemon.events.record(&request.source_group, refused);
        })?;
    let local = stream.tcp().local_addr().map_err(|e| e.to_string())?.ip();
    let destination_rdma = checked.rdma_unavailable.clone().map_or(Ok(()), Err);
    let transport = crate::rdma_link::choose(&request.transport, local, destination_rdma).inspect_err(|reason| {
        let refused = EventKind::PartnershipRefused { reason: reason.clone() };
        daemon.events.record(&request.source_group, refused);
    })?;
    let mut entry = PartnershipEntry::default_zeroed();
    entry.id = id;
    entry.mode = mode;
    entry.channels = request.channels;
    entry.peer_node = fixed_str(&checked.destination_node).unwrap_or([0; 64]);
    entry.peer_group = fixed_str(&request.destination_group).ok_or("destination group name too long")?;
    entry.peer_address = fixed_str(&request.destination).ok_or("destination address longer than 127 bytes")?;
    let baseline_lsn = daemon.become_source(&request.source_group, entry)?;
    let transport_code = crate::rdma_link::transport_code(transport);
    if let Err(reason) =
        daemon.set_channel_policy(&request.source_group, &request.source_network, encryption, transport_code)
    {
        let _ = daemon.leave_partnership(&request.source_group);
        return Err(reason);
    }
    let mut commit = hello;
    commit.action = HelloAction::Create;
    commit.baseline_lsn = baseline_lsn;
    transport.clone_into(&mut commit.transport);
    let answer = match exchange(&mut stream, &commit) {
        Ok(answer) => answer,
        Err(reason) => {
            let _ = daemon.leave_partnership(&request.source_group);
            return Err(format!("the destination refused the partnership: {reason}"));
        }
    };
    let channels = match join_channels(
        daemon,
        stream,
        (&request.destination, &request.source_network),
        &commit,
        answer.session,
    ) {
        Ok(channels) => channels,
        Err(reason) => {
            // The destination keeps the partnership; the connector resumes it.
            daemon.note_peer_error(&request.source_group, reason.clone());
            return Err(format!("the partnership was created but its data channels could not connect ({reason}); it reconnects by itself"));
        }
    };
    daemon.attach_peer(
        &request.source_group,
        channels,
        Some(SourceView {
            durable_lsn: answer.durable_lsn,
            next_lsn: answer.next_lsn,
            copy: copy_position(answer.copy_at),
            diverged: None,
        }),
    )?;
    let peer = format!("{}/{}", checked.destination_node, request.destination_group);
    daemon.events.record(&request.source_group, EventKind::PartnershipCreated { peer, mode: request.mode.clone() });
    Ok(format!(
        "partnership {} created: {}/{} -> {}/{} ({}, {} {transport} channel(s)); initial sync started: {}",
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

/// Reconnects a source group to its destination (one attempt). A
/// partnership over RDMA whose RDMA path is gone resumes over TCP when
/// `replication.rdma_fallback = "tcp"` (see rdma_fallback.rs).
fn resume(daemon: &Daemon, status: &GroupStatus) -> Result<(), String> {
    let partnership = status.partnership.as_ref().ok_or("no partnership")?;
    let request = CreateRequest::existing(&status.name, partnership);
    match resume_over(daemon, status, &request) {
        Ok(()) => {
            rdma_fallback::restored(daemon, &status.name);
            Ok(())
        }
        Err(ResumeFailure::Rdma(reason)) if rdma_fallback::may_fall_back(daemon, &request) => {
            let tcp = CreateRequest { transport: "tcp".to_owned(), ..request };
            resume_over(daemon, status, &tcp)
                .map_err(|failure| format!("{reason}; and over TCP: {}", failure.into_reason()))?;
            rdma_fallback::fell_back(daemon, &status.name, reason);
            Ok(())
        }
        Err(failure) => Err(failure.into_reason()),
    }
}

/// One resume over `request.transport`; what failed in its RDMA part is
/// told apart (no path from this node, none into the destination, a queue
/// pair that did not connect).
fn resume_over(daemon: &Daemon, status: &GroupStatus, request: &CreateRequest) -> Result<(), ResumeFailure> {
    let partnership = status.partnership.as_ref().ok_or("no partnership".to_owned())?;
    let over_rdma = request.transport == "rdma";
    if over_rdma {
        // Checked before connecting: the destination is not asked for a
        // session this node cannot open.
        let local = crate::rdma_link::local_address_towards(resolve(&request.destination)?)?.ip();
        crate::rdma_link::path_from(local).map_err(ResumeFailure::Rdma)?;
    }
    let mut stream = open_control(daemon, request)?;
    let hello = hello_for(daemon, status, request, HelloAction::Resume, &partnership.id);
    write_line(&mut stream, &hello)?;
    let answer: Answer = read_line(&mut stream)?;
    if !answer.ok {
        let reason = answer.error.unwrap_or_else(|| "the destination refused without a reason".to_owned());
        if let Some(after_lsn) = answer.promoted_after_lsn {
            crate::failback::fence(daemon, status, after_lsn, &answer.promoted_generation)?;
        }
        return Err(match answer.rdma_unavailable {
            Some(_) if over_rdma => ResumeFailure::Rdma(reason),
            _ => ResumeFailure::Other(reason),
        });
    }
    let channels =
        join_channels(daemon, stream, (&request.destination, &request.source_network), &hello, answer.session)
            .map_err(|reason| if over_rdma { ResumeFailure::Rdma(reason) } else { ResumeFailure::Other(reason) })?;
    daemon.attach_peer(
        &status.name,
        channels,
        Some(SourceView {
            durable_lsn: answer.durable_lsn,
            next_lsn: answer.next_lsn,
            copy: copy_position(answer.copy_at),
            diverged: hello.recovered_lsn.zip(answer.held_after),
        }),
    )?;
    Ok(())
}

pub(crate) fn check_channels(channels: u32) -> Result<(), String> {
    if (1..=MAX_CHANNELS as u32).contains(&channels) {
        Ok(())
    } else {
        Err(format!("--channels {channels}: a partnership has 1 to {MAX_CHANNELS} data channels (2 by default)"))
    }
}

/// Opens the other data channels of the session that `first` (channel 0)
/// opened with `hello`; all of them, in channel order and sealed with the
/// session's keys, ready for the core.
fn join_channels(
    daemon: &Daemon,
    first: ControlStream,
    (address, network): (&str, &str),
    hello: &Hello,
    session: u64,
) -> Result<Vec<PeerChannel>, String> {
    let count = session_channel_count(hello);
    let keys = first.session_keys(&hello.encryption, count)?;
    let join = |channel| {
        let join_proof = keys.as_ref().map(|k| k.join_proof(session, channel)).unwrap_or_default();
        Hello { action: HelloAction::Join, session, channel, join_proof, ..hello.clone() }
    };
    let tcp = first.into_tcp();
    let mut wires = Vec::with_capacity(count as usize);
    if hello.transport == "rdma" {
        let ends = (tcp.local_addr().map_err(|e| e.to_string())?.ip(), tcp.peer_addr().map_err(|e| e.to_string())?);
        wires.push(Wire::Tcp(tcp));
        wires.extend(crate::rdma_link::connect_channels(daemon, ends, hello.channels, join)?);
    } else {
        wires.push(Wire::Tcp(tcp));
        for channel in 1..count {
            let mut stream = connect(address, network)?;
            exchange(&mut stream, &join(channel))
                .map_err(|reason| format!("data channel {channel} was refused: {reason}"))?;
            wires.push(Wire::Tcp(stream));
        }
    }
    Ok(secure_channel::sealed_channels(wires, keys.as_ref(), Side::Source))
}

/// Connections of a session: the partnership's channels, and over RDMA the
/// TCP control channel 0 before them.
pub(crate) fn session_channel_count(hello: &Hello) -> u32 {
    hello.channels + u32::from(hello.transport == "rdma")
}

/// Keeps every source group connected: tries again with a growing backoff.
pub fn run_connector(daemon: Arc<Daemon>) {
    let mut next_attempt: std::collections::HashMap<String, (Instant, Duration)> = std::collections::HashMap::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        for status in daemon.status() {
            let Some(partnership) = status.partnership.as_ref() else { continue };
            let fenced = status.fenced_after_lsn.is_some();
            if status.role != "source" || partnership.connected || fenced || daemon.is_changing(&status.name) {
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
        remote = match open_control(daemon, &request).and_then(|mut s| exchange(&mut s, &hello)) {
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
