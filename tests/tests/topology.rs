//! `tandem topology test` between two real daemons: every requirement fails
//! on purpose once with its own message (different volume sizes, log on the
//! data device, unreachable peer, wrong node), a good pair passes them all,
//! and a one-minute run under a real workload writes a report that headless
//! Chromium renders with its charts.

use std::path::Path;
use std::process::{Command, Output};

use tandem_tests::{bin, free_port, require_tool, Node};

const VOLUME_BYTES: u64 = 16 << 20;

/// Two nodes: topo-a/rg01 (log on tmpfs, volume on disk) and on topo-b
/// rg02 like it, rg03 with a larger volume, rg04 with its log beside its
/// volume.
fn pair(shm: &Path) -> (Node, Node) {
    let a = Node::start_named("topo-a", "", "");
    let b = Node::start_named("topo-b", "", "");
    a.create_group_with_log("rg01", &shm.join("a-rg01.log"), "128MiB", &[("data", VOLUME_BYTES)]);
    b.create_group_with_log("rg02", &shm.join("b-rg02.log"), "128MiB", &[("data", VOLUME_BYTES)]);
    b.create_group_with_log("rg03", &shm.join("b-rg03.log"), "128MiB", &[("data", 2 * VOLUME_BYTES)]);
    b.create_group("rg04", "128MiB", &[("data", VOLUME_BYTES)]);
    (a, b)
}

/// `tandem topology test` (with --requirements-only unless `extra` says more).
fn topology(a: &Node, source: &str, destination: &str, extra: &[&str]) -> (Output, String) {
    let mut args = vec!["topology", "test", "--source", source, "--destination", destination];
    if extra.is_empty() {
        args.push("--requirements-only");
    }
    args.extend_from_slice(extra);
    let output = a.cli(&args);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output, text)
}

#[test]
fn each_requirement_fails_on_purpose_with_its_own_message() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (a, b) = pair(shm.path());
    let to = |group: &str| format!("{}/{group}", b.replication_address());

    let (output, text) = topology(&a, "topo-a/rg01", &to("rg02"), &[]);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("all 12 requirements met"), "{text}");
    assert!(text.contains("PASS round trip: "), "{text}");
    assert!(text.contains("PASS source log on its own device: log on tmpfs on /dev/shm"), "{text}");

    let (output, text) = topology(&a, "topo-a/rg01", &to("rg03"), &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL volume sizes equal: source rg01: 16777216 bytes; destination rg03: 33554432 bytes"),
        "{text}"
    );
    assert!(text.contains("1 of 12 requirements failed"), "{text}");

    let (output, text) = topology(&a, "topo-a/rg01", &to("rg04"), &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let shared = text.lines().find(|l| l.starts_with("FAIL destination log on its own device")).expect(&text);
    assert!(shared.contains("rg04.log and volume 0 (") && shared.contains("are both on"), "{shared}");
    assert!(text.contains("FAIL destination log faster than data: the log and volume 0 share"), "{text}");
    assert!(text.contains("PASS volume sizes equal"), "only the log's requirements fail: {text}");

    let nobody = format!("127.0.0.1:{}/rg02", free_port());
    let (output, text) = topology(&a, "topo-a/rg01", &nobody, &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL destination daemon reachable: cannot connect to"), "{text}");
    assert!(text.contains("start tandemd on the destination"), "{text}");

    let (_, text) = topology(&a, "topo-z/rg01", &to("rg02"), &[]);
    assert!(text.contains("FAIL source daemon reachable: tandemd of node topo-a answers"), "{text}");
    assert!(text.contains("run the topology test on topo-z (this machine is topo-a)"), "{text}");
    let (_, text) = topology(&a, "topo-a/nothere", &to("nothere"), &[]);
    assert!(text.contains("FAIL source group exists: no group nothere on topo-a"), "{text}");
    assert!(text.contains("FAIL destination group exists: group nothere does not exist on topo-b"), "{text}");

    let (output, text) = topology(&a, "rg01", &to("rg02"), &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("--source rg01: write it as NODE/GROUP"), "{text}");
}

#[test]
fn a_one_minute_run_writes_a_report_chromium_renders() {
    require_tool("chromium", "chromium");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (a, b) = pair(shm.path());
    let workload = Command::new(bin("tandem"))
        .args(["bench", "--nbd", &a.nbd_uri("rg01", "data"), "--seconds", "75", "--warmup-seconds", "0"])
        .args(["--queue-depth", "2", "--rate-iops", "800", "--json"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut workload = Guard(workload);
    let results = a.path("report");
    let destination = format!("{}/rg02", b.replication_address());
    let (output, text) = topology(
        &a,
        "topo-a/rg01",
        &destination,
        &["--duration", "60s", "--result-path", results.to_str().unwrap(), "--tolerated-outage", "10m"],
    );
    let _ = workload.0.kill();
    assert!(output.status.success(), "{text}");
    assert!(text.contains("report written to"), "{text}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("topology-report.json")).unwrap()).unwrap();
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 60, "one sample a second");
    let written: Vec<f64> = samples.iter().map(|s| s["write_bytes_per_s"].as_f64().unwrap()).collect();
    // 800 writes of 4 KiB a second: 3.1 MiB/s, seen in the daemon's counters.
    let typical = written[30];
    assert!((2.0e6..5.0e6).contains(&typical), "{written:?}");
    assert!(samples.iter().filter(|s| s["log_write_latency_us"].is_number()).count() >= 55, "{samples:?}");
    let recommended = report["recommended_log_bytes"].as_u64().unwrap();
    assert!(recommended >= 1 << 30, "10 minutes at ~3 MiB/s needs ~2 GiB: {recommended}");
    assert!(report["log_size_reasoning"].as_str().unwrap().contains("tolerated outage 600 s"), "{report}");
    assert!(report["initial_sync_estimate_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["requirements"].as_array().unwrap().iter().all(|r| r["passed"] == true), "{report}");

    let html = results.join("topology-report.html");
    let url = format!("file://{}", html.display());
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,2400"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let screenshot = a.path("report.png");
    let shot = chromium(&[&format!("--screenshot={}", screenshot.display())]);
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a rendered page, {} bytes", png.len());
    let dom = String::from_utf8(chromium(&["--dump-dom"]).stdout).unwrap();
    assert_eq!(dom.matches("<svg").count(), 3, "write rate, round trips, log latency");
    assert!(dom.contains("id=\"write-rate\"") && dom.contains("id=\"log-latency\""), "line charts rendered");
    assert!(dom.matches("<polyline").count() == 2 && dom.matches("<rect").count() >= 2, "charts have data");
    assert!(dom.contains("Every requirement is met."), "the verdict is in the page");
}

/// Kills the workload if an assertion fails first.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Before Tandem is in the path: the planned volume is a block device the
/// application writes directly (a loop device here), measured through its
/// block statistics; a planned log file that does not exist yet is judged
/// by its directory's device.
#[test]
fn a_planned_group_is_measured_through_its_block_devices() {
    require_tool("losetup", "mount");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (a, b) = pair(shm.path());
    let backing = a.path("planned.img");
    std::fs::File::create(&backing).unwrap().set_len(VOLUME_BYTES).unwrap();
    let attached = tandem_tests::run_ok(Command::new("losetup").args(["--find", "--show"]).arg(&backing));
    let device = Detach(attached.trim().to_owned());
    let writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while true; do dd if=/dev/zero of={} bs=64k count=16 oflag=direct conv=notrunc status=none; sleep 0.2; done",
            device.0
        ))
        .spawn()
        .unwrap();
    let _writer = Guard(writer);
    let planned_log = shm.path().join("planned.log");
    let destination = format!("{}/rg02", b.replication_address());
    let planned = ["--source-volume", &device.0, "--source-log", planned_log.to_str().unwrap()];
    let (output, text) = topology(&a, "topo-a/rg09", &destination, &[&planned[..], &["--requirements-only"]].concat());
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(
            "PASS source volumes: 1 planned volume(s), workload from block device statistics (/sys/dev/block/7:"
        ),
        "{text}"
    );
    assert!(text.contains("PASS volume sizes equal"), "{text}");
    assert!(text.contains("PASS source log on its own device: log on tmpfs on /dev/shm"), "{text}");
    let wrote = text.lines().find(|l| l.starts_with("PASS bandwidth")).expect(&text);
    assert!(!wrote.contains("the source wrote 0 B/s"), "the direct writes to the device were seen: {wrote}");
    assert!(!planned_log.exists(), "the test creates nothing where the log will go");

    let (output, text) = topology(&a, "topo-a/rg01", &destination, &[&planned[..], &["--requirements-only"]].concat());
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL source volumes: group rg01 already exists on topo-a"), "{text}");
}

struct Detach(String);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.0]).status();
    }
}
