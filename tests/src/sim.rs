//! Deterministic simulation of one group's write path with power loss.
//!
//! The real `GroupCore` and the real recovery (`engine::core::replay`) run
//! against a simulated log device and volume in memory, with IO completions
//! delivered in a seeded random order. A crash is a power loss, harsher than
//! the kill -9 of the process tests: every sector of an in-flight write lands
//! or not, and volume writes that completed but were not yet made durable by a
//! checkpoint's fdatasync each survive or not. After every crash, recovery runs
//! and every sector must hold its last acknowledged write or a later one that
//! was issued, never an older write and never a mix.
//!
//! Half of the seeds attach a simulated replication peer that acknowledges
//! records lazily (only ones the source log already holds durably; a peer
//! ahead of a crashed source is the replication issue's generation logic).
//! The log must retain every record the peer lacks: after every step each
//! durable retained record is still intact in the log, and after every power
//! loss recovery finds all of them, with their older epochs, before the new
//! epoch's start.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::core::{Event, WriteRequest};

use crate::pattern::WriteModel;
use crate::sim_node::{random_config, ClientWrite, NodeOutput, SimNode, SECTOR};

const RING_SECTORS: usize = 64;
const VOLUME_SECTORS: u64 = 32;
const GROUP_ID: u32 = 0x5eed;

/// What a seed did, for the summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    pub writes_acked: u64,
    pub crashes: u64,
    pub checkpoints: u64,
    pub records_replayed: u64,
    pub peer_acknowledgements: u64,
}

struct World {
    rng: StdRng,
    node: SimNode,
    /// Write id -> (first sector, sectors) while the client waits for it.
    in_flight: HashMap<u64, (u64, u64)>,
    busy: HashSet<u64>,
    model: WriteModel,
    next_seq: u64,
    /// The simulated peer's durable LSN; `None` in seeds without a peer. The
    /// peer is another node: it survives the source's power losses.
    peer_durable_lsn: Option<u64>,
    /// Acknowledgements of the peer on their way.
    peer_acks: Vec<u64>,
    stats: SimStats,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = random_config(&mut rng);
        let peer_durable_lsn = rng.random_bool(0.5).then_some(0);
        let volume = vec![0u8; VOLUME_SECTORS as usize * SECTOR];
        let mut node = SimNode::new(GROUP_ID, config, RING_SECTORS, vec![volume]);
        if peer_durable_lsn.is_some() {
            // Opening the empty log with a peer attaches retention for it.
            node.recover(Some(0)).expect("an empty log recovers");
        }
        Self {
            rng,
            node,
            in_flight: HashMap::new(),
            busy: HashSet::new(),
            model: WriteModel::default(),
            next_seq: 1,
            peer_durable_lsn,
            peer_acks: Vec::new(),
            stats: SimStats::default(),
        }
    }

    /// The peer acknowledges, later, some of what the source log holds durably.
    fn peer_acknowledges(&mut self) {
        let Some(peer) = self.peer_durable_lsn else { return };
        let durable = self.node.core.snapshot().durable_lsn;
        if durable > peer {
            let lsn = self.rng.random_range(peer + 1..=durable);
            self.peer_acks.push(lsn);
        }
    }

    /// Every retained record whose append completed is intact in the log.
    fn check_retained(&self) -> Result<(), String> {
        let durable = self.node.core.snapshot().durable_lsn;
        for record in self.node.core.retained().filter(|r| r.lsn <= durable) {
            self.node.read_record(record.lsn, record.position, record.end_position)?;
        }
        Ok(())
    }

    /// A client write, trim or write-zeroes of 1 to 4 sectors that no other
    /// in-flight request touches.
    fn submit(&mut self) {
        let first = self.rng.random_range(0..VOLUME_SECTORS);
        let count = self.rng.random_range(1..=4).min(VOLUME_SECTORS - first);
        if (first..first + count).any(|s| self.busy.contains(&s)) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let sectors: Vec<u64> = (first..first + count).collect();
        let ClientWrite { payload, op, zeroing } = ClientWrite::random(&mut self.rng, seq, &sectors);
        for &sector in &sectors {
            self.model.issued.entry(sector).or_default().push(seq);
            self.busy.insert(sector);
        }
        if zeroing {
            self.model.zeroing.insert(seq);
        }
        let offset = first * SECTOR as u64;
        let length = payload.len() as u32;
        self.node.writes.insert(seq, (0, offset, payload));
        self.in_flight.insert(seq, (first, count));
        self.node.core.handle(Event::Submit(WriteRequest { id: seq, volume_index: 0, offset, length, op }));
    }

    fn run_actions(&mut self) {
        for output in self.node.run(None) {
            let NodeOutput::Completed { id, result } = output else {
                unreachable!("this simulation attaches a lazy peer through retention only, never a shipper")
            };
            result.expect("no IO fails in this simulation");
            let (first, count) = self.in_flight.remove(&id).expect("completed write was in flight");
            for sector in first..first + count {
                self.busy.remove(&sector);
                let acked = self.model.acked.entry(sector).or_insert(0);
                *acked = (*acked).max(id);
            }
            self.stats.writes_acked += 1;
        }
    }

    fn deliver_something(&mut self) {
        let total = self.node.pending_count() + self.peer_acks.len();
        if total == 0 {
            return;
        }
        let index = self.rng.random_range(0..total);
        if index < self.node.pending_count() {
            self.node.deliver(index);
            return;
        }
        let lsn = self.peer_acks.swap_remove(index - self.node.pending_count());
        let peer = self.peer_durable_lsn.as_mut().expect("acks only with a peer");
        *peer = (*peer).max(lsn);
        self.stats.peer_acknowledgements += 1;
        self.node.core.handle(Event::PeerDurable { lsn });
    }

    /// Power loss, then recovery exactly as the daemon runs it at start.
    fn crash_and_recover(&mut self) -> Result<(), String> {
        self.stats.crashes += 1;
        self.node.lose_power(&mut self.rng);
        self.peer_acks.clear();
        let outcome = self.node.recover(self.peer_durable_lsn)?;
        if let (Some(peer), Some(first)) = (self.peer_durable_lsn, self.node.core.retained().next()) {
            // Recovery found every record the peer lacks (before the new epoch).
            assert_eq!(first.lsn, peer + 1, "retention starts right after the peer's durable LSN");
        }
        self.stats.records_replayed = self.node.records_replayed;
        let _ = outcome;
        self.in_flight.clear();
        self.busy.clear();
        self.verify()
    }

    /// Every sector against the model; what recovery left is durable, so it
    /// becomes the floor for later crashes.
    fn verify(&mut self) -> Result<(), String> {
        for sector in 0..VOLUME_SECTORS {
            let start = sector as usize * SECTOR;
            let data = &self.node.volumes[0][start..start + SECTOR];
            self.model.check(sector, data)?;
            self.model.observe(sector, data, self.next_seq);
        }
        // The zero floors recorded above used `next_seq`; later writes are newer.
        self.next_seq += 1;
        Ok(())
    }
}

/// Runs one seed for `steps` steps; `Err` names the seed and what broke.
pub fn run_seed(seed: u64, steps: usize) -> Result<SimStats, String> {
    let mut world = World::new(seed);
    for step in 0..steps {
        let roll = world.rng.random_range(0..100);
        if roll < 2 {
            world.crash_and_recover().map_err(|e| format!("seed {seed}, step {step}, after a crash: {e}"))?;
        } else if roll < 40 && world.in_flight.len() < 8 {
            world.submit();
        } else if roll < 46 {
            world.peer_acknowledges();
        } else {
            world.deliver_something();
        }
        world.run_actions();
        world.check_retained().map_err(|e| format!("seed {seed}, step {step}: {e}"))?;
    }
    world.crash_and_recover().map_err(|e| format!("seed {seed}, final crash: {e}"))?;
    world.stats.checkpoints = world.node.checkpoints;
    Ok(world.stats)
}
