//! Kill drills of a sync partnership: verifying writers through NBD on the
//! source while the destination, the source, or both are killed with SIGKILL
//! at random moments. After every restart and catch-up, each block of the
//! destination holds its last acknowledged write or a later one (never an
//! older one, never a torn one), and both sides are equal byte for byte.
//!
//! `TANDEM_REPL_KILL_CYCLES=50` runs more cycles of each kind;
//! `TANDEM_REPL_KILL_SEED=N` replays the random choices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_tests::netns::NetPair;
use tandem_tests::pattern::{decode_block, Found, WriteModel, BLOCK_BYTES};
use tandem_tests::writer::Writer;
use tandem_tests::Node;

const VOLUMES: [(&str, u64); 2] = [("data", 32 << 20), ("logs", 16 << 20)];

#[derive(Debug, Clone, Copy)]
enum Victim {
    Destination,
    Source,
    Both,
}

/// Checks the destination's volume file against the model and makes what it
/// holds the floor for later cycles (it is durable: in the destination's log
/// or its checkpointed volume, and equal to the source's).
fn verify(destination: &Node, volume: usize, model: &Mutex<WriteModel>) -> Vec<String> {
    let (name, _) = VOLUMES[volume];
    let data = std::fs::read(destination.path(&format!("rg02-{name}.img"))).expect("read destination volume");
    let mut model = model.lock().unwrap();
    let mut errors = Vec::new();
    for (index, block_data) in data.chunks(BLOCK_BYTES).enumerate() {
        let block = index as u64;
        match model.check(block, block_data) {
            Ok(()) => {
                if let Ok(Found::Write(seq)) = decode_block(block_data, block) {
                    model.acked.insert(block, seq);
                }
            }
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    errors
}

#[test]
fn sync_partnership_kill_drills_lose_no_acknowledged_write() {
    let cycles: u32 = std::env::var("TANDEM_REPL_KILL_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("TANDEM_REPL_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("replication kill drill: {cycles} cycles per victim, seed {seed} (TANDEM_REPL_KILL_SEED={seed} replays the choices)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Frequent checkpoints: kills land in checkpoints, log wraps and retention.
    let mut source = Node::start_named("node-a", "checkpoint_used_percent = 10", "");
    let mut destination = Node::start_named("node-b", "checkpoint_used_percent = 10", "");
    source.replicate_to(&destination, "128MiB", &VOLUMES, "sync");
    let models = [Arc::new(Mutex::new(WriteModel::default())), Arc::new(Mutex::new(WriteModel::default()))];
    let mut seqs = [0u64; 2];
    let mut recopied = Vec::new();
    for cycle in 0..3 * cycles {
        let victim = [Victim::Destination, Victim::Source, Victim::Both][(cycle % 3) as usize];
        let stop = Arc::new(AtomicBool::new(false));
        let port = source.nbd_port;
        let writers: Vec<_> = (0..VOLUMES.len())
            .map(|volume| {
                let model = Arc::clone(&models[volume]);
                let stop = Arc::clone(&stop);
                let (seq, writer_seed) = (seqs[volume], rng.random());
                std::thread::spawn(move || {
                    let (name, size_bytes) = VOLUMES[volume];
                    let writer = Writer {
                        host: "127.0.0.1",
                        port,
                        export: format!("rg01/{name}"),
                        size_bytes,
                        model: &model,
                        stop: &stop,
                    };
                    writer.run(seq, writer_seed)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
        match victim {
            Victim::Destination => {
                destination.kill9();
                // The source goes on acknowledging writes (on_peer_loss = continue)
                // and keeps them in its log for the destination.
                std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
                destination.spawn();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..200)));
                stop.store(true, Ordering::Relaxed);
            }
            Victim::Source => source.kill9(),
            Victim::Both => {
                destination.kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
                source.kill9();
            }
        }
        for (volume, writer) in writers.into_iter().enumerate() {
            seqs[volume] = writer.join().expect("writer thread");
        }
        if matches!(victim, Victim::Source) {
            // The source is gone, as in a disaster: in sync mode the destination
            // alone must hold every acknowledged write (RPO 0). A clean stop
            // applies and checkpoints everything its log holds.
            destination.stop();
            let errors: Vec<String> = (0..VOLUMES.len()).flat_map(|v| verify(&destination, v, &models[v])).collect();
            assert!(
                errors.is_empty(),
                "cycle {cycle} (source killed, seed {seed}): the destination lacks acknowledged writes: {:#?}\ndestination log:\n{}",
                &errors[..errors.len().min(10)],
                destination.log()
            );
            destination.spawn();
        }
        if matches!(victim, Victim::Source | Victim::Both) {
            source.spawn();
        }
        if matches!(victim, Victim::Both) {
            destination.spawn();
        }
        source.wait_in_sync("rg01", Duration::from_secs(60));
        if matches!(victim, Victim::Source | Victim::Both) {
            // Records ship while their local append is in flight: a killed
            // source may come back behind its destination, which then lists
            // what it holds beyond the recovered LSN (event 4006 of the
            // restarted source's events, which start empty at its start).
            let events = source.cli_ok(&["events", "--json"]);
            recopied.extend(events.lines().filter(|line| line.contains("\"id\":4006,")).map(str::to_owned));
        }
        // Durable is not yet applied: a clean stop applies and checkpoints
        // everything the destination's log holds before its files are read.
        destination.stop();
        let errors: Vec<String> = (0..VOLUMES.len()).flat_map(|v| verify(&destination, v, &models[v])).collect();
        assert!(
            errors.is_empty(),
            "cycle {cycle} ({victim:?} killed, seed {seed}): {} bad blocks on the destination, first: {:#?}\nsource log:\n{}\ndestination log:\n{}",
            errors.len(),
            &errors[..errors.len().min(10)],
            source.log(),
            destination.log()
        );
        for (name, _) in VOLUMES {
            let here = std::fs::read(source.path(&format!("rg01-{name}.img"))).expect("source volume");
            let there = std::fs::read(destination.path(&format!("rg02-{name}.img"))).expect("destination volume");
            assert!(
                here == there,
                "cycle {cycle} ({victim:?} killed, seed {seed}): volume {name} differs after catch-up"
            );
        }
        destination.spawn();
        // The next cycle starts with the destination connected and holding
        // everything (sync writes count on it from the first one).
        source.wait_in_sync("rg01", Duration::from_secs(60));
    }
    let acked: usize = models.iter().map(|m| m.lock().unwrap().acked.len()).sum();
    assert!(acked > 1000, "the writers got many writes acknowledged ({acked} blocks)");
    eprintln!(
        "replication kill drill done: {seqs:?} writes issued; {} reconnection(s) found the destination ahead of its restarted source:\n{}",
        recopied.len(),
        recopied.join("\n")
    );
}

/// A source and a destination daemon in two namespaces joined by a link to
/// cut; `None` (said on stderr) where namespaces are unavailable.
fn nodes_in_namespaces() -> Option<(Arc<NetPair>, Node, Node)> {
    let net = match NetPair::create() {
        Ok(net) => Arc::new(net),
        Err(reason) => {
            eprintln!("network namespaces unavailable ({reason}); this drill needs a link to cut");
            return None;
        }
    };
    let source = Node::start_in("node-a", "", "", Some((&net.ns[0], &net.addr[0])));
    let destination = Node::start_in("node-b", "", "", Some((&net.ns[1], &net.addr[1])));
    Some((net, source, destination))
}

/// Cuts the link and waits until the source declares its destination lost.
fn cut_until_lost(net: &NetPair, source: &Node) {
    net.set_link(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while source.partnership("rg01")["state"] != "WaitingForDestination" {
        assert!(std::time::Instant::now() < deadline, "the source never declared its destination lost");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs verifying writers against the source inside its namespace until
/// `stop` is set or the source dies; returns their threads.
fn start_writers(
    net: &Arc<NetPair>,
    source: &Node,
    models: &[Arc<Mutex<WriteModel>>; 2],
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..VOLUMES.len())
        .map(|volume| {
            let (net, model, stop) = (Arc::clone(net), Arc::clone(&models[volume]), Arc::clone(stop));
            let (host, port) = (source.host.clone(), source.nbd_port);
            std::thread::spawn(move || {
                net.enter(0);
                let (name, size_bytes) = VOLUMES[volume];
                let export = format!("rg01/{name}");
                let writer = Writer { host: &host, port, export, size_bytes, model: &model, stop: &stop };
                writer.run(volume as u64 * 1_000_000_000, seed + volume as u64)
            })
        })
        .collect()
}

/// Sync mode holds writes while the destination cannot be reached: a source
/// lost for good behind a cut link leaves no acknowledged write behind.
#[test]
fn a_source_lost_behind_a_cut_link_leaves_every_acknowledged_write_on_the_destination() {
    let Some((net, mut source, mut destination)) = nodes_in_namespaces() else { return };
    source.replicate_to(&destination, "128MiB", &VOLUMES, "sync");
    let models = [Arc::new(Mutex::new(WriteModel::default())), Arc::new(Mutex::new(WriteModel::default()))];
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&net, &source, &models, &stop, rand::rng().random());
    std::thread::sleep(Duration::from_millis(500));
    net.set_link(false);
    // Shorter than the peer timeout: the source still counts on its destination.
    std::thread::sleep(Duration::from_millis(1500));
    source.kill9();
    for writer in writers {
        writer.join().expect("writer thread");
    }
    destination.stop();
    let errors: Vec<String> = (0..VOLUMES.len()).flat_map(|v| verify(&destination, v, &models[v])).collect();
    assert!(errors.is_empty(), "the destination lacks acknowledged writes: {:#?}", &errors[..errors.len().min(10)]);
    let acked: usize = models.iter().map(|m| m.lock().unwrap().acked.len()).sum();
    assert!(acked > 100, "writes were acknowledged before the cut ({acked} blocks)");
}

/// A link cut longer than the peer timeout: the source declares its
/// destination lost, goes on serving writes from its log, and catches the
/// destination up from the log once the link is back.
#[test]
fn a_cut_link_is_caught_up_from_the_log_after_it_returns() {
    let Some((net, source, mut destination)) = nodes_in_namespaces() else { return };
    source.replicate_to(&destination, "256MiB", &VOLUMES, "sync");
    let models = [Arc::new(Mutex::new(WriteModel::default())), Arc::new(Mutex::new(WriteModel::default()))];
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&net, &source, &models, &stop, rand::rng().random());
    std::thread::sleep(Duration::from_millis(300));
    cut_until_lost(&net, &source);
    let lost_at_lsn = source.partnership("rg01")["current_lsn"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let p = source.partnership("rg01");
    assert!(p["current_lsn"].as_u64().unwrap() > lost_at_lsn, "writes go on without the destination: {p:#}");
    net.set_link(true);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer thread");
    }
    source.wait_in_sync("rg01", Duration::from_secs(60));
    // States are observed every 100 ms: the completion's event follows shortly.
    source.wait_for_events(&[2001, 3001, 3002, 4001, 4002, 4003], Duration::from_secs(5));
    destination.stop();
    let errors: Vec<String> = (0..VOLUMES.len()).flat_map(|v| verify(&destination, v, &models[v])).collect();
    assert!(errors.is_empty(), "after catch-up: {:#?}", &errors[..errors.len().min(10)]);
    for (name, _) in VOLUMES {
        let here = std::fs::read(source.path(&format!("rg01-{name}.img"))).expect("source volume");
        let there = std::fs::read(destination.path(&format!("rg02-{name}.img"))).expect("destination volume");
        assert!(here == there, "volume {name} differs after catch-up");
    }
}

/// A cut long enough for the writes to outgrow the source's log: the log
/// folds what the destination lacks into the bitmap instead of holding
/// writes back, and the destination catches up by copying the marked regions.
#[test]
fn a_log_that_fills_during_a_cut_spills_into_the_bitmap_and_catches_up() {
    tandem_tests::require_tool("qemu-img", "qemu-utils");
    let Some((net, source, mut destination)) = nodes_in_namespaces() else { return };
    let volumes = [("data", 256u64 << 20)];
    source.replicate_to(&destination, "128MiB", &volumes, "sync");
    cut_until_lost(&net, &source);
    // 192 MiB of writes do not fit in the 128 MiB log: without the bitmap
    // they would wait for the destination forever.
    let image = source.path("image.img");
    tandem_tests::run_ok(
        std::process::Command::new("dd").arg("if=/dev/urandom").arg(format!("of={}", image.display())).args([
            "bs=1M",
            "count=192",
            "status=none",
        ]),
    );
    tandem_tests::run_ok(
        source
            .client_command("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(source.nbd_uri("rg01", "data")),
    );
    let p = source.partnership("rg01");
    assert!(p["bitmap_spills"].as_u64().unwrap() > 0 && p["bitmap_dirty_bytes"].as_u64().unwrap() > 0, "{p:#}");
    let (dirty, compared_before) =
        (p["bitmap_dirty_bytes"].as_u64().unwrap(), p["sync"]["bytes_compared"].as_u64().unwrap());
    net.set_link(true);
    source.wait_in_sync("rg01", Duration::from_secs(120));
    let p = source.partnership("rg01");
    let compared = p["sync"]["bytes_compared"].as_u64().unwrap() - compared_before;
    assert!(compared >= dirty, "the catch-up compared the dirty regions ({compared} of {dirty} bytes): {p:#}");
    source.wait_for_events(&[4004, 4005], Duration::from_secs(5));
    destination.stop();
    let here = std::fs::read(source.path("rg01-data.img")).expect("source volume");
    let there = std::fs::read(destination.path("rg02-data.img")).expect("destination volume");
    assert!(here == there, "the volumes differ after the bitmap catch-up");
    let p = source.partnership("rg01");
    assert_eq!(p["bitmap_dirty_bytes"], 0, "the bitmap is clear once the destination holds every region: {p:#}");
}

/// The source's established replication connections, as `ss` lists them
/// (local port of each).
fn replication_channel_ports(net: &NetPair, destination: &Node) -> Vec<String> {
    let filter = format!("dport = :{}", destination.replication_port);
    let output = net.command(0, "ss").args(["-Htn", "state", "established"]).arg(&filter).output().expect("ss");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.rsplit_once(':').map(|(_, port)| port.to_owned()))
        .collect()
}

/// One data channel of a session breaks (its socket destroyed under load):
/// the whole session ends, the source reconnects every channel, catches up
/// from the log and loses nothing.
#[test]
fn losing_one_data_channel_ends_the_session_and_it_reconnects_without_loss() {
    let Some((net, source, mut destination)) = nodes_in_namespaces() else { return };
    source.replicate_to(&destination, "256MiB", &VOLUMES, "sync");
    let ports = replication_channel_ports(&net, &destination);
    assert_eq!(ports.len(), 2, "two data channels by default: {ports:?}");
    let models = [Arc::new(Mutex::new(WriteModel::default())), Arc::new(Mutex::new(WriteModel::default()))];
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&net, &source, &models, &stop, rand::rng().random());
    std::thread::sleep(Duration::from_millis(500));
    let victim = format!("sport = :{}", ports[1]);
    let killed = net.command(0, "ss").args(["-K", "-Htn"]).arg(&victim).output().expect("ss -K");
    assert!(killed.status.success(), "ss -K: {}", String::from_utf8_lossy(&killed.stderr));
    source.wait_for_events(&[4001, 4002], Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer thread");
    }
    source.wait_in_sync("rg01", Duration::from_secs(60));
    let p = source.partnership("rg01");
    assert_eq!(p["channels_connected"], 2, "every channel is back: {p:#}");
    let now = replication_channel_ports(&net, &destination);
    assert!(!now.contains(&ports[0]) && !now.contains(&ports[1]), "the session was replaced: {ports:?} then {now:?}");
    destination.stop();
    let errors: Vec<String> = (0..VOLUMES.len()).flat_map(|v| verify(&destination, v, &models[v])).collect();
    assert!(errors.is_empty(), "after the channel loss: {:#?}", &errors[..errors.len().min(10)]);
    let acked: usize = models.iter().map(|m| m.lock().unwrap().acked.len()).sum();
    assert!(acked > 100, "writes were acknowledged around the loss ({acked} blocks)");
}

/// Unplanned failover: promotion is refused while the source is connected;
/// once the link is cut and the destination lost its source, `group promote`
/// makes it writable under a new generation (event 7001); when the link
/// returns, the old source cannot resume into it and writes nothing there.
#[test]
fn a_promoted_destination_serves_writes_and_the_old_source_cannot_overwrite_it() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let Some((net, source, destination)) = nodes_in_namespaces() else { return };
    source.replicate_to(&destination, "128MiB", &[("data", 16 << 20)], "sync");
    let write = |node: &Node, group: &str, pattern: u8| {
        tandem_tests::run_ok(
            node.client_command("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 1M")])
                .arg(node.nbd_uri(group, "data")),
        )
    };
    write(&source, "rg01", 1);
    source.wait_in_sync("rg01", Duration::from_secs(60));
    let refused = destination.cli(&["group", "promote", "rg02"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the source of rg02 is connected"), "{refused:?}");

    cut_until_lost(&net, &source);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while destination.partnership("rg02")["connected"] == true {
        assert!(std::time::Instant::now() < deadline, "the destination never noticed the cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    let promoted = destination.cli_ok(&["group", "promote", "rg02"]);
    assert!(promoted.contains("rg02 promoted") && promoted.contains("every write node-a/rg01 reported"), "{promoted}");
    destination.wait_for_events(&[7001], Duration::from_secs(5));
    assert_eq!(destination.group_status("rg02")["role"], "standalone");
    write(&destination, "rg02", 7);

    net.set_link(true);
    std::thread::sleep(Duration::from_secs(3));
    let p = source.partnership("rg01");
    assert_eq!(p["connected"], false, "the old source cannot resume into the promoted group: {p:#}");
    assert!(p["last_error"].as_str().unwrap_or_default().contains("was promoted after LSN"), "{p:#}");
    assert_eq!(p["state"], "PeerPromoted", "it wrote nothing after the promotion: {p:#}");
    assert!(source.group_status("rg01")["fenced_after_lsn"].is_u64(), "the old source is fenced");
    let data = std::fs::read(destination.path("rg02-data.img")).unwrap();
    assert!(data[..1 << 20].iter().all(|&b| b == 7), "the promoted group keeps its own writes");
}

/// Split brain: during a partition the source keeps writing and the
/// destination is promoted and writes too. When the link returns the old
/// source stops in `SplitBrain` (event 7002 names both generations) and
/// nothing moves; `resolve --keep` on it keeps the side chosen (here the old
/// source): the promoted side becomes its destination, loses its writes since
/// the promotion, and the volumes end equal.
#[test]
fn split_brain_stops_until_resolved_and_resolve_keeps_the_chosen_side() {
    tandem_tests::require_tool("qemu-io", "qemu-utils");
    let Some((net, source, destination)) = nodes_in_namespaces() else { return };
    source.replicate_to(&destination, "128MiB", &[("data", 16 << 20)], "async");
    let write = |node: &Node, group: &str, pattern: u8, offset_mib: u64| {
        tandem_tests::run_ok(
            node.client_command("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {pattern} {offset_mib}M 1M")])
                .arg(node.nbd_uri(group, "data")),
        )
    };
    cut_until_lost(&net, &source);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while destination.partnership("rg02")["connected"] == true {
        assert!(std::time::Instant::now() < deadline, "the destination never noticed the cut");
        std::thread::sleep(Duration::from_millis(100));
    }
    let promoted = destination.cli_ok(&["group", "promote", "rg02"]);
    assert!(promoted.contains("rg02 promoted"), "{promoted}");
    write(&source, "rg01", 0x11, 0);
    write(&destination, "rg02", 0x22, 0);
    write(&destination, "rg02", 0x22, 4);

    net.set_link(true);
    source.wait_for_events(&[7002], Duration::from_secs(30));
    let p = source.partnership("rg01");
    assert_eq!(p["state"], "SplitBrain", "{p:#}");
    let event = source.cli_ok(&["events", "--json"]);
    let (ours, theirs) =
        (source.group_status("rg01")["generation"].clone(), destination.group_status("rg02")["generation"].clone());
    assert!(event.contains(ours.as_str().unwrap()) && event.contains(theirs.as_str().unwrap()), "{event}");
    let md5 = |node: &Node, file: &str| tandem_tests::run_ok(std::process::Command::new("md5sum").arg(node.path(file)));
    let before = (md5(&source, "rg01-data.img"), md5(&destination, "rg02-data.img"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(before, (md5(&source, "rg01-data.img"), md5(&destination, "rg02-data.img")), "nothing moves");

    let resolved = source.cli_ok(&["partnership", "resolve", "--group", "rg01", "--keep", "node-a/rg01"]);
    assert!(resolved.contains("split brain resolved"), "{resolved}");
    source.wait_in_sync("rg01", Duration::from_secs(60));
    write(&source, "rg01", 0x33, 8);
    source.wait_in_sync("rg01", Duration::from_secs(60));
    assert_eq!(
        md5(&source, "rg01-data.img").split_whitespace().next(),
        md5(&destination, "rg02-data.img").split_whitespace().next()
    );
    let data = std::fs::read(destination.path("rg02-data.img")).unwrap();
    assert!(data[..1 << 20].iter().all(|&b| b == 0x11), "the kept side's write won");
    assert!(data[4 << 20..5 << 20].iter().all(|&b| b == 0), "the promoted side's own write is gone");
    assert_eq!(destination.group_status("rg02")["role"], "destination");
}
