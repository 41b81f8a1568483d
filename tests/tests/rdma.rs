//! Partnerships over RDMA. The `#[ignore]`d tests need an RDMA device: they
//! run in the soft-RoCE lab guest (`scripts/test-rdma`), where both daemons
//! listen on rxe0's 10.77.0.1 side by side. The last one runs here: asking
//! for RDMA on a host without it fails with the reason and the fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_tests::pattern::{check_acknowledged, WriteModel};
use tandem_tests::writer;
use tandem_tests::{run_ok, Node};

const LAB_IP: &str = "10.77.0.1";
const VOLUME_BYTES: u64 = 16 << 20;
/// The guest is emulated (TCG): everything takes tens of times longer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

fn lab_pair(replication_toml: &str, mode: &str) -> (Node, Node) {
    let a = Node::start_on("node-a", LAB_IP, replication_toml);
    let b = Node::start_on("node-b", LAB_IP, replication_toml);
    a.create_group("rg01", "128MiB", &[("data", VOLUME_BYTES)]);
    b.create_group("rg02", "128MiB", &[("data", VOLUME_BYTES)]);
    let created = a.partner_with("rg01", &b, "rg02", &["--mode", mode, "--transport", "rdma", "--channels", "2"]);
    let out = String::from_utf8_lossy(&created.stdout);
    assert!(created.status.success(), "{out}{}", String::from_utf8_lossy(&created.stderr));
    assert!(out.contains("2 rdma channel(s)"), "{out}");
    (a, b)
}

fn md5(path: &std::path::Path) -> String {
    run_ok(std::process::Command::new("md5sum").arg(path)).split_whitespace().next().unwrap().to_owned()
}

/// Status names the transport of each channel: TCP control, then rxe0's queue pairs.
fn assert_rdma_channels(node: &Node, group: &str) {
    let p = node.partnership(group);
    assert_eq!(p["transport"], "rdma", "{p:#}");
    assert_eq!(p["channels_connected"], 2, "{p:#}");
    let channels: Vec<String> =
        p["channel_addresses"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert!(channels[0].starts_with("tcp "), "{channels:?}");
    assert!(channels[1..].iter().all(|c| c.starts_with("rdma rxe0 port 1 gid ")), "{channels:?}");
}

fn converges(mode: &str) {
    let (a, b) = lab_pair("", mode);
    assert_rdma_channels(&a, "rg01");
    assert_rdma_channels(&b, "rg02");
    let image = a.path("image.raw");
    let bytes: Vec<u8> = (0..VOLUME_BYTES / 2).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&image, bytes).unwrap();
    run_ok(
        a.client_command("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(a.nbd_uri("rg01", "data")),
    );
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")), "{mode}: the volumes are equal");
    let p = a.partnership("rg01");
    assert!(p["bytes_sent"].as_u64().unwrap() > VOLUME_BYTES / 2, "{mode}: the image crossed: {p:#}");
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn a_sync_partnership_over_rdma_converges() {
    converges("sync");
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn an_async_partnership_over_rdma_converges() {
    converges("async");
}

/// Writers through NBD until stopped, recording what was acknowledged.
fn writers(a: &Node, count: usize, model: &Arc<Mutex<WriteModel>>, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<u64>> {
    // Writers share the model: each numbers its writes from its own billion.
    (0..count as u64)
        .map(|seed| writer::spawn(None, a, ("rg01/data", VOLUME_BYTES), (seed * 1_000_000_000, seed + 5), model, stop))
        .collect()
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn killing_the_destination_under_load_loses_no_acknowledged_write() {
    let (a, mut b) = lab_pair("", "sync");
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = writers(&a, 1, &model, &stop);
    std::thread::sleep(Duration::from_secs(4));
    b.kill9();
    std::thread::sleep(Duration::from_secs(2));
    b.spawn();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for writer in load {
        writer.join().unwrap();
    }
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert_rdma_channels(&a, "rg01");
    check_acknowledged(&b.path("rg02-data.img"), &model);
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
}

/// The smallest window and buffers with many writers: replication keeps
/// up (the partnership is never lost, so no wait reached the heartbeat
/// timeout) and the volumes end equal.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn tiny_credit_windows_under_many_writers_never_stall() {
    let (a, b) = lab_pair("rdma_window = 4\nrdma_message_bytes = 4096\n", "sync");
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = writers(&a, 4, &model, &stop);
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = load.into_iter().map(|w| w.join().unwrap() % 1_000_000_000).sum();
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    assert!(writes > 100, "the writers wrote ({writes} writes in {:?})", started.elapsed());
    let events = a.cli_ok(&["events", "--json"]);
    assert!(!events.contains("\"id\": 4001"), "the partnership was never lost: {events}");
    assert_eq!(md5(&a.path("rg01-data.img")), md5(&b.path("rg02-data.img")));
}

/// On a host without RDMA (this one, outside the lab), asking for it fails
/// with the reason and the fix; auto falls back to TCP.
#[test]
fn asking_for_rdma_without_a_device_fails_with_the_reason() {
    let a = Node::start_named("node-a", "", "");
    let b = Node::start_named("node-b", "", "");
    a.create_group("rg01", "128MiB", &[("data", 4 << 20)]);
    b.create_group("rg02", "128MiB", &[("data", 4 << 20)]);
    let refused = a.partner_with("rg01", &b, "rg02", &["--transport", "rdma"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("--transport rdma: this node cannot use RDMA from 127.0.0.1"), "{stderr}");
    assert!(stderr.contains("or use --transport tcp"), "the fix is named: {stderr}");
    assert_eq!(a.group_status("rg01")["role"], "standalone", "nothing was created");
    let auto = a.partner_with("rg01", &b, "rg02", &["--transport", "auto"]);
    assert!(String::from_utf8_lossy(&auto.stdout).contains("tcp channel(s)"), "{auto:?}");
    assert_eq!(a.partnership("rg01")["transport"], "tcp");
}
