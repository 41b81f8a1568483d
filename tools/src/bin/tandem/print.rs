//! How `tandem` prints the daemon's answers: messages, the group table and
//! one group in detail.

use tandem_engine::runtime::status::GroupStatus;
use tandem_tools::api::ResponseBody;
use tandem_tools::size::format_size;

pub(crate) fn print_message(body: &ResponseBody) {
    if let ResponseBody::Message(message) = body {
        println!("{message}");
    }
}

pub(crate) fn print_groups(body: &ResponseBody, json: bool, detailed: bool) {
    let ResponseBody::Groups(groups) = body else { return };
    if json {
        println!("{}", serde_json::to_string_pretty(groups).expect("status serializes"));
        return;
    }
    if groups.is_empty() {
        println!("no groups; create one with `tandem group create --name NAME --log PATH --volume PATH`");
        return;
    }
    for group in groups {
        if detailed {
            print_detailed(group);
        } else {
            let volumes: Vec<String> = group.volumes.iter().map(|v| format!("{}/{}", group.name, v.name)).collect();
            println!(
                "{:<16} {:<10} log {:<40} exports {}",
                group.name,
                short_state(&group.state),
                group.log_path,
                volumes.join(" ")
            );
        }
    }
}

fn short_state(state: &str) -> &str {
    state.split(':').next().unwrap_or(state)
}

fn print_detailed(g: &GroupStatus) {
    println!("group {}: {}", g.name, g.state);
    println!("  LSN           current {}  durable {}  checkpoint {}", g.current_lsn, g.durable_lsn, g.checkpoint_lsn);
    println!(
        "  log           {} ({} ring, {} used, {} free, {}-byte sectors{})",
        g.log_path,
        format_size(g.log_size_bytes),
        format_size(g.log_used_bytes),
        format_size(g.log_free_bytes),
        g.log_sector_bytes,
        if g.log_direct_io { ", O_DIRECT" } else { ", O_DSYNC without O_DIRECT" }
    );
    for v in &g.volumes {
        println!("  volume        {}/{} {} ({})", g.name, v.name, v.path, format_size(v.size_bytes));
    }
    println!(
        "  engine        core {}; group commit up to {} records per log write, {} log writes in flight",
        g.core, g.max_batch_records, g.max_inflight_appends
    );
    println!(
        "  writes        {} completed, {} waiting for log space, {} written; latency avg {:.0} us, p99 {} us",
        g.writes_completed,
        g.writes_waiting_for_log_space,
        format_size(g.bytes_written),
        g.write_latency_us_avg,
        g.write_latency_us_p99
    );
    println!("  reads         {} completed, {} read", g.reads_completed, format_size(g.bytes_read));
    println!("  checkpoints   {}   connections {}   epoch {}", g.checkpoints, g.connections, g.epoch);
    if g.partnership.is_some() {
        tandem_tools::partnership_view::print_partnership(g);
    }
    let r = &g.last_recovery;
    println!(
        "  last recovery replayed {} records ({}), LSN {}..{}, {} ms; stopped at {}",
        r.records_replayed,
        format_size(r.bytes_replayed),
        r.first_lsn,
        r.last_lsn,
        r.elapsed_ms,
        r.stopped
    );
}

pub(crate) fn paths(files: &[std::path::PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}
