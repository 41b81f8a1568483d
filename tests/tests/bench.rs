//! `tandem bench` against real NBD exports: what it counts is exactly what
//! the daemon served; two targets compare; bad targets are refused.

use std::process::Command;

use tandem_tests::{bin, run_ok, Node};

fn counters(node: &Node) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(&["counters", "--json"])).expect("counters JSON")
}

fn volume_counter(all: &serde_json::Value, group: usize, name: &str) -> u64 {
    all[group]["volumes"][0][name].as_u64().unwrap()
}

#[test]
fn bench_counts_exactly_what_the_daemon_served() {
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    let uri = format!("nbd://{}:{}/rg01/data", node.host, node.nbd_port);
    let before = counters(&node);
    let out = run_ok(Command::new(bin("tandem")).args([
        "bench",
        "--nbd",
        &uri,
        "--seconds",
        "2",
        "--warmup-seconds",
        "0",
        "--queue-depth",
        "4",
        "--read-percent",
        "30",
        "--block-size",
        "8KiB",
        "--json",
    ]));
    let results: serde_json::Value = serde_json::from_str(&out).expect("bench JSON");
    let result = &results[0];
    let (reads, writes) = (result["reads"].as_u64().unwrap(), result["writes"].as_u64().unwrap());
    assert!(reads > 0 && writes > 0, "{result:#}");
    let after = counters(&node);
    let delta = |name| volume_counter(&after, 0, name) - volume_counter(&before, 0, name);
    assert_eq!(delta("application_write_requests"), writes, "every write the bench counted reached the daemon");
    assert_eq!(delta("application_read_requests"), reads);
    assert_eq!(delta("application_write_bytes"), writes * 8192);
    assert_eq!(result["bytes"].as_u64().unwrap(), (reads + writes) * 8192);
    let latency = &result["latency"];
    let (p50, p99, max) =
        (latency["p50_us"].as_u64().unwrap(), latency["p99_us"].as_u64().unwrap(), latency["max_us"].as_u64().unwrap());
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{latency:#}");
    assert!(result["machine_cpu_us_per_io"].as_f64().unwrap() > 0.0, "{result:#}");
}

#[test]
fn bench_compares_two_targets_and_refuses_bad_ones() {
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    node.create_group("rg02", "128MiB", &[("data", 16 << 20)]);
    let uri = |group: &str| format!("nbd://{}:{}/{group}/data", node.host, node.nbd_port);
    let out = run_ok(Command::new(bin("tandem")).args([
        "bench",
        "--nbd",
        &uri("rg01"),
        "--compare",
        &uri("rg02"),
        "--seconds",
        "1",
        "--warmup-seconds",
        "0",
        "--rounds",
        "2",
        "--sequential",
        "--rate-iops",
        "500",
    ]));
    assert_eq!(out.matches("IOPS,").count(), 4, "two rounds of two targets: {out}");
    assert!(out.contains(&format!("{} vs {} over 2 alternating round(s): IOPS x", uri("rg02"), uri("rg01"))), "{out}");
    let iops: Vec<f64> = out
        .lines()
        .filter(|l| l.contains(" IOPS, "))
        .map(|l| l.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(iops.iter().all(|&v| v <= 520.0), "--rate-iops 500 holds the rate: {iops:?}");
    for (target, expected) in [
        ("http://x/y".to_owned(), "an NBD target is nbd://HOST[:PORT]/EXPORT".to_owned()),
        (uri("nothere"), "refused".to_owned()),
        ("nbd://127.0.0.1:1/x".to_owned(), "nbd://127.0.0.1:1/x: ".to_owned()),
    ] {
        let output = Command::new(bin("tandem")).args(["bench", "--nbd", &target, "--seconds", "1"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{target}: {stderr}");
        assert!(stderr.contains(&expected), "{target}: {stderr}");
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new(bin("tandem")).arg("bench").args(args).args(["--warmup-seconds", "0", "--json"]));
    let results: serde_json::Value = serde_json::from_str(&out).expect("bench JSON");
    results[0].clone()
}

fn bench_error(args: &[&str]) -> String {
    let output = Command::new(bin("tandem")).arg("bench").args(args).args(["--seconds", "1"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{args:?} must fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A local file through io_uring with O_DIRECT: several jobs share it, the
/// writes land in it, reads leave it alone; a block device (a loop device
/// here) is written only with --destroy-data.
#[test]
fn bench_drives_files_and_block_devices_with_direct_io() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("target.img");
    std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
    let file = path.to_str().unwrap();
    let written = bench_json(&["--file", file, "--seconds", "1", "--queue-depth", "8", "--jobs", "2"]);
    let writes = written["writes"].as_u64().unwrap();
    assert!(writes > 0 && written["reads"] == 0 && written["jobs"] == 2, "{written:#}");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    assert!(allocated >= 4096 * writes.min(1000), "the writes reached the sparse file: {allocated} bytes allocated");
    let read = bench_json(&["--file", file, "--seconds", "1", "--read-percent", "100", "--block-size", "64KiB"]);
    assert!(read["reads"].as_u64().unwrap() > 0 && read["writes"] == 0, "{read:#}");
    assert!(bench_error(&["--file", file, "--block-size", "1000"]).contains("not a multiple of"));
    assert!(bench_error(&["--file", "/var/tmp/no-such-bench-target"]).contains("cannot access"));

    tandem_tests::require_tool("losetup", "mount");
    let attached = run_ok(Command::new("losetup").args(["--find", "--show", file]));
    let device = attached.trim().to_owned();
    let _detach = Detach(device.clone());
    let refused = bench_error(&["--file", &device]);
    assert!(refused.contains("destroys the data") && refused.contains("--destroy-data"), "{refused}");
    let read = bench_json(&["--file", &device, "--seconds", "1", "--read-percent", "100"]);
    assert!(read["reads"].as_u64().unwrap() > 0, "{read:#}");
    let written = bench_json(&["--file", &device, "--seconds", "1", "--destroy-data"]);
    assert!(written["writes"].as_u64().unwrap() > 0, "{written:#}");
}

struct Detach(String);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.0]).status();
    }
}

/// The transport to a daemon: ping-pong round trips and a multi-channel
/// stream through probe frames on its replication listener.
#[test]
fn bench_measures_the_transport_to_a_daemon() {
    let node = Node::start("");
    let address = node.replication_address();
    let ping = bench_json(&["--transport", &address, "--seconds", "1"]);
    let round_trips = ping["writes"].as_u64().unwrap();
    assert!(round_trips > 100, "{ping:#}");
    assert!(ping["latency"]["p50_us"].as_u64().unwrap() > 0, "{ping:#}");
    let stream = bench_json(&[
        "--transport",
        &address,
        "--pattern",
        "stream",
        "--block-size",
        "1MiB",
        "--queue-depth",
        "4",
        "--jobs",
        "2",
        "--socket-buffer",
        "1MiB",
        "--seconds",
        "1",
    ]);
    assert!(stream["mib_per_s"].as_f64().unwrap() > 10.0, "{stream:#}");
    assert_eq!(stream["bytes"].as_u64().unwrap(), stream["writes"].as_u64().unwrap() << 20);
    let error = bench_error(&["--transport", &format!("127.0.0.1:{}", tandem_tests::free_port())]);
    assert!(error.contains("cannot connect"), "{error}");
    assert!(node.log().lines().all(|l| !l.contains("panicked")), "the daemon served the probes cleanly");
}
