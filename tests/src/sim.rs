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

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::core::{
    replay, Action, AppendSegment, Event, GroupConfig, GroupCore, LogRing, Retention, ScanStart, Scanner, WriteOp,
    WriteRequest,
};
use tandem_proto::{xxh3_128_bytes, RecordHeader, RecordKind, RecordStamp};

use crate::pattern::{block_content_sized, WriteModel};

const SECTOR: usize = 512;
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

/// IO the simulated devices have accepted but not completed.
#[derive(Debug)]
enum Pending {
    LogSegment { batch_id: u64, ring_offset: usize, bytes: Vec<u8> },
    VolumeWrite { lsn: u64, offset: usize, bytes: Vec<u8> },
    CheckpointFlush { lsn: u64, tail: (u64, u64) },
    SuperblockWrite { lsn: u64, tail: (u64, u64) },
    PeerAck { lsn: u64 },
}

/// The durable part of the superblock.
#[derive(Debug, Clone, Copy)]
struct DurableSuperblock {
    checkpoint_lsn: u64,
    tail_position: u64,
    tail_lsn: u64,
    epoch_start_position: u64,
    epoch: u32,
}

struct World {
    rng: StdRng,
    config: GroupConfig,
    core: GroupCore,
    log: Vec<u8>,
    volume: Vec<u8>,
    /// Volume sectors whose write completed but are not yet flushed.
    volatile: BTreeMap<usize, Vec<u8>>,
    superblock: DurableSuperblock,
    pending: Vec<Pending>,
    segments_left: HashMap<u64, usize>,
    /// Target and the bytes the volume gets (zeros for trim and write-zeroes)
    /// of every write in the core, by write id.
    writes: HashMap<u64, (u64, Vec<u8>)>,
    /// Write id -> (first sector, sectors) while the client waits for it.
    in_flight: HashMap<u64, (u64, u64)>,
    busy: HashSet<u64>,
    model: WriteModel,
    next_seq: u64,
    /// The simulated peer's durable LSN; `None` in seeds without a peer. The
    /// peer is another node: it survives the source's power losses.
    peer_durable_lsn: Option<u64>,
    stats: SimStats,
}

fn stamp(epoch: u32) -> RecordStamp {
    RecordStamp { group_id: GROUP_ID, epoch, generation_tag: 1 }
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = GroupConfig {
            max_batch_bytes: (SECTOR * rng.random_range(4..32)) as u64,
            max_batch_records: rng.random_range(2..16),
            max_inflight_appends: rng.random_range(1..=4),
            checkpoint_used_percent: rng.random_range(10..=90),
            checkpoint_interval_ms: u64::MAX,
        };
        let superblock =
            DurableSuperblock { checkpoint_lsn: 0, tail_position: 0, tail_lsn: 1, epoch_start_position: 0, epoch: 1 };
        let peer_durable_lsn = rng.random_bool(0.5).then_some(0);
        let retention = peer_durable_lsn.map(|lsn| Retention::new(lsn, []));
        Self {
            rng,
            config,
            core: Self::core_for(config, superblock, 0, retention),
            log: vec![0u8; RING_SECTORS * SECTOR],
            volume: vec![0u8; VOLUME_SECTORS as usize * SECTOR],
            volatile: BTreeMap::new(),
            superblock,
            pending: Vec::new(),
            segments_left: HashMap::new(),
            writes: HashMap::new(),
            in_flight: HashMap::new(),
            busy: HashSet::new(),
            model: WriteModel::default(),
            next_seq: 1,
            peer_durable_lsn,
            stats: SimStats::default(),
        }
    }

    fn core_for(config: GroupConfig, sb: DurableSuperblock, head: u64, retention: Option<Retention>) -> GroupCore {
        let head = head.max(sb.tail_position);
        let ring = LogRing::new((RING_SECTORS * SECTOR) as u64, SECTOR as u32, sb.tail_position, head);
        GroupCore::with_retention(config, stamp(sb.epoch), ring, sb.checkpoint_lsn, retention)
    }

    /// The peer acknowledges, later, some of what the source log holds durably.
    fn peer_acknowledges(&mut self) {
        let Some(peer) = self.peer_durable_lsn else { return };
        let durable = self.core.snapshot().durable_lsn;
        if durable > peer {
            let lsn = self.rng.random_range(peer + 1..=durable);
            self.pending.push(Pending::PeerAck { lsn });
        }
    }

    /// Every retained record whose append completed is intact in the log.
    fn check_retained(&self) -> Result<(), String> {
        let durable = self.core.snapshot().durable_lsn;
        for record in self.core.retained().filter(|r| r.lsn <= durable) {
            let at = (record.position % self.log.len() as u64) as usize;
            let header = RecordHeader::decode(&self.log[at..at + SECTOR])
                .map_err(|e| format!("retained LSN {} was overwritten: {e}", record.lsn))?;
            let payload_at = at + SECTOR;
            let payload = &self.log[payload_at..payload_at + header.payload_bytes() as usize];
            if header.lsn != record.lsn || header.verify_payload(payload).is_err() {
                return Err(format!("retained LSN {} at {} was overwritten", record.lsn, record.position));
            }
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
        let kind = self.rng.random_range(0..10);
        let mut payload = Vec::new();
        for sector in first..first + count {
            if kind < 8 {
                payload.extend_from_slice(&block_content_sized(seq, sector, SECTOR));
            } else {
                payload.extend_from_slice(&[0u8; SECTOR]);
            }
            self.model.issued.entry(sector).or_default().push(seq);
            self.busy.insert(sector);
        }
        let op = match kind {
            0..8 => WriteOp::Write { payload_checksum: xxh3_128_bytes(&payload) },
            8 => WriteOp::Trim,
            _ => WriteOp::WriteZeroes { no_hole: self.rng.random_bool(0.5) },
        };
        if kind >= 8 {
            self.model.zeroing.insert(seq);
        }
        let offset = first * SECTOR as u64;
        let length = payload.len() as u32;
        self.writes.insert(seq, (offset, payload));
        self.in_flight.insert(seq, (first, count));
        self.core.handle(Event::Submit(WriteRequest { id: seq, volume_index: 0, offset, length, op }));
    }

    fn run_actions(&mut self) {
        for action in self.core.take_actions() {
            match action {
                Action::Append(batch) => {
                    self.segments_left.insert(batch.batch_id, batch.segments.len());
                    for segment in &batch.segments {
                        let bytes = self.segment_bytes(segment);
                        let ring_offset = segment.ring_offset as usize;
                        self.pending.push(Pending::LogSegment { batch_id: batch.batch_id, ring_offset, bytes });
                    }
                }
                Action::Apply(apply) => {
                    let (offset, payload) = &self.writes[&apply.write_id];
                    assert_eq!(*offset, apply.offset, "apply targets the write's range");
                    let bytes = payload.clone();
                    self.pending.push(Pending::VolumeWrite { lsn: apply.lsn, offset: *offset as usize, bytes });
                }
                Action::Checkpoint { lsn, tail_position, tail_lsn } => {
                    self.pending.push(Pending::CheckpointFlush { lsn, tail: (tail_position, tail_lsn) });
                }
                Action::Ship { .. } | Action::ReadChunk { .. } | Action::SendCopyDone { .. } => {
                    unreachable!("this simulation attaches a lazy peer through retention only, never a shipper")
                }
                Action::Complete { id, result } => {
                    result.expect("no IO fails in this simulation");
                    self.writes.remove(&id);
                    let (first, count) = self.in_flight.remove(&id).expect("completed write was in flight");
                    for sector in first..first + count {
                        self.busy.remove(&sector);
                        let acked = self.model.acked.entry(sector).or_insert(0);
                        *acked = (*acked).max(id);
                    }
                    self.stats.writes_acked += 1;
                }
            }
        }
    }

    /// The bytes a runtime writes for a segment: each record's header sector,
    /// then a write's payload padded to whole sectors; a pad writes only its
    /// header sector.
    fn segment_bytes(&self, segment: &AppendSegment) -> Vec<u8> {
        let mut bytes = Vec::new();
        for record in &segment.records {
            let mut header_sector = vec![0u8; SECTOR];
            header_sector[..64].copy_from_slice(record.header.as_bytes());
            bytes.extend_from_slice(&header_sector);
            if record.header.record_kind() == RecordKind::Write {
                let (_, payload) = &self.writes[&record.write_id.expect("writes carry their id")];
                bytes.extend_from_slice(payload);
                bytes.resize(bytes.len().next_multiple_of(SECTOR), 0);
            }
        }
        bytes
    }

    fn deliver(&mut self, index: usize) {
        match self.pending.swap_remove(index) {
            Pending::LogSegment { batch_id, ring_offset, bytes } => {
                self.log[ring_offset..ring_offset + bytes.len()].copy_from_slice(&bytes);
                let left = self.segments_left.get_mut(&batch_id).expect("known batch");
                *left -= 1;
                if *left == 0 {
                    self.segments_left.remove(&batch_id);
                    self.core.handle(Event::AppendDone { batch_id, result: Ok(()) });
                }
            }
            Pending::VolumeWrite { lsn, offset, bytes } => {
                for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                    self.volatile.insert(offset / SECTOR + i, sector.to_vec());
                }
                self.core.handle(Event::ApplyDone { lsn, result: Ok(()) });
            }
            Pending::CheckpointFlush { lsn, tail } => {
                self.flush_volume();
                self.pending.push(Pending::SuperblockWrite { lsn, tail });
            }
            Pending::SuperblockWrite { lsn, tail: (tail_position, tail_lsn) } => {
                self.superblock.checkpoint_lsn = lsn;
                self.superblock.tail_position = tail_position;
                self.superblock.tail_lsn = tail_lsn;
                self.stats.checkpoints += 1;
                self.core.handle(Event::CheckpointDone { lsn, tail_position, result: Ok(()) });
            }
            Pending::PeerAck { lsn } => {
                let peer = self.peer_durable_lsn.as_mut().expect("acks only with a peer");
                *peer = (*peer).max(lsn);
                self.stats.peer_acknowledgements += 1;
                self.core.handle(Event::PeerDurable { lsn });
            }
        }
    }

    fn flush_volume(&mut self) {
        for (sector, bytes) in std::mem::take(&mut self.volatile) {
            self.volume[sector * SECTOR..(sector + 1) * SECTOR].copy_from_slice(&bytes);
        }
    }

    /// Power loss: in-flight sectors land or not, unflushed volume sectors
    /// survive or not; then recovery, exactly as the daemon runs it at start.
    fn crash_and_recover(&mut self) -> Result<(), String> {
        self.stats.crashes += 1;
        for pending in std::mem::take(&mut self.pending) {
            match pending {
                Pending::LogSegment { ring_offset, bytes, .. } => {
                    for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                        if self.rng.random_bool(0.5) {
                            let at = ring_offset + i * SECTOR;
                            self.log[at..at + SECTOR].copy_from_slice(sector);
                        }
                    }
                }
                Pending::VolumeWrite { offset, bytes, .. } => {
                    for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                        if self.rng.random_bool(0.5) {
                            self.volatile.insert(offset / SECTOR + i, sector.to_vec());
                        }
                    }
                }
                Pending::CheckpointFlush { .. } | Pending::SuperblockWrite { .. } | Pending::PeerAck { .. } => {}
            }
        }
        for (sector, bytes) in std::mem::take(&mut self.volatile) {
            if self.rng.random_bool(0.5) {
                self.volume[sector * SECTOR..(sector + 1) * SECTOR].copy_from_slice(&bytes);
            }
        }
        self.recover()?;
        self.verify()
    }

    fn recover(&mut self) -> Result<(), String> {
        let sb = self.superblock;
        let mut scanner = Scanner::new(ScanStart {
            ring_size_bytes: self.log.len() as u64,
            sector_bytes: SECTOR as u32,
            group_id: GROUP_ID,
            epoch: sb.epoch,
            tail_position: sb.tail_position,
            tail_lsn: sb.tail_lsn,
            epoch_start_position: sb.epoch_start_position,
        });
        let log = &self.log;
        let volume = &mut self.volume;
        let read = |offset: u64, len: usize| -> Result<Vec<u8>, String> {
            Ok(log[offset as usize..offset as usize + len].to_vec())
        };
        let apply = |header: &RecordHeader, payload: &[u8]| -> Result<(), String> {
            let start = header.offset as usize;
            match header.record_kind() {
                RecordKind::Write => volume[start..start + payload.len()].copy_from_slice(payload),
                RecordKind::Trim | RecordKind::WriteZeroes => volume[start..start + header.length as usize].fill(0),
                RecordKind::Pad => unreachable!("pads are skipped by the scan"),
            }
            Ok(())
        };
        let outcome = replay(&mut scanner, sb.checkpoint_lsn, read, apply)?;
        self.stats.records_replayed += outcome.records;
        // Recovery ends with fdatasync of the volume and a new superblock; the
        // log keeps what the peer lacks, and the new epoch starts at the end.
        let retention = match self.peer_durable_lsn {
            Some(peer) => {
                let missing = (peer + 1..=outcome.last_lsn).find(|lsn| !outcome.scanned.iter().any(|r| r.lsn == *lsn));
                if let Some(lsn) = missing {
                    return Err(format!("the log lost LSN {lsn}, which the peer (durable to {peer}) still needs"));
                }
                Some(Retention::new(peer, outcome.scanned.iter().copied()))
            }
            None => None,
        };
        let (tail_position, tail_lsn) = retention
            .as_ref()
            .and_then(|r| r.records().next())
            .map_or((outcome.end_position, outcome.last_lsn + 1), |first| (first.position, first.lsn));
        self.superblock = DurableSuperblock {
            checkpoint_lsn: outcome.last_lsn,
            tail_position,
            tail_lsn,
            epoch_start_position: outcome.end_position,
            epoch: sb.epoch + 1,
        };
        self.core = Self::core_for(self.config, self.superblock, outcome.end_position, retention);
        self.segments_left.clear();
        self.writes.clear();
        self.in_flight.clear();
        self.busy.clear();
        Ok(())
    }

    /// Every sector against the model; what recovery left is durable, so it
    /// becomes the floor for later crashes.
    fn verify(&mut self) -> Result<(), String> {
        for sector in 0..VOLUME_SECTORS {
            let start = sector as usize * SECTOR;
            let data = &self.volume[start..start + SECTOR];
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
        } else if !world.pending.is_empty() {
            let index = world.rng.random_range(0..world.pending.len());
            world.deliver(index);
        }
        world.run_actions();
        world.check_retained().map_err(|e| format!("seed {seed}, step {step}: {e}"))?;
    }
    world.crash_and_recover().map_err(|e| format!("seed {seed}, final crash: {e}"))?;
    Ok(world.stats)
}
