//! `tandem partnership show`: text, JSON, and `--watch` with a progress bar
//! for the initial sync (bytes compared of the volumes' total).

use std::path::Path;
use std::time::Duration;

use tandem_engine::runtime::status::GroupStatus;

use crate::api::{call, CallError, Request, ResponseBody};
use crate::size::format_size;

pub fn print_partnerships(body: &ResponseBody, json: bool) {
    let ResponseBody::Groups(groups) = body else { return };
    if json {
        let partnerships: Vec<serde_json::Value> = groups
            .iter()
            .filter_map(|g| {
                let mut value = serde_json::to_value(g.partnership.as_ref()?).ok()?;
                value["group"] = serde_json::Value::String(g.name.clone());
                value["role"] = serde_json::Value::String(g.role.clone());
                Some(value)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&partnerships).expect("status serializes"));
        return;
    }
    if groups.is_empty() {
        println!("no partnerships; create one with `tandem partnership create --source-group G --destination HOST --destination-group G2`");
        return;
    }
    for g in groups {
        print_partnership(g);
    }
}

pub fn print_partnership(g: &GroupStatus) {
    let Some(p) = &g.partnership else { return };
    let arrow = if g.role == "source" { "->" } else { "<-" };
    println!("{} ({}) {arrow} {}/{}  {} mode, {}", g.name, g.role, p.peer_node, p.peer_group, p.mode, p.state);
    let transport = match (&p.transport_fallback, p.transport.as_str()) {
        (Some(reason), _) => format!("TCP while RDMA is away ({reason}); it moves back once the RDMA path returns"),
        (None, "rdma") => "RDMA; channel 0 is the TCP control connection".to_owned(),
        _ => "TCP".to_owned(),
    };
    println!("  channels      {} of {} connected ({transport})", p.channels_connected, p.channels);
    for (index, addresses) in p.channel_addresses.iter().enumerate() {
        println!("  channel {index:<5} {addresses}");
    }
    if !p.network.is_empty() {
        println!("  network       constrained to {} on this node", p.network);
    }
    if let Some(after_lsn) = g.fenced_after_lsn {
        println!(
            "  FENCED        {}/{} was promoted after LSN {after_lsn}: no client I/O here; {} record(s) beyond it",
            p.peer_node, p.peer_group, p.diverged_records
        );
        for range in &p.diverged {
            println!(
                "  diverged      {} ({}) {}..{} ({} bytes)",
                range.volume,
                range.volume_index,
                range.offset,
                range.offset + range.length,
                range.length
            );
        }
        println!("  failback      `tandem partnership failback --group {} [--preserve-diverged DIR]`", g.name);
    }
    if let Some(test) = &g.test_failover {
        match &test.broken {
            Some(reason) => println!("  test failover BROKEN: {reason}"),
            None => println!(
                "  test failover {}@test exports, snapshot at LSN {}, {} of {} bytes used ({})",
                g.name, test.lsn, test.used_bytes, test.max_bytes, test.file
            ),
        }
    }
    let protection = match p.encryption.as_str() {
        "aes-128-gcm" => "AES-128-GCM (encrypted and authenticated), peer authenticated by TLS",
        "sign" => "signed (GMAC, authenticated, not encrypted), peer authenticated by TLS",
        _ => "none: frames travel in clear",
    };
    println!("  encryption    {protection}");
    if p.frames_rejected > 0 {
        println!("  rejected      {} frame(s) failed authentication (each reset the session)", p.frames_rejected);
    }
    if g.role == "source" {
        println!(
            "  LSN           current {}  destination durable {}  behind {}  RPO {} ms",
            p.current_lsn,
            p.destination_durable_lsn,
            format_size(p.bytes_behind),
            p.rpo_ms
        );
        let s = &p.sync;
        println!(
            "  initial sync  {} compared: {} equal, {} sent, {} punched as holes; {} remaining{}",
            format_size(s.bytes_compared),
            format_size(s.bytes_equal),
            format_size(s.bytes_sent),
            format_size(s.bytes_zeroed),
            format_size(p.copy_remaining_bytes),
            match (p.copy_remaining_bytes, s.eta_s) {
                (0, _) => String::new(),
                (_, Some(eta)) => format!(" at {}/s, about {eta:.0} s left", format_size(s.rate_bytes_per_s as u64)),
                (_, None) => String::new(),
            }
        );
        println!(
            "  volume reads  {} read, {} skipped as holes",
            format_size(p.copy_bytes_sent),
            format_size(p.copy_bytes_skipped)
        );
        println!(
            "  sync          last in sync {}, last out of sync {}; ship-to-durable-ack round trip avg {:.0} us",
            ago(p.last_in_sync_unix_ms),
            ago(p.last_out_of_sync_unix_ms),
            p.ack_round_trip_us_avg
        );
        if p.bitmap_dirty_bytes > 0 || p.bitmap_spills > 0 {
            println!(
                "  bitmap        {} marked for catch-up ({} spill(s) of a full log since start)",
                format_size(p.bitmap_dirty_bytes),
                p.bitmap_spills
            );
        }
    } else {
        println!(
            "  LSN           durable {}  applied {}  source's last known {}  initial copy {}",
            p.destination_durable_lsn,
            p.destination_applied_lsn,
            p.source_durable_lsn,
            if p.copy_complete { "complete" } else { "in progress" }
        );
    }
    println!("  traffic       {} sent, {} received", format_size(p.bytes_sent), format_size(p.bytes_received));
    if p.zero_copy_bytes_sent + p.zero_copy_bytes_received > 0 {
        println!(
            "  zero copy     {} read by the peer from this node's buffers, {} read from the peer's (RDMA READ)",
            format_size(p.zero_copy_bytes_sent),
            format_size(p.zero_copy_bytes_received)
        );
    }
    if g.role == "source" {
        println!("  read back     {} record(s) shipped from the log (not from memory)", p.records_read_back);
    }
    if let Some(error) = &p.last_error {
        println!("  last error    {error}");
    }
}

/// "12 s ago" for a Unix time in milliseconds ("never" for 0).
pub fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    format!("{} s ago", now.saturating_sub(unix_ms) / 1000)
}

/// Redraws a progress bar per source partnership every `seconds` until
/// every initial sync is done, then prints the partnerships.
pub fn watch(api: &Path, group: Option<&str>, seconds: u64) -> Result<(), CallError> {
    let bars = indicatif::MultiProgress::new();
    let mut shown: Vec<(String, indicatif::ProgressBar)> = Vec::new();
    loop {
        let body = call(api, &Request::PartnershipShow { group: group.map(str::to_owned) })?;
        let ResponseBody::Groups(groups) = &body else {
            return Err(CallError::Refused("tandemd answered without groups".to_owned()));
        };
        let mut syncing = false;
        for g in groups.iter().filter(|g| g.role == "source") {
            let Some(p) = &g.partnership else { continue };
            let total = p.sync.bytes_compared + p.copy_remaining_bytes;
            let bar = match shown.iter().find(|(name, _)| name == &g.name) {
                Some((_, bar)) => bar.clone(),
                None => {
                    let bar = bars.add(indicatif::ProgressBar::new(total.max(1)));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {bytes}/{total_bytes} compared, {msg}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(format!("{} -> {}/{}", g.name, p.peer_node, p.peer_group));
                    shown.push((g.name.clone(), bar.clone()));
                    bar
                }
            };
            bar.set_length(total.max(1));
            bar.set_position(p.sync.bytes_compared);
            bar.set_message(format!(
                "{} equal, {} sent, {}",
                format_size(p.sync.bytes_equal),
                format_size(p.sync.bytes_sent),
                p.sync
                    .eta_s
                    .filter(|_| p.copy_remaining_bytes > 0)
                    .map_or_else(|| p.state.clone(), |eta| format!("ETA {eta:.0} s"))
            ));
            syncing |= p.copy_remaining_bytes > 0;
        }
        if !syncing {
            for (_, bar) in &shown {
                bar.finish();
            }
            print_partnerships(&body, false);
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(seconds.max(1)));
    }
}

/// Follows the verify pass of `group` with a progress bar, then lists what it
/// found; an error (exit 1) when ranges differ and were not repaired.
pub fn wait_for_verify(api: &Path, group: &str) -> Result<(), CallError> {
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("verify [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (status, volumes) = loop {
        let body = call(api, &Request::PartnershipShow { group: Some(group.to_owned()) })?;
        let ResponseBody::Groups(groups) = body else {
            return Err(CallError::Refused("tandemd answered without groups".to_owned()));
        };
        let g = groups.into_iter().next().ok_or_else(|| CallError::Refused(format!("group {group} is gone")))?;
        let Some(p) = g.partnership else { return Err(CallError::Refused(format!("{group} left its partnership"))) };
        let v = p.verify;
        bar.set_length(v.total_bytes.max(1));
        bar.set_position(v.bytes_verified);
        bar.set_message(format!("{} range(s) out of sync", v.out_of_sync_ranges));
        if !v.running {
            break (v, g.volumes);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    for range in &status.ranges {
        let name = volumes.get(usize::from(range.volume_index)).map_or("?", |v| v.name.as_str());
        println!(
            "out of sync: volume {} ({name}) {}..{} ({})",
            range.volume_index,
            range.offset,
            range.offset + u64::from(range.length),
            format_size(u64::from(range.length))
        );
    }
    if let Some(reason) = &status.stopped {
        return Err(CallError::Refused(format!(
            "verify stopped after {} of {}: {reason}; run it again",
            format_size(status.bytes_verified),
            format_size(status.total_bytes)
        )));
    }
    let summary = format!(
        "verified {}: {} range(s) out of sync ({}), {} repaired",
        format_size(status.bytes_verified),
        status.out_of_sync_ranges,
        format_size(status.out_of_sync_bytes),
        format_size(status.repaired_bytes)
    );
    if status.out_of_sync_ranges > 0 && status.repaired_bytes < status.out_of_sync_bytes {
        return Err(CallError::Refused(format!(
            "{summary}; run `tandem partnership verify --group {group} --repair` to fix them"
        )));
    }
    println!("{summary}");
    Ok(())
}
