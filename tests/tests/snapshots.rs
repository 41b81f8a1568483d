//! Consistent snapshots between two real daemons in network namespaces:
//! `tandem group snapshot create` on the source writes a barrier record;
//! each side takes its copy-on-write snapshot at exactly that LSN, so the
//! read-only exports `GROUP@NAME/VOLUME` of both are byte-identical, though
//! clients wrote to both volumes of the group all along. They survive
//! kill -9 of either side, and deleting one side's copy leaves the other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_tests::netns::NetPair;
use tandem_tests::pattern::WriteModel;
use tandem_tests::writer;
use tandem_tests::{run_ok, Node};

const DATA_BYTES: u64 = 24 << 20;
const META_BYTES: u64 = 8 << 20;
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// Clients writing to every volume of node-a's rg01 until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<u64>>,
}

impl Load {
    fn start(net: Option<&Arc<NetPair>>, a: &Node) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = [("data", DATA_BYTES), ("meta", META_BYTES)]
            .into_iter()
            .enumerate()
            .map(|(seed, (volume, size_bytes))| {
                let model = Arc::new(Mutex::new(WriteModel::default()));
                let export = format!("rg01/{volume}");
                writer::spawn(net, a, (&export, size_bytes), (0, seed as u64 + 11), &model, &stop)
            })
            .collect();
        Self { stop, writers }
    }

    /// Stops the clients; returns how many writes they made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.writers.into_iter().map(|w| w.join().unwrap()).sum()
    }
}

/// The bytes of `GROUP@SNAPSHOT/VOLUME` on `node`, read by qemu-img.
fn snapshot_image(node: &Node, group: &str, snapshot: &str, volume: &str) -> Vec<u8> {
    let image = node.path(&format!("{group}@{snapshot}-{volume}.img"));
    let uri = node.nbd_uri(&format!("{group}@{snapshot}"), volume);
    run_ok(node.client_command("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&image));
    let bytes = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    bytes
}

fn both_sides(a: &Node, b: &Node, snapshot: &str) -> [Vec<u8>; 4] {
    [
        snapshot_image(a, "rg01", snapshot, "data"),
        snapshot_image(a, "rg01", snapshot, "meta"),
        snapshot_image(b, "rg02", snapshot, "data"),
        snapshot_image(b, "rg02", snapshot, "meta"),
    ]
}

fn assert_equal_sides(images: &[Vec<u8>; 4], what: &str) {
    assert!(images[0] == images[2], "{what}: data differs between the sides");
    assert!(images[1] == images[3], "{what}: meta differs between the sides");
}

fn snapshot_lsns(node: &Node, group: &str) -> Vec<(String, u64)> {
    let status = node.group_status(group);
    let list = status["snapshots"].as_array().cloned().unwrap_or_default();
    list.iter().map(|s| (s["name"].as_str().unwrap().to_owned(), s["lsn"].as_u64().unwrap())).collect()
}

fn pair(mode: &str) -> (Option<Arc<NetPair>>, Node, Node) {
    tandem_tests::require_tool("qemu-img", "qemu-utils");
    let (net, a, b) = tandem_tests::two_nodes("");
    a.replicate_to(&b, "256MiB", &[("data", DATA_BYTES), ("meta", META_BYTES)], mode);
    (net, a, b)
}

fn snapshots_under_load_are_equal_on_both_sides(mode: &str) {
    let (net, a, b) = pair(mode);
    let load = Load::start(net.as_ref(), &a);
    std::thread::sleep(Duration::from_millis(800));
    let first = a.cli_ok(&["group", "snapshot", "create", "rg01", "--name", "before-upgrade"]);
    assert!(first.contains("took its copy at the same LSN"), "{mode}: {first}");
    std::thread::sleep(Duration::from_millis(800));
    let second = a.cli_ok(&["group", "snapshot", "create", "rg01", "--name", "after-upgrade"]);
    assert!(second.contains("rg01@after-upgrade/data"), "{mode}: {second}");
    std::thread::sleep(Duration::from_millis(500));
    let writes = load.stop();
    assert!(writes > 50, "{mode}: the clients wrote all along ({writes} writes)");
    a.wait_in_sync("rg01", SYNC_TIMEOUT);

    assert_eq!(snapshot_lsns(&a, "rg01"), snapshot_lsns(&b, "rg02"), "{mode}: the same snapshots at the same LSNs");
    let before = both_sides(&a, &b, "before-upgrade");
    let after = both_sides(&a, &b, "after-upgrade");
    assert_equal_sides(&before, mode);
    assert_equal_sides(&after, mode);
    assert!(before[0] != after[0], "{mode}: writes between the snapshots are in the second only");
    let volume = std::fs::read(a.path("rg01-data.img")).unwrap();
    assert!(volume != after[0], "{mode}: writes after the snapshot are not in it");
    assert_eq!(volume, std::fs::read(b.path("rg02-data.img")).unwrap(), "{mode}: replication went on");

    // Read-only exports; deleting one side's copy leaves the other.
    let write = a
        .client_command("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(a.nbd_uri("rg01@before-upgrade", "data"))
        .output()
        .unwrap();
    assert!(!write.status.success() || String::from_utf8_lossy(&write.stdout).contains("failed"), "{write:?}");
    let deleted = a.cli_ok(&["group", "snapshot", "delete", "rg01", "--name", "before-upgrade"]);
    assert!(deleted.contains("deleted on this node"), "{deleted}");
    assert_eq!(snapshot_lsns(&a, "rg01").len(), 1);
    assert_eq!(snapshot_lsns(&b, "rg02").len(), 2, "{mode}: the destination keeps its copy");
    assert!(snapshot_image(&b, "rg02", "before-upgrade", "data") == before[2]);
    a.wait_for_events(&[7005, 7006], Duration::from_secs(5));
    b.wait_for_events(&[7005], Duration::from_secs(5));
    let listed = b.cli_ok(&["group", "snapshot", "list", "rg02"]);
    assert!(listed.contains("before-upgrade") && listed.contains("rg02@after-upgrade/VOLUME"), "{listed}");
}

#[test]
fn sync_snapshots_taken_under_load_are_byte_identical_on_both_sides() {
    snapshots_under_load_are_equal_on_both_sides("sync");
}

#[test]
fn async_snapshots_taken_under_load_are_byte_identical_on_both_sides() {
    snapshots_under_load_are_equal_on_both_sides("async");
}

/// Writes go on after the snapshot (its blocks move into it), then both
/// daemons are killed at different moments: after the restarts and the
/// catch-up both snapshots still read what they read before.
#[test]
fn snapshots_survive_kill_9_of_both_sides() {
    let (net, mut a, mut b) = pair("sync");
    let load = Load::start(net.as_ref(), &a);
    std::thread::sleep(Duration::from_millis(600));
    let taken_at = a.cli_ok(&["group", "snapshot", "create", "rg01", "--name", "nightly"]);
    assert!(taken_at.contains("took its copy at the same LSN"), "{taken_at}");
    let taken = both_sides(&a, &b, "nightly");
    assert_equal_sides(&taken, "after taking it");
    std::thread::sleep(Duration::from_millis(700));
    b.kill9();
    std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 400));
    a.kill9();
    load.stop();
    a.spawn();
    b.spawn();
    a.wait_in_sync("rg01", SYNC_TIMEOUT);
    let after = both_sides(&a, &b, "nightly");
    assert!(after == taken, "the snapshots read as before the kills");
    assert!(a.group_status("rg01")["snapshots"][0]["used_bytes"].as_u64().unwrap() > 0, "writes moved blocks into it");
}

#[test]
fn snapshot_refusals_name_what_forbids_them() {
    let (_net, a, b) = pair("sync");
    let on_destination = b.cli(&["group", "snapshot", "create", "rg02", "--name", "x"]);
    let stderr = String::from_utf8_lossy(&on_destination.stderr);
    assert!(stderr.contains("is a replication destination: take the snapshot on its source"), "{stderr}");
    for (name, expected) in [("test", "reserved for test failover"), ("a/b", "is not valid"), (".x", "is not valid")] {
        let refused = a.cli(&["group", "snapshot", "create", "rg01", "--name", name]);
        assert!(String::from_utf8_lossy(&refused.stderr).contains(expected), "{name}: {refused:?}");
    }
    let once = a.cli_ok(&["group", "snapshot", "create", "rg01", "--name", "once"]);
    assert!(once.contains("node-b/rg02 took its copy"), "{once}");
    let again = a.cli(&["group", "snapshot", "create", "rg01", "--name", "once"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"), "{again:?}");
    let unknown = a.cli(&["group", "snapshot", "delete", "rg01", "--name", "never"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no snapshot named never (this group has: once)"));
    // A group without a partnership takes its own.
    a.create_group("solo", "128MiB", &[("data", 4 << 20)]);
    let solo = a.cli_ok(&["group", "snapshot", "create", "solo", "--name", "alone"]);
    assert!(solo.contains("snapshot alone of solo taken at LSN") && !solo.contains("copy"), "{solo}");
    let deleted = a.cli_ok(&["group", "delete", "solo"]);
    assert!(deleted.contains("its 1 snapshot(s) were deleted"), "{deleted}");
}
