//! `tandem group snapshot create|list|delete`: consistent snapshots taken at
//! the same LSN on a source and its destination (see the engine's
//! `snapshots.rs`), exported read-only over NBD as `GROUP@NAME/VOLUME`.

use std::time::{Duration, Instant};

use tandem_engine::runtime::status::{GroupStatus, PartnershipStatus};
use tandem_engine::runtime::CoreMsg;

use crate::daemon::Daemon;

/// How long `create` waits for a connected destination to take its copy.
const DESTINATION_WAIT: Duration = Duration::from_secs(30);

/// Writes the snapshot record of `group` and reports where it was taken.
pub fn create(daemon: &Daemon, group: &str, name: &str) -> Result<String, String> {
    let status = daemon.group_status(group)?;
    let partnership = status.partnership.as_ref().filter(|_| status.role == "source");
    if let Some(p) = partnership {
        check_destination_can_follow(&status, p)?;
    }
    let owned = (group.to_owned(), name.to_owned());
    let lsn = daemon.ask(group, Duration::from_secs(30), |reply| CoreMsg::TakeSnapshot {
        group: owned.0,
        name: owned.1,
        reply,
    })??;
    let exports: Vec<String> = status.volumes.iter().map(|v| format!("{group}@{name}/{}", v.name)).collect();
    let here = format!("snapshot {name} of {group} taken at LSN {lsn}: read-only exports {}", exports.join(", "));
    let Some(p) = partnership else {
        return Ok(here);
    };
    let peer = format!("{}/{}", p.peer_node, p.peer_group);
    match wait_for_destination(daemon, group, lsn) {
        Ok(()) => Ok(format!("{here}; {peer} took its copy at the same LSN (exports {}@{name}/...)", p.peer_group)),
        Err(behind) => Ok(format!(
            "{here}; {peer} takes its copy when it applies LSN {lsn} ({behind}); if this log must overwrite that record before, the destination will not have it"
        )),
    }
}

/// Refuses a snapshot the destination could not take at the same state.
fn check_destination_can_follow(status: &GroupStatus, p: &PartnershipStatus) -> Result<(), String> {
    if p.state == "InitialBlockCopy" || p.copy_remaining_bytes > 0 {
        let total: u64 = status.volumes.iter().map(|v| v.size_bytes).sum();
        let done = 100 * total.saturating_sub(p.copy_remaining_bytes) / total.max(1);
        return Err(format!(
            "initial block copy {done} % done: {}/{} is not yet a copy of {}, so its snapshot would not match; take it once the partnership is ContinuouslyReplicating",
            p.peer_node, p.peer_group, status.name
        ));
    }
    if p.state == "BitmapCatchUp" || p.bitmap_dirty_bytes > 0 {
        return Err(format!(
            "bitmap catch-up in progress ({} bytes of marked regions to copy): {}/{} would take its snapshot from an incomplete copy; try again once it is done",
            p.bitmap_dirty_bytes, p.peer_node, p.peer_group
        ));
    }
    Ok(())
}

/// Waits until the destination applied `lsn`; else says how far it is.
fn wait_for_destination(daemon: &Daemon, group: &str, lsn: u64) -> Result<(), String> {
    let deadline = Instant::now() + DESTINATION_WAIT;
    loop {
        let p = daemon.group_status(group)?.partnership.ok_or("the partnership was removed")?;
        if p.destination_applied_lsn >= lsn {
            return Ok(());
        }
        if !p.connected {
            return Err(format!("it is not connected: {}", p.last_error.as_deref().unwrap_or("waiting for it")));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {} s it has applied LSN {}",
                DESTINATION_WAIT.as_secs(),
                p.destination_applied_lsn
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prints the snapshots of a group, as a table or JSON.
pub fn print_list(status: &GroupStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&status.snapshots).expect("snapshots serialize"));
        return;
    }
    if status.snapshots.is_empty() {
        println!(
            "group {} has no snapshots; `tandem group snapshot create {} --name NAME` takes one",
            status.name, status.name
        );
        return;
    }
    println!("{:<24} {:>12} {:<20} {:>21}  STATE", "NAME", "LSN", "TAKEN", "USED / MAX");
    for s in &status.snapshots {
        let taken = crate::partnership_view::ago(s.created_unix_ms);
        let used = format!("{} / {}", crate::size::format_size(s.used_bytes), crate::size::format_size(s.max_bytes));
        let state = s
            .broken
            .as_deref()
            .map_or_else(|| format!("export {}@{}/VOLUME", status.name, s.name), |r| format!("BROKEN: {r}"));
        println!("{:<24} {:>12} {:<20} {:>21}  {state}", s.name, s.lsn, taken, used);
    }
}

/// Deletes snapshot `name` of `group` on this node only.
pub fn delete(daemon: &Daemon, group: &str, name: &str) -> Result<String, String> {
    let owned = (group.to_owned(), name.to_owned());
    let info = daemon.ask(group, Duration::from_secs(30), |reply| CoreMsg::DeleteSnapshot {
        group: owned.0,
        name: owned.1,
        reply,
    })??;
    Ok(format!(
        "snapshot {name} of {group} (LSN {}) deleted on this node, {} freed; its partner's copy stays until deleted there",
        info.lsn,
        crate::size::format_size(info.used_bytes)
    ))
}
