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
