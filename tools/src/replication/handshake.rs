//! The replication port's handshake: the line the source sends (`Hello`),
//! the destination's answer, both one JSON line each, bounded in size.

use super::*;

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
    /// Planned switch, source to destination: every record up to
    /// `baseline_lsn` is on both sides and the source became a destination;
    /// become the source (its listener is on `replication_port`).
    Switch,
    /// Failback asked by a fenced old source (named as `source_node`/
    /// `source_group`): the promoted group (`destination_group`) creates the
    /// reverse partnership into it.
    FailbackRequest,
    /// Split brain resolved for the old source (named as `source_node`/
    /// `source_group`): the promoted group (`destination_group`) stops taking
    /// client I/O, to become its destination again.
    KeepSource,
    /// Planned switch asked on the destination: the destination (named as
    /// `source_node`/`source_group` here) asks its source
    /// (`destination_group`) to run the switch.
    SwitchRequest,
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
    /// Resume: this source opened (recovered its log) since it was last
    /// connected, and the lowest LSN it recovered to; records after it that
    /// the destination holds may be ones this source lost.
    #[serde(default)]
    pub recovered_lsn: Option<u64>,
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
    /// How the partnership's frames are protected: aes-128-gcm, sign or none.
    #[serde(default = "encryption_none")]
    pub encryption: String,
    /// Join over a TLS session: the proof that this channel belongs to it.
    #[serde(default)]
    pub join_proof: String,
    /// The sender's replication listener port (a destination learns where
    /// its source listens, for a switch asked on the destination).
    #[serde(default)]
    pub replication_port: u16,
    /// Create and Resume: the data channels' transport (tcp or rdma).
    #[serde(default = "transport_tcp")]
    pub transport: String,
}

fn transport_tcp() -> String {
    "tcp".to_owned()
}

fn encryption_none() -> String {
    "none".to_owned()
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
            recovered_lsn: None,
            session: 0,
            channel: 0,
            measure_devices,
            socket_buffer_bytes,
            seeded: false,
            destination_network: String::new(),
            encryption: encryption_none(),
            join_proof: String::new(),
            replication_port: 0,
            transport: transport_tcp(),
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
    /// What was done, for the operator (a switch asked on the destination).
    #[serde(default)]
    pub message: Option<String>,
    /// A Resume refused because the destination was promoted after this LSN,
    /// into this generation (hex).
    #[serde(default)]
    pub promoted_after_lsn: Option<u64>,
    #[serde(default)]
    pub promoted_generation: String,
    /// Check: why the destination cannot take RDMA data channels (`None`:
    /// it listens for them).
    #[serde(default)]
    pub rdma_unavailable: Option<String>,
    /// Resume from a source that recovered up to `Hello::recovered_lsn`:
    /// what this destination holds after that LSN (`None`: nothing).
    #[serde(default)]
    pub held_after: Option<tandem_engine::core::HeldAfter>,
}

pub(crate) fn write_line<T: Serialize>(stream: &mut impl Write, value: &T) -> Result<(), String> {
    let mut text = serde_json::to_string(value).expect("handshake serializes");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(|e| format!("sending the handshake failed: {e}"))?;
    stream.flush().map_err(|e| format!("sending the handshake failed: {e}"))
}

pub(crate) fn read_line<T: for<'a> Deserialize<'a>>(stream: &mut impl Read) -> Result<T, String> {
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Answer {
    /// Node `node`'s yes to a data channel's Join, or its refusal with the reason.
    #[must_use]
    pub fn join_outcome<T>(node: &str, result: &Result<T, String>) -> Self {
        Self {
            ok: result.is_ok(),
            error: result.as_ref().err().cloned(),
            destination_node: node.to_owned(),
            ..Self::default()
        }
    }
}
