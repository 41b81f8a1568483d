//! Hot paths of the write path, per operation: checksumming a payload,
//! sealing and decoding a record header, one write through the group state
//! machine (submit, batch, apply, durable, complete), and parsing an NBD
//! request; hashing a chunk for compare-then-send.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_engine::core::{Action, Event, GroupConfig, GroupCore, LogRing, WriteOp, WriteRequest};
use tandem_engine::runtime::session::BlockSession;
use tandem_frontend::nbd::NbdSession;
use tandem_proto::{xxh3_128_bytes, RecordHeader, RecordStamp};

const STAMP: RecordStamp = RecordStamp { group_id: 1, epoch: 1, generation_tag: 1 };

fn checksums(c: &mut Criterion) {
    let mut group = c.benchmark_group("payload_checksum_xxh3_128");
    for size in [4096usize, 65536, 1 << 20] {
        let data = vec![0xa5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| xxh3_128_bytes(black_box(data)))
        });
    }
    group.finish();
}

fn headers(c: &mut Criterion) {
    let checksum = xxh3_128_bytes(&[1u8; 4096]);
    c.bench_function("record_header_seal", |b| {
        b.iter(|| {
            RecordHeader::seal_with(STAMP, tandem_proto::RecordKind::Write, 0, black_box(42), 0, 4096, 4096, checksum)
        })
    });
    let header = RecordHeader::write(STAMP, 42, 0, 4096, &[1u8; 4096]);
    c.bench_function("record_header_decode", |b| {
        b.iter(|| RecordHeader::decode(black_box(header.as_bytes())).unwrap())
    });
}

/// One 4 KiB write through the state machine with its IO reported done at once:
/// the engine's own cost per write, without any IO.
fn state_machine(c: &mut Criterion) {
    let ring = LogRing::new(1 << 30, 4096, 0, 0);
    let config = GroupConfig { checkpoint_used_percent: 50, ..GroupConfig::default() };
    let mut core = GroupCore::new(config, STAMP, ring, 0);
    let mut id = 0u64;
    c.bench_function("group_core_write_4k_round_trip", |b| {
        b.iter(|| {
            id += 1;
            let op = WriteOp::Write { payload_checksum: [7; 16] };
            core.handle(Event::Submit(WriteRequest {
                id,
                volume_index: 0,
                offset: (id % 1024) * 4096,
                length: 4096,
                op,
            }));
            let mut pending = core.take_actions();
            while !pending.is_empty() {
                for action in std::mem::take(&mut pending) {
                    match action {
                        Action::Append(batch) => {
                            core.handle(Event::AppendDone { batch_id: batch.batch_id, result: Ok(()) })
                        }
                        Action::Apply(apply) => core.handle(Event::ApplyDone { lsn: apply.lsn, result: Ok(()) }),
                        Action::Checkpoint { lsn, tail_position, .. } => {
                            core.handle(Event::CheckpointDone { lsn, tail_position, result: Ok(()) })
                        }
                        Action::Complete { .. } => {}
                        Action::Ship { .. }
                        | Action::ReadChunk { .. }
                        | Action::SendCopyDone { .. }
                        | Action::SendRebase { .. }
                        | Action::PersistBitmap { .. } => {
                            unreachable!("no partnership in this benchmark")
                        }
                    }
                }
                pending = core.take_actions();
            }
        })
    });
}

fn nbd_parse(c: &mut Criterion) {
    let mut request = Vec::new();
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes());
    request.extend_from_slice(&1u16.to_be_bytes());
    request.extend_from_slice(&9u64.to_be_bytes());
    request.extend_from_slice(&4096u64.to_be_bytes());
    request.extend_from_slice(&4096u32.to_be_bytes());
    let mut session = NbdSession::new(1 << 30, false, "bench".into());
    c.bench_function("nbd_parse_write_request", |b| b.iter(|| session.parse(black_box(&request)).unwrap()));
}

/// Compare-then-send: hashing a 1 MiB chunk in 4 KiB blocks and its digest
/// (what each side does per chunk; the issue expects far more than a disk reads).
fn chunk_hashing(c: &mut Criterion) {
    use tandem_engine::core::compare::ChunkHashes;
    let mut group = c.benchmark_group("chunk_hashes_1mib_in_4k_blocks");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("of_data", |b| b.iter(|| ChunkHashes::of_data(black_box(&data), 4096)));
    group.bench_function("of_zeros_hole", |b| b.iter(|| ChunkHashes::of_zeros(black_box(1 << 20), 4096)));
    group.finish();
}

/// The performance counters' cost per client write (a volume tally and a
/// latency histogram record), next to the state machine's cost per write.
fn counters(c: &mut Criterion) {
    let mut counters = tandem_engine::runtime::counters::GroupCounters::new(4);
    let mut latency = 0u64;
    c.bench_function("counters_write_answered", |b| {
        b.iter(|| {
            latency = (latency + 37) % 5000;
            counters.write_answered(black_box(2), 65536, black_box(latency));
        })
    });
}

criterion_group!(benches, checksums, headers, state_machine, nbd_parse, chunk_hashing, counters);
criterion_main!(benches);
