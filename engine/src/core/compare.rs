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
//! The runtime drives it: the destination streams digests ahead
//! (runtime/compare_dest.rs); the source hashes each chunk under its copy
//! fence, and for a chunk whose digest differs asks for the destination's
//! block hashes and sends the [`differences`] (runtime/compare_source.rs).

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

/// Progress of a comparison, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareProgress {
    pub bytes_compared: u64,
    pub bytes_equal: u64,
    /// Bytes of differing ranges sent as data, and as holes.
    pub bytes_sent: u64,
    pub bytes_zeroed: u64,
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
