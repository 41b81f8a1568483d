//! A partnership over RDMA whose RDMA path goes away: a device removed
//! (`rdma link delete`, a driver unloaded), its port down, or the
//! destination's listener closed. With `replication.rdma_fallback = "tcp"`
//! (the default) the source resumes over TCP data channels meanwhile (the
//! superblocks keep saying RDMA), and moves back once the path returns: it
//! checks every [`RETURN_CHECK_INTERVAL`] with a probe over RDMA, then ends
//! the TCP session and resumes over RDMA, holding sync writes for the
//! reconnection rather than completing them on its own log. With `"none"`
//! it keeps trying RDMA, and the destination counts as lost until then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::status::{GroupStatus, PartnershipStatus};
use tandem_transport_rdma::RdmaChannel;

use crate::daemon::{lock, Daemon};
use crate::replication::{hello_for, resolve, Answer, CreateRequest, HelloAction};

/// How often a source running on its TCP fallback looks for its RDMA path.
pub const RETURN_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Longest wait of sync writes for the session over RDMA that replaces the
/// TCP one (the reconnection takes milliseconds).
const RECONNECT_HOLD: Duration = Duration::from_secs(5);

/// Why a resume failed: its RDMA part (a fallback may help), or anything else.
pub enum ResumeFailure {
    Rdma(String),
    Other(String),
}

impl ResumeFailure {
    #[must_use]
    pub fn into_reason(self) -> String {
        match self {
            Self::Rdma(reason) | Self::Other(reason) => reason,
        }
    }
}

impl From<String> for ResumeFailure {
    fn from(reason: String) -> Self {
        Self::Other(reason)
    }
}

/// Whether the partnership of `request` may resume over TCP when its RDMA
/// path is gone.
#[must_use]
pub fn may_fall_back(daemon: &Daemon, request: &CreateRequest) -> bool {
    request.transport == "rdma" && daemon.config.replication.rdma_fallback == "tcp"
}

/// `group` resumed over TCP because of `reason`: status says so, and the
/// first time an event does.
pub fn fell_back(daemon: &Daemon, group: &str, reason: String) {
    tracing::warn!(group, %reason, "the RDMA path is gone: replicating over TCP");
    let before = lock(&daemon.transport_fallbacks).insert(group.to_owned(), reason.clone());
    if before.is_none() {
        daemon.events.record(group, EventKind::TransportFallback { reason });
    }
}

/// `group` resumed over RDMA: a fallback, if there was one, is over.
pub fn restored(daemon: &Daemon, group: &str) {
    if lock(&daemon.transport_fallbacks).remove(group).is_some() {
        tracing::info!(group, "the RDMA path is back: replicating over RDMA again");
        daemon.events.record(group, EventKind::TransportRestored);
    }
}

/// On a destination: why a partnership over RDMA runs over TCP channels
/// now (its source fell back), or nothing.
#[must_use]
pub fn seen_by_destination(p: &PartnershipStatus) -> Option<String> {
    let over_tcp = p.channel_addresses.iter().all(|channel| !channel.starts_with("rdma "));
    (p.transport == "rdma" && p.connected && over_tcp)
        .then(|| "the source resumed over TCP: its RDMA path was away (it moves back by itself)".to_owned())
}

/// Looks, every [`RETURN_CHECK_INTERVAL`], for the RDMA path of each
/// source group on its TCP fallback; once it is back, ends the TCP session
/// so that the connector resumes over RDMA.
pub fn run_return_checks(daemon: Arc<Daemon>) {
    let mut checked: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let fallen: Vec<String> = lock(&daemon.transport_fallbacks).keys().cloned().collect();
        checked.retain(|group, _| fallen.contains(group));
        if fallen.is_empty() {
            continue;
        }
        for status in daemon.status().into_iter().filter(|s| fallen.contains(&s.name)) {
            if status.role != "source" {
                // A planned switch made it a destination: its source decides.
                lock(&daemon.transport_fallbacks).remove(&status.name);
                continue;
            }
            let due = checked.get(&status.name).is_none_or(|at| at.elapsed() >= RETURN_CHECK_INTERVAL);
            let connected = status.partnership.as_ref().is_some_and(|p| p.connected);
            if !due || !connected || daemon.is_changing(&status.name) {
                continue;
            }
            checked.insert(status.name.clone(), Instant::now());
            match probe_rdma_path(&daemon, &status) {
                Ok(()) => {
                    let reason = "the RDMA path is back: reconnecting over RDMA".to_owned();
                    if let Err(error) = daemon.end_session(&status.name, reason, RECONNECT_HOLD) {
                        tracing::warn!(group = %status.name, %error, "cannot end the TCP session to return to RDMA");
                    }
                }
                Err(reason) => tracing::debug!(group = %status.name, %reason, "the RDMA path is still away"),
            }
        }
    }
}

/// Whether the destination of `status`'s partnership takes an RDMA channel
/// from this node now: a channel opened, a probe line answered, closed.
fn probe_rdma_path(daemon: &Daemon, status: &GroupStatus) -> Result<(), String> {
    let partnership = status.partnership.as_ref().ok_or("no partnership")?;
    let remote = resolve(&partnership.peer_address)?;
    let local = crate::rdma_link::local_address_towards(remote)?;
    crate::rdma_link::path_from(local.ip())?;
    let mut channel = RdmaChannel::connect(remote, crate::rdma_link::channel_config(daemon))?;
    let request = CreateRequest::existing(&status.name, partnership);
    let hello = hello_for(daemon, status, &request, HelloAction::Probe, &partnership.id);
    channel.send(&serde_json::to_vec(&hello).map_err(|e| e.to_string())?)?;
    let answer: Answer =
        serde_json::from_slice(&channel.recv()?).map_err(|e| format!("a malformed answer to an RDMA probe: {e}"))?;
    if answer.ok {
        Ok(())
    } else {
        Err(answer.error.unwrap_or_else(|| "the RDMA probe was refused".to_owned()))
    }
}
