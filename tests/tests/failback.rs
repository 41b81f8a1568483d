//! Failback after an unplanned promotion, between two real daemons: the old
//! source dies under writes (async), the destination is promoted and takes
//! writes, the old source restarts, learns of the promotion, fences itself
//! (no client I/O), lists what it holds beyond the promotion (every
//! acknowledged write the promoted side lacks lies in those ranges), saves
//! them, and fails back: only the blocks that differ move, and the volumes
//! end equal.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_tests::pattern::{WriteModel, BLOCK_BYTES};
use tandem_tests::run_ok;
use tandem_tests::writer;

const VOLUME_BYTES: u64 = 64 << 20;

fn md5(path: &std::path::Path) -> String {
    run_ok(Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_returning_source_is_fenced_lists_what_diverged_and_fails_back_moving_only_differences() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let (net, mut a, b) = tandem_tests::two_nodes("");
    a.replicate_to(&b, "256MiB", &[("data", VOLUME_BYTES)], "async");

    // Async: writes acknowledged on node-a may not have reached node-b when it dies.
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer::spawn(net.as_ref(), &a, ("rg01/data", VOLUME_BYTES), (0, 11), &model, &stop);
    std::thread::sleep(Duration::from_millis(800));
    // The source's site is lost: its link goes down and it dies.
    if let Some(net) = &net {
        net.set_link(false);
    }
    a.kill9();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    wait_until("node-b noticing its source is gone", Duration::from_secs(20), || {
        b.partnership("rg02")["connected"] == false
    });
    let promoted = b.cli_ok(&["group", "promote", "rg02"]);
    assert!(promoted.contains("rg02 promoted"), "{promoted}");
    let promoted_after = b.group_status("rg02")["promoted_after_lsn"].as_u64().unwrap();
    run_ok(
        b.client_command("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 40M 1M"]).arg(b.nbd_uri("rg02", "data")),
    );
    // What node-b holds now: acknowledged writes it lacks are node-a's divergence.
    let promoted_image = std::fs::read(b.path("rg02-data.img")).unwrap();

    a.spawn();
    if let Some(net) = &net {
        net.set_link(true);
    }
    a.wait_for_events(&[7002], Duration::from_secs(30));
    let status = a.group_status("rg01");
    assert_eq!(status["fenced_after_lsn"], promoted_after, "{status:#}");
    let refused = a
        .client_command("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(a.nbd_uri("rg01", "data"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a fenced group takes no client I/O: {refused:?}");
    let shown = a.cli_ok(&["partnership", "show", "--group", "rg01"]);
    assert!(shown.contains("FENCED") && shown.contains("tandem partnership failback"), "{shown}");

    // Every acknowledged write node-b lacks lies in a listed range.
    let p = a.partnership("rg01");
    let ranges: Vec<(u64, u64)> = p["diverged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    let model = model.lock().unwrap();
    let mut lost = 0;
    for (block, bytes) in promoted_image.chunks(BLOCK_BYTES).enumerate() {
        let offset = (block * BLOCK_BYTES) as u64;
        if (40 << 20..41 << 20).contains(&offset) || model.check(block as u64, bytes).is_ok() {
            continue;
        }
        lost += 1;
        assert!(
            ranges.iter().any(|&(start, length)| offset >= start && offset < start + length),
            "block {block} lost on node-b but not listed as diverged: {ranges:?}"
        );
    }
    let diverged_records = p["diverged_records"].as_u64().unwrap();
    // The RPO at promotion counts the records node-a reported (heartbeats)
    // that never arrived: at most what node-a really holds beyond them.
    let events = b.cli_ok(&["events", "--json"]);
    let promotion: serde_json::Value =
        serde_json::from_str(events.lines().find(|l| l.contains("\"id\":7001,")).expect("event 7001")).unwrap();
    let reported = promotion["data"]["records_missing"].as_u64().unwrap();
    // The source went silent when its link went down, seconds before the
    // promotion (the destination waits for the peer timeout): the report says so.
    let silent_ms = promotion["data"]["source_silent_ms"].as_u64().unwrap();
    assert!(silent_ms >= 1000, "last heard {silent_ms} ms before the promotion");
    assert!(promoted.contains("was last heard"), "{promoted}");
    assert!(reported <= diverged_records, "reported RPO {reported} records, actually {diverged_records}");
    eprintln!(
        "{lost} acknowledged block(s) never reached node-b; node-a lists {diverged_records} record(s) in {} range(s); the promotion reported {reported} missing",
        ranges.len()
    );
    drop(model);

    let saved = tempfile::tempdir().unwrap();
    let failback = a.cli_ok(&[
        "partnership",
        "failback",
        "--group",
        "rg01",
        "--preserve-diverged",
        saved.path().to_str().unwrap(),
    ]);
    assert!(failback.contains("failing back"), "{failback}");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.path().join("diverged.json")).unwrap()).unwrap();
    assert_eq!(index["ranges"].as_array().unwrap().len(), ranges.len());
    for range in index["ranges"].as_array().unwrap() {
        let file = saved.path().join(range["file"].as_str().unwrap());
        assert_eq!(std::fs::metadata(file).unwrap().len(), range["length"].as_u64().unwrap());
    }

    b.wait_in_sync("rg02", Duration::from_secs(120));
    assert_eq!(a.group_status("rg01")["role"], "destination");
    assert_eq!(a.group_status("rg01")["fenced_after_lsn"], serde_json::Value::Null);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
    let sync = &b.partnership("rg02")["sync"];
    let moved = sync["bytes_sent"].as_u64().unwrap();
    let diverged_bytes: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(moved >= 1 << 20, "node-b's own write moved: {sync:#}");
    assert!(moved <= (1 << 20) + diverged_bytes + (4 << 20), "only what differs moved: {moved} bytes, {sync:#}");
}
