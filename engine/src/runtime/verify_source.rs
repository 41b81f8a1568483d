//! Online verify on the source's core (core/group_verify.rs decides which
//! chunk and when): a verify chunk read under its fence is hashed and its
//! digest kept; a `VerifyChunk` frame in the ordered stream asks the
//! destination for its digest at the same point; answers are matched here.
//! A mismatch is an out-of-sync range: an event, a count in status, and a
//! repair when the pass repairs. Passes start on request (`tandem partnership
//! verify`) or every `verify_interval` in the background.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tandem_proto::{Checksum128, FrameHeader, FrameKind};

use super::events::EventKind;
use super::group_io::GroupRt;
use super::peer_conn::OutFrame;
use super::replica_source::{unix_ms_now, ChunkRequest};
use crate::core::compare::{Chunk, ChunkHashes};
use crate::runtime::compare_source::COMPARE_BLOCK_BYTES;

/// Out-of-sync ranges status keeps (the events have them all).
const MAX_RANGES_SHOWN: usize = 64;

/// An out-of-sync range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfSyncRange {
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
}

/// Verify as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    pub running: bool,
    pub repair: bool,
    pub bytes_verified: u64,
    pub total_bytes: u64,
    pub out_of_sync_ranges: u64,
    pub out_of_sync_bytes: u64,
    pub repaired_bytes: u64,
    /// Unix milliseconds (0: never).
    pub started_unix_ms: u64,
    pub completed_unix_ms: u64,
    /// The first out-of-sync ranges of the last pass.
    pub ranges: Vec<OutOfSyncRange>,
    /// Why the last pass stopped before its end.
    pub stopped: Option<String>,
}

/// Verify's state on the source's core.
#[derive(Debug, Default)]
pub struct VerifyState {
    pub status: VerifyStatus,
    /// Digests of chunks asked of the destination: (length, digest) by start.
    waiting: HashMap<(u8, u64), (u32, Checksum128)>,
    started_at: Option<Instant>,
    /// The connection the pass runs on: another one means the pass stopped.
    connection: Option<u64>,
    /// Background verify: every this often (none: only on request), at this rate.
    pub interval_ms: Option<u64>,
    pub rate_bytes_per_s: u64,
}

impl VerifyState {
    /// Verify of a source with background passes every `interval_ms` (none:
    /// on request only) at `rate_bytes_per_s`.
    #[must_use]
    pub fn new(interval_ms: Option<u64>, rate_bytes_per_s: u64) -> Self {
        Self { interval_ms, rate_bytes_per_s, ..Self::default() }
    }
}

impl GroupRt {
    /// Starts a verify pass (refused, with the reason, when one cannot run).
    pub fn start_verify(&mut self, rate_bytes_per_s: u64, repair: bool) -> Result<(), String> {
        if self.source.as_ref().is_none_or(|l| l.conn.is_none()) {
            return Err(format!("{} is not connected to its destination; verify once it is", self.name));
        }
        self.core.start_verify(rate_bytes_per_s, repair)?;
        let total_bytes = self.volumes.iter().map(|v| v.size_bytes).sum();
        self.verify.status = VerifyStatus {
            running: true,
            repair,
            total_bytes,
            started_unix_ms: unix_ms_now(),
            ..VerifyStatus::default()
        };
        self.verify.waiting.clear();
        self.verify.started_at = Some(Instant::now());
        self.verify.connection = self.source.as_ref().and_then(|l| l.conn).map(|c| c.1);
        self.pending_events.push(EventKind::VerifyStarted { total_bytes, repair });
        Ok(())
    }

    /// A verify chunk under its fence: a hole hashes as zeros, data is read.
    pub(super) fn verify_hole(&mut self, chunk: ChunkRequest) {
        let digest = ChunkHashes::of_zeros(chunk.length, COMPARE_BLOCK_BYTES).digest;
        self.verify_hashed(chunk, digest);
    }

    /// The read of a verify chunk finished.
    pub(super) fn verify_chunk_read(&mut self, chunk: ChunkRequest, data: &[u8]) {
        let digest = ChunkHashes::of_data(data, COMPARE_BLOCK_BYTES).digest;
        self.verify_hashed(chunk, digest);
    }

    fn verify_hashed(&mut self, chunk: ChunkRequest, digest: Checksum128) {
        // A read that finishes after its connection ended asks nothing: the
        // next connection's stream must not start with it.
        let connection = self.source.as_ref().and_then(|l| l.conn).map(|c| c.1);
        if let Some(link) =
            self.source.as_mut().filter(|_| connection.is_some() && connection == self.verify.connection)
        {
            let header = FrameHeader::new(
                FrameKind::VerifyChunk,
                0,
                chunk.volume_index,
                chunk.after_lsn,
                chunk.offset,
                chunk.length,
            );
            link.push(OutFrame::new(header.as_bytes(), None));
            self.verify.waiting.insert((chunk.volume_index, chunk.offset), (chunk.length, digest));
        }
        self.core.chunk_shipped(chunk.chunk_id);
    }

    /// The destination's digest of a verify chunk.
    pub(super) fn verify_digest(&mut self, header: &FrameHeader) -> Result<(), String> {
        let key = (header.volume_index, header.offset);
        let (length, digest) = self.verify.waiting.remove(&key).ok_or_else(|| {
            format!("a verify digest for volume {} at {}, which was not asked for", header.volume_index, header.offset)
        })?;
        if length != header.length {
            return Err(format!("a verify digest of {} bytes for a chunk of {length}", header.length));
        }
        let status = &mut self.verify.status;
        status.bytes_verified += u64::from(length);
        if digest != header.payload_checksum {
            let range = OutOfSyncRange { volume_index: header.volume_index, offset: header.offset, length };
            status.out_of_sync_ranges += 1;
            status.out_of_sync_bytes += u64::from(length);
            if status.ranges.len() < MAX_RANGES_SHOWN {
                status.ranges.push(range);
            }
            let volume = self
                .superblock
                .volumes()
                .get(usize::from(range.volume_index))
                .map(|v| tandem_proto::read_fixed_str(&v.name).unwrap_or_default().to_owned())
                .unwrap_or_default();
            self.pending_events.push(EventKind::OutOfSync {
                volume_index: range.volume_index,
                volume,
                offset: range.offset,
                length: range.length,
                repair: status.repair,
            });
            let chunk = Chunk { volume_index: range.volume_index, offset: range.offset, length };
            self.core.verify_mismatch(chunk);
        }
        Ok(())
    }

    /// A repair chunk was queued whole.
    pub(super) fn verify_repaired(&mut self, bytes: u64) {
        self.verify.status.repaired_bytes += bytes;
    }

    /// The connection ended: answers in flight are lost, the pass stops.
    pub(super) fn verify_disconnected(&mut self) {
        self.verify.waiting.clear();
        if self.verify.status.running {
            self.verify.status.running = false;
            let reason = "the replication connection ended".to_owned();
            self.verify.status.stopped = Some(reason.clone());
            self.pending_events
                .push(EventKind::VerifyStopped { reason, bytes_verified: self.verify.status.bytes_verified });
        }
    }

    /// Ends a pass whose chunks are all answered and repaired, and starts a
    /// background pass when one is due.
    pub(super) fn observe_verify(&mut self) {
        let connection = self.source.as_ref().and_then(|l| l.conn).map(|c| c.1);
        if self.verify.status.running && connection != self.verify.connection {
            self.verify_disconnected();
        }
        let progress = self.core.verify_progress();
        let status = &mut self.verify.status;
        if status.running && !progress.running && self.verify.waiting.is_empty() && progress.repairs_queued == 0 {
            status.running = false;
            status.completed_unix_ms = unix_ms_now();
            let elapsed_ms = self.verify.started_at.map_or(0, |at| at.elapsed().as_millis() as u64);
            self.pending_events.push(EventKind::VerifyCompleted {
                bytes_verified: status.bytes_verified,
                out_of_sync_ranges: status.out_of_sync_ranges,
                out_of_sync_bytes: status.out_of_sync_bytes,
                repaired_bytes: status.repaired_bytes,
                elapsed_ms,
            });
        }
        let Some(interval_ms) = self.verify.interval_ms else { return };
        let last = self.verify.status.completed_unix_ms.max(self.verify.status.started_unix_ms);
        let due = !self.verify.status.running && unix_ms_now().saturating_sub(last) >= interval_ms;
        if due && self.core.copy_acknowledged() && self.source.as_ref().is_some_and(|l| l.conn.is_some()) {
            let rate = self.verify.rate_bytes_per_s;
            if let Err(reason) = self.start_verify(rate, false) {
                tracing::debug!(group = %self.name, %reason, "background verify not started");
            }
        }
    }
}
