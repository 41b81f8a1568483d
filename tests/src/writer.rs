//! A verifying writer through NBD for kill drills: self-describing blocks at
//! random places with a queue depth, every issued and acknowledged write
//! recorded in a [`WriteModel`], until the connection breaks or it is told to stop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};

use crate::nbd_client::{NbdClient, CMD_WRITE, FLAG_FUA};
use crate::pattern::{block_content, WriteModel, BLOCK_BYTES};

const QUEUE_DEPTH: usize = 16;

/// One writer's target and state.
pub struct Writer<'a> {
    pub host: &'a str,
    pub port: u16,
    pub export: String,
    pub size_bytes: u64,
    pub model: &'a Mutex<WriteModel>,
    /// Ends the writer after its writes in flight are answered.
    pub stop: &'a AtomicBool,
}

impl Writer<'_> {
    /// Writes from sequence number `seq + 1` until the connection breaks (the
    /// daemon was killed) or `stop` is set; returns the last sequence number.
    pub fn run(&self, mut seq: u64, seed: u64) -> u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let blocks = self.size_bytes / BLOCK_BYTES as u64;
        let Ok(mut client) = NbdClient::connect_to(self.host, self.port, &self.export) else { return seq };
        let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut busy_blocks: HashSet<u64> = HashSet::new();
        loop {
            while in_flight.len() < QUEUE_DEPTH && !self.stop.load(Ordering::Relaxed) {
                let first = rng.random_range(0..blocks);
                let count = rng.random_range(1..=8).min(blocks - first);
                if (first..first + count).any(|b| busy_blocks.contains(&b)) {
                    continue;
                }
                seq += 1;
                let mut payload = Vec::with_capacity(count as usize * BLOCK_BYTES);
                {
                    let mut model = self.model.lock().unwrap();
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
            if in_flight.is_empty() {
                return seq;
            }
            let Ok((error, cookie)) = client.reply() else { return seq };
            assert_eq!(error, 0, "write {cookie} failed with NBD error {error}");
            let (first, count) = in_flight.remove(&cookie).expect("reply for a write in flight");
            let mut model = self.model.lock().unwrap();
            for block in first..first + count {
                busy_blocks.remove(&block);
                let acked = model.acked.entry(block).or_insert(0);
                *acked = (*acked).max(cookie);
            }
        }
    }
}

/// A writer on its own thread against `node`'s export `export`, from inside
/// network namespace 0 of `net` when the nodes run in namespaces; its
/// writes start after sequence number `first_seq` (writers sharing a model
/// need distinct ones). The thread returns the last sequence number.
#[must_use]
pub fn spawn(
    net: Option<&std::sync::Arc<crate::netns::NetPair>>,
    node: &crate::Node,
    (export, size_bytes): (&str, u64),
    (first_seq, seed): (u64, u64),
    model: &std::sync::Arc<Mutex<WriteModel>>,
    stop: &std::sync::Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let (model, stop, net) = (std::sync::Arc::clone(model), std::sync::Arc::clone(stop), net.cloned());
    let (host, port, export) = (node.host.clone(), node.nbd_port, export.to_owned());
    std::thread::spawn(move || {
        if let Some(net) = &net {
            net.enter(0);
        }
        Writer { host: &host, port, export, size_bytes, model: &model, stop: &stop }.run(first_seq, seed)
    })
}
