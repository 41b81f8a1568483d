//! Write order across the volumes of a consistency group, on the destination,
//! at every instant: a client writes a chain of dependent writes alternating
//! between two volumes (each issued after the previous one was acknowledged),
//! while the destination daemon is paused at random moments and its volumes
//! are read. No snapshot may show a write without the writes before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tandem_tests::nbd_client::NbdClient;
use tandem_tests::pattern::{block_content, decode_block, Found, BLOCK_BYTES};
use tandem_tests::Node;

const VOLUMES: [(&str, u64); 2] = [("a", 4 << 20), ("b", 4 << 20)];
/// Blocks each volume cycles through.
const SLOTS: u64 = 256;

fn place(seq: u64) -> (usize, u64) {
    ((seq % 2) as usize, (seq / 2) % SLOTS)
}

/// Writes the chain until `stop`: write `seq` only after `seq - 1` was acknowledged.
fn write_chain(port: u16, stop: &AtomicBool) -> u64 {
    let mut clients: Vec<NbdClient> =
        VOLUMES.iter().map(|(name, _)| NbdClient::connect(port, &format!("rg01/{name}")).expect("connect")).collect();
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let (volume, slot) = place(seq);
        let error = clients[volume].write(slot * BLOCK_BYTES as u64, &block_content(seq, slot)).expect("write");
        assert_eq!(error, 0, "write {seq} failed");
    }
    seq
}

/// The destination's volumes, read while its daemon is stopped.
fn snapshot(destination: &Node, pid: i32) -> Vec<Vec<u8>> {
    // SAFETY: signalling the destination daemon, a child of this test.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // IO the daemon submitted before it stopped still completes in the kernel.
    std::thread::sleep(Duration::from_millis(30));
    let volumes = VOLUMES
        .iter()
        .map(|(name, _)| std::fs::read(destination.path(&format!("rg02-{name}.img"))).expect("read volume"))
        .collect();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    volumes
}

/// The newest write found, and every write of the last two laps before it
/// present exactly (each is the newest write of its block up to there).
fn check(volumes: &[Vec<u8>]) -> Result<u64, String> {
    let mut newest = 0;
    for (volume, data) in volumes.iter().enumerate() {
        for slot in 0..SLOTS {
            let block = &data[(slot as usize) * BLOCK_BYTES..(slot as usize + 1) * BLOCK_BYTES];
            if let Found::Write(seq) = decode_block(block, slot)? {
                assert_eq!(place(seq), (volume, slot), "write {seq} found in the wrong place");
                newest = newest.max(seq);
            }
        }
    }
    for seq in newest.saturating_sub(2 * SLOTS - 1).max(1)..=newest {
        let (volume, slot) = place(seq);
        let block = &volumes[volume][(slot as usize) * BLOCK_BYTES..(slot as usize + 1) * BLOCK_BYTES];
        let found = decode_block(block, slot)?;
        if found != Found::Write(seq) {
            return Err(format!("write {newest} is on the destination but write {seq} is not (found {found:?})"));
        }
    }
    Ok(newest)
}

#[test]
fn the_destination_never_shows_a_write_without_its_predecessors() {
    for mode in ["async", "sync"] {
        let source = Node::start_named("node-a", "", "");
        let destination = Node::start_named("node-b", "", "");
        source.replicate_to(&destination, "128MiB", &VOLUMES, mode);
        let stop = Arc::new(AtomicBool::new(false));
        let writer_stop = Arc::clone(&stop);
        let port = source.nbd_port;
        let writer = std::thread::spawn(move || write_chain(port, &writer_stop));
        let pid = destination.pid().expect("destination runs");
        let mut rng = rand::rng();
        let (mut snapshots, mut newest) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(rng.random_range(10..100)));
            let found =
                check(&snapshot(&destination, pid)).unwrap_or_else(|e| panic!("{mode}: snapshot {snapshots}: {e}"));
            newest = newest.max(found);
            snapshots += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().expect("writer");
        source.wait_in_sync("rg01", Duration::from_secs(60));
        let last = check(&snapshot(&destination, pid)).expect("final snapshot");
        assert_eq!(last, written, "{mode}: the destination holds the whole chain at the end");
        assert!(snapshots > 20 && newest > 100, "{mode}: {snapshots} snapshots, newest write seen {newest}");
        eprintln!("{mode}: {snapshots} snapshots, {written} dependent writes, newest seen mid-run {newest}");
    }
}
