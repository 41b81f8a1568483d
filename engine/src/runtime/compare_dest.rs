//! The destination's half of a compared copy (compare.rs): from the position
//! a `CompareStart` names, it hashes its volumes chunk by chunk, a bounded
//! window ahead of the source, and sends each chunk's digest; when the source
//! asks for a chunk's block hashes, it hashes that chunk again and sends them.
//!
//! Holes are not read: their hashes are those of zeros. Reads go through the
//! core's io_uring, O_DIRECT when aligned, a few at a time. A digest may come
//! from any state of its chunk: every record and copy range after it in the
//! stream overwrites its range, so the volumes converge (docs/ARCHITECTURE.md,
//! "Compare-then-send").

use io_uring::{opcode, types};
use tandem_proto::{FrameHeader, FrameKind};

use super::buf::AlignedBuf;
use super::group_io::GroupRt;
use super::io::{Io, Op};
use super::peer_conn::{OutFrame, SharedBytes};
use crate::core::compare::{Chunk, ChunkCursor, ChunkHashes};

/// Chunks whose digests may be sent beyond the source's progress.
const DIGEST_WINDOW_CHUNKS: u64 = 32;
/// Destination volume reads in flight for the comparison.
const MAX_COMPARE_READS: usize = 4;

/// Why a chunk is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComparePurpose {
    /// Its digest, streamed ahead.
    Digest,
    /// Its block hashes, which the source asked for.
    Blocks,
    /// Its digest for online verify, at the stream point the source named.
    Verify,
}

/// A chunk read for the comparison; `session` names the connection it
/// belongs to (a read finishing after that connection ended is dropped).
#[derive(Debug)]
pub struct CompareRead {
    pub session: u64,
    pub chunk: Chunk,
    pub purpose: ComparePurpose,
}

/// The destination's digest stream for one connection.
#[derive(Debug)]
pub struct DigestStream {
    session: u64,
    cursor: std::iter::Peekable<ChunkCursor>,
    volume_sizes_bytes: Vec<u64>,
    chunk_bytes: u32,
    block_bytes: u32,
    /// Linear end of the last chunk whose digest is under way or sent.
    issued_to: u64,
    /// Linear end of the source's progress (from its copy frames).
    source_reached: u64,
    /// Block-hash requests not yet read.
    requested: std::collections::VecDeque<Chunk>,
    reads_in_flight: usize,
    /// Block hashes of the chunks last digested: a request for one of them
    /// is answered without reading the chunk again.
    recent: std::collections::VecDeque<(Chunk, Vec<tandem_proto::Checksum128>)>,
}

impl DigestStream {
    /// Starts at (`volume_index`, `offset`) for connection `session`.
    #[must_use]
    pub fn new(
        session: u64,
        volume_sizes_bytes: Vec<u64>,
        start: (u8, u64),
        chunk_bytes: u32,
        block_bytes: u32,
    ) -> Self {
        let cursor = ChunkCursor::new(volume_sizes_bytes.clone(), chunk_bytes, start.0, start.1).peekable();
        let position = linear(&volume_sizes_bytes, start.0, start.1);
        Self {
            session,
            cursor,
            volume_sizes_bytes,
            chunk_bytes,
            block_bytes,
            issued_to: position,
            source_reached: position,
            requested: std::collections::VecDeque::new(),
            reads_in_flight: 0,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// Keeps the block hashes of a digested chunk for a while.
    fn remember(&mut self, chunk: Chunk, blocks: &[tandem_proto::Checksum128]) {
        if self.recent.len() >= 2 * DIGEST_WINDOW_CHUNKS as usize {
            self.recent.pop_front();
        }
        self.recent.push_back((chunk, blocks.to_vec()));
    }

    /// The remembered block hashes of `chunk`.
    fn remembered(&mut self, chunk: Chunk) -> Option<ChunkHashes> {
        let index = self.recent.iter().position(|(c, _)| *c == chunk)?;
        let (_, blocks) = self.recent.remove(index)?;
        Some(ChunkHashes::from_blocks(blocks))
    }

    /// The source's copy reached `end` of `volume_index` (a copy frame arrived).
    pub fn source_reached(&mut self, volume_index: u8, end: u64) {
        let position = linear(&self.volume_sizes_bytes, volume_index, end);
        self.source_reached = self.source_reached.max(position);
    }

    /// The source asked for the block hashes of `chunk`.
    pub fn blocks_requested(&mut self, chunk: Chunk) {
        self.requested.push_back(chunk);
    }

    /// The next chunk to read or hash, block requests first, then digests
    /// within the window.
    fn next(&mut self) -> Option<(Chunk, ComparePurpose)> {
        if self.reads_in_flight >= MAX_COMPARE_READS {
            return None;
        }
        if let Some(chunk) = self.requested.pop_front() {
            return Some((chunk, ComparePurpose::Blocks));
        }
        let window = DIGEST_WINDOW_CHUNKS * u64::from(self.chunk_bytes);
        if self.issued_to >= self.source_reached + window {
            return None;
        }
        let chunk = self.cursor.next()?;
        self.issued_to = linear(&self.volume_sizes_bytes, chunk.volume_index, chunk.offset + u64::from(chunk.length));
        Some((chunk, ComparePurpose::Digest))
    }
}

fn linear(volume_sizes_bytes: &[u64], volume_index: u8, offset: u64) -> u64 {
    volume_sizes_bytes.iter().take(usize::from(volume_index)).sum::<u64>() + offset
}

/// The frame answering `purpose` for `chunk` with its hashes.
fn answer(chunk: Chunk, purpose: ComparePurpose, hashes: &ChunkHashes) -> OutFrame {
    match purpose {
        ComparePurpose::Digest | ComparePurpose::Verify => {
            let kind = if purpose == ComparePurpose::Digest { FrameKind::Digest } else { FrameKind::VerifyDigest };
            let header = FrameHeader::digest_of(kind, chunk.volume_index, chunk.offset, chunk.length, hashes.digest);
            OutFrame::new(header.as_bytes(), None)
        }
        ComparePurpose::Blocks => {
            let bytes: &[u8] = bytemuck::cast_slice(&hashes.blocks);
            let header = FrameHeader::block_hashes(chunk.volume_index, chunk.offset, chunk.length, bytes);
            let mut buf = AlignedBuf::zeroed(bytes.len());
            buf.copy_from_slice(bytes);
            let len = buf.len();
            OutFrame::new(header.as_bytes(), Some(SharedBytes { buf: std::rc::Rc::new(buf), start: 0, len }))
        }
    }
}

impl GroupRt {
    /// Hashes what the digest stream may hash now: holes at once, data
    /// through reads.
    pub(super) fn progress_compare(&mut self, io: &mut Io, group: usize) {
        loop {
            let Some(link) = self.destination.as_mut() else { return };
            let Some(stream) = link.compare.as_mut() else { return };
            let Some((chunk, purpose)) = stream.next() else { return };
            let session = stream.session;
            if purpose == ComparePurpose::Blocks {
                if let Some(hashes) = stream.remembered(chunk) {
                    link.outbox.push(answer(chunk, purpose, &hashes));
                    continue;
                }
            }
            if self.hash_now(chunk, purpose, stream_block_bytes(self)).is_none() {
                if let Some(stream) = self.destination.as_mut().and_then(|l| l.compare.as_mut()) {
                    stream.reads_in_flight += 1;
                }
                self.submit_compare_read(io, group, CompareRead { session, chunk, purpose });
            }
        }
    }

    /// Online verify: hashes `chunk` (the receiver takes nothing later
    /// until the answer is queued).
    pub(super) fn hash_for_verify(&mut self, io: &mut Io, group: usize, chunk: Chunk) {
        let Some(session) = self.destination.as_ref().and_then(|l| l.conn).map(|c| c.1) else { return };
        if self.hash_now(chunk, ComparePurpose::Verify, VERIFY_BLOCK_BYTES).is_some() {
            if let Some(link) = self.destination.as_mut() {
                link.receiver.verified_range();
            }
            return;
        }
        self.submit_compare_read(io, group, CompareRead { session, chunk, purpose: ComparePurpose::Verify });
    }

    /// Answers a chunk without data (a hole) at once; `None` when it must be read.
    fn hash_now(&mut self, chunk: Chunk, purpose: ComparePurpose, block_bytes: u32) -> Option<()> {
        let volume = &self.volumes[usize::from(chunk.volume_index)];
        let end = chunk.offset + u64::from(chunk.length);
        if super::device::has_data(&volume.file, chunk.offset, end) {
            return None;
        }
        let frame = answer(chunk, purpose, &ChunkHashes::of_zeros(chunk.length, block_bytes));
        self.destination.as_mut()?.outbox.push(frame);
        Some(())
    }

    fn submit_compare_read(&mut self, io: &mut Io, group: usize, read: CompareRead) {
        let chunk = read.chunk;
        let volume = &self.volumes[usize::from(chunk.volume_index)];
        let buf = AlignedBuf::zeroed(chunk.length as usize);
        let fd = types::Fd(volume.io_fd(chunk.offset, u64::from(chunk.length)));
        io.submit(Op::CompareRead { group, read, buf }, |op| {
            let Op::CompareRead { buf, .. } = op else { unreachable!() };
            opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(chunk.offset).build()
        });
    }

    /// Completion of a comparison or verify read: hash it and answer (a
    /// read of an earlier connection is dropped).
    pub(super) fn compare_read_done(
        &mut self,
        read: &CompareRead,
        buf: &AlignedBuf,
        result: i32,
    ) -> Result<(), String> {
        let Some(link) = self.destination.as_mut() else { return Ok(()) };
        if link.conn.map(|c| c.1) != Some(read.session) {
            return Ok(());
        }
        let block_bytes = match read.purpose {
            ComparePurpose::Verify => {
                link.receiver.verified_range();
                VERIFY_BLOCK_BYTES
            }
            ComparePurpose::Digest | ComparePurpose::Blocks => {
                let Some(stream) = link.compare.as_mut().filter(|s| s.session == read.session) else { return Ok(()) };
                stream.reads_in_flight -= 1;
                stream.block_bytes
            }
        };
        if result < 0 || result as usize != buf.len() {
            link.compare = None;
            return Err(format!(
                "reading volume {} at {} to compare it failed (result {result}); the copy resumes after reconnection",
                read.chunk.volume_index, read.chunk.offset
            ));
        }
        let hashes = ChunkHashes::of_data(buf, block_bytes);
        link.compare_bytes_read += buf.len() as u64;
        link.outbox.push(answer(read.chunk, read.purpose, &hashes));
        if read.purpose == ComparePurpose::Digest {
            if let Some(stream) = link.compare.as_mut() {
                stream.remember(read.chunk, &hashes.blocks);
            }
        }
        Ok(())
    }
}

/// Verify digests hash blocks as the source's comparison does.
const VERIFY_BLOCK_BYTES: u32 = super::compare_source::COMPARE_BLOCK_BYTES;

fn stream_block_bytes(rt: &GroupRt) -> u32 {
    rt.destination.as_ref().and_then(|l| l.compare.as_ref()).map_or(VERIFY_BLOCK_BYTES, |s| s.block_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests run at most the window ahead of the source; block requests
    /// go first; reads in flight are bounded.
    #[test]
    fn the_stream_stays_within_its_window() {
        let mib = 1u32 << 20;
        let mut stream = DigestStream::new(1, vec![100 * u64::from(mib)], (0, 0), mib, 4096);
        let mut issued = Vec::new();
        while let Some((chunk, purpose)) = stream.next() {
            assert_eq!(purpose, ComparePurpose::Digest);
            issued.push(chunk.offset);
            stream.reads_in_flight = 0;
        }
        assert_eq!(issued.len() as u64, DIGEST_WINDOW_CHUNKS, "a window ahead of a source at 0");
        stream.source_reached(0, 3 * u64::from(mib));
        stream.blocks_requested(Chunk { volume_index: 0, offset: 0, length: mib });
        assert_eq!(stream.next().unwrap().1, ComparePurpose::Blocks, "requests go first");
        let mut more = 0;
        while stream.next().is_some() {
            more += 1;
        }
        assert_eq!(more, MAX_COMPARE_READS - 1, "reads in flight are bounded");
        stream.reads_in_flight = 0;
        while stream.next().is_some() {
            stream.reads_in_flight = 0;
        }
        assert_eq!(stream.issued_to, (3 + DIGEST_WINDOW_CHUNKS) * u64::from(mib), "the window moved with the source");
    }
}
