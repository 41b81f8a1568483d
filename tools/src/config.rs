//! The daemon's configuration file (`tandemd --config tandem.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_engine::core::GroupConfig;

/// Default path of the management socket.
pub const DEFAULT_API_SOCKET: &str = "/run/tandem/api.sock";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// This node's certificate and the CA its peers' certificates must chain
    /// to (absent: replication is neither authenticated nor encrypted, and
    /// only partnerships with encryption "none" are possible).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[tls]`: PEM files (`tandem cert issue` writes all three).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    /// The settings that differ between `self` (running) and `new` (the
    /// file now) and take effect only at a restart: everything but
    /// `node.log_level`, which a reload (SIGHUP) applies at once.
    #[must_use]
    pub fn changes_needing_restart(&self, new: &Config) -> Vec<String> {
        let (a, b) = (&self.node, &new.node);
        let fields = [
            ("node.name", format!("{:?}", a.name), format!("{:?}", b.name)),
            ("node.cores", format!("{:?}", a.cores), format!("{:?}", b.cores)),
            ("node.state_dir", format!("{:?}", a.state_dir), format!("{:?}", b.state_dir)),
            ("node.api_socket", format!("{:?}", a.api_socket), format!("{:?}", b.api_socket)),
            ("node.nbd_listen", format!("{:?}", a.nbd_listen), format!("{:?}", b.nbd_listen)),
            ("node.replication_listen", format!("{:?}", a.replication_listen), format!("{:?}", b.replication_listen)),
            ("node.metrics_listen", format!("{:?}", a.metrics_listen), format!("{:?}", b.metrics_listen)),
            ("[engine]", format!("{:?}", self.engine), format!("{:?}", new.engine)),
            ("[replication]", format!("{:?}", self.replication), format!("{:?}", new.replication)),
            ("[tls]", format!("{:?}", self.tls), format!("{:?}", new.tls)),
        ];
        fields.into_iter().filter(|(_, old, new)| old != new).map(|(name, _, _)| name.to_owned()).collect()
    }
}

/// `[replication]`: how sources behave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// `"continue"`: a sync source without its destination acknowledges
    /// writes after its own log; `"block"`: it holds them (RPO 0 across
    /// disconnects, at the price of availability).
    pub on_peer_loss: String,
    /// Bytes per initial-copy chunk.
    pub copy_chunk_bytes: u32,
    /// An async partnership whose RPO exceeds this raises event 5001 (0: never).
    pub target_rpo_seconds: u64,
    /// Data channels of a new partnership when `--channels` is not given.
    pub channels: u32,
    /// Send and receive buffer of every replication socket (the kernel caps
    /// it at net.core.wmem_max and rmem_max).
    pub socket_buffer_bytes: u32,
    /// A source verifies its destination in the background every this many
    /// seconds (0: only on request with `tandem partnership verify`).
    pub verify_interval_seconds: u64,
    /// Rate of a verify pass (background and on request without --rate).
    pub verify_rate_bytes_per_s: u64,
    /// How partnership frames are protected on the wire: "aes-128-gcm"
    /// (encrypted and authenticated), "sign" (authenticated) or "none".
    /// A source offers it when `--encryption` is not given; a destination
    /// accepts only partnerships that use it.
    pub encryption: String,
    /// Most bytes a destination's test failover keeps (blocks changed on
    /// either side since it started, 64 KiB each) in its file in state_dir.
    pub test_failover_max_bytes: u64,
    /// Most bytes each consistent snapshot (`tandem group snapshot`) keeps:
    /// blocks changed since it was taken, 64 KiB each, under state_dir.
    pub snapshot_max_bytes: u64,
    /// RDMA data channels: bytes of one message (a registered buffer) and
    /// buffers posted per channel (the credits a sender starts with). Both
    /// nodes need the same; each channel registers 2 x window x message.
    pub rdma_message_bytes: usize,
    pub rdma_window: u32,
    /// A partnership over RDMA whose RDMA path is gone (device removed,
    /// port down, the peer's listener closed): `"tcp"` replicates over TCP
    /// meanwhile and moves back once the path returns; `"none"` waits for
    /// RDMA (the destination counts as lost until then). On a destination:
    /// whether it takes such a source's TCP channels.
    pub rdma_fallback: String,
    /// RDMA: payloads of at least this many bytes are not copied into
    /// messages; the peer's adapter reads them with RDMA READ from the
    /// buffer the local log writes, into the one its log writes. Smaller
    /// ones (of 2 KiB or more) are sent from where they lie by the local
    /// adapter, and copied only out of the receive buffer. 0: copy every
    /// payload.
    pub rdma_zero_copy_threshold_bytes: usize,
    /// RDMA: memory registered once (with every RDMA channel, so it counts
    /// against the memory-lock limit once per channel) from which
    /// direct-IO buffers of 4 KiB and more come; used up, buffers come from
    /// the heap and are copied.
    pub rdma_arena_bytes: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            on_peer_loss: "continue".to_owned(),
            copy_chunk_bytes: 1 << 20,
            target_rpo_seconds: 30,
            channels: 2,
            socket_buffer_bytes: tandem_engine::runtime::net::DEFAULT_SOCKET_BUFFER_BYTES,
            verify_interval_seconds: 0,
            verify_rate_bytes_per_s: tandem_engine::runtime::DEFAULT_VERIFY_RATE_BYTES_PER_S,
            encryption: "aes-128-gcm".to_owned(),
            test_failover_max_bytes: 16 << 30,
            snapshot_max_bytes: 16 << 30,
            rdma_message_bytes: 64 << 10,
            rdma_window: 32,
            rdma_fallback: "tcp".to_owned(),
            rdma_zero_copy_threshold_bytes: 16 << 10,
            rdma_arena_bytes: 64 << 20,
        }
    }
}

impl ReplicationConfig {
    #[must_use]
    pub fn peer_defaults(&self) -> tandem_engine::runtime::PeerDefaults {
        tandem_engine::runtime::PeerDefaults {
            hold_writes_when_lost: self.on_peer_loss == "block",
            copy_chunk_bytes: self.copy_chunk_bytes,
            socket_buffer_bytes: self.socket_buffer_bytes,
            verify_interval_seconds: self.verify_interval_seconds,
            verify_rate_bytes_per_s: self.verify_rate_bytes_per_s,
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// CPUs that run a core thread each (pinned).
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    #[serde(default = "default_nbd_listen")]
    pub nbd_listen: SocketAddr,
    /// Where this node accepts replication connections from sources.
    #[serde(default = "default_replication_listen")]
    pub replication_listen: SocketAddr,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Where Prometheus scrapes `/metrics` (off when absent).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[engine]`: write-path tunables (defaults suit most disks).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub max_batch_bytes: u64,
    pub max_batch_records: usize,
    pub max_inflight_appends: usize,
    pub checkpoint_used_percent: u64,
    pub checkpoint_interval_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let defaults = GroupConfig::default();
        Self {
            max_batch_bytes: defaults.max_batch_bytes,
            max_batch_records: defaults.max_batch_records,
            max_inflight_appends: defaults.max_inflight_appends,
            checkpoint_used_percent: defaults.checkpoint_used_percent,
            checkpoint_interval_ms: defaults.checkpoint_interval_ms,
        }
    }
}

impl EngineConfig {
    #[must_use]
    pub fn group_config(&self) -> GroupConfig {
        GroupConfig {
            max_batch_bytes: self.max_batch_bytes,
            max_batch_records: self.max_batch_records,
            max_inflight_appends: self.max_inflight_appends,
            checkpoint_used_percent: self.checkpoint_used_percent,
            checkpoint_interval_ms: self.checkpoint_interval_ms,
        }
    }
}

fn default_cores() -> Vec<usize> {
    vec![0]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tandem")
}
fn default_api_socket() -> PathBuf {
    PathBuf::from(DEFAULT_API_SOCKET)
}
fn default_nbd_listen() -> SocketAddr {
    "0.0.0.0:10809".parse().expect("valid literal")
}
fn default_replication_listen() -> SocketAddr {
    "0.0.0.0:5445".parse().expect("valid literal")
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl Config {
    /// Reads and validates the file; errors say which key is wrong and why.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::parse_text(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses and validates a configuration's text.
    pub fn parse_text(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.node.name.is_empty() || self.node.name.len() > 63 {
            return Err("node.name must be 1 to 63 bytes".to_owned());
        }
        if self.node.cores.is_empty() {
            return Err("node.cores must list at least one CPU, e.g. cores = [0]".to_owned());
        }
        let allowed = allowed_cpus();
        if let Some(cpu) = self.node.cores.iter().find(|c| !allowed.contains(c)) {
            let list: Vec<String> = allowed.iter().map(usize::to_string).collect();
            return Err(format!(
                "node.cores names CPU {cpu}, but this process may run only on CPUs {} (the machine's, less any \
                 taskset, systemd CPUAffinity= or cpuset limit); list cores among those",
                list.join(", ")
            ));
        }
        let engine = &self.engine;
        if engine.max_inflight_appends == 0 || engine.max_batch_records < 2 || engine.max_batch_records > 1024 {
            return Err("engine.max_inflight_appends must be ≥ 1 and engine.max_batch_records in 2..=1024".to_owned());
        }
        if !(1..=100).contains(&engine.checkpoint_used_percent) {
            return Err("engine.checkpoint_used_percent must be in 1..=100".to_owned());
        }
        let replication = &self.replication;
        if replication.on_peer_loss != "continue" && replication.on_peer_loss != "block" {
            return Err(format!(
                "replication.on_peer_loss = {:?}: use \"continue\" or \"block\"",
                replication.on_peer_loss
            ));
        }
        if replication.rdma_fallback != "tcp" && replication.rdma_fallback != "none" {
            return Err(format!(
                "replication.rdma_fallback = {:?}: use \"tcp\" (replicate over TCP while RDMA is away) or \"none\"",
                replication.rdma_fallback
            ));
        }
        let chunk = replication.copy_chunk_bytes;
        if !(64 * 1024..=4 << 20).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(format!("replication.copy_chunk_bytes = {chunk}: use a power of two from 65536 to 4194304"));
        }
        if !(1..=tandem_engine::runtime::peer_session::MAX_CHANNELS as u32).contains(&replication.channels) {
            return Err(format!(
                "replication.channels = {}: a partnership has 1 to {} data channels",
                replication.channels,
                tandem_engine::runtime::peer_session::MAX_CHANNELS
            ));
        }
        if replication.verify_rate_bytes_per_s < 1 << 20 {
            return Err(format!(
                "replication.verify_rate_bytes_per_s = {}: use at least 1048576 (1 MiB/s)",
                replication.verify_rate_bytes_per_s
            ));
        }
        if replication.test_failover_max_bytes < 1 << 20 {
            return Err(format!(
                "replication.test_failover_max_bytes = {}: use at least 1048576 (1 MiB)",
                replication.test_failover_max_bytes
            ));
        }
        if replication.snapshot_max_bytes < 1 << 20 {
            return Err(format!(
                "replication.snapshot_max_bytes = {}: use at least 1048576 (1 MiB)",
                replication.snapshot_max_bytes
            ));
        }
        if !(4..=4096).contains(&replication.rdma_window) {
            return Err(format!("replication.rdma_window = {}: use 4 to 4096 buffers", replication.rdma_window));
        }
        if !(4096..=16 << 20).contains(&replication.rdma_message_bytes) {
            return Err(format!(
                "replication.rdma_message_bytes = {}: use 4096 (4 KiB) to 16777216 (16 MiB)",
                replication.rdma_message_bytes
            ));
        }
        if replication.rdma_zero_copy_threshold_bytes != 0
            && !(4096..=tandem_engine::runtime::arena::MAX_BUFFER_BYTES)
                .contains(&replication.rdma_zero_copy_threshold_bytes)
        {
            return Err(format!(
                "replication.rdma_zero_copy_threshold_bytes = {}: use 4096 (4 KiB) to {} (4 MiB and a sector), \
                 or 0 to copy every payload",
                replication.rdma_zero_copy_threshold_bytes,
                tandem_engine::runtime::arena::MAX_BUFFER_BYTES
            ));
        }
        if replication.rdma_zero_copy_threshold_bytes != 0
            && !(8 << 20..=64 << 30).contains(&replication.rdma_arena_bytes)
        {
            return Err(format!(
                "replication.rdma_arena_bytes = {}: use 8388608 (8 MiB) to 68719476736 (64 GiB)",
                replication.rdma_arena_bytes
            ));
        }
        if !(64 << 10..=256 << 20).contains(&replication.socket_buffer_bytes) {
            return Err(format!(
                "replication.socket_buffer_bytes = {}: use 65536 (64 KiB) to 268435456 (256 MiB)",
                replication.socket_buffer_bytes
            ));
        }
        tandem_crypto::Protection::parse(&replication.encryption)
            .map_err(|e| format!("replication.encryption: {e}"))?;
        tracing_subscriber::EnvFilter::try_new(&self.node.log_level)
            .map_err(|e| format!("node.log_level {:?} is not a log filter: {e}", self.node.log_level))?;
        Ok(())
    }
}

/// The CPUs this process may run on (its affinity mask), in order.
#[must_use]
pub fn allowed_cpus() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|core| core.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged default configuration parses, and every commented
    /// setting in it shows the real default: uncommenting them all changes nothing.
    #[test]
    fn the_packaged_config_documents_the_real_defaults() {
        let text = include_str!("../../contrib/tandem.toml");
        let commented: Config = toml::from_str(text).expect("contrib/tandem.toml parses");
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
                {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(uncommented.matches(" = ").count() >= 15, "the settings are all there");
        let explicit: Config = toml::from_str(&uncommented).expect("the uncommented settings parse");
        let explicit_text =
            format!("{explicit:?}").replace("metrics_listen: Some(127.0.0.1:9445)", "metrics_listen: None");
        assert_eq!(format!("{commented:?}"), explicit_text);
    }

    #[test]
    fn cores_outside_the_affinity_mask_are_refused_with_the_allowed_list() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        let outside = allowed.iter().max().unwrap() + 1;
        let text = format!("[node]\nname = \"n\"\ncores = [{}]\n", allowed[0]);
        Config::parse_text(&text).expect("a core of the mask is accepted");
        let refused = Config::parse_text(&format!("[node]\nname = \"n\"\ncores = [{outside}]\n")).unwrap_err();
        let list: Vec<String> = allowed.iter().map(usize::to_string).collect();
        assert!(
            refused
                .contains(&format!("names CPU {outside}, but this process may run only on CPUs {}", list.join(", "))),
            "{refused}"
        );
    }

    #[test]
    fn example_from_the_docs_parses_with_defaults() {
        let config: Config = toml::from_str(
            r#"
            [node]
            name = "sr-srv05"
            cores = [0]
            state_dir = "/var/lib/tandem"
            api_socket = "/run/tandem/api.sock"
            nbd_listen = "0.0.0.0:10809"
            replication_listen = "0.0.0.0:5445"
            log_level = "info"
            metrics_listen = "127.0.0.1:9445"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.engine.max_inflight_appends, GroupConfig::default().max_inflight_appends);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let unknown = toml::from_str::<Config>("[node]\nname = \"a\"\ncolour = 3\n").unwrap_err();
        assert!(unknown.to_string().contains("colour"), "{unknown}");
        let mut config: Config = toml::from_str("[node]\nname = \"a\"\ncores = [4096]\n").unwrap();
        assert!(config.validate().unwrap_err().contains("CPU 4096"));
        config.node.cores = vec![];
        assert!(config.validate().unwrap_err().contains("at least one CPU"));
        let mut config: Config =
            toml::from_str("[node]\nname = \"a\"\n[replication]\nrdma_fallback = \"udp\"\n").unwrap();
        let refused = config.validate().unwrap_err();
        assert!(refused.contains("replication.rdma_fallback = \"udp\"") && refused.contains("\"none\""), "{refused}");
        config.replication.rdma_fallback = "none".to_owned();
        config.validate().unwrap();
        config.replication.rdma_zero_copy_threshold_bytes = 1000;
        let refused = config.validate().unwrap_err();
        assert!(
            refused.contains("rdma_zero_copy_threshold_bytes = 1000: use 4096") && refused.contains("or 0"),
            "{refused}"
        );
        config.replication.rdma_zero_copy_threshold_bytes = 0;
        config.replication.rdma_arena_bytes = 1 << 20;
        config.validate().expect("no arena is needed without zero copy");
        config.replication.rdma_zero_copy_threshold_bytes = 65536;
        let refused = config.validate().unwrap_err();
        assert!(refused.contains("rdma_arena_bytes = 1048576: use 8388608 (8 MiB)"), "{refused}");
    }
}
