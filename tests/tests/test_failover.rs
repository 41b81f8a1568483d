//! Test failover between two real daemons, in sync and async mode: the
//! destination's `GROUP@test/VOLUME` exports are a writable snapshot
//! (qemu-io writes, qemu-img reads) while replication into the group goes
//! on; the destination's volume never sees the test writes, the snapshot
//! never sees later replicated ones, and stop discards it.

use std::time::Duration;

use tandem_tests::{run_ok, Node};

const MIB: usize = 1 << 20;

fn qemu_io(node: &Node, uri: &str, command: &str) -> std::process::Output {
    node.client_command("qemu-io").args(["-f", "raw", "-c", command]).arg(uri).output().unwrap()
}

fn all(data: &[u8], value: u8) -> bool {
    data.iter().all(|&b| b == value)
}

fn drill(mode: &str) {
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    a.replicate_to(&b, "128MiB", &[("data", 16 << 20)], mode);
    let source = a.nbd_uri("rg01", "data");
    assert!(qemu_io(&a, &source, "write -P 0x10 0 8M").status.success());
    a.wait_in_sync("rg01", Duration::from_secs(60));

    let started = b.cli_ok(&["group", "test-failover", "start", "rg02"]);
    assert!(started.contains("rg02@test/data"), "{started}");
    let test = b.nbd_uri("rg02@test", "data");
    let wrote = qemu_io(&b, &test, "write -P 0x77 0 1M");
    assert!(wrote.status.success() && !String::from_utf8_lossy(&wrote.stdout).contains("failed"), "{wrote:?}");
    // Replication goes on, over blocks the test wrote and blocks it did not.
    assert!(qemu_io(&a, &source, "write -P 0x55 4M 1M").status.success());
    assert!(qemu_io(&a, &source, "write -P 0x66 0 64k").status.success());
    a.wait_in_sync("rg01", Duration::from_secs(60));

    let volume = std::fs::read(b.path("rg02-data.img")).unwrap();
    assert_eq!(volume, std::fs::read(a.path("rg01-data.img")).unwrap(), "{mode}: replication went on");
    assert!(
        all(&volume[..64 << 10], 0x66) && all(&volume[64 << 10..MIB], 0x10),
        "{mode}: no test write reached the volume"
    );
    let image = b.path("snapshot.img");
    run_ok(b.client_command("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &test]).arg(&image));
    let snapshot = std::fs::read(&image).unwrap();
    assert!(all(&snapshot[..MIB], 0x77), "{mode}: the snapshot keeps its own writes");
    assert!(all(&snapshot[MIB..8 * MIB], 0x10), "{mode}: and the instant it was taken");
    assert!(all(&snapshot[4 * MIB..5 * MIB], 0x10), "{mode}: later replicated writes stay out of it");
    let status = b.group_status("rg02");
    assert!(status["test_failover"]["used_bytes"].as_u64().unwrap() >= 2 * MIB as u64, "{status:#}");
    let file = status["test_failover"]["file"].as_str().unwrap().to_owned();

    let stopped = b.cli_ok(&["group", "test-failover", "stop", "rg02"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(!qemu_io(&b, &test, "read 0 4k").status.success(), "{mode}: the test export is gone");
    assert!(!std::path::Path::new(&file).exists(), "{mode}: its file is discarded");
    b.wait_for_events(&[7003, 7004], Duration::from_secs(5));
    // The destination still follows its source.
    assert!(qemu_io(&a, &source, "write -P 0x21 8M 1M").status.success());
    a.wait_in_sync("rg01", Duration::from_secs(60));
}

#[test]
fn a_test_failover_is_writable_while_sync_replication_goes_on() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    drill("sync");
}

#[test]
fn a_test_failover_is_writable_while_async_replication_goes_on() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    drill("async");
}

#[test]
fn a_test_failover_is_refused_on_a_source_with_the_reason() {
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    a.replicate_to(&b, "128MiB", &[("data", 4 << 20)], "sync");
    let refused = a.cli(&["group", "test-failover", "start", "rg01"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a replication destination"), "{refused:?}");
    let twice = b.cli_ok(&["group", "test-failover", "start", "rg02"]);
    assert!(twice.contains("started"), "{twice}");
    let again = b.cli(&["group", "test-failover", "start", "rg02"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has a test failover"), "{again:?}");
}

/// A daemon that stops during a test failover leaves its file behind; the
/// test failover is gone after the restart and starts again over it.
#[test]
fn a_test_failover_starts_again_after_the_daemon_restarted() {
    let a = Node::start_named("node-a", "", "");
    let mut b = Node::start_named("node-b", "", "");
    a.replicate_to(&b, "128MiB", &[("data", 4 << 20)], "sync");
    let started = b.cli_ok(&["group", "test-failover", "start", "rg02"]);
    assert!(started.contains("started"), "{started}");
    let file = b.group_status("rg02")["test_failover"]["file"].as_str().unwrap().to_owned();
    b.kill9();
    b.spawn();
    assert!(std::path::Path::new(&file).exists(), "the killed daemon left its file");
    assert!(b.group_status("rg02")["test_failover"].is_null(), "no test failover after a restart");
    let again = b.cli_ok(&["group", "test-failover", "start", "rg02"]);
    assert!(again.contains("started"), "{again}");
    a.wait_in_sync("rg01", Duration::from_secs(60));
}
