//! The transport probe: a connection to a daemon's replication listener that
//! measures the path between two nodes (round trip and bandwidth) and asks
//! the far daemon about one of its groups. `tandem bench --transport`,
//! `tandem topology test` and `tandem tune` use it.
//!
//! After the JSON handshake (action `probe`) the connection carries probe
//! frames: a 16-byte header (operation, payload length, request id) and the
//! payload. The daemon answers `echo` with the same frame (ping-pong: the
//! payload crosses the path twice) and `sink` with the header alone (stream:
//! the payload crosses once, the small answer keeps a window of requests in
//! flight). One thread reads requests and another writes answers, so a
//! client with many large requests in flight never deadlocks against full
//! socket buffers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_proto::WIRE_VERSION;

use crate::replication::Hello;

/// Largest payload of one probe frame.
pub const MAX_PROBE_PAYLOAD_BYTES: u32 = 16 << 20;
const HEADER_BYTES: usize = 16;
const OP_ECHO: u8 = 1;
const OP_SINK: u8 = 2;

/// What a probe frame asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOp {
    /// The payload comes back (ping-pong).
    Echo,
    /// The payload is consumed; only the header comes back (stream).
    Sink,
}

/// What the daemon tells a probe about one of its groups.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupFacts {
    pub name: String,
    pub state: String,
    pub role: String,
    pub volume_sizes_bytes: Vec<u64>,
    /// Bytes the volumes hold (holes of thin volumes not counted).
    pub volume_allocated_bytes: u64,
    pub log_sector_bytes: u32,
    pub connections: usize,
    pub devices: crate::device_facts::GroupDevices,
}

/// The probe part of the daemon's handshake answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeFacts {
    /// `None` when the probe named no group.
    pub group: Option<GroupFacts>,
    /// Set when the named group does not exist.
    pub group_error: Option<String>,
}

fn encode_header(op: ProbeOp, payload_bytes: u32, id: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0] = match op {
        ProbeOp::Echo => OP_ECHO,
        ProbeOp::Sink => OP_SINK,
    };
    header[4..8].copy_from_slice(&payload_bytes.to_le_bytes());
    header[8..16].copy_from_slice(&id.to_le_bytes());
    header
}

fn decode_header(header: &[u8; HEADER_BYTES]) -> Result<(ProbeOp, u32, u64), String> {
    let op = match header[0] {
        OP_ECHO => ProbeOp::Echo,
        OP_SINK => ProbeOp::Sink,
        other => return Err(format!("unknown probe operation {other}")),
    };
    let payload_bytes = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if payload_bytes > MAX_PROBE_PAYLOAD_BYTES {
        return Err(format!("probe payload of {payload_bytes} bytes exceeds {MAX_PROBE_PAYLOAD_BYTES}"));
    }
    Ok((op, payload_bytes, u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"))))
}

/// The node configuration whose `[tls]` authenticates this process's
/// probes (set once by the CLI; read at the first probe).
static NODE_CONFIG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
static CLIENT_TLS: std::sync::OnceLock<Result<Option<tandem_crypto::NodeTls>, String>> = std::sync::OnceLock::new();

/// Names the configuration whose `[tls]` probes use (a missing file means none).
pub fn set_node_config(path: &std::path::Path) {
    let _ = NODE_CONFIG.set(path.to_owned());
}

fn client_tls() -> Result<Option<&'static tandem_crypto::NodeTls>, String> {
    let loaded = CLIENT_TLS.get_or_init(|| {
        let Some(path) = NODE_CONFIG.get().filter(|p| p.exists()) else { return Ok(None) };
        let config = crate::config::Config::load(path)?;
        let Some(tls) = config.tls else { return Ok(None) };
        let identity = tandem_crypto::identity::load_identity(&tls.ca, &tls.cert, &tls.key)
            .map_err(|e| format!("{} [tls]: {e} (probes authenticate as this node)", path.display()))?;
        tandem_crypto::NodeTls::new(identity).map(Some)
    });
    loaded.as_ref().map(Option::as_ref).map_err(Clone::clone)
}

/// A probe: the facts it asked for, then echo and sink frames until it
/// leaves. Over TLS the facts travel inside it; the frames follow in clear
/// (they are generated filler, and the prober is authenticated).
pub fn answer(
    daemon: &crate::daemon::Daemon,
    mut control: crate::secure_channel::ControlStream,
    hello: &Hello,
) -> Result<(), String> {
    let mut reply = crate::replication::Answer {
        destination_node: daemon.config.node.name.clone(),
        ..crate::replication::Answer::default()
    };
    if hello.wire_version == WIRE_VERSION {
        reply.ok = true;
        reply.probe = Some(probe_facts(daemon, hello));
    } else {
        reply.error = Some(format!(
            "the prober speaks replication protocol {} and this node {WIRE_VERSION}; run the same Tandem version on both",
            hello.wire_version
        ));
    }
    crate::replication::write_line(&mut control, &reply)?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_default());
    }
    let stream = control.into_tcp();
    let _ = stream.set_nodelay(true);
    if hello.socket_buffer_bytes > 0 {
        tandem_engine::runtime::net::set_socket_buffers(&stream, hello.socket_buffer_bytes);
    }
    serve(stream)
}

fn probe_facts(daemon: &crate::daemon::Daemon, hello: &Hello) -> ProbeFacts {
    let name = &hello.destination_group;
    if name.is_empty() {
        return ProbeFacts::default();
    }
    match daemon.group_status(name) {
        Ok(status) => {
            let volumes: Vec<std::path::PathBuf> = status.volumes.iter().map(|v| v.path.clone().into()).collect();
            let devices = crate::device_facts::group_devices(status.log_path.as_ref(), &volumes, hello.measure_devices);
            let facts = GroupFacts {
                name: name.clone(),
                state: status.state.clone(),
                role: status.role.clone(),
                volume_sizes_bytes: status.volumes.iter().map(|v| v.size_bytes).collect(),
                volume_allocated_bytes: devices.volumes.iter().map(|v| v.allocated_bytes).sum(),
                log_sector_bytes: status.log_sector_bytes,
                connections: status.connections,
                devices,
            };
            ProbeFacts { group: Some(facts), group_error: None }
        }
        Err(_) => ProbeFacts {
            group: None,
            group_error: Some(format!("group {name} does not exist on {}", daemon.config.node.name)),
        },
    }
}

/// Answers probe frames on `stream` until the client goes away.
pub fn serve(stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut reader = stream.try_clone().map_err(|e| format!("cannot split the probe connection: {e}"))?;
    let (answers, to_write) = crossbeam_channel::unbounded::<Vec<u8>>();
    let writer = std::thread::Builder::new()
        .name("tandem-probe-tx".into())
        .spawn(move || {
            let mut stream = stream;
            for answer in to_write {
                if stream.write_all(&answer).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the probe writer: {e}"))?;
    let result = loop {
        let mut header = [0u8; HEADER_BYTES];
        if reader.read_exact(&mut header).is_err() {
            break Ok(());
        }
        let (op, payload_bytes, id) = match decode_header(&header) {
            Ok(decoded) => decoded,
            Err(reason) => break Err(reason),
        };
        let mut answer = Vec::with_capacity(HEADER_BYTES + payload_bytes as usize);
        let answered_bytes = if op == ProbeOp::Echo { payload_bytes } else { 0 };
        answer.extend_from_slice(&encode_header(op, answered_bytes, id));
        answer.resize(HEADER_BYTES + payload_bytes as usize, 0);
        if reader.read_exact(&mut answer[HEADER_BYTES..]).is_err() {
            break Ok(());
        }
        answer.truncate(HEADER_BYTES + answered_bytes as usize);
        if answers.send(answer).is_err() {
            break Ok(());
        }
    };
    drop(answers);
    let _ = writer.join();
    result
}

/// The client end of a probe connection.
pub struct ProbeClient {
    stream: TcpStream,
    frame: Vec<u8>,
    scratch: Vec<u8>,
}

impl ProbeClient {
    /// Connects to the replication listener at `address` (`HOST[:PORT]`),
    /// asking about `group` (and measuring its devices when `measure_devices`).
    pub fn connect(
        address: &str,
        group: Option<&str>,
        measure_devices: bool,
        socket_buffer_bytes: u32,
    ) -> Result<(Self, crate::replication::Answer), String> {
        let stream = crate::replication::connect_replication(address)?;
        let mut control = match client_tls()? {
            Some(tls) => crate::secure_channel::ControlStream::Tls(Box::new(
                tls.connect(stream, None).map_err(|e| format!("cannot authenticate {address}: {e}"))?,
            )),
            None => crate::secure_channel::ControlStream::Plain(stream),
        };
        let hello = crate::replication::Hello::probe(group, measure_devices, socket_buffer_bytes);
        let answer = crate::replication::exchange_with(&mut control, &hello)?;
        let stream = control.into_tcp();
        let _ = stream.set_nodelay(true);
        if socket_buffer_bytes > 0 {
            tandem_engine::runtime::net::set_socket_buffers(&stream, socket_buffer_bytes);
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        Ok((Self { stream, frame: Vec::new(), scratch: Vec::new() }, answer))
    }

    /// Sends one request with `payload_bytes` bytes of payload.
    pub fn send(&mut self, op: ProbeOp, id: u64, payload_bytes: u32) -> Result<(), String> {
        assert!(payload_bytes <= MAX_PROBE_PAYLOAD_BYTES, "probe payloads are bounded");
        self.frame.clear();
        self.frame.extend_from_slice(&encode_header(op, payload_bytes, id));
        self.frame.resize(HEADER_BYTES + payload_bytes as usize, 0x5a);
        self.stream.write_all(&self.frame).map_err(|e| format!("sending a probe frame failed: {e}"))
    }

    /// Waits for the next answer; returns its request id.
    pub fn receive(&mut self) -> Result<u64, String> {
        let mut header = [0u8; HEADER_BYTES];
        self.stream.read_exact(&mut header).map_err(|e| format!("reading a probe answer failed: {e}"))?;
        let (_, payload_bytes, id) = decode_header(&header)?;
        self.scratch.resize(payload_bytes as usize, 0);
        self.stream.read_exact(&mut self.scratch).map_err(|e| format!("reading a probe answer failed: {e}"))?;
        Ok(id)
    }

    /// Round trips of `count` echoes of `payload_bytes`, one at a time, in
    /// microseconds.
    pub fn ping(&mut self, count: u32, payload_bytes: u32) -> Result<Vec<u64>, String> {
        let mut round_trips_us = Vec::with_capacity(count as usize);
        for id in 0..u64::from(count) {
            let sent = std::time::Instant::now();
            self.send(ProbeOp::Echo, id, payload_bytes)?;
            let answered = self.receive()?;
            assert_eq!(answered, id, "one echo at a time comes back in order");
            round_trips_us.push(sent.elapsed().as_micros().max(1) as u64);
        }
        Ok(round_trips_us)
    }

    /// Streams `frame_bytes` frames with `window` in flight for `duration`;
    /// returns the payload bytes per second the far end took.
    pub fn stream_rate(&mut self, frame_bytes: u32, window: u32, duration: Duration) -> Result<f64, String> {
        let started = std::time::Instant::now();
        let (mut sent, mut answered) = (0u64, 0u64);
        while started.elapsed() < duration || answered < sent {
            while sent - answered < u64::from(window.max(1)) && started.elapsed() < duration {
                self.send(ProbeOp::Sink, sent, frame_bytes)?;
                sent += 1;
            }
            self.receive()?;
            answered += 1;
        }
        Ok(answered as f64 * f64::from(frame_bytes) / started.elapsed().as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let header = encode_header(ProbeOp::Sink, 4096, 77);
        assert_eq!(decode_header(&header).unwrap(), (ProbeOp::Sink, 4096, 77));
        let mut unknown = header;
        unknown[0] = 9;
        assert!(decode_header(&unknown).unwrap_err().contains("unknown probe operation 9"));
        let huge = encode_header(ProbeOp::Echo, MAX_PROBE_PAYLOAD_BYTES + 1, 1);
        assert!(decode_header(&huge).unwrap_err().contains("exceeds"));
    }

    /// A real server thread on loopback answers echoes with their payload
    /// and sinks with the header alone, with many large frames in flight.
    #[test]
    fn the_server_answers_pipelined_echoes_and_sinks() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        let stream = TcpStream::connect(address).unwrap();
        let mut client = ProbeClient { stream, frame: Vec::new(), scratch: Vec::new() };
        for id in 0..64 {
            client.send(if id % 2 == 0 { ProbeOp::Echo } else { ProbeOp::Sink }, id, 1 << 20).unwrap();
        }
        for id in 0..64 {
            assert_eq!(client.receive().unwrap(), id);
            assert_eq!(client.scratch.len(), if id % 2 == 0 { 1 << 20 } else { 0 });
        }
        drop(client);
        server.join().unwrap().unwrap();
    }
}
