//! Two daemons replicating: real partnerships over TCP between two network
//! namespaces (loopback where namespaces are unavailable), real qemu-img
//! writes through NBD, whole-volume md5 comparisons.

use std::process::Command;
use std::time::Duration;

use tandem_tests::netns::NetPair;
use tandem_tests::{fio_pipelined_verify_job, require_tool, run_ok, Node};

const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Two nodes, in namespaces when this machine allows it.
struct Pair {
    source: Node,
    destination: Node,
    _net: Option<std::sync::Arc<NetPair>>,
}

fn start_pair(replication_toml: &str) -> Pair {
    let (net, source, destination) = tandem_tests::two_nodes(replication_toml);
    Pair { source, destination, _net: net }
}

fn md5(path: &std::path::Path) -> String {
    run_ok(Command::new("md5sum").arg(path)).split_whitespace().next().expect("md5sum output").to_owned()
}

fn random_image(node: &Node, name: &str, size_mib: u64) -> std::path::PathBuf {
    let path = node.path(name);
    run_ok(
        Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", path.display()))
            .arg("bs=1M")
            .arg(format!("count={size_mib}"))
            .arg("status=none"),
    );
    path
}

/// Converges with `channels` data channels (the stream is striped over them
/// and reordered at the destination).
fn converge(mode: &str, channels: u32, volumes: &[(&str, u64)]) {
    require_tool("qemu-img", "qemu-utils");
    let pair = start_pair("");
    // Data before the partnership exists goes through the initial copy;
    // data after it through the log.
    let before = random_image(&pair.source, "before.img", 32);
    pair.source.create_group("rg01", "256MiB", volumes);
    let (first, _) = volumes[0];
    run_ok(
        pair.source
            .client_command("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&before)
            .arg(pair.source.nbd_uri("rg01", first)),
    );
    pair.destination.create_group("rg02", "256MiB", volumes);
    let channels_text = channels.to_string();
    let output =
        pair.source.partner_with("rg01", &pair.destination, "rg02", &["--mode", mode, "--channels", &channels_text]);
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        out.contains(&format!("({mode}, {channels} tcp channel(s))")),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let image = random_image(&pair.source, "image.img", 256);
    for (index, (volume, size)) in volumes.iter().enumerate() {
        let image =
            if index == 0 { image.clone() } else { random_image(&pair.source, &format!("v{index}.img"), size >> 20) };
        run_ok(
            pair.source
                .client_command("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(&image)
                .arg(pair.source.nbd_uri("rg01", volume)),
        );
    }
    pair.source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    for (volume, _) in volumes {
        let source = md5(&pair.source.path(&format!("rg01-{volume}.img")));
        let destination = md5(&pair.destination.path(&format!("rg02-{volume}.img")));
        assert_eq!(source, destination, "{mode}: volume {volume} differs after the partnership reported in sync");
    }
    let p = pair.source.partnership("rg01");
    assert!(p["copy_bytes_skipped"].as_u64().unwrap() > 0, "holes were skipped: {p:#}");
    assert!(p["ack_round_trip_us_avg"].as_f64().unwrap() > 0.0, "round trips were measured: {p:#}");
    assert!(p["last_in_sync_unix_ms"].as_u64().unwrap() > 0, "the destination was seen in sync: {p:#}");
    assert_eq!(p["channels"], channels, "{p:#}");
    assert_eq!(p["channels_connected"], channels, "every channel is up: {p:#}");
    let destination = pair.destination.partnership("rg02");
    assert_eq!(destination["copy_complete"], true, "{destination:#}");
}

#[test]
fn sync_partnership_with_one_volume_converges() {
    converge("sync", 2, &[("data", 320 << 20)]);
}

#[test]
fn async_partnership_with_one_volume_converges() {
    converge("async", 1, &[("data", 320 << 20)]);
}

#[test]
fn sync_partnership_with_three_volumes_converges() {
    converge("sync", 4, &[("data", 320 << 20), ("logs", 64 << 20), ("index", 32 << 20)]);
}

#[test]
fn async_partnership_with_three_volumes_converges() {
    converge("async", 3, &[("data", 320 << 20), ("logs", 64 << 20), ("index", 32 << 20)]);
}

/// A source answers a write once it is durable in both logs, possibly before
/// its own volume write (which starts only after the log write): a read right
/// after it must still return it. Writes and read-backs alternate on
/// overlapping ranges of the source's export.
#[test]
fn a_source_reads_back_every_write_it_answered() {
    require_tool("qemu-io", "qemu-utils");
    let pair = start_pair("");
    pair.source.replicate_to(&pair.destination, "256MiB", &[("data", 16 << 20)], "sync");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for round in 0..300u64 {
        let pattern = round % 250 + 1;
        let offset = (round * 7919 % 250) * 4096;
        let length = 4096 * (1 + round % 16);
        args.extend(["-c".into(), format!("write -P {pattern} {offset} {length}")]);
        args.extend(["-c".into(), format!("read -P {pattern} {offset} {length}")]);
    }
    let output = pair
        .source
        .client_command("qemu-io")
        .args(&args)
        .arg(pair.source.nbd_uri("rg01", "data"))
        .output()
        .expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("Pattern verification failed"), "a read missed the write before it: {text}");
    assert_eq!(text.matches("read ").count(), 300, "{text}");
}

/// A sync source under a deep pipeline of mixed write sizes (payloads
/// received straight into record buffers, several requests per receive),
/// with fio reading back and verifying on the same connection: every reply
/// is right, and the destination ends byte-identical.
#[test]
fn a_sync_source_under_pipelined_mixed_writes_verifies_and_converges() {
    require_tool("fio", "fio");
    let pair = start_pair("");
    pair.source.replicate_to(&pair.destination, "256MiB", &[("data", 64 << 20)], "sync");
    let uri = pair.source.nbd_uri("rg01", "data");
    let output = run_ok(fio_pipelined_verify_job(&mut pair.source.client_command("fio"), &uri));
    assert!(!output.contains("verify: bad"), "fio verification failed:\n{output}");
    pair.source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let source = md5(&pair.source.path("rg01-data.img"));
    let destination = md5(&pair.destination.path("rg02-data.img"));
    assert_eq!(source, destination, "the destination differs after the source reported in sync");
}

#[test]
fn destination_exports_refuse_clients_with_the_reason() {
    require_tool("qemu-io", "qemu-utils");
    let pair = start_pair("");
    pair.source.replicate_to(&pair.destination, "256MiB", &[("data", 16 << 20)], "sync");
    let output = pair
        .destination
        .client_command("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(pair.destination.nbd_uri("rg02", "data"))
        .output()
        .expect("run qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "a write to the destination was accepted: {text}");
    assert!(text.contains("rg02 is a replication destination of node-a/rg01"), "{text}");
    // Removing the partnership on the source frees both groups.
    let out = pair.source.cli_ok(&["partnership", "remove", "--group", "rg01"]);
    assert!(out.contains("standalone again"), "{out}");
    run_ok(
        pair.destination
            .client_command("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(pair.destination.nbd_uri("rg02", "data")),
    );
    assert_eq!(pair.destination.group_status("rg02")["role"], "standalone");
}

fn refused(pair: &Pair, destination_group: &str) -> String {
    let output = pair.source.partner("rg01", &pair.destination, destination_group, None);
    assert_eq!(output.status.code(), Some(1), "partnership with {destination_group} was not refused");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_destination_refuses_with_a_precise_reason() {
    let pair = start_pair("");
    pair.source.create_group("rg01", "128MiB", &[("data", 16 << 20), ("logs", 8 << 20)]);
    assert!(refused(&pair, "nothere").contains("group nothere does not exist on node-b"));
    pair.destination.create_group("one", "128MiB", &[("data", 16 << 20)]);
    assert!(refused(&pair, "one").contains("has 1 volume(s) but rg01 has 2"));
    pair.destination.create_group("small", "128MiB", &[("data", 16 << 20), ("logs", 4 << 20)]);
    let text = refused(&pair, "small");
    assert!(
        text.contains("volume 1 of small on node-b is 4194304 bytes but volume 1 of rg01 is 8388608 bytes"),
        "{text}"
    );
    pair.destination.create_group("busy", "128MiB", &[("data", 16 << 20), ("logs", 8 << 20)]);
    let held = pair
        .destination
        .client_command("qemu-io")
        .args(["-f", "raw", "-c", "sleep 3000"])
        .arg(pair.destination.nbd_uri("busy", "data"))
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(500));
    let text = refused(&pair, "busy");
    assert!(text.contains("in use by 1 client connection(s)"), "{text}");
    let mut held = held;
    let _ = held.wait();
    pair.destination.create_group("rg02", "128MiB", &[("data", 16 << 20), ("logs", 8 << 20)]);
    let _ = pair.source.partner_ok("rg01", &pair.destination, "rg02", None);
    pair.source.create_group("other", "128MiB", &[("data", 16 << 20), ("logs", 8 << 20)]);
    let output = pair.source.partner("other", &pair.destination, "rg02", None);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("group rg02 on node-b is already in a partnership"), "{text}");
    let output = pair.source.partner("rg01", &pair.destination, "busy", None);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("group rg01 is already in a partnership"), "{text}");
    let output = pair.source.cli(&["group", "delete", "rg01"]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("remove it first"), "{text}");
    let output = pair.source.cli(&[
        "partnership",
        "create",
        "--source-group",
        "other",
        "--destination",
        "127.0.0.1:1",
        "--destination-group",
        "x",
    ]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("cannot connect to the destination's replication listener"), "{text}");
    for channels in ["0", "17"] {
        let output = pair.source.partner_with("other", &pair.destination, "rg02", &["--channels", channels]);
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(&format!("--channels {channels}: a partnership has 1 to 16 data channels")), "{text}");
    }
}

#[test]
fn tandem_demo_replicates_a_workload_and_finds_the_volumes_equal() {
    for mode in ["sync", "async"] {
        let output = Command::new(tandem_tests::bin("tandem"))
            .args(["demo", "--mode", mode, "--seconds", "2", "--size", "64MiB"])
            .output()
            .expect("run tandem demo");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "demo ({mode}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("comparing the volumes byte for byte ... equal"), "{stdout}");
        assert!(stdout.contains(&format!("{mode} mode")), "{stdout}");
        assert!(stdout.contains("initial block copy done"), "{stdout}");
    }
}

/// Moving either side's group to another core thread (as `tandem tune
/// --cores` does) ends the session; the partnership resumes by itself and
/// the volumes still converge.
#[test]
fn a_partnership_resumes_after_either_group_moves_core() {
    require_tool("qemu-io", "qemu-utils");
    let pair = start_pair("");
    pair.source.replicate_to(&pair.destination, "256MiB", &[("data", 16 << 20)], "sync");
    let two_cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) >= 2;
    let core = if two_cores { "1" } else { "0" };
    let write = |pattern: u32| {
        run_ok(
            pair.source
                .client_command("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 1M")])
                .arg(pair.source.nbd_uri("rg01", "data")),
        );
    };
    write(1);
    let _ = pair.source.cli_ok(&["group", "move", "rg01", "--core", core]);
    write(2);
    pair.source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let _ = pair.destination.cli_ok(&["group", "move", "rg02", "--core", core]);
    write(3);
    pair.source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let source = md5(&pair.source.path("rg01-data.img"));
    assert_eq!(source, md5(&pair.destination.path("rg02-data.img")), "the volumes converged after both moves");
    assert_eq!(pair.destination.group_status("rg02")["core"].as_u64().unwrap().to_string(), core);
}

/// `tandem partnership set --mode` changes a running partnership on both
/// sides, durably; in sync mode a write returns only once the destination
/// holds it; the destination refuses to change it.
#[test]
fn the_mode_of_a_running_partnership_changes_on_both_sides() {
    require_tool("qemu-io", "qemu-utils");
    let mut pair = start_pair("");
    pair.source.replicate_to(&pair.destination, "256MiB", &[("data", 16 << 20)], "async");
    let changed = pair.source.cli_ok(&["partnership", "set", "--group", "rg01", "--mode", "sync"]);
    assert!(changed.contains("is now sync (was async)") && changed.contains("holds it too"), "{changed}");
    assert_eq!(pair.source.partnership("rg01")["mode"], "sync");
    assert_eq!(pair.destination.partnership("rg02")["mode"], "sync");
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for round in 0..20u64 {
        args.extend(["-c".to_owned(), format!("write -P {} {} 64k", round + 1, round * 65536)]);
    }
    run_ok(pair.source.client_command("qemu-io").args(&args).arg(pair.source.nbd_uri("rg01", "data")));
    let p = pair.source.partnership("rg01");
    assert_eq!(
        p["destination_durable_lsn"], p["current_lsn"],
        "sync: every answered write is on the destination: {p:#}"
    );

    pair.source.stop();
    pair.source.spawn();
    pair.destination.stop();
    pair.destination.spawn();
    assert_eq!(pair.source.partnership("rg01")["mode"], "sync", "the source's superblock holds the mode");
    assert_eq!(pair.destination.partnership("rg02")["mode"], "sync", "so does the destination's");
    let refused = pair.destination.cli(&["partnership", "set", "--group", "rg02", "--mode", "async"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("change the mode on the source"), "{refused:?}");
    let back = pair.source.cli_ok(&["partnership", "set", "--group", "rg01", "--mode", "async"]);
    assert!(back.contains("is now async (was sync)"), "{back}");
    pair.source.wait_for_events(&[2005], Duration::from_secs(5));
    pair.destination.wait_for_events(&[2005], Duration::from_secs(5));
    assert_eq!(pair.destination.partnership("rg02")["mode"], "async");
}

/// Network constraints (Set-SRNetworkConstraint): the source binds its
/// channels to its veth, the destination accepts them only on its address;
/// both persist, status shows each channel's addresses; a constraint that
/// names nothing on a node is refused with the node's interfaces or addresses.
#[test]
fn network_constraints_hold_on_both_sides() {
    let Ok(net) = tandem_tests::netns::NetPair::create() else {
        eprintln!("network namespaces unavailable; skipped");
        return;
    };
    let mut source = Node::start_in("node-a", "", "", Some((&net.ns[0], &net.addr[0])));
    let destination = Node::start_in("node-b", "", "", Some((&net.ns[1], &net.addr[1])));
    source.create_group("rg01", "128MiB", &[("data", 16 << 20)]);
    destination.create_group("rg02", "128MiB", &[("data", 16 << 20)]);
    let bogus = source.partner_with("rg01", &destination, "rg02", &["--source-network", "nosuchif0"]);
    let text = String::from_utf8_lossy(&bogus.stderr);
    assert!(text.contains("--source-network nosuchif0: there is no interface or address nosuchif0"), "{text}");
    let elsewhere = source.partner_with("rg01", &destination, "rg02", &["--destination-network", "10.99.99.99"]);
    let text = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(text.contains("--destination-network 10.99.99.99: 10.99.99.99 is not an address of this node"), "{text}");
    assert_eq!(source.group_status("rg01")["role"], "standalone", "refusals change nothing");

    let created = source.partner_with(
        "rg01",
        &destination,
        "rg02",
        &["--source-network", &net.veth[0], "--destination-network", &net.addr[1], "--channels", "2"],
    );
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    let p = source.partnership("rg01");
    assert_eq!(p["network"], net.veth[0].as_str(), "{p:#}");
    let channels = p["channel_addresses"].as_array().unwrap();
    assert_eq!(channels.len(), 2, "{p:#}");
    for channel in channels {
        let text = channel.as_str().unwrap();
        assert!(
            text.starts_with(&format!("tcp {}:", net.addr[0])) && text.contains(&format!("-> {}:", net.addr[1])),
            "{text}"
        );
    }
    assert_eq!(destination.partnership("rg02")["network"], net.addr[1].as_str());
    // Both survive a restart of the source, which reconnects through its veth.
    source.stop();
    source.spawn();
    source.wait_in_sync("rg01", IN_SYNC_TIMEOUT);
    assert_eq!(source.partnership("rg01")["network"], net.veth[0].as_str());
    let shown = source.cli_ok(&["partnership", "show"]);
    assert!(shown.contains(&format!("constrained to {} on this node", net.veth[0])), "{shown}");
}
