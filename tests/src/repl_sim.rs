//! Deterministic simulation of a partnership: the real `GroupCore` of a
//! source (shipping, initial copy under a fence, sync acknowledgement) and of
//! a destination behind the real `Receiver`, on simulated disks (power loss:
//! in-flight and unflushed sectors land or not) and a simulated network
//! (frames delayed, connections dropped, partitions, duplicated frames,
//! reconnection) driven from one seed.
//!
//! Checked after every step and fault:
//! - sync mode: after a destination power loss with the copy complete, every
//!   write acknowledged to a client is there (RPO 0, `on_peer_loss = block`);
//! - the destination applies in LSN order: after its power loss with the copy
//!   complete, its volumes equal the source's initial content plus exactly the
//!   source's records up to the destination's last LSN;
//! - a reconnection never finds the destination ahead of the source, and the
//!   source's log still holds everything the destination lacks;
//! - duplicated frames are refused and never applied twice;
//! - once faults stop, both sides converge byte for byte.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::core::{
    CopyPosition, DirtyBitmap, Event, Incoming, PeerConfig, Receiver, ReceiverAction, ReplicationMode,
    UnconfirmedRecords, WriteOp, WriteRequest,
};
use tandem_proto::{RecordHeader, RecordKind};

use crate::pattern::{block_content_sized, WriteModel};
use crate::sim_node::{random_config, ClientWrite, NodeOutput, SimNode, SECTOR};

const RING_SECTORS: usize = 48;
const VOLUME_SECTORS: u64 = 32;
const VOLUMES: usize = 2;
const SOURCE_GROUP_ID: u32 = 0x50_0c;
const DESTINATION_GROUP_ID: u32 = 0xde_57;
/// Bitmap regions: 2 KiB, four sectors.
const REGION_BYTES: u64 = 2048;

/// What a seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplSimStats {
    pub writes_acked: u64,
    pub source_crashes: u64,
    pub destination_crashes: u64,
    pub connections: u64,
    pub drops: u64,
    pub duplicates_refused: u64,
    pub records_shipped: u64,
    pub chunks_copied: u64,
    pub prefix_checks: u64,
    /// Snapshot records the destination applied and that matched the
    /// source's state before them (and the source's own snapshot, when it
    /// took it first).
    pub snapshots_checked: u64,
    pub spills: u64,
    pub rebases: u64,
    /// Planned reconnections (a transport change): sync writes completed
    /// while the link was down under their hold were checked as vouched.
    pub planned_reconnects: u64,
    /// Reconnections that found the destination holding records after the
    /// LSN the source recovered to (shipped in parallel with their append,
    /// then lost in the source's power loss).
    pub diverged_reconnects: u64,
}

#[derive(Debug, Clone)]
enum Frame {
    Record {
        header: RecordHeader,
        payload: Vec<u8>,
    },
    Copy {
        volume: u8,
        offset: u64,
        length: u32,
        data: Option<Vec<u8>>,
    },
    CopyDone,
    Rebase {
        lsn: u64,
    },
    Barrier {
        lsn: u64,
    },
    Ack {
        lsn: u64,
        copy: CopyPosition,
        rebased: bool,
    },
    /// The source's progress heartbeat: its announced durable LSN.
    Heartbeat {
        lsn: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Calm,
    Faulty,
    Converge,
}

struct Link {
    id: u64,
    /// The last barrier sent on this connection.
    barrier_lsn: u64,
    to_destination: VecDeque<Frame>,
    to_source: VecDeque<Frame>,
}

struct ChunkRead {
    link_id: u64,
    chunk_id: u64,
    after_lsn: u64,
    volume: u8,
    offset: u64,
    length: u32,
}

struct World {
    rng: StdRng,
    mode: ReplicationMode,
    peer_config: PeerConfig,
    source: SimNode,
    destination: SimNode,
    receiver: Receiver,
    payloads: HashMap<u64, Vec<u8>>,
    next_payload_id: u64,
    next_destination_write: u64,
    link: Option<Link>,
    next_link_id: u64,
    partitioned_until: usize,
    /// A planned reconnection holds sync writes until the next link or
    /// until this step, when the source's clock is moved to the hold's end
    /// (its millisecond).
    reconnect_hold_until: Option<(usize, u64)>,
    /// The source's clock (`Event::Tick`): it moves only to end holds.
    source_clock_ms: u64,
    chunk_reads: Vec<ChunkRead>,
    /// A destination rebase waiting for an idle, empty log.
    pending_rebase: Option<u64>,
    /// A rebase done, waiting for the checkpoint that makes it durable.
    rebase_persisting: bool,
    /// The source's superblock: the lowest LSN it recovered to since it
    /// was last connected (records after it may differ on the destination).
    recovered_lsn: Option<u64>,
    /// The destination's records its source has not announced durable.
    unconfirmed: UnconfirmedRecords,
    /// The source volumes before any record, and every record shipped (all
    /// durable at the source, so they survive its power losses).
    initial: Vec<Vec<u8>>,
    history: BTreeMap<u64, (RecordHeader, Vec<u8>)>,
    /// What each side's volumes read when it applied a Snapshot record,
    /// waiting for the other side's (LSN -> volumes).
    source_snapshots: BTreeMap<u64, Vec<Vec<u8>>>,
    in_flight: HashMap<u64, Vec<u64>>,
    busy: HashSet<u64>,
    model: WriteModel,
    /// Like `model`, with only the acknowledgements sync mode vouches for:
    /// those given while the destination held the whole copy, or while it
    /// was away and writes were held for it.
    vouched: WriteModel,
    next_seq: u64,
    stats: ReplSimStats,
}

fn volume_sizes() -> Vec<u64> {
    vec![VOLUME_SECTORS * SECTOR as u64; VOLUMES]
}

/// Sector key across volumes for the write model.
fn key(volume: u8, sector: u64) -> u64 {
    u64::from(volume) * VOLUME_SECTORS + sector
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let source_config = random_config(&mut rng);
        let destination_config = random_config(&mut rng);
        let mode = if rng.random_bool(0.5) { ReplicationMode::Sync } else { ReplicationMode::Async };
        // Some sectors of the source hold data before the partnership (the
        // rest are holes); the destination holds unrelated bytes.
        let initial: Vec<Vec<u8>> = (0..VOLUMES)
            .map(|volume| {
                let mut data = vec![0u8; VOLUME_SECTORS as usize * SECTOR];
                for sector in 0..VOLUME_SECTORS {
                    if rng.random_bool(0.3) {
                        // Write 0 of the model: there before the partnership.
                        let content = block_content_sized(0, key(volume as u8, sector), SECTOR);
                        data[sector as usize * SECTOR..(sector as usize + 1) * SECTOR].copy_from_slice(&content);
                    }
                }
                data
            })
            .collect();
        let garbage: Vec<Vec<u8>> =
            (0..VOLUMES).map(|_| (0..VOLUME_SECTORS as usize * SECTOR).map(|_| rng.random()).collect()).collect();
        let mut source = SimNode::new(SOURCE_GROUP_ID, source_config, RING_SECTORS, initial.clone());
        let mut destination = SimNode::new(DESTINATION_GROUP_ID, destination_config, RING_SECTORS, garbage);
        let peer_config = PeerConfig {
            mode,
            // Sync seeds hold writes while the destination is away half of the
            // time; the others (and async seeds) go on and may fill the log.
            hold_writes_when_lost: mode == ReplicationMode::Sync && rng.random_bool(0.5),
            copy_chunk_bytes: (SECTOR * rng.random_range(2..=16)) as u32,
            volume_sizes_bytes: volume_sizes(),
            max_unacked_log_bytes: (SECTOR * rng.random_range(2..64)) as u64,
            max_unacked_copy_bytes: (SECTOR * rng.random_range(1..64)) as u64,
            copy_complete: false,
        };
        let baseline = source.core.attach_peer(peer_config.clone());
        source.core.set_bitmap(DirtyBitmap::new(REGION_BYTES, volume_sizes()));
        destination.rebase(baseline);
        destination.core.set_apply_after_durable(true);
        destination.superblock.copy = Some(CopyPosition::At { volume_index: 0, offset: 0 });
        let receiver = Receiver::new(volume_sizes(), CopyPosition::At { volume_index: 0, offset: 0 });
        let mut model = WriteModel::default();
        for (volume, data) in initial.iter().enumerate() {
            for sector in 0..VOLUME_SECTORS {
                let at = sector as usize * SECTOR;
                if data[at..at + SECTOR].iter().any(|&b| b != 0) {
                    model.issued.insert(key(volume as u8, sector), vec![0]);
                    model.acked.insert(key(volume as u8, sector), 0);
                }
            }
        }
        Self {
            rng,
            mode,
            peer_config,
            source,
            destination,
            receiver,
            payloads: HashMap::new(),
            next_payload_id: 1,
            next_destination_write: 1,
            link: None,
            next_link_id: 1,
            partitioned_until: 0,
            reconnect_hold_until: None,
            source_clock_ms: 0,
            chunk_reads: Vec::new(),
            pending_rebase: None,
            recovered_lsn: None,
            unconfirmed: UnconfirmedRecords::default(),
            rebase_persisting: false,
            initial,
            history: BTreeMap::new(),
            source_snapshots: BTreeMap::new(),
            in_flight: HashMap::new(),
            busy: HashSet::new(),
            vouched: WriteModel {
                issued: model.issued.clone(),
                acked: model.acked.clone(),
                zeroing: model.zeroing.clone(),
            },
            model,
            next_seq: 1,
            stats: ReplSimStats::default(),
        }
    }

    /// A snapshot record on the source, in any state (the destination's
    /// is checked when its copy is complete).
    fn submit_snapshot(&mut self) {
        if self.in_flight.len() >= 8 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = format!("s{seq}").into_bytes();
        let op = WriteOp::Snapshot { payload_checksum: tandem_proto::xxh3_128_bytes(&name) };
        let length = name.len() as u32;
        self.source.writes.insert(seq, (0, 0, name));
        self.in_flight.insert(seq, Vec::new());
        self.source.core.handle(Event::Submit(WriteRequest { id: seq, volume_index: 0, offset: 0, length, op }));
    }

    /// A client write, trim or write-zeroes on the source.
    fn submit(&mut self) {
        let volume = self.rng.random_range(0..VOLUMES) as u8;
        let first = self.rng.random_range(0..VOLUME_SECTORS);
        let count = self.rng.random_range(1..=4).min(VOLUME_SECTORS - first);
        if (first..first + count).any(|s| self.busy.contains(&key(volume, s))) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let keys: Vec<u64> = (first..first + count).map(|sector| key(volume, sector)).collect();
        let ClientWrite { payload, op, zeroing } = ClientWrite::random(&mut self.rng, seq, &keys);
        for &k in &keys {
            self.model.issued.entry(k).or_default().push(seq);
            self.vouched.issued.entry(k).or_default().push(seq);
            self.busy.insert(k);
        }
        if zeroing {
            self.model.zeroing.insert(seq);
            self.vouched.zeroing.insert(seq);
        }
        let offset = first * SECTOR as u64;
        let length = payload.len() as u32;
        self.source.writes.insert(seq, (volume, offset, payload));
        self.in_flight.insert(seq, keys);
        self.source.core.handle(Event::Submit(WriteRequest { id: seq, volume_index: volume, offset, length, op }));
    }

    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..64 {
            let mut progressed = false;
            let copy = self.source.core.copy_acknowledged().then_some(CopyPosition::Done);
            for output in self.source.run(copy) {
                progressed = true;
                self.source_output(output)?;
            }
            progressed |= self.drive_receiver();
            progressed |= self.progress_rebase();
            let copy = Some(self.receiver.copy_to_persist());
            for output in self.destination.run(copy) {
                progressed = true;
                match output {
                    NodeOutput::Completed { result, .. } => {
                        result.map_err(|e| format!("replicated write failed: {e:?}"))?
                    }
                    NodeOutput::CopyWritten { end } => self.receiver.copy_written(end),
                    NodeOutput::CopyPersisted { copy } => {
                        self.receiver.persisted(copy);
                        if std::mem::take(&mut self.rebase_persisting) {
                            self.receiver.rebased();
                        }
                    }
                    NodeOutput::SnapshotPoint { lsn, volumes } => self.check_destination_snapshot(lsn, &volumes)?,
                    other => unreachable!("a destination ships nothing: {other:?}"),
                }
            }
            if let Some(link) = self.link.as_mut() {
                let core = &self.destination.core;
                if let Some((lsn, _, copy)) =
                    self.receiver.ack(core.snapshot().durable_lsn, core.applied_prefix_lsn(), false)
                {
                    let rebased = self.receiver.rebased_on_connection();
                    link.to_source.push_back(Frame::Ack { lsn, copy, rebased });
                }
            }
            if !progressed {
                return Ok(());
            }
        }
        Ok(())
    }

    fn source_output(&mut self, output: NodeOutput) -> Result<(), String> {
        match output {
            NodeOutput::Completed { id, result } => {
                result.map_err(|e| format!("client write {id} failed: {e:?}"))?;
                let vouched = self.mode == ReplicationMode::Sync
                    && if self.link.is_some() {
                        self.source.core.copy_acknowledged()
                    } else {
                        self.peer_config.hold_writes_when_lost || self.reconnect_hold_until.is_some()
                    };
                for k in self.in_flight.remove(&id).expect("completed write was in flight") {
                    self.busy.remove(&k);
                    let acked = self.model.acked.entry(k).or_insert(0);
                    *acked = (*acked).max(id);
                    if vouched {
                        let acked = self.vouched.acked.entry(k).or_insert(0);
                        *acked = (*acked).max(id);
                    }
                }
                self.stats.writes_acked += 1;
            }
            NodeOutput::Ship { lsn, position, end_position, depends_on } => {
                if let Some(link) = self.link.as_mut().filter(|l| depends_on > l.barrier_lsn) {
                    link.barrier_lsn = depends_on;
                    link.to_destination.push_back(Frame::Barrier { lsn: depends_on });
                }
                // Shipped records are in the log or in an append in flight.
                let (header, payload) = self.source.read_record(lsn, position, end_position)?;
                self.history.insert(lsn, (header, payload.clone()));
                self.stats.records_shipped += 1;
                self.send_to_destination(Frame::Record { header, payload });
            }
            NodeOutput::ReadChunk { chunk_id, volume_index, offset, length, after_lsn } => {
                let link_id = self.link.as_ref().map_or(0, |l| l.id);
                self.chunk_reads.push(ChunkRead { link_id, chunk_id, after_lsn, volume: volume_index, offset, length });
            }
            NodeOutput::SendCopyDone => self.send_to_destination(Frame::CopyDone),
            NodeOutput::SendRebase { lsn } => {
                self.stats.rebases += 1;
                self.send_to_destination(Frame::Rebase { lsn });
            }
            NodeOutput::Spilling { up_to_lsn } => {
                // These records never travel: remember them for the model.
                self.stats.spills += 1;
                let spilled: Vec<_> = self.source.core.retained().filter(|r| r.lsn <= up_to_lsn).copied().collect();
                for record in spilled {
                    let (header, payload) =
                        self.source.read_record(record.lsn, record.position, record.end_position)?;
                    self.history.insert(record.lsn, (header, payload));
                }
            }
            // The source's superblock now knows its destination completed the copy.
            NodeOutput::CopyPersisted { .. } => {}
            NodeOutput::CopyWritten { .. } => unreachable!("a source copies nothing in"),
            NodeOutput::SnapshotPoint { lsn, volumes } => {
                self.source_snapshots.insert(lsn, volumes);
            }
        }
        Ok(())
    }

    fn drive_receiver(&mut self) -> bool {
        // As in the daemon, frames of a connection that ended are not taken;
        // the next connection starts over from what the log holds.
        if self.link.is_none() {
            return false;
        }
        let actions = self.receiver.drive(self.destination.core.has_unapplied());
        let progressed = !actions.is_empty();
        for action in actions {
            match action {
                ReceiverAction::Submit { lsn, volume_index, offset, length, op, payload_id, depends_on } => {
                    let bytes = match payload_id {
                        Some(id) => self.payloads.remove(&id).expect("payload of a queued frame"),
                        None => vec![0u8; length as usize],
                    };
                    let changed_bytes = if matches!(op, WriteOp::Snapshot { .. }) { 0 } else { u64::from(length) };
                    self.unconfirmed.taken(lsn, (volume_index, offset, changed_bytes));
                    let id = self.next_destination_write;
                    self.next_destination_write += 1;
                    self.destination.writes.insert(id, (volume_index, offset, bytes));
                    let request = WriteRequest { id, volume_index, offset, length, op };
                    self.destination.core.handle(Event::SubmitReplicated { request, lsn, depends_on });
                }
                ReceiverAction::WriteCopy { volume_index, offset, length, payload_id, end } => {
                    let bytes = match payload_id {
                        Some(id) => self.payloads.remove(&id).expect("payload of a queued frame"),
                        None => vec![0u8; length as usize],
                    };
                    self.destination.write_copy(volume_index, offset, bytes, end);
                }
                ReceiverAction::Rebase { lsn } => self.pending_rebase = Some(lsn),
                ReceiverAction::Verify { .. } => {
                    panic!("the simulated source starts no verify pass, so no verify frame reaches the destination")
                }
                ReceiverAction::Persist => {
                    self.destination.core.handle(Event::VolumesChangedOutsideLog);
                    self.destination.core.handle(Event::CheckpointRequested);
                }
                ReceiverAction::Refuse(reason) => {
                    assert!(reason.contains("repeat"), "the receiver refused a correct stream: {reason}");
                    self.stats.duplicates_refused += 1;
                    self.drop_link();
                }
            }
        }
        progressed
    }

    /// The destination continues after the source's floor once its log is
    /// empty (the runtime persists that in one superblock write).
    fn progress_rebase(&mut self) -> bool {
        let Some(lsn) = self.pending_rebase else { return false };
        let core = &mut self.destination.core;
        if !(core.is_fully_checkpointed() && core.snapshot().log_used_bytes == 0) {
            core.handle(Event::CheckpointRequested);
            return false;
        }
        self.pending_rebase = None;
        self.destination.rebase(lsn);
        self.unconfirmed.rebased(lsn);
        self.receiver.rebase_performed();
        // As in the daemon, the receiver goes on once a checkpoint after the
        // rebase is durable; acknowledgements may leave in between.
        self.rebase_persisting = true;
        self.destination.core.handle(Event::VolumesChangedOutsideLog);
        self.destination.core.handle(Event::CheckpointRequested);
        true
    }

    fn complete_chunk_read(&mut self) -> Result<(), String> {
        if self.chunk_reads.is_empty() {
            return Ok(());
        }
        let index = self.rng.random_range(0..self.chunk_reads.len());
        let read = self.chunk_reads.swap_remove(index);
        let data = self.source.visible(read.volume, read.offset, read.length as usize);
        if self.link.as_ref().is_some_and(|l| l.id == read.link_id) {
            // The fence: the chunk shows its range exactly as of its LSN (a
            // read of an earlier connection lost its fence and is dropped).
            let expected = &self.state_at(read.after_lsn)[usize::from(read.volume)];
            if data[..] != expected[read.offset as usize..read.offset as usize + read.length as usize] {
                return Err(format!(
                    "chunk {}+{} of volume {} does not show the state after LSN {}",
                    read.offset, read.length, read.volume, read.after_lsn
                ));
            }
            let data = data.iter().any(|&b| b != 0).then_some(data);
            self.send_to_destination(Frame::Copy {
                volume: read.volume,
                offset: read.offset,
                length: read.length,
                data,
            });
            self.stats.chunks_copied += 1;
        }
        self.source.core.chunk_shipped(read.chunk_id);
        Ok(())
    }

    fn step(&mut self, step: usize, phase: Phase) -> Result<(), String> {
        if let Some((_, until_ms)) = self.reconnect_hold_until.filter(|&(until, _)| step >= until) {
            self.reconnect_hold_until = None;
            self.source_clock_ms = until_ms;
            self.source.core.handle(Event::Tick { now_ms: until_ms });
        }
        let roll = self.rng.random_range(0..1000);
        let faults = phase == Phase::Faulty;
        let writes = phase != Phase::Converge;
        match roll {
            0..10 if faults => self.crash_source()?,
            10..20 if faults => self.crash_destination()?,
            20..35 if faults => self.drop_link(),
            35..40 if faults => {
                self.drop_link();
                self.partitioned_until = step + self.rng.random_range(10..500);
            }
            40..46 if faults => self.duplicate_a_frame(),
            46..50 if faults => self.planned_reconnect(step),
            50..65 if writes => self.submit_snapshot(),
            65..200 if self.in_flight.len() < 8 && writes => self.submit(),
            200..350 if self.source.pending_count() > 0 => {
                let index = self.rng.random_range(0..self.source.pending_count());
                self.source.deliver(index);
            }
            350..500 if self.destination.pending_count() > 0 => {
                let index = self.rng.random_range(0..self.destination.pending_count());
                self.destination.deliver(index);
            }
            500..650 => self.deliver_to_destination(),
            650..800 => self.deliver_to_source()?,
            800..900 => self.complete_chunk_read()?,
            900..940 => self.send_heartbeat(),
            _ => {
                if self.link.is_none() && step >= self.partitioned_until {
                    self.connect()?;
                }
            }
        }
        self.settle()
    }

    /// With faults over: everything delivered, both sides equal byte for byte.
    fn converge(&mut self, seed_steps: usize) -> Result<(), String> {
        for step in 0..20_000 {
            self.step(seed_steps + step, Phase::Converge)?;
            let quiet = self.link.as_ref().is_some_and(|l| l.to_destination.is_empty() && l.to_source.is_empty())
                && self.in_flight.is_empty()
                && self.chunk_reads.is_empty()
                && self.source.pending_count() == 0
                && self.destination.pending_count() == 0
                && self.source.core.copy_acknowledged()
                && self.source.core.peer_durable_lsn() == Some(self.source.core.snapshot().current_lsn)
                && self.destination.core.snapshot().durable_lsn == self.source.core.snapshot().current_lsn;
            if quiet {
                for volume in 0..VOLUMES as u8 {
                    let size = VOLUME_SECTORS as usize * SECTOR;
                    if self.source.visible(volume, 0, size) != self.destination.visible(volume, 0, size) {
                        return Err(format!("volume {volume} differs after convergence"));
                    }
                }
                return Ok(());
            }
        }
        Err(format!(
            "did not converge: link {}, source LSN {:?}, destination {:?}, copy acknowledged {}",
            self.link.is_some(),
            self.source.core.snapshot(),
            self.destination.core.snapshot(),
            self.source.core.copy_acknowledged()
        ))
    }
}

/// Runs one seed; `Err` names the seed and what broke (an invariant the
/// engine asserts included).
pub fn run_seed(seed: u64, steps: usize) -> Result<ReplSimStats, String> {
    std::panic::catch_unwind(|| run_seed_inner(seed, steps)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("seed {seed}: the engine asserted: {message}"))
    })
}

fn run_seed_inner(seed: u64, steps: usize) -> Result<ReplSimStats, String> {
    let mut world = World::new(seed);
    for step in 0..steps {
        // Calm stretches let initial copies complete and sync mode hold
        // writes for the destination; faulty ones break everything.
        let phase = if (step / 300) % 2 == 0 { Phase::Calm } else { Phase::Faulty };
        world.step(step, phase).map_err(|e| format!("seed {seed} ({:?}), step {step}: {e}", world.mode))?;
    }
    world.converge(steps).map_err(|e| format!("seed {seed} ({:?}), convergence: {e}", world.mode))?;
    world.crash_destination().map_err(|e| format!("seed {seed} ({:?}), final destination crash: {e}", world.mode))?;
    Ok(world.stats)
}

#[path = "repl_sim_faults.rs"]
mod faults;

#[path = "repl_sim_net.rs"]
mod net;
