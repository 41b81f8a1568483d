//! `tandem group test-failover start|stop GROUP` on a destination: a writable
//! copy-on-write snapshot of its volumes, exported over NBD as
//! `GROUP@test/VOLUME`, while replication into GROUP goes on untouched.
//! Consistent snapshots are exported read-only the same way, as
//! `GROUP@NAME/VOLUME` (see `snapshot.rs`).
//!
//! A snapshot export's connection is served on its own thread: each request
//! goes to the group's core, which owns the snapshot (see the engine's
//! `test_failover.rs` and `snapshots.rs`), and its answer comes back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::session::{BlockError, BlockRequest, BlockSession, Parsed};
use tandem_engine::runtime::test_failover::SnapshotOp;
use tandem_engine::runtime::CoreMsg;

use crate::daemon::Daemon;

/// The suffix of a group's test exports: `GROUP@test/VOLUME`.
pub const TEST_SUFFIX: &str = "@test";

/// Starts or stops the test failover of destination group `group`.
pub fn run(daemon: &Daemon, group: &str, start: bool) -> Result<String, String> {
    if !start {
        daemon.ask_core(group, |reply| CoreMsg::StopTestFailover { group: group.to_owned(), reply })?;
        daemon.events.record(group, EventKind::TestFailoverStopped);
        return Ok(format!("test failover of {group} stopped; its exports are gone and what they wrote is discarded"));
    }
    let status = daemon.group_status(group)?;
    let path = daemon.config.node.state_dir.join(format!("{group}{TEST_SUFFIX}.cow"));
    let max_bytes = daemon.config.replication.test_failover_max_bytes;
    let lsn = daemon.ask(group, Duration::from_secs(30), |reply| CoreMsg::StartTestFailover {
        group: group.to_owned(),
        path: path.clone(),
        max_bytes,
        reply,
    })??;
    daemon.events.record(group, EventKind::TestFailoverStarted { lsn });
    let exports: Vec<String> = status.volumes.iter().map(|v| format!("{group}{TEST_SUFFIX}/{}", v.name)).collect();
    Ok(format!(
        "test failover of {group} started at LSN {lsn}: writable exports {} (changes kept in {}, at most {max_bytes} bytes); replication into {group} goes on; `tandem group test-failover stop {group}` discards them",
        exports.join(", "),
        path.display()
    ))
}

/// What an export `GROUP@X/VOLUME` shows: the test failover (`X` = test)
/// or the consistent snapshot named `X`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotExport<'a> {
    TestFailover { group: &'a str },
    Snapshot { group: &'a str, snapshot: &'a str },
}

impl<'a> SnapshotExport<'a> {
    /// Parses an export name; `None` for a volume's own export `GROUP/VOLUME`.
    #[must_use]
    pub fn of(name: &'a str) -> Option<Self> {
        let (group, snapshot) = name.split_once('/')?.0.split_once('@')?;
        Some(if snapshot == &TEST_SUFFIX[1..] {
            Self::TestFailover { group }
        } else {
            Self::Snapshot { group, snapshot }
        })
    }

    #[must_use]
    pub fn group(self) -> &'a str {
        match self {
            Self::TestFailover { group } | Self::Snapshot { group, .. } => group,
        }
    }

    /// Runs one request on the core that owns the group's snapshots.
    fn run(self, daemon: &Daemon, volume_index: u8, op: SnapshotOp) -> Result<Vec<u8>, String> {
        let group = self.group().to_owned();
        match (self, op) {
            (Self::TestFailover { .. }, op) => daemon.ask(&group.clone(), Duration::from_secs(30), |reply| {
                CoreMsg::TestFailoverIo { group, volume_index, op, reply }
            })?,
            (Self::Snapshot { snapshot, .. }, SnapshotOp::Read { offset, length }) => {
                let (name, range) = (snapshot.to_owned(), (volume_index, offset, length));
                daemon.ask(&group.clone(), Duration::from_secs(30), |reply| CoreMsg::ReadSnapshot {
                    group,
                    name,
                    range,
                    reply,
                })?
            }
            (Self::Snapshot { .. }, SnapshotOp::Flush) => Ok(Vec::new()),
            (Self::Snapshot { snapshot, .. }, _) => Err(format!("snapshot {snapshot} is read-only")),
        }
    }
}

/// Serves one client of a snapshot export until it leaves or the snapshot goes.
pub fn serve(
    daemon: &Daemon,
    mut stream: TcpStream,
    mut session: impl BlockSession,
    target: SnapshotExport<'_>,
    volume_index: u8,
) {
    let peer = session.peer().to_owned();
    let mut input: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let parsed = match session.parse(&input) {
            Ok(parsed) => parsed,
            Err(fatal) => {
                tracing::warn!(%peer, reason = %fatal.0, "test export client closed");
                return;
            }
        };
        let (consumed, request) = match parsed {
            Parsed::Request { consumed, request } => (consumed, request),
            Parsed::NeedMore => match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    input.extend_from_slice(&chunk[..n]);
                    continue;
                }
            },
        };
        input.drain(..consumed);
        let io = |op: SnapshotOp| target.run(daemon, volume_index, op);
        match answer(&io, &mut stream, &mut session, &mut input, request) {
            Ok(true) => {}
            Ok(false) => return,
            Err(reason) => {
                tracing::info!(%peer, %reason, "test export connection closed");
                return;
            }
        }
    }
}

/// Answers one request; false when the client is done.
fn answer(
    io: &dyn Fn(SnapshotOp) -> Result<Vec<u8>, String>,
    stream: &mut TcpStream,
    session: &mut impl BlockSession,
    input: &mut Vec<u8>,
    request: BlockRequest,
) -> Result<bool, String> {
    let mut out = Vec::new();
    match request {
        BlockRequest::Read { cookie, offset, length } => match io(SnapshotOp::Read { offset, length }) {
            Ok(data) => {
                let mut header = vec![0u8; session.read_reply_header_bytes()];
                session.encode_read_reply_header(cookie, &mut header);
                out.extend_from_slice(&header);
                out.extend_from_slice(&data);
            }
            Err(reason) => reply_error(session, cookie, &reason, &mut out),
        },
        BlockRequest::Write { cookie, offset, length } => {
            let data = take_payload(stream, input, length as usize)?;
            match io(SnapshotOp::Write { offset, data }) {
                Ok(_) => session.encode_reply(cookie, Ok(()), &mut out),
                Err(reason) => reply_error(session, cookie, &reason, &mut out),
            }
        }
        BlockRequest::Trim { cookie, offset, length } | BlockRequest::WriteZeroes { cookie, offset, length, .. } => {
            match io(SnapshotOp::Zero { offset, length }) {
                Ok(_) => session.encode_reply(cookie, Ok(()), &mut out),
                Err(reason) => reply_error(session, cookie, &reason, &mut out),
            }
        }
        BlockRequest::Flush { cookie } => match io(SnapshotOp::Flush) {
            Ok(_) => session.encode_reply(cookie, Ok(()), &mut out),
            Err(reason) => reply_error(session, cookie, &reason, &mut out),
        },
        BlockRequest::Refuse { cookie, error, discard_payload_bytes } => {
            take_payload(stream, input, discard_payload_bytes as usize)?;
            session.encode_reply(cookie, Err(error), &mut out);
        }
        BlockRequest::Disconnect => return Ok(false),
    }
    stream.write_all(&out).map_err(|e| format!("send failed: {e}"))?;
    Ok(true)
}

fn reply_error(session: &mut impl BlockSession, cookie: u64, reason: &str, out: &mut Vec<u8>) {
    tracing::warn!(peer = session.peer(), reason, "test export request failed");
    session.encode_reply(cookie, Err(BlockError::Io), out);
}

/// The `length` payload bytes that follow a request: what is buffered, then the socket.
fn take_payload(stream: &mut TcpStream, input: &mut Vec<u8>, length: usize) -> Result<Vec<u8>, String> {
    let buffered = input.len().min(length);
    let mut data: Vec<u8> = input.drain(..buffered).collect();
    data.resize(length, 0);
    stream.read_exact(&mut data[buffered..]).map_err(|e| format!("receiving a write's payload failed: {e}"))?;
    Ok(data)
}
