//! Planned role switch between two real daemons: under a client's writes,
//! the destination becomes the source with every acknowledged write, takes
//! writes itself, and the switch back (asked on the other node) leaves both
//! volumes equal. Refused while the initial copy runs.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_tests::pattern::{check_acknowledged, WriteModel};
use tandem_tests::writer;
use tandem_tests::{run_ok, Node};

const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const VOLUME_BYTES: u64 = 32 << 20;

fn md5(path: &std::path::Path) -> String {
    run_ok(Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

fn write_pattern(node: &Node, group: &str, pattern: u8, offset_mib: u64) {
    run_ok(
        node.client_command("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pattern} {offset_mib}M 1M")])
            .arg(node.nbd_uri(group, "data")),
    );
}

#[test]
fn a_planned_switch_under_load_keeps_every_acknowledged_write_and_switches_back() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let (net, a, b) = tandem_tests::two_nodes("");
    a.replicate_to(&b, "128MiB", &[("data", VOLUME_BYTES)], "sync");

    // A client writes through node-a's export while the switch happens.
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer::spawn(net.as_ref(), &a, ("rg01/data", VOLUME_BYTES), (0, 7), &model, &stop);
    std::thread::sleep(Duration::from_millis(700));
    let switched = a.cli_ok(&["partnership", "switch", "--new-source", "node-b/rg02"]);
    assert!(switched.contains("node-b/rg02 is the source now"), "{switched}");
    // The switch disconnected the writer (its export turned read-only).
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(a.group_status("rg01")["role"], "destination");
    assert_eq!(b.group_status("rg02")["role"], "source");
    check_acknowledged(&b.path("rg02-data.img"), &model);

    // The new source takes writes and replicates them back; the old one refuses them.
    let refused = a
        .client_command("qemu-io")
        .args(["-f", "raw", "-c", "write -P 9 0 4k"])
        .arg(a.nbd_uri("rg01", "data"))
        .output()
        .unwrap();
    assert!(!refused.status.success() || String::from_utf8_lossy(&refused.stdout).contains("failed"), "{refused:?}");
    write_pattern(&b, "rg02", 0x42, 3);
    b.wait_in_sync("rg02", SYNC_TIMEOUT);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
    a.wait_for_events(&[2006], Duration::from_secs(5));
    b.wait_for_events(&[2006], Duration::from_secs(5));

    // Switch back, asked on the node that becomes the source again.
    let back = a.cli_ok(&["partnership", "switch", "--new-source", "node-a/rg01"]);
    assert!(back.contains("node-a/rg01 is the source now"), "{back}");
    assert_eq!(a.group_status("rg01")["role"], "source");
    write_pattern(&a, "rg01", 0x17, 5);
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
    let data = std::fs::read(a.path("rg01-data.img")).unwrap();
    assert!(data[3 << 20..4 << 20].iter().all(|&b| b == 0x42), "node-b's write came back");
    assert!(data[5 << 20..6 << 20].iter().all(|&b| b == 0x17));
}

#[test]
fn a_switch_during_the_initial_copy_is_refused_with_its_progress() {
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    let size_mib = 768;
    a.create_group("rg01", "256MiB", &[("data", size_mib << 20)]);
    b.create_group("rg02", "256MiB", &[("data", size_mib << 20)]);
    run_ok(Command::new("dd").arg("if=/dev/urandom").arg(format!("of={}", a.path("rg01-data.img").display())).args([
        "bs=4M",
        &format!("count={}", size_mib / 4),
        "conv=notrunc",
        "status=none",
    ]));
    a.partner_ok("rg01", &b, "rg02", Some("sync"));
    let output = a.cli(&["partnership", "switch", "--new-source", "node-b/rg02"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("% done; switching now would lose data"), "{stderr}");
    assert_eq!(a.group_status("rg01")["role"], "source");
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
}

/// A switch whose hand-over cannot reach the destination leaves both sides
/// destinations (no writer) and says how to finish; asked on the
/// destination, the old source hands over and the switch completes.
#[test]
fn an_interrupted_switch_is_finished_from_the_other_node() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    let proxy = tandem_tests::proxy::FaultProxy::start(b.replication_address().parse().unwrap(), &[]);
    a.create_group("rg01", "128MiB", &[("data", 8 << 20)]);
    b.create_group("rg02", "128MiB", &[("data", 8 << 20)]);
    let address = proxy.address.to_string();
    let _ = a.partner_at("rg01", &address, "rg02", &[]);
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    write_pattern(&a, "rg01", 0x31, 1);
    a.wait_in_sync("rg01", SYNC_TIMEOUT);

    // The replication session stays; new connections to node-b fail.
    proxy.refuse_new.store(true, Ordering::Relaxed);
    let interrupted = a.cli(&["partnership", "switch", "--new-source", "node-b/rg02"]);
    let message = String::from_utf8_lossy(&interrupted.stderr);
    assert!(!interrupted.status.success(), "{message}");
    assert!(message.contains("could not be told to take over") && message.contains("on node-b"), "{message}");
    assert_eq!(a.group_status("rg01")["role"], "destination");
    assert_eq!(b.group_status("rg02")["role"], "destination", "never two writers, here none");

    let finished = b.cli_ok(&["partnership", "switch", "--new-source", "node-b/rg02"]);
    assert!(finished.contains("switch completed"), "{finished}");
    assert_eq!(b.group_status("rg02")["role"], "source");
    write_pattern(&b, "rg02", 0x32, 2);
    b.wait_in_sync("rg02", SYNC_TIMEOUT);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
}
