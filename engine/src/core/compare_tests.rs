//! Unit tests of compare-then-send: the chunk cursor, hashes and differences.

use super::*;

const BLOCK: u32 = 512;
const CHUNK: u32 = 4096;

#[test]
fn the_cursor_walks_every_volume_in_chunks_from_a_resume_point() {
    let chunks: Vec<Chunk> = ChunkCursor::new(vec![10_000, 0, 4096], CHUNK, 0, 0).collect();
    let expected = vec![
        Chunk { volume_index: 0, offset: 0, length: 4096 },
        Chunk { volume_index: 0, offset: 4096, length: 4096 },
        Chunk { volume_index: 0, offset: 8192, length: 1808 },
        Chunk { volume_index: 2, offset: 0, length: 4096 },
    ];
    assert_eq!(chunks, expected, "the last chunk of a volume is short; an empty volume has none");
    let resumed: Vec<Chunk> = ChunkCursor::new(vec![10_000, 0, 4096], CHUNK, 0, 8192).collect();
    assert_eq!(resumed, expected[2..]);
}

#[test]
fn holes_hash_like_written_zeros() {
    for length in [4096u32, 1808, 300] {
        assert_eq!(ChunkHashes::of_zeros(length, BLOCK), ChunkHashes::of_data(&vec![0u8; length as usize], BLOCK));
    }
    let mut data = vec![0u8; 4096];
    data[4000] = 1;
    assert_ne!(ChunkHashes::of_data(&data, BLOCK).digest, ChunkHashes::of_zeros(4096, BLOCK).digest);
}

#[test]
fn differences_join_adjacent_blocks_and_mark_zeros() {
    let chunk = Chunk { volume_index: 1, offset: 8192, length: 4096 };
    let mut source = vec![7u8; 4096];
    source[1024..2048].fill(0); // blocks 2 and 3 are zeros on the source
    let destination_data = vec![9u8; 4096];
    let mut destination = ChunkHashes::of_data(&destination_data, BLOCK).blocks;
    let source_hashes = ChunkHashes::of_data(&source, BLOCK);
    // Blocks 6 and 7 already match.
    destination[6] = source_hashes.blocks[6];
    destination[7] = source_hashes.blocks[7];
    let found = differences(chunk, BLOCK, &source_hashes, &destination);
    assert_eq!(
        found,
        vec![
            Difference { offset: 8192, length: 1024, zeros: false },
            Difference { offset: 9216, length: 1024, zeros: true },
            Difference { offset: 10240, length: 1024, zeros: false },
        ]
    );
}
