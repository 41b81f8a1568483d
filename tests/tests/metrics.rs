//! Prometheus exposition of a running daemon: scraped over HTTP while a
//! partnership replicates real writes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tandem_tests::{free_port, require_tool, run_ok, Node};

fn scrape(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics_listen");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: tandem\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

fn value(body: &str, series: &str) -> f64 {
    let line = body.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} missing:\n{body}"));
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

/// The exposition goes through prometheus_client's text parser (Debian's
/// python3-prometheus-client, installed by scripts/install-deps), which must
/// find every family with its type.
fn parses_with_prometheus_client(body: &str) {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
families = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
assert families["tandem_group_write_latency_seconds"].type == "histogram", families.keys()
assert families["tandem_group_writes"].type == "counter"
assert families["tandem_partnership_state"].type == "gauge"
print(len(families), sum(len(f.samples) for f in families.values()))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (scripts/install-deps installs it with python3-prometheus-client)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "prometheus_client refused the exposition: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let families: usize = stdout.split_whitespace().next().unwrap().parse().unwrap();
    assert!(families >= 23, "every family parses: {stdout}");
}

#[test]
fn metrics_show_groups_latency_buckets_and_partnerships() {
    require_tool("qemu-io", "qemu-utils");
    let port = free_port();
    let source = Node::start_with("node-a", &format!("metrics_listen = \"127.0.0.1:{port}\""), "", "", None);
    let destination = Node::start_named("node-b", "", "");
    source.replicate_to(&destination, "128MiB", &[("data", 16 << 20)], "sync");
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 0 1M", "-c", "write -P 8 4M 64k"])
            .arg(source.nbd_uri("rg01", "data")),
    );
    source.wait_in_sync("rg01", Duration::from_secs(60));
    let (head, body) = scrape(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(value(&body, "tandem_group_writes_total{group=\"rg01\"}") >= 2.0);
    assert!(value(&body, "tandem_group_write_bytes_total{group=\"rg01\"}") >= f64::from(1u32 << 20) + 65536.0);
    let count = value(&body, "tandem_group_write_latency_seconds_count{group=\"rg01\"}");
    let infinite = value(&body, "tandem_group_write_latency_seconds_bucket{group=\"rg01\",le=\"+Inf\"}");
    assert!(count >= 2.0 && (count - infinite).abs() < f64::EPSILON, "{body}");
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("tandem_group_write_latency_seconds_bucket{group=\"rg01\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative buckets never decrease: {buckets:?}");
    assert_eq!(
        value(&body, "tandem_partnership_state{group=\"rg01\",role=\"source\",state=\"ContinuouslyReplicating\"}"),
        1.0
    );
    assert_eq!(value(&body, "tandem_partnership_channels_connected{group=\"rg01\",role=\"source\"}"), 2.0);
    assert!(value(&body, "tandem_partnership_sent_bytes_total{group=\"rg01\",role=\"source\"}") > 1e6);
    parses_with_prometheus_client(&body);
    let (head, _) = scrape(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[test]
fn a_metrics_address_in_use_is_refused_at_start_with_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = tandem_tests::minimal_config(dir.path(), "m", &format!("metrics_listen = \"127.0.0.1:{port}\""));
    let output = Command::new(tandem_tests::bin("tandemd")).arg("--config").arg(&config).output().expect("tandemd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("cannot listen for metrics on 127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("change or remove node.metrics_listen"), "{stderr}");
}

fn counters(node: &Node) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(&["counters", "--json"])).expect("counters JSON")
}

/// A known workload moves the counters exactly: N writes and M reads
/// through NBD are N application write requests of N x 4 KiB and M read
/// requests, and a sync source sends at least those bytes in at least N
/// messages.
#[test]
fn counters_move_exactly_under_a_known_workload() {
    require_tool("qemu-io", "qemu-utils");
    let source = Node::start_named("node-a", "", "");
    let destination = Node::start_named("node-b", "", "");
    source.replicate_to(&destination, "128MiB", &[("data", 16 << 20), ("logs", 8 << 20)], "sync");
    let before = counters(&source);
    let (writes, reads) = (50u64, 10u64);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..writes {
        args.extend(["-c".into(), format!("write -P {} {} 4k", i + 1, i * 8192)]);
    }
    for i in 0..reads {
        args.extend(["-c".into(), format!("read -P {} {} 4k", i + 1, i * 8192)]);
    }
    run_ok(Command::new("qemu-io").args(&args).arg(source.nbd_uri("rg01", "logs")));
    let after = counters(&source);
    let volume = |v: &serde_json::Value, name: &str| v[0]["volumes"][1][name].as_u64().unwrap();
    assert_eq!(after[0]["volumes"][1]["volume"], "logs");
    assert_eq!(volume(&after, "application_write_requests") - volume(&before, "application_write_requests"), writes);
    assert_eq!(volume(&after, "application_write_bytes") - volume(&before, "application_write_bytes"), writes * 4096);
    assert_eq!(volume(&after, "application_read_requests") - volume(&before, "application_read_requests"), reads);
    assert_eq!(volume(&after, "application_read_bytes") - volume(&before, "application_read_bytes"), reads * 4096);
    assert_eq!(
        after[0]["volumes"][0]["application_write_requests"], before[0]["volumes"][0]["application_write_requests"],
        "the other volume did not move"
    );
    let sent = after[0]["partnership"]["bytes_sent"].as_u64().unwrap()
        - before[0]["partnership"]["bytes_sent"].as_u64().unwrap();
    assert!(sent >= writes * 4096, "a sync source sent every write: {sent} bytes");
    let messages = after[0]["partnership"]["messages_sent"].as_u64().unwrap()
        - before[0]["partnership"]["messages_sent"].as_u64().unwrap();
    assert!(messages >= writes, "{messages} messages for {writes} writes");
    assert!(after[0]["log"]["log_writes"].as_u64().unwrap() >= writes, "one log write at least per QD1 write");
    assert!(after[0]["volumes"][1]["application_write_latency"]["p99_us"].as_u64().unwrap() > 0);
    assert!(after[0]["partnership"]["avg_message_round_trip_us"].as_f64().unwrap() > 0.0);
    let text = source.cli_ok(&["counters"]);
    assert!(text.contains("application write requests") && text.contains("times flush paused"), "{text}");
}
