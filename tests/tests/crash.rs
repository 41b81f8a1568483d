//! Crash drill: verifying writers through NBD, one per volume of a two-volume
//! group (one log, one LSN stream), while tandemd is killed with SIGKILL at
//! random moments. After every restart, each block must hold its last
//! acknowledged write (or a later one that was in flight), never an older
//! write, never a torn one.
//!
//! `TANDEM_CRASH_CYCLES=200 cargo nextest run -E 'test(kill9)'` runs the long mode.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tandem_tests::nbd_client::NbdClient;
use tandem_tests::pattern::{decode_block, Found, WriteModel, BLOCK_BYTES};
use tandem_tests::writer::Writer;
use tandem_tests::Node;

/// The group's volumes: (export name, size).
const VOLUMES: [(&str, u64); 2] = [("data", 32 << 20), ("logs", 16 << 20)];

/// Writes until the connection breaks (the daemon was killed); returns the
/// next sequence number.
fn write_until_killed(port: u16, volume: usize, model: &Mutex<WriteModel>, seq: u64, seed: u64) -> u64 {
    let (name, size_bytes) = VOLUMES[volume];
    let stop = AtomicBool::new(false);
    let writer = Writer { host: "127.0.0.1", port, export: format!("rg01/{name}"), size_bytes, model, stop: &stop };
    writer.run(seq, seed)
}

/// Reads the whole volume and checks every block against the model. What a
/// read finds after recovery is durable (recovery ends with fdatasync), so it
/// becomes the floor for the next cycle.
fn verify(port: u16, volume: usize, model: &Mutex<WriteModel>) -> Vec<String> {
    let (name, size) = VOLUMES[volume];
    let mut client = match NbdClient::connect(port, &format!("rg01/{name}")) {
        Ok(client) => client,
        Err(e) => return vec![format!("cannot connect after restart: {e}")],
    };
    let mut model = model.lock().unwrap();
    let mut errors = Vec::new();
    let chunk_bytes = 1u64 << 20;
    for chunk in 0..size / chunk_bytes {
        let data = client.read(chunk * chunk_bytes, chunk_bytes as u32).expect("read").expect("read succeeds");
        for (index, block_data) in data.chunks(BLOCK_BYTES).enumerate() {
            let block = chunk * chunk_bytes / BLOCK_BYTES as u64 + index as u64;
            match model.check(block, block_data).map_err(|e| format!("{name}: {e}")) {
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
    node.create_group("rg01", "128MiB", &VOLUMES);
    let models = [Arc::new(Mutex::new(WriteModel::default())), Arc::new(Mutex::new(WriteModel::default()))];
    let mut seqs = [0u64; 2];
    let mut total_acked_before_kill = 0;
    for cycle in 0..cycles {
        let port = node.nbd_port;
        let writers: Vec<_> = (0..VOLUMES.len())
            .map(|volume| {
                let writer_model = Arc::clone(&models[volume]);
                let (seq, writer_seed) = (seqs[volume], rng.random());
                std::thread::spawn(move || write_until_killed(port, volume, &writer_model, seq, writer_seed))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        node.kill9();
        for (volume, writer) in writers.into_iter().enumerate() {
            seqs[volume] = writer.join().expect("writer thread");
        }
        total_acked_before_kill = models.iter().map(|m| m.lock().unwrap().acked.len()).sum();
        node.spawn();
        let errors: Vec<String> =
            (0..VOLUMES.len()).flat_map(|volume| verify(node.nbd_port, volume, &models[volume])).collect();
        assert!(
            errors.is_empty(),
            "cycle {cycle} (seed {seed}): {} bad blocks, first: {:#?}\n{}",
            errors.len(),
            &errors[..errors.len().min(10)],
            node.log()
        );
    }
    for (volume, seq) in seqs.iter().enumerate() {
        assert!(*seq > u64::from(cycles) * 10, "writer {volume} made progress in every cycle ({seq} writes)");
    }
    assert!(total_acked_before_kill > 100, "many blocks were acknowledged ({total_acked_before_kill})");
    let status = node.group_status("rg01");
    eprintln!("crash drill done: {seqs:?} writes issued; last recovery {}", status["last_recovery"]);
}
