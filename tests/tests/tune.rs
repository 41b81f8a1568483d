//! `tandem tune` against real daemons: a small sweep of a group's
//! group-commit limits (live, restored afterwards, or applied to the running
//! group and its config file) and of a transport's channels and socket
//! buffers; it recommends the point it measured best.

use tandem_tests::Node;

fn tune_json(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["tune", "--json", "--seconds-per-point", "1"];
    all.extend_from_slice(args);
    serde_json::from_str(&node.cli_ok(&all)).expect("tune JSON")
}

/// The index of the fastest eligible point, as the test sees it.
fn fastest(outcome: &serde_json::Value) -> usize {
    let points = outcome["points"].as_array().unwrap();
    (0..points.len())
        .filter(|&i| points[i]["eligible"] == true)
        .max_by(|&a, &b| points[a]["mib_per_s"].as_f64().unwrap().total_cmp(&points[b]["mib_per_s"].as_f64().unwrap()))
        .unwrap()
}

fn batching(node: &Node) -> (u64, u64) {
    let status = node.group_status("rg01");
    (status["max_batch_records"].as_u64().unwrap(), status["max_inflight_appends"].as_u64().unwrap())
}

#[test]
fn tune_sweeps_a_group_live_and_recommends_its_best_point() {
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", 8 << 20)]);
    let refused = node.cli(&["tune", "--group", "rg01"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("add --destroy-data"), "{refused:?}");
    let original = batching(&node);
    assert_eq!(original, (256, 4), "the defaults");

    // Two cores when the machine has them: the group moves between points.
    let two_cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) >= 2;
    let mut first = vec!["--group", "rg01", "--destroy-data", "--batch-records", "8,128", "--inflight-appends", "1"];
    if two_cores {
        first.extend_from_slice(&["--cores", "1,0"]);
    }
    let outcome = tune_json(&node, &first);
    let points = outcome["points"].as_array().unwrap();
    assert_eq!(points.len(), if two_cores { 4 } else { 2 }, "{outcome:#}");
    assert!(points.iter().all(|p| p["iops"].as_f64().unwrap() > 0.0), "{outcome:#}");
    if two_cores {
        assert_eq!(points[0]["knobs"][0], serde_json::json!(["core", 1]), "{outcome:#}");
    }
    assert_eq!(outcome["best"].as_u64().unwrap() as usize, fastest(&outcome), "{outcome:#}");
    assert_eq!(batching(&node), original, "without --apply the limits come back");
    assert_eq!(node.group_status("rg01")["core"], 0, "and the group is back on its core");

    let sweep = ["--group", "rg01", "--destroy-data", "--batch-records", "8,128", "--inflight-appends", "1,4"];
    let mut applied = sweep.to_vec();
    let config = node.config_path().to_str().unwrap().to_owned();
    applied.extend_from_slice(&["--apply", "--config", &config]);
    let outcome = tune_json(&node, &applied);
    let best = &outcome["points"][outcome["best"].as_u64().unwrap() as usize]["knobs"];
    let chosen = (best[0][1].as_u64().unwrap(), best[1][1].as_u64().unwrap());
    assert_eq!(batching(&node), chosen, "--apply keeps the best point live");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("max_batch_records = {}", chosen.0)), "{text}");
    assert!(text.contains(&format!("max_inflight_appends = {}", chosen.1)), "{text}");
    assert!(text.contains("[node]") && text.contains("name = "), "the rest of the file stays: {text}");
}

#[test]
fn tune_sweeps_a_transport_and_honours_the_latency_ceiling() {
    let node = Node::start("");
    let address = node.replication_address();
    let outcome = tune_json(&node, &["--transport", &address, "--channels", "1,2", "--socket-buffers", "256KiB,1MiB"]);
    assert_eq!(outcome["points"].as_array().unwrap().len(), 4, "{outcome:#}");
    assert_eq!(outcome["best"].as_u64().unwrap() as usize, fastest(&outcome), "{outcome:#}");
    assert!(outcome["snippet"].as_str().unwrap().starts_with("[replication]\nchannels = "), "{outcome:#}");
    let output = node.cli(&["tune", "--transport", &address, "--channels", "1", "--socket-buffers", "256KiB"]);
    assert!(output.status.success());
    let output = node.cli(&[
        "tune",
        "--transport",
        &address,
        "--channels",
        "1",
        "--socket-buffers",
        "256KiB",
        "--seconds-per-point",
        "1",
        "--max-p99",
        "1us",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no point met --max-p99 1 us; the lowest p99 measured was"), "{stderr}");
}
