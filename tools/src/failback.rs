//! Failback after an unplanned promotion. A source that returns and learns
//! that its destination was promoted fences itself (no client I/O, persisted)
//! and lists what it holds beyond the promotion: `tandem partnership show`
//! prints the diverged ranges before anything overwrites them.
//! `tandem partnership failback --group G [--preserve-diverged DIR]` saves
//! them if asked, then asks the promoted group to replicate back: it creates
//! the reverse partnership (seeded, so the compared resync moves only the
//! blocks that differ: what this side wrote after the promotion and what the
//! promoted side wrote since).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::failback::DivergedRange;
use tandem_engine::runtime::status::GroupStatus;
use tandem_engine::runtime::CoreMsg;

use crate::daemon::Daemon;
use crate::replication::{hello_for, open_control, read_line, write_line, Answer, CreateRequest, Hello, HelloAction};

/// On a source whose destination answered that it was promoted after
/// `after_lsn`: fence the group off from clients, persistently.
pub fn fence(daemon: &Daemon, status: &GroupStatus, after_lsn: u64, peer_generation: &str) -> Result<(), String> {
    if status.fenced_after_lsn.is_some() {
        return Ok(());
    }
    let group = &status.name;
    let p = status.partnership.as_ref().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    daemon.fence_clients(group, Some(fence_text(&peer, after_lsn)));
    daemon.ask_core(group, |reply| CoreMsg::SetFence { group: group.clone(), after_lsn: Some(after_lsn), reply })?;
    daemon.ask_core(group, |reply| CoreMsg::CloseClients {
        group: group.clone(),
        reason: format!("{peer} was promoted: this group is fenced"),
        reply,
    })?;
    let fenced = daemon.group_status(group)?;
    let p = fenced.partnership.unwrap_or_default();
    let diverged_bytes = p.diverged.iter().map(|r| r.length).sum();
    daemon.events.record(
        group,
        EventKind::PeerPromoted {
            peer,
            after_lsn,
            diverged_records: p.diverged_records,
            diverged_bytes,
            generation: fenced.generation,
            peer_generation: peer_generation.to_owned(),
        },
    );
    Ok(())
}

/// What clients of a fenced group are told.
#[must_use]
pub fn fence_text(peer: &str, after_lsn: u64) -> String {
    format!("{peer}, which was promoted after LSN {after_lsn} (run `tandem partnership failback` here)")
}

/// On the fenced old source: save the diverged ranges if asked, then have
/// the promoted group replicate back into this one.
pub fn failback(daemon: &Daemon, group: &str, preserve: Option<&Path>) -> Result<String, String> {
    let status = daemon.group_status(group)?;
    let Some(after_lsn) = status.fenced_after_lsn else {
        return Err(format!(
            "group {group} is not fenced: failback is for a source whose destination was promoted (it learns that when it reconnects)"
        ));
    };
    let p = status.partnership.clone().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    let saved = match preserve {
        Some(dir) => format!("; {} saved in {}", preserve_ranges(&status, &p.diverged, dir)?, dir.display()),
        None => String::new(),
    };
    let request = CreateRequest::existing(group, &p);
    let mut hello = hello_for(daemon, &status, &request, HelloAction::FailbackRequest, &p.id);
    hello.baseline_lsn = after_lsn;
    daemon.leave_partnership(group)?;
    // Still fenced (the superblock says so until this group is a destination).
    daemon.fence_clients(group, Some(fence_text(&peer, after_lsn)));
    let answered = open_control(daemon, &request).and_then(|mut stream| {
        let _ = stream.tcp().set_read_timeout(Some(std::time::Duration::from_secs(120)));
        write_line(&mut stream, &hello)?;
        read_line::<Answer>(&mut stream)
    });
    match answered {
        Ok(answer) if answer.ok => Ok(format!(
            "failing back: {peer} replicates into {group} now; {} diverged range(s) ({} bytes) are overwritten from it{saved}. {}",
            p.diverged.len(),
            p.diverged.iter().map(|r| r.length).sum::<u64>(),
            answer.message.unwrap_or_default()
        )),
        Ok(answer) => Err(format!(
            "{peer} refused the failback: {}; {group} stays fenced and standalone (run failback again, or remove the fence by deleting and re-creating the group)",
            answer.error.unwrap_or_default()
        )),
        Err(reason) => Err(format!(
            "{peer} could not be asked ({reason}); {group} stays fenced and standalone: run `tandem partnership create --source-group {} --destination {}:{} --destination-group {group} --seeded` on {}",
            p.peer_group,
            daemon.config.node.replication_listen.ip(),
            daemon.config.node.replication_listen.port(),
            p.peer_node
        )),
    }
}

/// Writes each diverged range's current bytes to DIR, with an index.
fn preserve_ranges(status: &GroupStatus, ranges: &[DivergedRange], dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut index = Vec::new();
    let mut total = 0u64;
    for range in ranges {
        let volume = &status.volumes[usize::from(range.volume_index)];
        let file = std::fs::File::open(&volume.path).map_err(|e| format!("cannot read {}: {e}", volume.path))?;
        let mut bytes = vec![0u8; range.length as usize];
        file.read_exact_at(&mut bytes, range.offset).map_err(|e| format!("cannot read {}: {e}", volume.path))?;
        let name = format!("{}-{}-{}.bin", range.volume, range.offset, range.length);
        let path = dir.join(&name);
        let mut out = std::fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        out.write_all(&bytes)
            .and_then(|()| out.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        index.push(serde_json::json!({
            "file": name, "volume": range.volume, "volume_index": range.volume_index,
            "offset": range.offset, "length": range.length,
        }));
        total += range.length;
    }
    let index_path = dir.join("diverged.json");
    let text = serde_json::to_string_pretty(&serde_json::json!({ "group": status.name, "ranges": index }))
        .expect("index serializes");
    std::fs::write(&index_path, text).map_err(|e| format!("cannot write {}: {e}", index_path.display()))?;
    Ok(format!("{} range(s), {total} bytes,", ranges.len()))
}

/// On the promoted group's node: the old source asks to fail back; create
/// the reverse partnership into it (seeded: only differing blocks move).
pub fn answer_failback_request(
    daemon: &Daemon,
    hello: &Hello,
    certified: Option<&str>,
    source_ip: Option<std::net::IpAddr>,
) -> Answer {
    let node = daemon.config.node.name.clone();
    let result = (|| {
        let status = promoted_group(daemon, hello, certified)?;
        let group = &status.name;
        let ip = source_ip.ok_or("the requester's address is unknown")?;
        let request = CreateRequest {
            source_group: group.clone(),
            destination: std::net::SocketAddr::new(ip, hello.replication_port).to_string(),
            destination_group: hello.source_group.clone(),
            mode: hello.mode.clone(),
            channels: hello.channels,
            seeded: true,
            source_network: String::new(),
            destination_network: String::new(),
            encryption: hello.encryption.clone(),
            destination_node: Some(hello.source_node.clone()),
            transport: hello.transport.clone(),
        };
        let _guard = daemon.mark_changing(group)?;
        crate::replication::create(daemon, &request)
    })();
    match result {
        Ok(message) => Answer { ok: true, message: Some(message), destination_node: node, ..Answer::default() },
        Err(reason) => Answer { error: Some(reason), destination_node: node, ..Answer::default() },
    }
}

/// `tandem partnership resolve --group G --keep NODE/GROUP`: on the fenced
/// old source, the side named survives; the other becomes its destination
/// and a compared resync overwrites what differs there.
pub fn resolve(daemon: &Daemon, group: &str, keep: &str, preserve: Option<&Path>) -> Result<String, String> {
    let status = daemon.group_status(group)?;
    let p = status.partnership.clone().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    let Some(after_lsn) = status.fenced_after_lsn else {
        return Err(format!("group {group} is not fenced: there is no split brain to resolve here"));
    };
    let here = format!("{}/{group}", daemon.config.node.name);
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    if keep == peer {
        return failback(daemon, group, preserve);
    }
    if keep != here {
        return Err(format!("--keep {keep}: name {here} (this side) or {peer} (the promoted side)"));
    }
    if preserve.is_some() {
        return Err(format!(
            "--preserve-diverged saves this side's diverged ranges, which --keep {here} keeps anyway; {peer}'s changes since its promotion are not tracked, so they cannot be saved here"
        ));
    }
    // The promoted side stops taking client I/O first: never two writers.
    let request = CreateRequest::existing(group, &p);
    let hello = hello_for(daemon, &status, &request, HelloAction::KeepSource, &p.id);
    let answer = open_control(daemon, &request).and_then(|mut stream| {
        write_line(&mut stream, &hello)?;
        read_line::<Answer>(&mut stream)
    })?;
    if !answer.ok {
        return Err(format!("{peer} refused: {}", answer.error.unwrap_or_default()));
    }
    daemon.leave_partnership(group)?;
    daemon.fence_clients(group, Some(fence_text(&peer, after_lsn)));
    let create = CreateRequest { seeded: true, ..CreateRequest::existing(group, &p) };
    let created = crate::replication::create(daemon, &create).map_err(|reason| {
        format!("{peer} is fenced, but the partnership into it failed ({reason}); {group} stays fenced: create it again with `tandem partnership create ... --seeded` once it answers")
    })?;
    daemon.ask_core(group, |reply| CoreMsg::SetFence { group: group.to_owned(), after_lsn: None, reply })?;
    daemon.fence_clients(group, None);
    Ok(format!(
        "split brain resolved: {here} kept and takes client I/O again; {peer} becomes its destination and is overwritten where it differs. {created}"
    ))
}

/// On the promoted side: the old source is kept; stop client I/O here and
/// wait for its partnership.
pub fn answer_keep_source(daemon: &Daemon, hello: &Hello, certified: Option<&str>) -> Answer {
    let node = daemon.config.node.name.clone();
    let result = (|| {
        let group = &promoted_group(daemon, hello, certified)?.name;
        let kept = format!("{}/{}", hello.source_node, hello.source_group);
        let fenced = format!("{kept} (kept by a split-brain resolution; this group becomes its destination)");
        daemon.fence_clients(group, Some(fenced));
        daemon.ask_core(group, |reply| CoreMsg::CloseClients {
            group: group.clone(),
            reason: format!("split brain resolved for {kept}"),
            reply,
        })?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while daemon.group_status(group)?.connections > 0 {
            if std::time::Instant::now() > deadline {
                daemon.fence_clients(group, None);
                return Err(format!("the clients of {group} on {node} did not disconnect within 10 s"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    })();
    match result {
        Ok(()) => Answer { ok: true, destination_node: node, ..Answer::default() },
        Err(reason) => Answer { error: Some(reason), destination_node: node, ..Answer::default() },
    }
}

/// The group a failback or split-brain request names, checked: the
/// requester is the node its certificate names, and the group was promoted
/// out of that partnership and replicates with nobody since.
fn promoted_group(daemon: &Daemon, hello: &Hello, certified: Option<&str>) -> Result<GroupStatus, String> {
    if certified.is_some_and(|name| name != hello.source_node) {
        return Err(format!("the requester's certificate does not name node {:?}", hello.source_node));
    }
    let group = &hello.destination_group;
    let status = daemon.group_status(group)?;
    if status.promoted_from != hello.partnership_id || status.role != "standalone" {
        return Err(format!(
            "{group} on {} was not promoted out of that partnership (or replicates again); nothing to fail back to",
            daemon.config.node.name
        ));
    }
    Ok(status)
}
