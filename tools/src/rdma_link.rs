//! Partnership data channels over RDMA (`--transport rdma|tcp|auto`).
//!
//! Channel 0 stays the TCP connection where the TLS handshake runs (it then
//! carries heartbeats and acknowledgements); data channels 1..=N are RC
//! queue pairs that rdma_cm connects to the destination's RDMA listener on
//! the replication address and port. A data channel's first message is its
//! Join handshake line (the same as on TCP, with its proof bound to channel
//! 0's TLS session); the answer comes back as a message. From then on it
//! carries sealed frames like a TCP channel, driven by the group's core.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::runtime::wire::Wire;
use tandem_proto::{TRANSPORT_RDMA, TRANSPORT_TCP};
use tandem_transport_rdma::wire::RdmaWire;
use tandem_transport_rdma::{ChannelConfig, LendRegion, RdmaChannel, RdmaListener};

use crate::channel_join::JoiningSessions;
use crate::daemon::Daemon;
use crate::replication::{Answer, Hello, HelloAction};

/// The superblock's code of a transport's name ("rdma"; anything else is TCP).
#[must_use]
pub fn transport_code(name: &str) -> u32 {
    if name == "rdma" {
        TRANSPORT_RDMA
    } else {
        TRANSPORT_TCP
    }
}

/// The channel sizes of this node's configuration (both nodes need the same)
/// and the region it lends large payloads from.
#[must_use]
pub fn channel_config(daemon: &Daemon) -> ChannelConfig {
    let r = &daemon.config.replication;
    let mut config = ChannelConfig {
        message_bytes: r.rdma_message_bytes,
        window: r.rdma_window,
        timeout: Duration::from_secs(10),
        lend: lending_region(r.rdma_zero_copy_threshold_bytes, r.rdma_arena_bytes),
    };
    // Every channel registers the arena again: a memory-lock limit that
    // holds the message buffers but not the arena turns zero copy off
    // rather than RDMA (payloads are copied, as below the threshold).
    if let Some(region) = config.lend {
        if let Err(reason) = tandem_transport_rdma::memlock::check(config.registered_bytes()) {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    %reason,
                    arena_bytes = region.bytes,
                    "RDMA zero copy is off: the memory-lock limit cannot hold the registered arena as well \
                     (each RDMA channel registers it); payloads are copied"
                );
            }
            config.lend = None;
        }
    }
    config
}

/// The registered arena, installed at the first RDMA channel of the process
/// (from then on, direct-IO buffers of 4 KiB and more come from it), as the
/// region the channels send from without copies; `None` when zero copy is
/// off or the arena could not be mapped (payloads are copied then, and the
/// log says why).
fn lending_region(threshold_bytes: usize, arena_bytes: usize) -> Option<LendRegion> {
    if threshold_bytes == 0 {
        return None;
    }
    static INSTALLED: std::sync::OnceLock<Result<(usize, usize), String>> = std::sync::OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        // Buffers from 4 KiB up come from the arena: those below the
        // threshold are sent by gathering them where they lie.
        let arena = tandem_engine::runtime::arena::install(arena_bytes, 4096)?;
        tracing::info!(arena_bytes, threshold_bytes, "RDMA zero copy: payloads of the threshold and more are lent");
        Ok(arena.region())
    });
    match installed {
        Ok((address, bytes)) => Some(LendRegion { address: *address, bytes: *bytes, threshold_bytes }),
        Err(reason) => {
            tracing::warn!(%reason, "RDMA zero copy is off: every payload is copied");
            None
        }
    }
}

/// Whether this side can use RDMA from `local`: the device, port and GID of
/// the path, or why not with the fix.
pub fn local_path(local: IpAddr) -> Result<String, String> {
    let path = tandem_transport_rdma::devices::path_for(local)?;
    Ok(format!("{} port {} gid {}", path.device, path.port, path.gid))
}

/// Whether this node can use RDMA from `local`; why not as this node's
/// operator reads it (the device, port or GID missing, and the fix).
pub fn path_from(local: IpAddr) -> Result<String, String> {
    local_path(local).map_err(|reason| format!("this node cannot use RDMA from {local}: {reason}"))
}

/// The transport a new partnership uses: `requested` (rdma, tcp or auto)
/// against this side's path from `local` and the destination's RDMA
/// listener (`destination_rdma`: ready, or why not).
pub fn choose(requested: &str, local: IpAddr, destination_rdma: Result<(), String>) -> Result<&'static str, String> {
    // TCP asks nothing of the RDMA devices (nor loads the verbs library).
    match requested {
        "tcp" => Ok("tcp"),
        "auto" => Ok(if destination_rdma.is_ok() && local_path(local).is_ok() { "rdma" } else { "tcp" }),
        "rdma" => {
            path_from(local).map_err(|reason| format!("--transport rdma: {reason}"))?;
            destination_rdma.map_err(|reason| format!("--transport rdma: the destination cannot: {reason}"))?;
            Ok("rdma")
        }
        other => Err(format!("--transport {other}: use rdma, tcp or auto")),
    }
}

/// Opens data channels 1..=`channels` over RDMA to the destination whose
/// control connection runs from `local` to `remote`, each joining with the
/// Join line `join(channel)`.
pub fn connect_channels(
    daemon: &Daemon,
    (local, remote): (IpAddr, SocketAddr),
    channels: u32,
    join: impl Fn(u32) -> Hello,
) -> Result<Vec<Wire>, String> {
    let config = channel_config(daemon);
    let mut wires = Vec::new();
    for channel in 1..=channels {
        let mut rdma = RdmaChannel::connect(remote, config)
            .map_err(|reason| format!("RDMA data channel {channel} to {remote}: {reason}"))?;
        let line = serde_json::to_vec(&join(channel)).map_err(|e| e.to_string())?;
        rdma.send(&line)?;
        let answer: Answer = serde_json::from_slice(&rdma.recv()?)
            .map_err(|e| format!("RDMA data channel {channel}: a malformed answer: {e}"))?;
        if !answer.ok {
            let reason = answer.error.unwrap_or_default();
            return Err(format!("RDMA data channel {channel} was refused: {reason}"));
        }
        wires.push(Wire::Message(Box::new(RdmaWire::new(rdma, local, remote.to_string()))));
    }
    Ok(wires)
}

/// How often a node without an RDMA listener looks for a device again.
const LISTENER_RETRY: Duration = Duration::from_secs(2);

/// Listens for RDMA data channels on the replication address whenever this
/// node has a path there, and records in `daemon.rdma` whether it does and
/// why not. A device removed (`rdma link delete`) ends the listener, whose
/// removal waits for that, and a device that comes back is listened on again.
pub fn start_listener(daemon: &Arc<Daemon>, sessions: &Arc<JoiningSessions>) {
    let first = bind_listener(daemon);
    let (daemon, sessions) = (Arc::clone(daemon), Arc::clone(sessions));
    let spawned = std::thread::Builder::new()
        .name("tandem-rdma-accept".into())
        .spawn(move || listen_loop(&daemon, &sessions, first));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the RDMA listener thread");
    }
}

/// A listener on the replication address, or none (the state says why).
fn bind_listener(daemon: &Daemon) -> Option<RdmaListener> {
    let address = daemon.config.node.replication_listen;
    let ready = if address.ip().is_unspecified() {
        tandem_transport_rdma::devices::list().map(|_| ())
    } else {
        local_path(address.ip()).map(|_| ())
    };
    let bound = ready.and_then(|()| RdmaListener::bind(address, channel_config(daemon)));
    match bound {
        Ok(listener) => {
            tracing::info!(%address, "listening for RDMA data channels");
            daemon.set_rdma_state(Ok(()));
            Some(listener)
        }
        Err(reason) => {
            // Logged once per reason: the retries every 2 s stay quiet.
            if daemon.rdma_state() != Err(reason.clone()) {
                tracing::info!(%address, %reason, "no RDMA listener: partnerships into this node use TCP");
            }
            daemon.set_rdma_state(Err(reason));
            None
        }
    }
}

fn listen_loop(daemon: &Arc<Daemon>, sessions: &Arc<JoiningSessions>, mut listener: Option<RdmaListener>) {
    loop {
        let Some(bound) = listener.as_mut() else {
            std::thread::sleep(LISTENER_RETRY);
            listener = bind_listener(daemon);
            continue;
        };
        match bound.accept() {
            Ok(channel) => {
                let (daemon, sessions) = (Arc::clone(daemon), Arc::clone(sessions));
                let spawned = std::thread::Builder::new().name("tandem-rdma-join".into()).spawn(move || {
                    if let Err(reason) = join(&daemon, &sessions, channel) {
                        tracing::warn!(%reason, "RDMA data channel refused");
                    }
                });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start an RDMA join thread");
                }
            }
            Err(reason) if bound.device_removed() => {
                tracing::warn!(%reason, "the RDMA listener closed: partnerships into this node use TCP until a device is back");
                daemon.set_rdma_state(Err(reason));
                listener = None;
            }
            Err(reason) => {
                tracing::warn!(%reason, "accepting an RDMA data channel failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A data channel's Join: checked against its session, answered, added.
fn join(daemon: &Daemon, sessions: &JoiningSessions, mut channel: RdmaChannel) -> Result<(), String> {
    let hello: Hello =
        serde_json::from_slice(&channel.recv()?).map_err(|e| format!("a malformed join over RDMA: {e}"))?;
    if matches!(hello.action, HelloAction::Probe) {
        // A source on its TCP fallback checks that RDMA reaches this node.
        let reply = Answer::join_outcome(&daemon.config.node.name, &Ok(()));
        return channel.send(&serde_json::to_vec(&reply).map_err(|e| e.to_string())?);
    }
    let group = hello.destination_group.clone();
    let proof = Some(hello.join_proof.as_str());
    let checked = if hello.channel == 0 {
        Err("channel 0 is the control connection; it does not join".to_owned())
    } else {
        sessions.check(&group, &hello.partnership_id, hello.session, hello.channel, proof)
    };
    let reply = Answer::join_outcome(&daemon.config.node.name, &checked);
    channel.send(&serde_json::to_vec(&reply).map_err(|e| e.to_string())?)?;
    checked?;
    let local = daemon.config.node.replication_listen.ip();
    let wire = Wire::Message(Box::new(RdmaWire::new(channel, local, format!("{} (source)", hello.source_node))));
    let joined = sessions.add(&group, &hello.partnership_id, hello.session, hello.channel, wire, proof)?;
    match joined {
        Some(channels) => daemon.attach_peer(&group, channels, None),
        None => Ok(()),
    }
}

/// The local address the kernel routes from towards `remote` (no packet
/// is sent: a UDP socket is only connected).
pub(crate) fn local_address_towards(remote: SocketAddr) -> Result<SocketAddr, String> {
    let unspecified: SocketAddr =
        if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(unspecified).map_err(|e| e.to_string())?;
    socket.connect(remote).map_err(|e| format!("no route to {remote}: {e}"))?;
    socket.local_addr().map_err(|e| e.to_string())
}
