//! The management API: one JSON request per line on a unix socket, one JSON
//! response line back. The CLI is its only client today; scripts can use it too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_engine::runtime::status::GroupStatus;

/// A volume in a `group create` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeArg {
    pub name: String,
    /// Absolute path (the CLI resolves relative paths against its directory).
    pub path: PathBuf,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    GroupCreate {
        name: String,
        log: PathBuf,
        log_size_bytes: u64,
        volumes: Vec<VolumeArg>,
    },
    GroupList,
    GroupShow {
        name: String,
    },
    GroupDelete {
        name: String,
    },
    /// Start or stop the test failover of a destination group.
    TestFailover {
        name: String,
        start: bool,
    },
    /// Take a consistent snapshot of a group (and, from the same record, of
    /// its destination).
    SnapshotCreate {
        group: String,
        name: String,
    },
    /// Delete a snapshot of a group on this node.
    SnapshotDelete {
        group: String,
        name: String,
    },
    /// Promote a destination whose source is gone: it serves writes.
    GroupPromote {
        name: String,
    },
    /// Serve a group from another core (index into `node.cores`).
    GroupMove {
        name: String,
        core: usize,
    },
    Status,
    PartnershipCreate {
        source_group: String,
        destination: String,
        destination_group: String,
        mode: String,
        /// None: the daemon's `replication.channels`.
        #[serde(default)]
        channels: Option<u32>,
        /// The destination already holds an older copy.
        #[serde(default)]
        seeded: bool,
        /// Network constraints on each side (interface or local address).
        #[serde(default)]
        source_network: Option<String>,
        #[serde(default)]
        destination_network: Option<String>,
        /// aes-128-gcm, sign or none (None: the daemon's replication.encryption).
        #[serde(default)]
        encryption: Option<String>,
        /// The node the destination's certificate must name.
        #[serde(default)]
        destination_node: Option<String>,
        /// rdma, tcp or auto.
        #[serde(default = "transport_auto")]
        transport: String,
    },
    PartnershipShow {
        group: Option<String>,
    },
    PartnershipRemove {
        group: String,
    },
    /// Change the mode of a running partnership (on its source).
    /// Failback of a fenced old source: save the diverged ranges (if
    /// `preserve_diverged`), then become the promoted group's destination.
    PartnershipFailback {
        group: String,
        #[serde(default)]
        preserve_diverged: Option<std::path::PathBuf>,
    },
    /// Split brain: keep `keep` (NODE/GROUP, this side or the promoted one).
    PartnershipResolve {
        group: String,
        keep: String,
        #[serde(default)]
        preserve_diverged: Option<std::path::PathBuf>,
    },
    /// Planned switch: `new_source` (NODE/GROUP, the current destination)
    /// becomes the source.
    PartnershipSwitch {
        new_source: String,
    },
    PartnershipSet {
        group: String,
        mode: String,
    },
    /// Start an online verify pass of a source group.
    PartnershipVerify {
        group: String,
        /// None: the daemon's `replication.verify_rate_bytes_per_s`.
        #[serde(default)]
        rate_bytes_per_s: Option<u64>,
        #[serde(default)]
        repair: bool,
    },
    /// This node's name and listening addresses.
    Node,
    /// Change a group's group-commit limits while it runs (`tandem tune`).
    EngineSet {
        group: String,
        max_batch_records: usize,
        max_inflight_appends: usize,
    },
    /// Give `user` a role on `group` (administrators only).
    DelegationGrant {
        user: String,
        group: String,
        role: crate::delegation::Role,
    },
    /// Take back `user`'s role on `group`.
    DelegationRevoke {
        user: String,
        group: String,
    },
    /// Every grant.
    DelegationList,
    /// Events after `since`, waiting up to `wait_ms` for one.
    Events {
        since: u64,
        wait_ms: u64,
    },
}

/// A response: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResponseBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a successful request returns: `{"groups": [...]}`,
/// `{"events": [...]}` or `{"message": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    Groups(Vec<GroupStatus>),
    Events(Vec<crate::events::Event>),
    Message(String),
    Node(NodeInfo),
    Delegations(Vec<crate::delegation::Delegation>),
}

/// What `Request::Node` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub replication_listen: String,
    pub nbd_listen: String,
}

impl Response {
    #[must_use]
    pub fn success(result: ResponseBody) -> Self {
        Self { ok: true, result: Some(result), error: None }
    }

    #[must_use]
    pub fn failure(error: String) -> Self {
        Self { ok: false, result: None, error: Some(error) }
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The daemon is not reachable on the socket.
    NotRunning(String),
    /// The daemon answered with an error.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRunning(message) | Self::Refused(message) => f.write_str(message),
        }
    }
}

/// Sends one request to the daemon at `socket` and waits for the answer.
pub fn call(socket: &Path, request: &Request) -> Result<ResponseBody, CallError> {
    let not_running = |e: std::io::Error| {
        CallError::NotRunning(format!(
            "tandemd is not running or not reachable at {} ({e}); start it with `tandemd --config FILE` or pass --api PATH",
            socket.display()
        ))
    };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(not_running)?;
    if answer.is_empty() {
        return Err(CallError::NotRunning(format!("tandemd closed {} without answering", socket.display())));
    }
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| CallError::Refused(format!("unreadable answer from tandemd: {e}")))?;
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (_, _, Some(error)) => Err(CallError::Refused(error)),
        _ => Err(CallError::Refused("tandemd answered without result or error".to_owned())),
    }
}

fn transport_auto() -> String {
    "auto".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_shape() {
        let request = Request::GroupDelete { name: "rg01".into() };
        assert_eq!(serde_json::to_string(&request).unwrap(), r#"{"op":"group_delete","name":"rg01"}"#);
        let parsed: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(parsed, Request::Status);
        let failure = serde_json::to_string(&Response::failure("no".into())).unwrap();
        assert_eq!(failure, r#"{"ok":false,"error":"no"}"#);
    }
}
