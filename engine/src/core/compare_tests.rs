//! Unit tests of compare-then-send: hashes, differences, and the source's
//! comparer driven against a model destination in random orders.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Two sides of random volumes: the source's data is copied where it
/// differs, and the comparer is driven in a random order of hashing,
/// digests and block answers, with restarts from the resume point.
struct Drill {
    rng: StdRng,
    source: Vec<Vec<u8>>,
    destination: Vec<Vec<u8>>,
    /// Chunks whose destination digest was sent (the destination's cursor).
    digests_sent: usize,
    wire_bytes: u64,
    /// Bytes of volume data sent (the rest of the wire is hashes and ranges).
    data_bytes: u64,
}

impl Drill {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut source = Vec::new();
        let mut destination = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            let size = rng.random_range(0..12) * CHUNK as usize + rng.random_range(0..3) * BLOCK as usize;
            let mut here = vec![0u8; size];
            rng.fill(&mut here[..]);
            let mut there = here.clone();
            for block in 0..size.div_ceil(BLOCK as usize) {
                let range = block * BLOCK as usize..((block + 1) * BLOCK as usize).min(size);
                match rng.random_range(0..10) {
                    0 => rng.fill(&mut there[range]),
                    1 => here[range].fill(0),
                    2 => there[range].fill(0),
                    _ => {}
                }
            }
            source.push(here);
            destination.push(there);
        }
        Self { rng, source, destination, digests_sent: 0, wire_bytes: 0, data_bytes: 0 }
    }

    fn sizes(&self) -> Vec<u64> {
        self.source.iter().map(|v| v.len() as u64).collect()
    }

    fn bytes(volumes: &[Vec<u8>], chunk: Chunk) -> &[u8] {
        &volumes[usize::from(chunk.volume_index)]
            [chunk.offset as usize..(chunk.offset + u64::from(chunk.length)) as usize]
    }

    /// Runs a comparison from `start` until done or until `steps` ran out;
    /// returns the comparer.
    fn run(&mut self, start: (u8, u64), window: usize, steps: usize) -> SourceComparer {
        let cursor = ChunkCursor::new(self.sizes(), CHUNK, start.0, start.1);
        let destination_chunks: Vec<Chunk> = cursor.clone().collect();
        self.digests_sent = 0;
        let mut comparer = SourceComparer::new(cursor, BLOCK, window);
        let mut to_hash: Vec<Chunk> = Vec::new();
        let mut to_answer: Vec<Chunk> = Vec::new();
        for _ in 0..steps {
            self.execute(&mut comparer, &mut to_hash, &mut to_answer);
            if comparer.is_done() {
                break;
            }
            // The destination runs ahead by up to its own window.
            let ahead = self.digests_sent < destination_chunks.len()
                && self.digests_sent
                    < window * (EARLY_DIGESTS_PER_WINDOW + 1)
                        + destination_chunks
                            .iter()
                            .position(|c| Some((c.volume_index, c.offset)) == comparer.resume_at())
                            .unwrap_or(0);
            match self.rng.random_range(0..3) {
                0 if ahead => {
                    let chunk = destination_chunks[self.digests_sent];
                    self.digests_sent += 1;
                    self.wire_bytes += 16;
                    let digest = ChunkHashes::of_data(Self::bytes(&self.destination, chunk), BLOCK).digest;
                    comparer.destination_digest(chunk, digest).unwrap();
                }
                1 if !to_hash.is_empty() => {
                    let chunk = to_hash.swap_remove(self.rng.random_range(0..to_hash.len()));
                    let data = Self::bytes(&self.source, chunk);
                    let hashes = if data.iter().all(|&b| b == 0) && self.rng.random_bool(0.5) {
                        ChunkHashes::of_zeros(chunk.length, BLOCK)
                    } else {
                        ChunkHashes::of_data(data, BLOCK)
                    };
                    comparer.local_hashed(chunk, hashes);
                }
                2 if !to_answer.is_empty() => {
                    let chunk = to_answer.swap_remove(self.rng.random_range(0..to_answer.len()));
                    let blocks = ChunkHashes::of_data(Self::bytes(&self.destination, chunk), BLOCK).blocks;
                    self.wire_bytes += blocks.len() as u64 * 16;
                    comparer.destination_blocks(chunk, &blocks).unwrap();
                }
                _ => {}
            }
        }
        // The sends decided so far reach the destination before a restart
        // (a runtime persists only a position the destination acknowledged).
        self.execute(&mut comparer, &mut to_hash, &mut to_answer);
        comparer
    }

    fn execute(&mut self, comparer: &mut SourceComparer, to_hash: &mut Vec<Chunk>, to_answer: &mut Vec<Chunk>) {
        for action in comparer.take_actions() {
            match action {
                CompareAction::HashLocal(chunk) => to_hash.push(chunk),
                CompareAction::RequestBlocks(chunk) => {
                    self.wire_bytes += 16;
                    to_answer.push(chunk);
                }
                CompareAction::Send(chunk, found) => {
                    let source = &self.source[usize::from(chunk.volume_index)];
                    let destination = &mut self.destination[usize::from(chunk.volume_index)];
                    for difference in found {
                        let range =
                            difference.offset as usize..(difference.offset + u64::from(difference.length)) as usize;
                        if difference.zeros {
                            assert!(source[range.clone()].iter().all(|&b| b == 0), "a zero range holds zeros");
                            destination[range].fill(0);
                            self.wire_bytes += 16;
                        } else {
                            self.wire_bytes += range.len() as u64;
                            self.data_bytes += range.len() as u64;
                            destination[range.clone()].copy_from_slice(&source[range]);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn random_drills_converge_sending_only_differences_and_resume() {
    for seed in 0..300u64 {
        let mut drill = Drill::new(seed);
        let total: u64 = drill.sizes().iter().sum();
        let differing: u64 = drill
            .source
            .iter()
            .zip(&drill.destination)
            .flat_map(|(a, b)| a.chunks(BLOCK as usize).zip(b.chunks(BLOCK as usize)))
            .filter(|(a, b)| a != b && a.iter().any(|&x| x != 0))
            .map(|(a, _)| a.len() as u64)
            .sum();
        let window = drill.rng.random_range(1..6);
        // An interrupted first pass, then one from its resume point.
        let steps = drill.rng.random_range(0..200);
        let first = drill.run((0, 0), window, steps);
        let start = first.resume_at();
        let compared_before: u64 = first.progress().bytes_compared;
        if let Some(start) = start {
            let second = drill.run(start, window, usize::MAX);
            assert!(second.is_done(), "seed {seed}");
            assert!(
                compared_before + second.progress().bytes_compared >= total,
                "seed {seed}: every byte was compared in one pass or the other"
            );
        }
        assert!(drill.source == drill.destination, "seed {seed}: the destination differs from the source");
        assert_eq!(drill.data_bytes, differing, "seed {seed}: exactly the differing data crossed, once");
        // Per chunk at most a digest, a request, its block hashes and a
        // zero range per block; the chunks in flight or with digests sent
        // ahead at the interruption may be compared again (no data twice).
        let chunks = ChunkCursor::new(drill.sizes(), CHUNK, 0, 0).count() + (EARLY_DIGESTS_PER_WINDOW + 2) * window;
        let per_chunk = 16 * 2 + 2 * 16 * u64::from(CHUNK / BLOCK);
        assert!(
            drill.wire_bytes <= differing + chunks as u64 * per_chunk,
            "seed {seed}: {} bytes on the wire for {differing} differing bytes",
            drill.wire_bytes
        );
    }
}

#[test]
fn equal_volumes_cost_only_digests() {
    let volume: Vec<u8> = (0..64 * CHUNK).map(|i| (i % 251) as u8).collect();
    let mut drill = Drill {
        rng: StdRng::seed_from_u64(1),
        source: vec![volume.clone()],
        destination: vec![volume],
        digests_sent: 0,
        wire_bytes: 0,
        data_bytes: 0,
    };
    let comparer = drill.run((0, 0), 4, usize::MAX);
    assert!(comparer.is_done());
    assert_eq!(comparer.progress().bytes_equal, 64 * u64::from(CHUNK));
    assert_eq!(comparer.progress().bytes_sent, 0);
    assert_eq!(drill.wire_bytes, 64 * 16, "one digest per chunk and nothing else");
}

#[test]
fn protocol_errors_are_refused_with_the_reason() {
    let cursor = ChunkCursor::new(vec![4 * u64::from(CHUNK)], CHUNK, 0, 0);
    let mut comparer = SourceComparer::new(cursor, BLOCK, 1);
    let first = Chunk { volume_index: 0, offset: 0, length: CHUNK };
    let zeros = ChunkHashes::of_zeros(CHUNK, BLOCK);
    comparer.destination_digest(first, [1; 16]).unwrap();
    let twice = comparer.destination_digest(first, [1; 16]).unwrap_err();
    assert!(twice.contains("a second digest"), "{twice}");
    let unasked = comparer.destination_blocks(first, &zeros.blocks).unwrap_err();
    assert!(unasked.contains("not asked for"), "{unasked}");
    comparer.local_hashed(first, zeros.clone());
    assert!(comparer.take_actions().contains(&CompareAction::RequestBlocks(first)));
    let short = comparer.destination_blocks(first, &zeros.blocks[1..]).unwrap_err();
    assert!(short.contains("7 block hashes for chunk"), "{short}");
    comparer.destination_blocks(first, &zeros.blocks).unwrap();
    let behind = comparer.destination_digest(first, [2; 16]).unwrap_err();
    assert!(behind.contains("already compared"), "{behind}");
    let flood = (1..=5u64)
        .map(|i| comparer.destination_digest(Chunk { volume_index: 0, offset: i * 100_000, length: CHUNK }, [3; 16]))
        .find_map(Result::err)
        .expect("digests beyond the flow-control limit are refused");
    assert!(flood.contains("chunks ahead"), "{flood}");
}
