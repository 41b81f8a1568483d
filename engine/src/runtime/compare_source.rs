//! The source's half of a compared copy (compare.rs): every chunk of the
//! initial copy is read under its fence as before, but hashed instead of
//! sent; its digest is matched with the destination's (streamed ahead), and
//! only a differing chunk costs a request for the destination's block hashes
//! and then its differing ranges. Equal chunks cost a 64-byte frame.
//!
//! The fence stays on the chunk until its decision is queued in the ordered
//! stream, so no record for that range is shipped between the state hashed
//! here and the data sent (docs/ARCHITECTURE.md, "Compare-then-send").

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use tandem_proto::{Checksum128, FrameHeader, FrameKind, COMPARE_FLAG_ON_REQUEST};

use super::buf::AlignedBuf;
use super::group_io::GroupRt;
use super::peer_conn::{OutFrame, SharedBytes};
use super::replica_source::ChunkRequest;
use super::status::SyncProgress;
use crate::core::compare::{differences, Chunk, ChunkHashes};

/// Block size of a compared copy (xxh3-128 per block).
pub const COMPARE_BLOCK_BYTES: u32 = 4096;
/// Digests the destination may send ahead of the chunk being compared (its
/// window is 32 chunks; the margin absorbs chunks finishing meanwhile).
const MAX_WAITING_DIGESTS: usize = 64;

/// Where a chunk being compared stands.
#[derive(Debug)]
enum Stage {
    /// Read (or known to be a hole) and hashed; the destination's digest
    /// has not come yet.
    WaitDigest,
    /// The digests differ; the destination's block hashes were asked for.
    WaitBlocks,
}

#[derive(Debug)]
struct Pending {
    chunk: ChunkRequest,
    /// The chunk's bytes (`None`: a hole, all zeros).
    data: Option<Rc<AlignedBuf>>,
    local: ChunkHashes,
    stage: Stage,
}

/// The comparison of one connection.
#[derive(Debug, Default)]
pub struct SourceCompare {
    /// The destination streams digests (a full copy); otherwise every chunk
    /// asks for its block hashes (a bitmap catch-up).
    streamed: bool,
    /// Destination digests by chunk start: (length, digest).
    digests: HashMap<(u8, u64), (u32, Checksum128)>,
    /// The chunk whose read is in flight.
    reading: Option<u64>,
    pending: Option<Pending>,
}

fn as_chunk(request: &ChunkRequest) -> Chunk {
    Chunk { volume_index: request.volume_index, offset: request.offset, length: request.length }
}

impl GroupRt {
    /// A connection that copies every region compares it: the destination is
    /// told where to start hashing.
    pub(super) fn start_compare(&mut self) {
        let Some(start) = self.core.copy_start() else { return };
        let Some(link) = self.source.as_mut() else { return };
        // A full copy streams digests from its start; a bitmap catch-up asks
        // for the block hashes of each dirty chunk (only the source knows them).
        let flags = if start.full { 0 } else { COMPARE_FLAG_ON_REQUEST };
        let (volume_index, offset) = start.position;
        let mut header = FrameHeader::new(FrameKind::CompareStart, flags, volume_index, 0, offset, start.chunk_bytes);
        header.aux = u64::from(COMPARE_BLOCK_BYTES);
        link.push(OutFrame::new(header.resealed().as_bytes(), None));
        link.compare = Some(SourceCompare { streamed: start.full, ..SourceCompare::default() });
        self.copy_started_at.get_or_insert_with(Instant::now);
    }

    /// Whether chunks of the copy go through the comparison.
    pub(super) fn comparing(&self) -> bool {
        self.source.as_ref().is_some_and(|l| l.compare.is_some())
    }

    /// A chunk under its fence: a hole is hashed without reading; data is
    /// read first (`compare_read_for`).
    pub(super) fn compare_hole(&mut self, chunk: ChunkRequest) {
        let local = ChunkHashes::of_zeros(chunk.length, COMPARE_BLOCK_BYTES);
        self.copy_bytes_skipped += u64::from(chunk.length);
        self.compare_hashed(Pending { chunk, data: None, local, stage: Stage::WaitDigest });
    }

    /// Notes the read in flight for `chunk`.
    pub(super) fn compare_read_for(&mut self, chunk: &ChunkRequest) {
        if let Some(compare) = self.source.as_mut().and_then(|l| l.compare.as_mut()) {
            compare.reading = Some(chunk.chunk_id);
        }
    }

    /// The read of a compared chunk finished (a read from an earlier
    /// connection is dropped).
    pub(super) fn compare_chunk_read(&mut self, chunk: ChunkRequest, buf: AlignedBuf) {
        let Some(compare) = self.source.as_mut().and_then(|l| l.compare.as_mut()) else { return };
        if compare.reading != Some(chunk.chunk_id) {
            return;
        }
        compare.reading = None;
        self.copy_bytes_read += buf.len() as u64;
        let local = ChunkHashes::of_data(&buf, COMPARE_BLOCK_BYTES);
        self.compare_hashed(Pending { chunk, data: Some(Rc::new(buf)), local, stage: Stage::WaitDigest });
    }

    fn compare_hashed(&mut self, mut pending: Pending) {
        let Some(link) = self.source.as_mut() else { return };
        let Some(compare) = link.compare.as_mut() else { return };
        assert!(compare.pending.is_none(), "one chunk is compared at a time (one fence)");
        if compare.streamed {
            compare.pending = Some(pending);
            self.compare_decide();
            return;
        }
        let chunk = pending.chunk;
        if pending.data.is_none() {
            // A dirty region that is a hole here now: punch it there.
            self.punch_whole(chunk);
            self.compare_finish(chunk);
            return;
        }
        pending.stage = Stage::WaitBlocks;
        compare.pending = Some(pending);
        let header = FrameHeader::new(FrameKind::RequestBlocks, 0, chunk.volume_index, 0, chunk.offset, chunk.length);
        link.push(OutFrame::new(header.as_bytes(), None));
    }

    /// The destination's digest of a chunk arrived.
    pub(super) fn compare_digest(&mut self, header: &FrameHeader) -> Result<(), String> {
        let compare = self
            .source
            .as_mut()
            .and_then(|l| l.compare.as_mut())
            .ok_or("the destination sent a digest without a comparison")?;
        if compare.digests.len() >= MAX_WAITING_DIGESTS {
            return Err(format!("the destination sent more than {MAX_WAITING_DIGESTS} digests ahead"));
        }
        let key = (header.volume_index, header.offset);
        if compare.digests.insert(key, (header.length, header.payload_checksum)).is_some() {
            return Err(format!("a second digest for volume {} at {}", header.volume_index, header.offset));
        }
        self.compare_decide();
        Ok(())
    }

    /// Equal digests finish the chunk; a hole facing data is punched whole;
    /// other differences ask for the destination's block hashes.
    fn compare_decide(&mut self) -> Option<()> {
        let link = self.source.as_mut()?;
        let compare = link.compare.as_mut()?;
        let pending = compare.pending.as_mut()?;
        if !matches!(pending.stage, Stage::WaitDigest) {
            return None;
        }
        let key = (pending.chunk.volume_index, pending.chunk.offset);
        let (length, digest) = compare.digests.remove(&key)?;
        let chunk = pending.chunk;
        if length != chunk.length {
            link.last_error = Some(format!(
                "the destination hashed {length} bytes at volume {} offset {}, the source {} (chunk sizes differ)",
                chunk.volume_index, chunk.offset, chunk.length
            ));
            self.close_peer = true;
            return None;
        }
        if digest == pending.local.digest {
            self.compare_progress.bytes_equal += u64::from(chunk.length);
        } else if pending.data.is_none() {
            self.punch_whole(chunk);
        } else {
            pending.stage = Stage::WaitBlocks;
            let header =
                FrameHeader::new(FrameKind::RequestBlocks, 0, chunk.volume_index, 0, chunk.offset, chunk.length);
            link.push(OutFrame::new(header.as_bytes(), None));
            return None;
        }
        self.compare_finish(chunk);
        Some(())
    }

    /// The destination's block hashes of the chunk asked for arrived: send
    /// the differing ranges, then mark the chunk verified.
    pub(super) fn compare_blocks(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), String> {
        let link = self.source.as_mut().ok_or("no source link")?;
        let compare = link.compare.as_mut().ok_or("the destination sent block hashes without a comparison")?;
        let pending = compare
            .pending
            .take_if(|p| {
                matches!(p.stage, Stage::WaitBlocks)
                    && (p.chunk.volume_index, p.chunk.offset, p.chunk.length)
                        == (header.volume_index, header.offset, header.length)
            })
            .ok_or_else(|| {
                format!(
                    "block hashes for volume {} at {}, which were not asked for",
                    header.volume_index, header.offset
                )
            })?;
        let destination: &[Checksum128] =
            bytemuck::try_cast_slice(payload).map_err(|e| format!("block hashes: {e}"))?;
        if destination.len() != pending.local.blocks.len() {
            return Err(format!(
                "{} block hashes for a chunk of {} blocks",
                destination.len(),
                pending.local.blocks.len()
            ));
        }
        let chunk = pending.chunk;
        let data = pending.data.expect("holes never ask for block hashes");
        let found = differences(as_chunk(&chunk), COMPARE_BLOCK_BYTES, &pending.local, destination);
        let differing: u64 = found.iter().map(|d| u64::from(d.length)).sum();
        for difference in found {
            let (offset, length) = (difference.offset, difference.length);
            if difference.zeros {
                let header =
                    FrameHeader::new(FrameKind::CopyZero, 0, chunk.volume_index, chunk.after_lsn, offset, length);
                link.push(OutFrame::new(header.as_bytes(), None));
                self.compare_progress.bytes_zeroed += u64::from(length);
                continue;
            }
            let start = (offset - chunk.offset) as usize;
            let bytes = &data[start..start + length as usize];
            let header = FrameHeader::copy_data(chunk.volume_index, chunk.after_lsn, offset, bytes);
            let shared = SharedBytes { buf: Rc::clone(&data), start, len: length as usize };
            link.push(OutFrame::new(header.as_bytes(), Some(shared)));
            self.compare_progress.bytes_sent += u64::from(length);
        }
        self.compare_progress.bytes_equal += u64::from(chunk.length) - differing;
        self.compare_finish(chunk);
        Ok(())
    }

    /// Queues the whole chunk as a hole to punch (it is zeros here).
    fn punch_whole(&mut self, chunk: ChunkRequest) {
        let link = self.source.as_mut().expect("compared chunks have a link");
        let header =
            FrameHeader::new(FrameKind::CopyZero, 0, chunk.volume_index, chunk.after_lsn, chunk.offset, chunk.length);
        link.push(OutFrame::new(header.as_bytes(), None));
        self.compare_progress.bytes_zeroed += u64::from(chunk.length);
    }

    /// Marks the chunk verified in the stream and lifts its fence.
    fn compare_finish(&mut self, chunk: ChunkRequest) {
        let link = self.source.as_mut().expect("compared chunks have a link");
        let header = FrameHeader::new(
            FrameKind::CopyVerified,
            0,
            chunk.volume_index,
            chunk.after_lsn,
            chunk.offset,
            chunk.length,
        );
        link.push(OutFrame::new(header.as_bytes(), None));
        if let Some(compare) = link.compare.as_mut() {
            compare.pending = None;
        }
        self.compare_progress.bytes_compared += u64::from(chunk.length);
        self.core.chunk_shipped(chunk.chunk_id);
    }

    /// The compared copy's progress, with its rate from the copy's start to
    /// its end (or to now, while it runs) and the time left for
    /// `remaining_bytes`.
    pub(super) fn sync_progress(&self, remaining_bytes: u64) -> SyncProgress {
        let progress = self.compare_progress;
        let end = self.copy_finished_at.unwrap_or_else(Instant::now);
        let elapsed_s = self.copy_started_at.map_or(0.0, |at| end.saturating_duration_since(at).as_secs_f64());
        let rate_bytes_per_s = if elapsed_s > 0.0 { progress.bytes_compared as f64 / elapsed_s } else { 0.0 };
        SyncProgress {
            bytes_compared: progress.bytes_compared,
            bytes_equal: progress.bytes_equal,
            bytes_sent: progress.bytes_sent,
            bytes_zeroed: progress.bytes_zeroed,
            rate_bytes_per_s,
            eta_s: (rate_bytes_per_s > 0.0).then(|| remaining_bytes as f64 / rate_bytes_per_s),
        }
    }
}
