//! Planned role switch (`tandem partnership switch --new-source NODE/GROUP`,
//! like Set-SRPartnership): the source stops taking writes, drains until the
//! destination holds and has applied every acknowledged write, becomes the
//! destination of its destination, and tells it to take over; the new
//! source's exports turn writable and it resumes replication the other way.
//!
//! Order matters for safety: the old source gives up its role (persisted as
//! a destination) before the other side takes it, so there is never a moment
//! with two writers; at worst, when the last message is lost, both are
//! destinations and no client writes anywhere until the switch is repeated.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::status::{GroupStatus, PartnershipStatus};
use tandem_engine::runtime::CoreMsg;
use tandem_proto::{fixed_str, PartnershipEntry, COPY_DONE, MODE_ASYNC, MODE_SYNC};

use crate::daemon::Daemon;
use crate::rdma_link::transport_code;
use crate::replication::{hello_for, open_control, read_line, write_line, Answer, CreateRequest, Hello, HelloAction};
use crate::secure_channel::encryption_code;

/// How long the destination may take to hold every acknowledged write.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts to tell the destination to take over before giving up.
const TAKE_OVER_ATTEMPTS: u32 = 5;

/// The local group a switch to `new_source` (NODE/GROUP) concerns: the source
/// replicating to it, or, when NODE is this node, the destination named.
pub fn local_group(daemon: &Daemon, new_source: &str) -> Result<String, String> {
    let (node, group) = new_source
        .split_once('/')
        .ok_or_else(|| format!("--new-source {new_source}: use NODE/GROUP, e.g. dr-srv01/rg02"))?;
    let this_node = &daemon.config.node.name;
    if node == this_node {
        let status = daemon.group_status(group)?;
        if status.role != "destination" {
            return Err(format!(
                "{new_source} is not a replication destination ({}); the new source must be the current destination",
                status.role
            ));
        }
        return Ok(group.to_owned());
    }
    daemon
        .status()
        .into_iter()
        .find(|g| {
            g.role == "source" && g.partnership.as_ref().is_some_and(|p| p.peer_node == node && p.peer_group == group)
        })
        .map(|g| g.name)
        .ok_or_else(|| {
            format!(
                "no group of {this_node} replicates to {new_source}; run the switch on its source or destination node"
            )
        })
}

/// Runs the switch that makes `new_source` the source (the local group from
/// [`local_group`], already marked as changing).
pub fn switch(daemon: &Daemon, local: &str) -> Result<String, String> {
    let status = daemon.group_status(local)?;
    if status.role == "destination" {
        return ask_source(daemon, &status);
    }
    switch_source(daemon, &status)
}

/// Refuses a switch the partnership's state forbids, with that state.
fn check_switchable(status: &GroupStatus, p: &PartnershipStatus) -> Result<(), String> {
    if p.state == "InitialBlockCopy" || p.copy_remaining_bytes > 0 {
        let total: u64 = status.volumes.iter().map(|v| v.size_bytes).sum();
        let done = 100 * total.saturating_sub(p.copy_remaining_bytes) / total.max(1);
        return Err(format!("initial block copy {done} % done; switching now would lose data"));
    }
    if p.state == "BitmapCatchUp" || p.bitmap_dirty_bytes > 0 {
        return Err(format!(
            "bitmap catch-up in progress ({} bytes of marked regions to copy); switching now would lose data",
            p.bitmap_dirty_bytes
        ));
    }
    if !p.connected {
        return Err(format!(
            "{}/{} is not connected ({}): a planned switch needs it to hold every write; if it is lost for good, promote it there (`tandem group promote`)",
            p.peer_node,
            p.peer_group,
            p.last_error.as_deref().unwrap_or("waiting for it")
        ));
    }
    Ok(())
}

/// On the source: fence, drain, become the destination, hand over.
fn switch_source(daemon: &Daemon, status: &GroupStatus) -> Result<String, String> {
    let group = &status.name;
    let p = status.partnership.clone().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    check_switchable(status, &p)?;
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    daemon.fence_clients(group, Some(format!("{peer} (a planned switch makes it the source)")));
    let closed = daemon.ask_core(group, |reply| CoreMsg::CloseClients {
        group: group.clone(),
        reason: format!("planned switch: {peer} becomes the source"),
        reply,
    });
    let last_lsn = match closed.and_then(|()| drain(daemon, group)) {
        Ok(lsn) => lsn,
        Err(reason) => {
            daemon.fence_clients(group, None);
            return Err(format!("switch refused, {group} takes writes again: {reason}"));
        }
    };
    let entry = entry_from(&p)?;
    daemon.ask_core(group, |reply| CoreMsg::LeavePartnership { group: group.clone(), reply })?;
    if let Err(reason) = daemon.become_destination(group, entry, last_lsn).and_then(|()| {
        daemon.set_channel_policy(group, &p.network, encryption_code(&p.encryption)?, transport_code(&p.transport))
    }) {
        let restored = restore_source(daemon, group, &p, last_lsn);
        return Err(format!("{group} could not become a destination ({reason}); {restored}"));
    }
    match hand_over(daemon, status, &p, last_lsn, &p.peer_address) {
        Ok(()) => {
            daemon.events.record(group, EventKind::PartnershipSwitched { peer: peer.clone(), now: "destination".into() });
            Ok(format!(
                "switched: {peer} is the source now (writes there are replicated here), {}/{group} is its destination; every write up to LSN {last_lsn} is on both",
                daemon.config.node.name
            ))
        }
        Err(HandOver::Refused(reason)) => {
            let _ = daemon.ask_core(group, |reply| CoreMsg::LeavePartnership { group: group.clone(), reply });
            let restored = restore_source(daemon, group, &p, last_lsn);
            Err(format!("{peer} refused to take over ({reason}); {restored}"))
        }
        Err(HandOver::Unreachable(reason)) => Err(format!(
            "{group} is now a destination of {peer}, but {peer} could not be told to take over ({reason}); no side takes writes: once it answers, run `tandem partnership switch --new-source {peer}` on {} (it asks this node, which hands over at once), or `tandem group promote {}` there if this node is lost",
            p.peer_node, p.peer_group
        )),
    }
}

/// Waits until the destination holds and has applied every write; the LSN.
fn drain(daemon: &Daemon, group: &str) -> Result<u64, String> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let status = daemon.group_status(group)?;
        let p = status.partnership.ok_or("the partnership ended during the switch")?;
        let in_flight = status.connections > 0;
        if !in_flight
            && p.connected
            && p.destination_durable_lsn == p.current_lsn
            && p.destination_applied_lsn == p.current_lsn
        {
            return Ok(p.current_lsn);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the destination holds LSN {} of {} after {} s ({} client connection(s) still closing)",
                p.destination_durable_lsn,
                p.current_lsn,
                DRAIN_TIMEOUT.as_secs(),
                status.connections
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This side's partnership entry, seen from the other role.
fn entry_from(p: &PartnershipStatus) -> Result<PartnershipEntry, String> {
    let mut entry = PartnershipEntry::default_zeroed();
    entry.id = crate::replication_dest::parse_id(&p.id)?;
    entry.mode = if p.mode == "sync" { MODE_SYNC } else { MODE_ASYNC };
    entry.channels = p.channels;
    entry.copy_state = COPY_DONE;
    entry.peer_node = fixed_str(&p.peer_node).ok_or("peer node name too long")?;
    entry.peer_group = fixed_str(&p.peer_group).ok_or("peer group name too long")?;
    Ok(entry)
}

/// Makes `group` the source of its partnership again, after a switch that
/// did not happen; returns what to tell the operator.
fn restore_source(daemon: &Daemon, group: &str, p: &PartnershipStatus, last_lsn: u64) -> String {
    let restored = entry_from(p).and_then(|mut entry| {
        entry.peer_address = fixed_str(&p.peer_address).ok_or("peer address too long")?;
        entry.peer_durable_lsn = last_lsn;
        daemon.become_source(group, entry)?;
        daemon.set_channel_policy(group, &p.network, encryption_code(&p.encryption)?, transport_code(&p.transport))
    });
    daemon.fence_clients(group, None);
    match restored {
        Ok(()) => format!("{group} is the source again and takes writes"),
        Err(reason) => {
            format!("{group} could not be made the source again ({reason}); check `tandem partnership show`")
        }
    }
}

enum HandOver {
    Refused(String),
    Unreachable(String),
}

/// Tells the old destination to take over after `last_lsn` (repeated: a
/// take-over that already happened is answered as done).
fn hand_over(
    daemon: &Daemon,
    status: &GroupStatus,
    p: &PartnershipStatus,
    last_lsn: u64,
    address: &str,
) -> Result<(), HandOver> {
    let request = CreateRequest { destination: address.to_owned(), ..CreateRequest::existing(&status.name, p) };
    let mut hello = hello_for(daemon, status, &request, HelloAction::Switch, &p.id);
    hello.baseline_lsn = last_lsn;
    hello.replication_port = daemon.config.node.replication_listen.port();
    let mut last_error = String::new();
    for attempt in 0..TAKE_OVER_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let answered = open_control(daemon, &request).and_then(|mut stream| {
            write_line(&mut stream, &hello)?;
            read_line::<Answer>(&mut stream)
        });
        match answered {
            Ok(answer) if answer.ok => return Ok(()),
            Ok(answer) => return Err(HandOver::Refused(answer.error.unwrap_or_default())),
            Err(reason) => last_error = reason,
        }
    }
    Err(HandOver::Unreachable(last_error))
}

/// On the destination: asks the source to switch (the source runs it and
/// answers with its outcome).
fn ask_source(daemon: &Daemon, status: &GroupStatus) -> Result<String, String> {
    let p = status.partnership.clone().ok_or_else(|| format!("group {} is not in a partnership", status.name))?;
    let address = daemon.source_address(&status.name).ok_or_else(|| {
        format!(
            "the source {}/{} has not connected since this daemon started, so its address is unknown here; run the switch on {}",
            p.peer_node, p.peer_group, p.peer_node
        )
    })?;
    let request = CreateRequest {
        destination: address,
        destination_node: Some(p.peer_node.clone()),
        ..CreateRequest::existing(&status.name, &p)
    };
    let mut hello = hello_for(daemon, status, &request, HelloAction::SwitchRequest, &p.id);
    // From the destination's side: it names itself as the sender and the
    // source's group as the one to switch.
    hello.source_group.clone_from(&status.name);
    hello.destination_group.clone_from(&p.peer_group);
    let mut stream = open_control(daemon, &request)?;
    // The source fences, drains and hands over before it answers.
    let _ = stream.tcp().set_read_timeout(Some(DRAIN_TIMEOUT + Duration::from_secs(30)));
    write_line(&mut stream, &hello)?;
    let answer: Answer = read_line(&mut stream)?;
    match (answer.ok, answer.message, answer.error) {
        (true, message, _) => Ok(message.unwrap_or_else(|| "switched".to_owned())),
        (false, _, reason) => {
            Err(format!("{}/{} refused the switch: {}", p.peer_node, p.peer_group, reason.unwrap_or_default()))
        }
    }
}

/// On the source: the destination asks for the switch; runs it.
pub fn answer_switch_request(
    daemon: &Daemon,
    hello: &Hello,
    certified: Option<&str>,
    requester_ip: Option<IpAddr>,
) -> Answer {
    let node = &daemon.config.node.name;
    let result = (|| {
        if certified.is_some_and(|name| name != hello.source_node) {
            return Err(format!("the requester's certificate does not name node {:?}", hello.source_node));
        }
        let group = &hello.destination_group;
        let status = daemon.group_status(group)?;
        let same = status.partnership.as_ref().is_some_and(|p| {
            p.id == hello.partnership_id && p.peer_node == hello.source_node && p.peer_group == hello.source_group
        });
        if same && status.role == "destination" {
            // An earlier switch gave up this side's role but its hand-over
            // never arrived: hand over now.
            let p = status.partnership.clone().expect("checked");
            let ip = requester_ip.ok_or("the requester's address is unknown")?;
            let address = SocketAddr::new(ip, hello.replication_port).to_string();
            let _guard = daemon.mark_changing(group)?;
            return match hand_over(daemon, &status, &p, status.current_lsn, &address) {
                Ok(()) => Ok(format!("switch completed: {}/{} is the source now", p.peer_node, p.peer_group)),
                Err(HandOver::Refused(reason) | HandOver::Unreachable(reason)) => Err(reason),
            };
        }
        let ours = same && status.role == "source";
        if !ours {
            return Err(format!(
                "{group} on {node} is not the source of {}/{} in that partnership",
                hello.source_node, hello.source_group
            ));
        }
        let _guard = daemon.mark_changing(group)?;
        switch(daemon, group)
    })();
    match result {
        Ok(message) => Answer { ok: true, message: Some(message), destination_node: node.clone(), ..Answer::default() },
        Err(reason) => Answer { error: Some(reason), destination_node: node.clone(), ..Answer::default() },
    }
}

/// Whether a repeated take-over finds it done: this group is already the
/// source of that partnership, towards the node that asked.
#[must_use]
pub fn already_taken_over(status: &GroupStatus, hello: &Hello) -> bool {
    status.role == "source"
        && status.partnership.as_ref().is_some_and(|p| {
            p.id == hello.partnership_id && p.peer_node == hello.source_node && p.peer_group == hello.source_group
        })
}

/// On the destination: the source drained and became our destination;
/// become its source, continuing after `hello.baseline_lsn`.
pub fn take_over(
    daemon: &Daemon,
    group: &str,
    hello: &Hello,
    state: &tandem_engine::runtime::DestinationState,
    p: &PartnershipStatus,
    source_ip: Option<IpAddr>,
) -> Result<(), String> {
    let node = &daemon.config.node.name;
    if state.durable_lsn != hello.baseline_lsn || state.next_lsn != hello.baseline_lsn + 1 {
        return Err(format!(
            "{group} on {node} holds LSN {} (next {}) but the source switched at LSN {}; refused",
            state.durable_lsn, state.next_lsn, hello.baseline_lsn
        ));
    }
    if state.copy != tandem_engine::core::CopyPosition::Done {
        return Err(format!("the initial copy into {group} on {node} is not complete; refused"));
    }
    let ip = source_ip.ok_or("the source's address is unknown")?;
    let address = SocketAddr::new(ip, hello.replication_port).to_string();
    let mut entry = entry_from(p)?;
    entry.peer_address = fixed_str(&address).ok_or("source address too long")?;
    entry.peer_durable_lsn = hello.baseline_lsn;
    let encryption = encryption_code(&p.encryption)?;
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    daemon.leave_partnership(group)?;
    // Clients stay read-only until the role is durable.
    daemon.fence_clients(group, Some(format!("{peer} (switching)")));
    let baseline = daemon.become_source(group, entry);
    let result = baseline.and_then(|baseline| {
        if baseline != hello.baseline_lsn {
            return Err(format!("{group} continues after LSN {baseline}, not {}", hello.baseline_lsn));
        }
        daemon.set_channel_policy(group, &p.network, encryption, transport_code(&p.transport))
    });
    daemon.fence_clients(group, None);
    result?;
    daemon.events.record(group, EventKind::PartnershipSwitched { peer, now: "source".into() });
    Ok(())
}
