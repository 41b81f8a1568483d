//! Unit tests of the group state machine: no files, no threads, no clock.

use super::*;
use crate::core::ring::LogRing;

const SECTOR: u32 = 4096;
const STAMP: RecordStamp = RecordStamp { group_id: 7, epoch: 1, generation_tag: 1 };

fn core_with(ring_sectors: u64, config: GroupConfig) -> GroupCore {
    GroupCore::new(config, STAMP, LogRing::new(ring_sectors * u64::from(SECTOR), SECTOR, 0, 0), 0)
}

fn write(id: WriteId, offset: u64, length: u32) -> Event {
    Event::Submit(WriteRequest {
        id,
        volume_index: 0,
        offset,
        length,
        op: WriteOp::Write { payload_checksum: [1; 16] },
    })
}

fn appends(actions: &[Action]) -> Vec<&AppendBatch> {
    actions.iter().filter_map(|a| if let Action::Append(b) = a { Some(b) } else { None }).collect()
}

fn applies(actions: &[Action]) -> Vec<ApplyOp> {
    actions.iter().filter_map(|a| if let Action::Apply(op) = a { Some(*op) } else { None }).collect()
}

fn completed(actions: &[Action]) -> Vec<WriteId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Complete { id, result: Ok(()) } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn write_completes_when_durable_and_its_range_reads_as_unapplied_until_applied() {
    let mut core = core_with(64, GroupConfig::default());
    core.handle(write(1, 8192, 4096));
    let actions = core.take_actions();
    let batch = appends(&actions)[0].clone();
    assert_eq!(batch.segments.len(), 1);
    assert_eq!(batch.segments[0].records[0].header.lsn, 1);
    assert_eq!(applies(&actions).len(), 1);
    assert!(core.unapplied_overlaps(0, 0, 8193), "the last byte overlaps");
    assert!(!core.unapplied_overlaps(0, 0, 8192), "the range before it does not");
    assert!(!core.unapplied_overlaps(1, 8192, 4096), "another volume does not");
    core.handle(Event::AppendDone { batch_id: batch.batch_id, result: Ok(()) });
    assert_eq!(completed(&core.take_actions()), vec![1], "durable: answered before its volume write");
    assert_eq!(core.snapshot().durable_lsn, 1);
    assert!(core.unapplied_overlaps(0, 8192, 4096), "a read of the range must still wait");
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    assert!(completed(&core.take_actions()).is_empty(), "answered once");
    assert!(!core.unapplied_overlaps(0, 8192, 4096));
}

#[test]
fn a_large_volume_write_backlog_answers_writes_only_once_applied() {
    let mut core = core_with(32 * 1024, GroupConfig { max_batch_bytes: 1 << 30, ..GroupConfig::default() });
    let count = (MAX_ANSWERED_UNAPPLIED_BYTES >> 20) + 2;
    for id in 1..=count {
        core.handle(write(id, id << 20, 1 << 20));
    }
    let actions = core.take_actions();
    assert_eq!(applies(&actions).len() as u64, count);
    for batch in appends(&actions) {
        core.handle(Event::AppendDone { batch_id: batch.batch_id, result: Ok(()) });
    }
    assert!(completed(&core.take_actions()).is_empty(), "{count} MiB of volume writes to do: writes wait for them");
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    core.handle(Event::ApplyDone { lsn: 2, result: Ok(()) });
    let answered = completed(&core.take_actions());
    assert_eq!(answered.len() as u64, count, "the backlog is back at the limit: every durable write is answered");
}

#[test]
fn writes_submitted_while_appends_are_in_flight_form_one_batch() {
    let config = GroupConfig { max_inflight_appends: 1, ..GroupConfig::default() };
    let mut core = core_with(256, config);
    core.handle(write(1, 0, 4096));
    let first = appends(&core.take_actions())[0].batch_id;
    for id in 2..=6 {
        core.handle(write(id, id * 4096, 4096));
    }
    assert!(appends(&core.take_actions()).is_empty(), "the only append slot is busy");
    core.handle(Event::AppendDone { batch_id: first, result: Ok(()) });
    let actions = core.take_actions();
    let batches = appends(&actions);
    assert_eq!(batches.len(), 1);
    let lsns: Vec<u64> = batches[0].segments[0].records.iter().map(|r| r.header.lsn).collect();
    assert_eq!(lsns, vec![2, 3, 4, 5, 6]);
    assert_eq!(batches[0].segments[0].bytes, 5 * 8192);
}

#[test]
fn only_a_contiguous_prefix_of_batches_is_durable() {
    let config = GroupConfig { max_inflight_appends: 2, ..GroupConfig::default() };
    let mut core = core_with(64, config);
    core.handle(write(1, 0, 4096));
    let b1 = appends(&core.take_actions())[0].batch_id;
    core.handle(write(2, 8192, 4096));
    let b2 = appends(&core.take_actions())[0].batch_id;
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    core.handle(Event::ApplyDone { lsn: 2, result: Ok(()) });
    core.handle(Event::AppendDone { batch_id: b2, result: Ok(()) });
    assert!(completed(&core.take_actions()).is_empty(), "batch 2 sits behind batch 1");
    core.handle(Event::AppendDone { batch_id: b1, result: Ok(()) });
    assert_eq!(completed(&core.take_actions()), vec![1, 2]);
}

#[test]
fn overlapping_volume_writes_are_applied_in_lsn_order() {
    let mut core = core_with(64, GroupConfig::default());
    core.handle(write(1, 0, 8192));
    core.handle(write(2, 4096, 4096));
    core.handle(write(3, 65536, 4096));
    let actions = core.take_actions();
    let issued: Vec<u64> = applies(&actions).iter().map(|a| a.lsn).collect();
    assert_eq!(issued, vec![1, 3], "LSN 2 overlaps LSN 1 and waits");
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    let issued: Vec<u64> = applies(&core.take_actions()).iter().map(|a| a.lsn).collect();
    assert_eq!(issued, vec![2]);
}

#[test]
fn full_log_waits_for_checkpoint_then_pads_at_the_wrap() {
    // 20 sectors: nine 2-sector records fill 18, a 3-sector record cannot fit.
    let config =
        GroupConfig { checkpoint_used_percent: 100, checkpoint_interval_ms: u64::MAX, ..GroupConfig::default() };
    let mut core = core_with(20, config);
    for id in 1..=9 {
        core.handle(write(id, id * 4096, 4096));
    }
    core.handle(write(10, 0, 8192));
    let actions = core.take_actions();
    let batch = appends(&actions)[0].batch_id;
    assert_eq!(core.snapshot().writes_waiting_for_space, 1);
    for lsn in 1..=9 {
        core.handle(Event::ApplyDone { lsn, result: Ok(()) });
    }
    core.handle(Event::AppendDone { batch_id: batch, result: Ok(()) });
    let actions = core.take_actions();
    assert_eq!(completed(&actions).len(), 9);
    let checkpoint = actions.iter().find_map(|a| match a {
        Action::Checkpoint { lsn, tail_position, tail_lsn } => {
            assert_eq!(*tail_lsn, lsn + 1, "without a peer the tail follows the checkpoint");
            Some((*lsn, *tail_position))
        }
        _ => None,
    });
    assert_eq!(checkpoint, Some((9, 18 * 4096)), "a waiting writer forces a checkpoint");
    assert!(appends(&actions).is_empty(), "never overwrite unreclaimed records");
    core.handle(Event::CheckpointDone { lsn: 9, tail_position: 18 * 4096, result: Ok(()) });
    let actions = core.take_actions();
    let batch = appends(&actions)[0];
    assert_eq!(batch.segments.len(), 2, "pad at the end, record at the start");
    let pad = &batch.segments[0].records[0];
    assert_eq!((pad.header.record_kind(), pad.header.lsn, pad.header.length), (RecordKind::Pad, 10, 2 * 4096));
    assert_eq!(batch.segments[1].ring_offset, 0);
    assert_eq!(batch.segments[1].records[0].header.lsn, 10, "the pad does not consume the record's LSN");
}

#[test]
fn log_failure_fails_every_write_and_later_submissions() {
    let mut core = core_with(64, GroupConfig::default());
    core.handle(write(1, 0, 4096));
    let batch = appends(&core.take_actions())[0].batch_id;
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    core.handle(Event::AppendDone { batch_id: batch, result: Err(IoFailure { errno: libc::EIO }) });
    core.handle(write(2, 0, 4096));
    let actions = core.take_actions();
    let failed: Vec<WriteId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Complete { id, result: Err(WriteError::GroupFailed(_)) } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2, "{actions:?}");
    assert!(core.failure().unwrap().contains("log append failed"));
    assert!(appends(&actions).is_empty());
}

#[test]
fn oversized_write_is_refused_with_the_limit() {
    let mut core = core_with(16, GroupConfig::default());
    core.handle(write(1, 0, 64 * 1024));
    let actions = core.take_actions();
    assert!(matches!(
        actions.as_slice(),
        [Action::Complete { id: 1, result: Err(WriteError::TooLarge { max_record_bytes: 32768, .. }) }]
    ));
}

#[test]
fn idle_interval_triggers_a_checkpoint() {
    let config = GroupConfig { checkpoint_interval_ms: 1000, ..GroupConfig::default() };
    let mut core = core_with(64, config);
    core.handle(write(1, 0, 4096));
    let batch = appends(&core.take_actions())[0].batch_id;
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    core.handle(Event::AppendDone { batch_id: batch, result: Ok(()) });
    core.handle(Event::Tick { now_ms: 500 });
    let actions = core.take_actions();
    assert!(!actions.iter().any(|a| matches!(a, Action::Checkpoint { .. })), "not due yet: {actions:?}");
    core.handle(Event::Tick { now_ms: 1500 });
    let actions = core.take_actions();
    assert!(actions.contains(&Action::Checkpoint { lsn: 1, tail_position: 8192, tail_lsn: 2 }));
    core.handle(Event::CheckpointDone { lsn: 1, tail_position: 8192, result: Ok(()) });
    core.take_actions();
    assert!(core.is_fully_checkpointed());
    assert_eq!(core.snapshot().log_used_bytes, 0);
}

/// Executes actions like a runtime would, with completions delivered later in
/// an order the test chooses, and checks every completion against the write's
/// own LSN.
#[derive(Default)]
struct Harness {
    outstanding: Vec<Event>,
    lsn_of_write: std::collections::HashMap<WriteId, u64>,
    range_of_write: std::collections::HashMap<WriteId, (u8, u64, u32)>,
    applied_lsns: std::collections::HashSet<u64>,
    completed: std::collections::HashSet<WriteId>,
}

impl Harness {
    fn run(&mut self, core: &mut GroupCore, seed: u64) {
        for action in core.take_actions() {
            match action {
                Action::Append(b) => {
                    for record in b.segments.iter().flat_map(|s| &s.records) {
                        let (Some(id), header) = (record.write_id, &record.header) else { continue };
                        let range = (header.volume_index, header.offset, header.length);
                        self.lsn_of_write.insert(id, header.lsn);
                        self.range_of_write.insert(id, range);
                    }
                    self.outstanding.push(Event::AppendDone { batch_id: b.batch_id, result: Ok(()) });
                }
                Action::Apply(op) => {
                    self.outstanding.push(Event::ApplyDone { lsn: op.lsn, result: Ok(()) });
                }
                Action::Checkpoint { lsn, tail_position, .. } => {
                    self.outstanding.push(Event::CheckpointDone { lsn, tail_position, result: Ok(()) })
                }
                Action::Complete { id, result } => {
                    result.unwrap();
                    let lsn = self.lsn_of_write[&id];
                    assert!(
                        core.snapshot().durable_lsn >= lsn,
                        "seed {seed}: write {id} completed before LSN {lsn} was durable"
                    );
                    let (volume_index, offset, length) = self.range_of_write[&id];
                    assert!(
                        self.applied_lsns.contains(&lsn) || core.unapplied_overlaps(volume_index, offset, length),
                        "seed {seed}: write {id} completed before it was applied, and reads of its range do not wait"
                    );
                    assert!(self.completed.insert(id), "seed {seed}: write {id} completed twice");
                }
                Action::Ship { .. }
                | Action::ReadChunk { .. }
                | Action::SendCopyDone { .. }
                | Action::SendRebase { .. }
                | Action::PersistBitmap { .. } => {
                    unreachable!("no partnership in this test")
                }
            }
        }
    }

    fn deliver(&mut self, core: &mut GroupCore, index: usize) {
        let event = self.outstanding.swap_remove(index);
        if let Event::ApplyDone { lsn, .. } = event {
            self.applied_lsns.insert(lsn);
        }
        core.handle(event);
    }
}

/// Random interleavings of IO completions: every write completes exactly once,
/// never before its record is durable and applied, and the log drains after a
/// checkpoint.
#[test]
fn random_completion_orders_keep_the_invariants() {
    for seed in 1..300u64 {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let config = GroupConfig { max_inflight_appends: 1 + (next() % 4) as usize, ..GroupConfig::default() };
        let mut core = core_with(48, config);
        let mut harness = Harness::default();
        let mut submitted = 0u64;
        for _step in 0..400 {
            if submitted < 60 && next() % 3 == 0 {
                submitted += 1;
                let length = 4096 * (1 + (next() % 3) as u32);
                core.handle(write(submitted, (next() % 16) * 4096, length));
            } else if !harness.outstanding.is_empty() {
                let index = (next() as usize) % harness.outstanding.len();
                harness.deliver(&mut core, index);
            }
            harness.run(&mut core, seed);
        }
        while !harness.outstanding.is_empty() || !core.is_fully_checkpointed() {
            if harness.outstanding.is_empty() {
                core.handle(Event::CheckpointRequested);
            } else {
                harness.deliver(&mut core, 0);
            }
            harness.run(&mut core, seed);
        }
        assert_eq!(harness.completed.len() as u64, submitted, "seed {seed}: every write completed");
        assert_eq!(core.snapshot().log_used_bytes, 0, "seed {seed}: the log drained");
    }
}

fn replicated(lsn: u64, offset: u64, depends_on: u64) -> Event {
    let request = WriteRequest {
        id: lsn,
        volume_index: 0,
        offset,
        length: 4096,
        op: WriteOp::Write { payload_checksum: [1; 16] },
    };
    Event::SubmitReplicated { request, lsn, depends_on }
}

#[test]
fn a_destination_applies_dependent_writes_in_order_and_independent_ones_together() {
    let mut core = core_with(64, GroupConfig::default());
    core.set_apply_after_durable(true);
    // 2 was issued after 1 completed at the source, 3 after 2; 4 alongside 3.
    core.handle(replicated(1, 0, 0));
    core.handle(replicated(2, 8192, 1));
    core.handle(replicated(3, 16384, 2));
    core.handle(replicated(4, 24576, 2));
    let actions = core.take_actions();
    assert!(applies(&actions).is_empty(), "nothing is applied before it is durable");
    for batch in appends(&actions) {
        core.handle(Event::AppendDone { batch_id: batch.batch_id, result: Ok(()) });
    }
    let lsns = |actions: &[Action]| applies(actions).iter().map(|a| a.lsn).collect::<Vec<_>>();
    assert_eq!(lsns(&core.take_actions()), vec![1], "2 waits for 1");
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    assert_eq!(lsns(&core.take_actions()), vec![2], "3 and 4 wait for 2");
    core.handle(Event::ApplyDone { lsn: 2, result: Ok(()) });
    assert_eq!(lsns(&core.take_actions()), vec![3, 4], "3 and 4 are independent");
}

#[test]
fn a_snapshot_record_is_applied_between_the_records_before_and_after_it() {
    let mut core = core_with(256, GroupConfig::default());
    core.handle(write(1, 0, 4096));
    core.handle(write(2, 0, 4096));
    let snapshot = WriteRequest {
        id: 3,
        volume_index: 0,
        offset: 0,
        length: 5,
        op: WriteOp::Snapshot { payload_checksum: [2; 16] },
    };
    core.handle(Event::Submit(snapshot));
    core.handle(write(4, 1 << 20, 4096));
    let actions = core.take_actions();
    let header = &appends(&actions)[0].segments[0].records[2].header;
    assert_eq!((header.record_kind(), header.lsn, header.payload_bytes()), (RecordKind::Snapshot, 3, 5));
    // LSN 2 overlaps LSN 1 and waits; the snapshot waits for both, and the
    // unrelated LSN 4 waits behind the snapshot.
    assert_eq!(applies(&actions).iter().map(|a| a.lsn).collect::<Vec<_>>(), vec![1]);
    core.handle(Event::ApplyDone { lsn: 1, result: Ok(()) });
    assert_eq!(applies(&core.take_actions()).iter().map(|a| a.lsn).collect::<Vec<_>>(), vec![2]);
    core.handle(Event::ApplyDone { lsn: 2, result: Ok(()) });
    assert!(applies(&core.take_actions()).is_empty(), "not durable yet: no snapshot of writes a crash may undo");
    for batch in appends(&actions) {
        core.handle(Event::AppendDone { batch_id: batch.batch_id, result: Ok(()) });
    }
    let taken = applies(&core.take_actions());
    assert_eq!(taken.iter().map(|a| (a.lsn, a.kind, a.length)).collect::<Vec<_>>(), vec![(3, ApplyKind::Snapshot, 0)]);
    assert!(!core.unapplied_overlaps(0, 0, 8), "a snapshot holds no range for reads");
    core.handle(Event::ApplyDone { lsn: 3, result: Ok(()) });
    assert_eq!(applies(&core.take_actions()).iter().map(|a| a.lsn).collect::<Vec<_>>(), vec![4]);
}
