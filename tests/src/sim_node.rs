//! One simulated node for the deterministic simulators: the real `GroupCore`
//! (and, on a destination, the real `Receiver`) over an in-memory log and
//! volumes whose IO completes in an order the caller chooses, and whose power
//! loss is harsher than kill -9: every sector of an in-flight write lands or
//! not, and volume writes not yet made durable by a checkpoint's fdatasync
//! each survive or not. Recovery is the real `engine::core::replay`.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::Rng;
use tandem_engine::core::{
    replay, Action, AppendSegment, ApplyKind, CopyPosition, Event, GroupConfig, GroupCore, LogRing, ReplayOutcome,
    Retention, ScanStart, Scanner, WriteError, WriteId, WriteOp,
};
use tandem_proto::{xxh3_128_bytes, RecordHeader, RecordKind, RecordStamp};

use crate::pattern::block_content_sized;

pub const SECTOR: usize = 512;

/// IO a simulated device accepted but has not completed.
#[derive(Debug)]
enum Pending {
    LogSegment {
        batch_id: u64,
        ring_offset: usize,
        bytes: Vec<u8>,
    },
    VolumeWrite {
        lsn: u64,
        volume: u8,
        offset: usize,
        bytes: Vec<u8>,
    },
    /// An initial-copy write of a destination (outside the log).
    CopyWrite {
        volume: u8,
        offset: usize,
        bytes: Vec<u8>,
        end: CopyPosition,
    },
    CheckpointFlush {
        lsn: u64,
        tail: (u64, u64),
        copy: Option<CopyPosition>,
    },
    BitmapWrite {
        bytes: Vec<u8>,
        spilled_up_to_lsn: Option<u64>,
    },
    SuperblockWrite {
        lsn: u64,
        tail: (u64, u64),
        copy: Option<CopyPosition>,
    },
}

/// The durable part of the superblock.
#[derive(Debug, Clone, Copy)]
pub struct DurableSuperblock {
    pub checkpoint_lsn: u64,
    pub tail_position: u64,
    pub tail_lsn: u64,
    pub epoch_start_position: u64,
    pub epoch: u32,
    /// A destination's durable initial-copy progress (or a source's knowledge
    /// that its destination completed it).
    pub copy: Option<CopyPosition>,
}

/// What a node hands to its world after running its core.
#[derive(Debug)]
pub enum NodeOutput {
    Completed {
        id: WriteId,
        result: Result<(), WriteError>,
    },
    Ship {
        lsn: u64,
        position: u64,
        end_position: u64,
        depends_on: u64,
    },
    ReadChunk {
        chunk_id: u64,
        volume_index: u8,
        offset: u64,
        length: u32,
        after_lsn: u64,
    },
    SendCopyDone,
    /// A destination's copy write finished.
    CopyWritten {
        end: CopyPosition,
    },
    /// A checkpoint made this copy progress durable.
    CopyPersisted {
        copy: CopyPosition,
    },
    SendRebase {
        lsn: u64,
    },
    /// Records up to this LSN are about to leave the log for the bitmap.
    Spilling {
        up_to_lsn: u64,
    },
    /// The core applied the Snapshot record `lsn`: what every volume reads now.
    SnapshotPoint {
        lsn: u64,
        volumes: Vec<Vec<u8>>,
    },
}

/// One node.
pub struct SimNode {
    pub group_id: u32,
    pub config: GroupConfig,
    pub core: GroupCore,
    pub log: Vec<u8>,
    pub volumes: Vec<Vec<u8>>,
    volatile: BTreeMap<(u8, usize), Vec<u8>>,
    pub superblock: DurableSuperblock,
    /// The bitmap area of the log device (durable).
    pub bitmap_area: Vec<u8>,
    pending: Vec<Pending>,
    segments_left: HashMap<u64, usize>,
    /// Volume, offset and the bytes the volume gets, of every write in the core.
    pub writes: HashMap<WriteId, (u8, u64, Vec<u8>)>,
    /// Writes answered before their volume write was issued: their bytes
    /// stay in `writes` until it is.
    answered_unapplied: std::collections::HashSet<WriteId>,
    /// Writes whose volume write was issued and that are not answered yet.
    applies_issued: std::collections::HashSet<WriteId>,
    outputs: Vec<NodeOutput>,
    pub checkpoints: u64,
    pub records_replayed: u64,
}

impl SimNode {
    /// A freshly formatted node whose volumes hold `volumes`.
    #[must_use]
    pub fn new(group_id: u32, config: GroupConfig, ring_sectors: usize, volumes: Vec<Vec<u8>>) -> Self {
        let superblock = DurableSuperblock {
            checkpoint_lsn: 0,
            tail_position: 0,
            tail_lsn: 1,
            epoch_start_position: 0,
            epoch: 1,
            copy: None,
        };
        let log = vec![0u8; ring_sectors * SECTOR];
        let core = Self::core_for(group_id, config, superblock, log.len(), 0, None);
        Self {
            group_id,
            config,
            core,
            log,
            volumes,
            volatile: BTreeMap::new(),
            superblock,
            bitmap_area: vec![0u8; 4 * SECTOR],
            pending: Vec::new(),
            segments_left: HashMap::new(),
            writes: HashMap::new(),
            answered_unapplied: std::collections::HashSet::new(),
            applies_issued: std::collections::HashSet::new(),
            outputs: Vec::new(),
            checkpoints: 0,
            records_replayed: 0,
        }
    }

    fn core_for(
        group_id: u32,
        config: GroupConfig,
        sb: DurableSuperblock,
        ring_bytes: usize,
        head: u64,
        retention: Option<Retention>,
    ) -> GroupCore {
        let head = head.max(sb.tail_position);
        let ring = LogRing::new(ring_bytes as u64, SECTOR as u32, sb.tail_position, head);
        let stamp = RecordStamp { group_id, epoch: sb.epoch, generation_tag: 1 };
        GroupCore::with_retention(config, stamp, ring, sb.checkpoint_lsn, retention)
    }

    /// IO operations waiting for completion.
    #[must_use]
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Runs the core and queues the IO it asks for; returns what the world handles.
    pub fn run(&mut self, copy_to_persist: Option<CopyPosition>) -> Vec<NodeOutput> {
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
                    let (volume, offset, bytes) = if self.answered_unapplied.remove(&apply.write_id) {
                        self.writes.remove(&apply.write_id).expect("an answered write keeps its bytes")
                    } else {
                        self.applies_issued.insert(apply.write_id);
                        self.writes[&apply.write_id].clone()
                    };
                    assert_eq!((volume, offset), (apply.volume_index, apply.offset), "apply targets the write");
                    let bytes = if apply.kind == ApplyKind::Snapshot {
                        // The runtime takes its copy-on-write snapshot here.
                        let volumes =
                            (0..self.volumes.len()).map(|v| self.visible(v as u8, 0, self.volumes[v].len())).collect();
                        self.outputs.push(NodeOutput::SnapshotPoint { lsn: apply.lsn, volumes });
                        Vec::new()
                    } else {
                        bytes
                    };
                    self.pending.push(Pending::VolumeWrite { lsn: apply.lsn, volume, offset: offset as usize, bytes });
                }
                Action::Checkpoint { lsn, tail_position, tail_lsn } => {
                    let tail = (tail_position, tail_lsn);
                    self.pending.push(Pending::CheckpointFlush { lsn, tail, copy: copy_to_persist });
                }
                Action::Complete { id, result } => {
                    // A durable write may be answered before its volume
                    // write is issued, which still needs its bytes.
                    if self.applies_issued.remove(&id) {
                        self.writes.remove(&id);
                    } else {
                        self.answered_unapplied.insert(id);
                    }
                    self.outputs.push(NodeOutput::Completed { id, result });
                }
                Action::Ship { lsn, position, end_position, depends_on } => {
                    self.outputs.push(NodeOutput::Ship { lsn, position, end_position, depends_on });
                }
                Action::ReadChunk { chunk_id, volume_index, offset, length, after_lsn, purpose } => {
                    // The simulated world copies; it starts no verify pass.
                    assert_eq!(
                        purpose,
                        tandem_engine::core::group::peer::FencePurpose::Copy,
                        "only copies are simulated"
                    );
                    self.outputs.push(NodeOutput::ReadChunk { chunk_id, volume_index, offset, length, after_lsn });
                }
                Action::SendCopyDone { .. } => self.outputs.push(NodeOutput::SendCopyDone),
                Action::SendRebase { lsn } => self.outputs.push(NodeOutput::SendRebase { lsn }),
                Action::PersistBitmap { spilled_up_to_lsn } => {
                    let bytes = self.core.bitmap_bytes(self.bitmap_area.len()).expect("a bitmap to persist");
                    if let Some(up_to_lsn) = spilled_up_to_lsn {
                        self.outputs.push(NodeOutput::Spilling { up_to_lsn });
                    }
                    self.pending.push(Pending::BitmapWrite { bytes, spilled_up_to_lsn });
                }
            }
        }
        std::mem::take(&mut self.outputs)
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
            if record.header.record_kind().has_payload() {
                let (_, _, payload) = &self.writes[&record.write_id.expect("writes carry their id")];
                bytes.extend_from_slice(payload);
                bytes.resize(bytes.len().next_multiple_of(SECTOR), 0);
            }
        }
        bytes
    }

    /// Queues a destination's copy write (outside the log).
    pub fn write_copy(&mut self, volume: u8, offset: u64, bytes: Vec<u8>, end: CopyPosition) {
        self.pending.push(Pending::CopyWrite { volume, offset: offset as usize, bytes, end });
    }

    /// Completes pending IO number `index`.
    pub fn deliver(&mut self, index: usize) {
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
            Pending::VolumeWrite { lsn, volume, offset, bytes } => {
                self.land_volatile(volume, offset, &bytes);
                self.core.handle(Event::ApplyDone { lsn, result: Ok(()) });
            }
            Pending::CopyWrite { volume, offset, bytes, end } => {
                self.land_volatile(volume, offset, &bytes);
                self.core.handle(Event::VolumesChangedOutsideLog);
                self.outputs.push(NodeOutput::CopyWritten { end });
            }
            Pending::BitmapWrite { bytes, spilled_up_to_lsn } => {
                self.bitmap_area = bytes;
                self.core.bitmap_persisted(spilled_up_to_lsn);
            }
            Pending::CheckpointFlush { lsn, tail, copy } => {
                self.flush_volumes();
                self.pending.push(Pending::SuperblockWrite { lsn, tail, copy });
            }
            Pending::SuperblockWrite { lsn, tail: (tail_position, tail_lsn), copy } => {
                self.superblock.checkpoint_lsn = lsn;
                self.superblock.tail_position = tail_position;
                self.superblock.tail_lsn = tail_lsn;
                if let Some(copy) = copy {
                    self.superblock.copy = Some(copy);
                    self.outputs.push(NodeOutput::CopyPersisted { copy });
                }
                self.checkpoints += 1;
                self.core.handle(Event::CheckpointDone { lsn, tail_position, result: Ok(()) });
            }
        }
    }

    fn land_volatile(&mut self, volume: u8, offset: usize, bytes: &[u8]) {
        for (i, sector) in bytes.chunks(SECTOR).enumerate() {
            self.volatile.insert((volume, offset / SECTOR + i), sector.to_vec());
        }
    }

    fn flush_volumes(&mut self) {
        for ((volume, sector), bytes) in std::mem::take(&mut self.volatile) {
            self.volumes[usize::from(volume)][sector * SECTOR..(sector + 1) * SECTOR].copy_from_slice(&bytes);
        }
    }

    /// What a read of the volume sees now (durable content plus completed writes).
    #[must_use]
    pub fn visible(&self, volume: u8, offset: u64, length: usize) -> Vec<u8> {
        let mut data = self.volumes[usize::from(volume)][offset as usize..offset as usize + length].to_vec();
        for sector in offset as usize / SECTOR..(offset as usize + length) / SECTOR {
            if let Some(bytes) = self.volatile.get(&(volume, sector)) {
                let at = sector * SECTOR - offset as usize;
                data[at..at + SECTOR].copy_from_slice(bytes);
            }
        }
        data
    }

    /// Reads record `position..end_position` back from the log, checked.
    /// Reads record `lsn` as the runtime has it: from the log, or from the
    /// append still in flight (a record ships in parallel with its append).
    pub fn read_record(&self, lsn: u64, position: u64, end_position: u64) -> Result<(RecordHeader, Vec<u8>), String> {
        let at = (position % self.log.len() as u64) as usize;
        let len = (end_position - position) as usize;
        let mut bytes = self.log[at..at + len].to_vec();
        for pending in &self.pending {
            if let Pending::LogSegment { ring_offset, bytes: segment, .. } = pending {
                let start = at.max(*ring_offset);
                let end = (at + len).min(ring_offset + segment.len());
                if start < end {
                    bytes[start - at..end - at].copy_from_slice(&segment[start - ring_offset..end - ring_offset]);
                }
            }
        }
        let header =
            RecordHeader::decode(&bytes).map_err(|e| format!("LSN {lsn} at {position} is gone from the log: {e}"))?;
        let payload = bytes[SECTOR..SECTOR + header.payload_bytes() as usize].to_vec();
        if header.lsn != lsn || header.verify_payload(&payload).is_err() {
            return Err(format!("LSN {lsn} at {position} was overwritten in the log (found LSN {})", header.lsn));
        }
        Ok((header, payload))
    }

    /// Power loss: in-flight sectors land or not, unflushed volume sectors
    /// survive or not. Call `recover` next.
    pub fn lose_power(&mut self, rng: &mut StdRng) {
        for pending in std::mem::take(&mut self.pending) {
            match pending {
                Pending::LogSegment { ring_offset, bytes, .. } => {
                    for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                        if rng.random_bool(0.5) {
                            let at = ring_offset + i * SECTOR;
                            self.log[at..at + SECTOR].copy_from_slice(sector);
                        }
                    }
                }
                Pending::VolumeWrite { volume, offset, bytes, .. }
                | Pending::CopyWrite { volume, offset, bytes, .. } => {
                    for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                        if rng.random_bool(0.5) {
                            self.volatile.insert((volume, offset / SECTOR + i), sector.to_vec());
                        }
                    }
                }
                Pending::BitmapWrite { bytes, .. } => {
                    if rng.random_bool(0.5) {
                        self.bitmap_area = bytes;
                    }
                }
                Pending::CheckpointFlush { .. } | Pending::SuperblockWrite { .. } => {}
            }
        }
        for ((volume, sector), bytes) in std::mem::take(&mut self.volatile) {
            if rng.random_bool(0.5) {
                self.volumes[usize::from(volume)][sector * SECTOR..(sector + 1) * SECTOR].copy_from_slice(&bytes);
            }
        }
        self.segments_left.clear();
        self.writes.clear();
        self.answered_unapplied.clear();
        self.applies_issued.clear();
        self.outputs.clear();
    }

    /// Recovery as the daemon runs it at start: replay after the checkpoint,
    /// volumes durable, new epoch at the scan's end. `retain_after` keeps the
    /// records after that LSN in the log (a source: its destination's floor).
    pub fn recover(&mut self, retain_after: Option<u64>) -> Result<ReplayOutcome, String> {
        let sb = self.superblock;
        let mut scanner = Scanner::new(ScanStart {
            ring_size_bytes: self.log.len() as u64,
            sector_bytes: SECTOR as u32,
            group_id: self.group_id,
            epoch: sb.epoch,
            tail_position: sb.tail_position,
            tail_lsn: sb.tail_lsn,
            epoch_start_position: sb.epoch_start_position,
        });
        let log = &self.log;
        let volumes = &mut self.volumes;
        let read = |offset: u64, len: usize| -> Result<Vec<u8>, String> {
            Ok(log[offset as usize..offset as usize + len].to_vec())
        };
        let apply = |header: &RecordHeader, payload: &[u8]| -> Result<(), String> {
            let volume = &mut volumes[usize::from(header.volume_index)];
            let start = header.offset as usize;
            match header.record_kind() {
                RecordKind::Write => volume[start..start + payload.len()].copy_from_slice(payload),
                RecordKind::Trim | RecordKind::WriteZeroes => volume[start..start + header.length as usize].fill(0),
                RecordKind::Snapshot => {}
                RecordKind::Pad => unreachable!("pads are skipped by the scan"),
            }
            Ok(())
        };
        let outcome = replay(&mut scanner, sb.checkpoint_lsn, read, apply)?;
        self.records_replayed += outcome.records;
        let retention = match retain_after {
            Some(floor) => {
                let missing = (floor + 1..=outcome.last_lsn).find(|lsn| !outcome.scanned.iter().any(|r| r.lsn == *lsn));
                if let Some(lsn) = missing {
                    return Err(format!("the log lost LSN {lsn}, which the peer (durable to {floor}) still needs"));
                }
                Some(Retention::new(floor, outcome.scanned.iter().copied()))
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
            copy: sb.copy,
        };
        self.core = Self::core_for(
            self.group_id,
            self.config,
            self.superblock,
            self.log.len(),
            outcome.end_position,
            retention,
        );
        Ok(outcome)
    }

    /// A destination takes over its source's LSN sequence (idle, empty log):
    /// a new epoch starts at the head, and (in the same superblock write) its
    /// copy starts over.
    pub fn rebase(&mut self, lsn: u64) {
        let head = self.core.head_position();
        self.superblock.copy = Some(CopyPosition::At { volume_index: 0, offset: 0 });
        self.superblock.epoch += 1;
        self.superblock.epoch_start_position = head;
        self.superblock.checkpoint_lsn = lsn;
        self.superblock.tail_position = head;
        self.superblock.tail_lsn = lsn + 1;
        self.core.rebase(lsn, self.superblock.epoch);
    }
}

/// A random write-path configuration: batch bounds, appends in flight and the
/// checkpoint threshold (never by time: the simulations have no clock).
pub fn random_config(rng: &mut StdRng) -> GroupConfig {
    GroupConfig {
        max_batch_bytes: (SECTOR * rng.random_range(4..32)) as u64,
        max_batch_records: rng.random_range(2..16),
        max_inflight_appends: rng.random_range(1..=4),
        checkpoint_used_percent: rng.random_range(10..=90),
        checkpoint_interval_ms: u64::MAX,
    }
}

/// What a simulated client sends for write `seq` over the sectors named by
/// `keys` (the write model's block keys): self-describing sectors 8 times in
/// 10, else a trim or a write-zeroes (`zeroing`).
pub struct ClientWrite {
    pub payload: Vec<u8>,
    pub op: WriteOp,
    pub zeroing: bool,
}

impl ClientWrite {
    pub fn random(rng: &mut StdRng, seq: u64, keys: &[u64]) -> Self {
        let kind = rng.random_range(0..10);
        let mut payload = Vec::with_capacity(keys.len() * SECTOR);
        for &key in keys {
            if kind < 8 {
                payload.extend_from_slice(&block_content_sized(seq, key, SECTOR));
            } else {
                payload.extend_from_slice(&[0u8; SECTOR]);
            }
        }
        let op = match kind {
            0..8 => WriteOp::Write { payload_checksum: xxh3_128_bytes(&payload) },
            8 => WriteOp::Trim,
            _ => WriteOp::WriteZeroes { no_hole: rng.random_bool(0.5) },
        };
        Self { payload, op, zeroing: kind >= 8 }
    }
}
