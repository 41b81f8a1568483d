//! `tandem partnership set --mode sync|async`: the mode of a running
//! partnership changes on the source at once (writes acknowledged from then on
//! follow it) and is persisted in both superblocks; the destination is told
//! on the replication port, as for a removal.

use tandem_engine::runtime::events::EventKind;
use tandem_engine::runtime::CoreMsg;
use tandem_proto::{MODE_ASYNC, MODE_SYNC};

use crate::daemon::Daemon;
use crate::replication::{exchange_with, hello_for, open_control, CreateRequest, HelloAction};

fn mode_value(mode: &str) -> Result<u32, String> {
    match mode {
        "sync" => Ok(MODE_SYNC),
        "async" => Ok(MODE_ASYNC),
        other => Err(format!("--mode {other}: use sync or async")),
    }
}

/// Changes the mode of the partnership of source group `group`.
pub fn set_mode(daemon: &Daemon, group: &str, mode: &str) -> Result<String, String> {
    let value = mode_value(mode)?;
    let status = daemon.group_status(group)?;
    let partnership = status.partnership.clone().ok_or_else(|| format!("group {group} is not in a partnership"))?;
    if status.role != "source" {
        return Err(format!(
            "group {group} is the destination of {}/{}: change the mode on the source",
            partnership.peer_node, partnership.peer_group
        ));
    }
    if partnership.mode == mode {
        return Ok(format!("the partnership of {group} is already {mode}"));
    }
    daemon.ask_core(group, |reply| CoreMsg::SetMode { group: group.to_owned(), mode: value, reply })?;
    let peer = format!("{}/{}", partnership.peer_node, partnership.peer_group);
    daemon.events.record(
        group,
        EventKind::ModeChanged { from: partnership.mode.clone(), to: mode.to_owned(), peer: peer.clone() },
    );
    let request = CreateRequest { mode: mode.to_owned(), ..CreateRequest::existing(group, &partnership) };
    let hello = hello_for(daemon, &status, &request, HelloAction::SetMode, &partnership.id);
    let told = open_control(daemon, &request).and_then(|mut stream| exchange_with(&mut stream, &hello));
    let remote = match told {
        Ok(_) => format!("; {peer} holds it too"),
        Err(reason) => format!("; {peer} could not be told ({reason}) and shows the old mode until it is"),
    };
    Ok(format!(
        "partnership of {group} is now {mode} (was {}): {}{remote}",
        partnership.mode,
        if mode == "sync" {
            "writes are acknowledged once both logs hold them"
        } else {
            "writes are acknowledged once this log holds them"
        }
    ))
}

/// On the destination: the source changed the mode.
pub fn take_mode(daemon: &Daemon, group: &str, mode: &str) -> Result<(), String> {
    let value = mode_value(mode)?;
    let before = daemon.group_status(group)?.partnership.map(|p| p.mode).unwrap_or_default();
    daemon.ask_core(group, |reply| CoreMsg::SetMode { group: group.to_owned(), mode: value, reply })?;
    let status = daemon.group_status(group)?;
    let peer = status.partnership.map(|p| format!("{}/{}", p.peer_node, p.peer_group)).unwrap_or_default();
    daemon.events.record(group, EventKind::ModeChanged { from: before, to: mode.to_owned(), peer });
    Ok(())
}
