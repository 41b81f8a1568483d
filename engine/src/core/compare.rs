//! Compare-then-send, the machinery of a seeded initial sync (and later of
//! bitmap catch-up and online verify): both sides hash their volumes in
//! chunks, the destination's chunk digests stream to the source, and only
//! blocks whose hashes differ cross the wire.
//!
//! A block's hash is xxh3-128 of its bytes; a chunk's digest is xxh3-128 of
//! its block hashes. A range of zeros has the same hashes whether it is a hole
//! or written zeros, so either side computes the hashes of a hole without
//! reading it, and a hole on the source where the destination holds data
//! becomes a zero range (a hole punched there), not zeros on the wire.
//!
//! [`SourceComparer`] is the source's sans-IO side: it walks the chunks with a
//! bounded window, asks for local hashing, matches the destination's digests,
//! asks for the destination's block hashes of a chunk that differs, and says
//! which ranges to send. Chunks finish in any order; the resume point is the
//! end of the longest finished prefix.

use std::collections::VecDeque;

use tandem_proto::{xxh3_128_bytes, Checksum128};

/// One chunk of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub volume_index: u8,
    pub offset: u64,
    pub length: u32,
}

/// Walks every volume in chunks of `chunk_bytes` (the last one of a volume
/// may be shorter), from a resume point.
#[derive(Debug, Clone)]
pub struct ChunkCursor {
    volume_sizes_bytes: Vec<u64>,
    chunk_bytes: u32,
    volume_index: usize,
    offset: u64,
}

impl ChunkCursor {
    #[must_use]
    pub fn new(volume_sizes_bytes: Vec<u64>, chunk_bytes: u32, volume_index: u8, offset: u64) -> Self {
        assert!(chunk_bytes > 0, "chunks have a size");
        Self { volume_sizes_bytes, chunk_bytes, volume_index: usize::from(volume_index), offset }
    }
}

impl Iterator for ChunkCursor {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        loop {
            let size = *self.volume_sizes_bytes.get(self.volume_index)?;
            if self.offset < size {
                let length = (size - self.offset).min(u64::from(self.chunk_bytes)) as u32;
                let chunk = Chunk { volume_index: self.volume_index as u8, offset: self.offset, length };
                self.offset += u64::from(length);
                return Some(chunk);
            }
            self.volume_index += 1;
            self.offset = 0;
        }
    }
}

/// The block hashes of a chunk and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    pub blocks: Vec<Checksum128>,
    pub digest: Checksum128,
}

impl ChunkHashes {
    /// Hashes `data` in blocks of `block_bytes` (the last may be shorter).
    #[must_use]
    pub fn of_data(data: &[u8], block_bytes: u32) -> Self {
        let blocks: Vec<Checksum128> = data.chunks(block_bytes as usize).map(xxh3_128_bytes).collect();
        Self::from_blocks(blocks)
    }

    /// The hashes of `length` bytes of zeros (a hole), without reading it.
    #[must_use]
    pub fn of_zeros(length: u32, block_bytes: u32) -> Self {
        let full = xxh3_128_bytes(&vec![0u8; block_bytes as usize]);
        let count = length.div_ceil(block_bytes);
        let mut blocks = vec![full; count as usize];
        let tail = length % block_bytes;
        if tail != 0 {
            blocks[count as usize - 1] = xxh3_128_bytes(&vec![0u8; tail as usize]);
        }
        Self::from_blocks(blocks)
    }

    #[must_use]
    pub fn from_blocks(blocks: Vec<Checksum128>) -> Self {
        let digest = xxh3_128_bytes(bytemuck::cast_slice(&blocks));
        Self { blocks, digest }
    }
}

/// A range of a chunk the destination must get from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Difference {
    pub offset: u64,
    pub length: u32,
    /// The source holds zeros there: punch a hole instead of sending data.
    pub zeros: bool,
}

/// The ranges of `chunk` where the source's blocks differ from the
/// destination's, adjacent blocks of the same kind joined.
#[must_use]
pub fn differences(
    chunk: Chunk,
    block_bytes: u32,
    source: &ChunkHashes,
    destination: &[Checksum128],
) -> Vec<Difference> {
    assert_eq!(source.blocks.len(), destination.len(), "both sides hash a chunk in the same blocks");
    let zero_block = xxh3_128_bytes(&vec![0u8; block_bytes as usize]);
    let mut found: Vec<Difference> = Vec::new();
    for (index, (here, there)) in source.blocks.iter().zip(destination).enumerate() {
        if here == there {
            continue;
        }
        let offset = chunk.offset + index as u64 * u64::from(block_bytes);
        let length = (chunk.offset + u64::from(chunk.length) - offset).min(u64::from(block_bytes)) as u32;
        let zeros =
            *here == zero_block || (length < block_bytes && *here == xxh3_128_bytes(&vec![0u8; length as usize]));
        match found.last_mut() {
            Some(last) if last.zeros == zeros && last.offset + u64::from(last.length) == offset => {
                last.length += length
            }
            _ => found.push(Difference { offset, length, zeros }),
        }
    }
    found
}

/// Windows of destination digests that may wait for their chunks.
pub const EARLY_DIGESTS_PER_WINDOW: usize = 4;

/// What the source's comparer asks of its runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareAction {
    /// Hash this chunk of the local volume (without reading its holes) and
    /// report it with [`SourceComparer::local_hashed`].
    HashLocal(Chunk),
    /// Ask the destination for the block hashes of this chunk (its digest
    /// differs); the answer goes to [`SourceComparer::destination_blocks`].
    RequestBlocks(Chunk),
    /// Send these ranges of the chunk (data, or zeros as holes).
    Send(Chunk, Vec<Difference>),
}

#[derive(Debug)]
struct InFlight {
    chunk: Chunk,
    local: Option<ChunkHashes>,
    destination_digest: Option<Checksum128>,
    blocks_requested: bool,
    done: bool,
}

/// Progress of a comparison, for status and the resume point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareProgress {
    pub bytes_compared: u64,
    pub bytes_equal: u64,
    /// Bytes of differing ranges sent as data, and as holes.
    pub bytes_sent: u64,
    pub bytes_zeroed: u64,
}

/// The source's side of a comparison (see the module documentation).
#[derive(Debug)]
pub struct SourceComparer {
    cursor: std::iter::Peekable<ChunkCursor>,
    block_bytes: u32,
    window: usize,
    in_flight: VecDeque<InFlight>,
    /// Digests of chunks not yet in the window (the destination runs ahead).
    early_digests: std::collections::HashMap<Chunk, Checksum128>,
    actions: Vec<CompareAction>,
    progress: CompareProgress,
    /// Where the first unfinished chunk starts (the resume point).
    resume_at: Option<(u8, u64)>,
}

impl SourceComparer {
    /// Compares from `cursor`'s position with up to `window` chunks in flight.
    #[must_use]
    pub fn new(cursor: ChunkCursor, block_bytes: u32, window: usize) -> Self {
        assert!(window > 0 && block_bytes > 0, "a window and blocks");
        let mut cursor = cursor.peekable();
        let resume_at = cursor.peek().map(|c| (c.volume_index, c.offset));
        let mut comparer = Self {
            cursor,
            block_bytes,
            window,
            in_flight: VecDeque::new(),
            early_digests: std::collections::HashMap::new(),
            actions: Vec::new(),
            progress: CompareProgress::default(),
            resume_at,
        };
        comparer.fill_window();
        comparer
    }

    /// The actions to carry out now.
    pub fn take_actions(&mut self) -> Vec<CompareAction> {
        std::mem::take(&mut self.actions)
    }

    /// The local hashes of a chunk asked for with `HashLocal`.
    pub fn local_hashed(&mut self, chunk: Chunk, hashes: ChunkHashes) {
        let entry = self.entry(chunk);
        assert!(entry.local.is_none(), "chunk {chunk:?} hashed twice");
        entry.local = Some(hashes);
        self.decide(chunk);
    }

    /// The destination's digest of a chunk. The destination hashes ahead of
    /// the source: up to [`EARLY_DIGESTS_PER_WINDOW`] windows of digests wait
    /// for their chunks; more is a protocol error (it ignored flow control).
    pub fn destination_digest(&mut self, chunk: Chunk, digest: Checksum128) -> Result<(), String> {
        if self.find(chunk).is_none() {
            if self.resume_at.is_none_or(|at| (chunk.volume_index, chunk.offset) < at) {
                return Err(format!("a digest for chunk {chunk:?}, which is already compared"));
            }
            if self.early_digests.len() >= EARLY_DIGESTS_PER_WINDOW * self.window {
                return Err(format!(
                    "the destination sent digests {} chunks ahead; at most {} may wait",
                    self.early_digests.len() + 1,
                    EARLY_DIGESTS_PER_WINDOW * self.window
                ));
            }
            if self.early_digests.insert(chunk, digest).is_some() {
                return Err(format!("a second digest for chunk {chunk:?}"));
            }
            return Ok(());
        }
        let entry = self.find(chunk).expect("checked");
        if entry.destination_digest.replace(digest).is_some() {
            return Err(format!("a second digest for chunk {chunk:?}"));
        }
        self.decide(chunk);
        Ok(())
    }

    /// The destination's block hashes of a chunk asked for with `RequestBlocks`.
    pub fn destination_blocks(&mut self, chunk: Chunk, blocks: &[Checksum128]) -> Result<(), String> {
        let block_bytes = self.block_bytes;
        let entry =
            self.find(chunk).ok_or_else(|| format!("block hashes for chunk {chunk:?}, which is not in flight"))?;
        if !entry.blocks_requested || entry.done {
            return Err(format!("block hashes for chunk {chunk:?}, which were not asked for"));
        }
        let local = entry.local.as_ref().expect("blocks are requested only after local hashing");
        if blocks.len() != local.blocks.len() {
            return Err(format!("{} block hashes for chunk {chunk:?}, which has {}", blocks.len(), local.blocks.len()));
        }
        let found = differences(chunk, block_bytes, local, blocks);
        entry.done = true;
        entry.local = None;
        let differing: u64 = found.iter().map(|d| u64::from(d.length)).sum();
        for difference in &found {
            if difference.zeros {
                self.progress.bytes_zeroed += u64::from(difference.length);
            } else {
                self.progress.bytes_sent += u64::from(difference.length);
            }
        }
        self.progress.bytes_compared += u64::from(chunk.length);
        self.progress.bytes_equal += u64::from(chunk.length) - differing;
        if !found.is_empty() {
            self.actions.push(CompareAction::Send(chunk, found));
        }
        self.retire();
        Ok(())
    }

    #[must_use]
    pub fn progress(&self) -> CompareProgress {
        self.progress
    }

    /// Where a restarted comparison continues (`None`: everything compared),
    /// provided the actions taken so far were carried out: a runtime persists
    /// the position the destination acknowledged, not this one.
    #[must_use]
    pub fn resume_at(&self) -> Option<(u8, u64)> {
        self.resume_at
    }

    #[must_use]
    pub fn is_done(&self) -> bool {
        self.in_flight.is_empty() && self.resume_at.is_none()
    }

    fn find(&mut self, chunk: Chunk) -> Option<&mut InFlight> {
        self.in_flight.iter_mut().find(|f| f.chunk == chunk)
    }

    fn entry(&mut self, chunk: Chunk) -> &mut InFlight {
        self.find(chunk).unwrap_or_else(|| panic!("chunk {chunk:?} is not in flight"))
    }

    fn decide(&mut self, chunk: Chunk) {
        let entry = self.entry(chunk);
        let (Some(local), Some(digest)) = (&entry.local, entry.destination_digest) else { return };
        if local.digest == digest {
            entry.done = true;
            entry.local = None;
            self.progress.bytes_compared += u64::from(chunk.length);
            self.progress.bytes_equal += u64::from(chunk.length);
            self.retire();
        } else if !entry.blocks_requested {
            entry.blocks_requested = true;
            self.actions.push(CompareAction::RequestBlocks(chunk));
        }
    }

    /// Drops the finished prefix, moves the resume point, refills the window.
    fn retire(&mut self) {
        while self.in_flight.front().is_some_and(|f| f.done) {
            self.in_flight.pop_front();
        }
        self.resume_at = match self.in_flight.front() {
            Some(first) => Some((first.chunk.volume_index, first.chunk.offset)),
            None => self.cursor.peek().map(|c| (c.volume_index, c.offset)),
        };
        self.fill_window();
    }

    fn fill_window(&mut self) {
        while self.in_flight.len() < self.window {
            let Some(chunk) = self.cursor.next() else { return };
            self.in_flight.push_back(InFlight {
                chunk,
                local: None,
                destination_digest: None,
                blocks_requested: false,
                done: false,
            });
            self.actions.push(CompareAction::HashLocal(chunk));
            if let Some(digest) = self.early_digests.remove(&chunk) {
                self.in_flight.back_mut().expect("just pushed").destination_digest = Some(digest);
            }
        }
    }
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
