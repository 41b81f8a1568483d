//! Crash drill: a verifying writer through NBD while tandemd is killed with
//! SIGKILL at random moments. After every restart, each block must hold its
//! last acknowledged write (or a later one that was in flight), never an older
//! write, never a torn one.
//!
//! `TANDEM_CRASH_CYCLES=200 cargo nextest run -E 'test(kill9)'` runs the long mode.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_tests::nbd_client::{NbdClient, CMD_WRITE, FLAG_FUA};
use tandem_tests::pattern::{block_content, decode_block, Found, WriteModel, BLOCK_BYTES};
use tandem_tests::Node;

const VOLUME_BYTES: u64 = 32 << 20;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK_BYTES as u64;
const QUEUE_DEPTH: usize = 16;

/// Writes until the connection breaks (the daemon was killed); returns the
/// next sequence number.
fn write_until_killed(port: u16, model: &Mutex<WriteModel>, mut seq: u64, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(mut client) = NbdClient::connect(port, "rg01/data") else { return seq };
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut busy_blocks: HashSet<u64> = HashSet::new();
    loop {
        while in_flight.len() < QUEUE_DEPTH {
            let first = rng.random_range(0..BLOCKS);
            let count = rng.random_range(1..=8).min(BLOCKS - first);
            if (first..first + count).any(|b| busy_blocks.contains(&b)) {
                continue;
            }
            seq += 1;
            let mut payload = Vec::with_capacity(count as usize * BLOCK_BYTES);
            {
                let mut model = model.lock().unwrap();
                for block in first..first + count {
                    payload.extend_from_slice(&block_content(seq, block));
                    model.issued.entry(block).or_default().push(seq);
                    busy_blocks.insert(block);
                }
            }
            let flags = if seq.is_multiple_of(5) { FLAG_FUA } else { 0 };
            let offset = first * BLOCK_BYTES as u64;
            if client.send(flags, CMD_WRITE, seq, offset, payload.len() as u32, &payload).is_err() {
                return seq;
            }
            in_flight.insert(seq, (first, count));
        }
        let Ok((error, cookie)) = client.reply() else { return seq };
        assert_eq!(error, 0, "write {cookie} failed with NBD error {error}");
        let (first, count) = in_flight.remove(&cookie).expect("reply for a write in flight");
        let mut model = model.lock().unwrap();
        for block in first..first + count {
            busy_blocks.remove(&block);
            let acked = model.acked.entry(block).or_insert(0);
            *acked = (*acked).max(cookie);
        }
    }
}

/// Reads the whole volume and checks every block against the model. What a
/// read finds after recovery is durable (recovery ends with fdatasync), so it
/// becomes the floor for the next cycle.
fn verify(port: u16, model: &Mutex<WriteModel>) -> Vec<String> {
    let mut client = match NbdClient::connect(port, "rg01/data") {
        Ok(client) => client,
        Err(e) => return vec![format!("cannot connect after restart: {e}")],
    };
    let mut model = model.lock().unwrap();
    let mut errors = Vec::new();
    let chunk_bytes = 1u64 << 20;
    for chunk in 0..VOLUME_BYTES / chunk_bytes {
        let data = client.read(chunk * chunk_bytes, chunk_bytes as u32).expect("read").expect("read succeeds");
        for (index, block_data) in data.chunks(BLOCK_BYTES).enumerate() {
            let block = chunk * chunk_bytes / BLOCK_BYTES as u64 + index as u64;
            match model.check(block, block_data) {
                Ok(()) => {
                    if let Ok(Found::Write(seq)) = decode_block(block_data, block) {
                        model.acked.insert(block, seq);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
    }
    errors
}

#[test]
fn kill9_at_random_moments_loses_no_acknowledged_write() {
    let cycles: u32 = std::env::var("TANDEM_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 =
        std::env::var("TANDEM_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("crash drill: {cycles} cycles, seed {seed} (TANDEM_CRASH_SEED={seed} replays the choices)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A low checkpoint threshold makes checkpoints, log wraps and pad records
    // happen many times per cycle, so kills land in all of them.
    let mut node = Node::start("checkpoint_used_percent = 10\n");
    node.create_group("rg01", "128MiB", &[("data", VOLUME_BYTES)]);
    let model = Arc::new(Mutex::new(WriteModel::default()));
    let mut seq = 0;
    let mut total_acked_before_kill = 0;
    for cycle in 0..cycles {
        let port = node.nbd_port;
        let writer_model = Arc::clone(&model);
        let writer_seed = rng.random();
        let writer = std::thread::spawn(move || write_until_killed(port, &writer_model, seq, writer_seed));
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        node.kill9();
        seq = writer.join().expect("writer thread");
        total_acked_before_kill = model.lock().unwrap().acked.len();
        node.spawn();
        let errors = verify(node.nbd_port, &model);
        assert!(
            errors.is_empty(),
            "cycle {cycle} (seed {seed}): {} bad blocks, first: {:#?}\n{}",
            errors.len(),
            &errors[..errors.len().min(10)],
            node.log()
        );
    }
    assert!(seq > u64::from(cycles) * 10, "the writer made progress in every cycle ({seq} writes)");
    assert!(total_acked_before_kill > 100, "many blocks were acknowledged ({total_acked_before_kill})");
    let status = node.group_status("rg01");
    eprintln!("crash drill done: {seq} writes issued; last recovery {}", status["last_recovery"]);
}
