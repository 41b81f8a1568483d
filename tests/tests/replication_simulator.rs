//! The replication simulator (see `tandem_tests::repl_sim`): a source and a
//! destination on simulated disks and a faulty network, thousands of seeds. A
//! failure prints its seed; `TANDEM_REPL_SIM_SEED=N` replays one seed,
//! `TANDEM_REPL_SIM_SEEDS=N` runs more.

use tandem_tests::repl_sim::run_seed;

#[test]
fn partnerships_survive_power_loss_and_network_faults() {
    let steps = 1200;
    if let Some(seed) = std::env::var("TANDEM_REPL_SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        let stats = run_seed(seed, steps).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {stats:?}");
        return;
    }
    let seeds: u64 = std::env::var("TANDEM_REPL_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut total = tandem_tests::repl_sim::ReplSimStats::default();
    for seed in 0..seeds {
        let stats = run_seed(seed, steps).unwrap_or_else(|e| panic!("{e} (replay: TANDEM_REPL_SIM_SEED={seed})"));
        total.writes_acked += stats.writes_acked;
        total.source_crashes += stats.source_crashes;
        total.destination_crashes += stats.destination_crashes;
        total.connections += stats.connections;
        total.drops += stats.drops;
        total.duplicates_refused += stats.duplicates_refused;
        total.records_shipped += stats.records_shipped;
        total.chunks_copied += stats.chunks_copied;
        total.prefix_checks += stats.prefix_checks;
        total.spills += stats.spills;
        total.rebases += stats.rebases;
        total.snapshots_checked += stats.snapshots_checked;
        total.planned_reconnects += stats.planned_reconnects;
        total.diverged_reconnects += stats.diverged_reconnects;
    }
    eprintln!("{seeds} seeds: {total:?}");
    assert!(total.writes_acked > seeds * 20, "writes were acknowledged: {total:?}");
    assert!(total.source_crashes > seeds && total.destination_crashes > seeds, "both sides lost power: {total:?}");
    assert!(total.duplicates_refused > seeds / 4, "duplicated frames were refused: {total:?}");
    assert!(total.prefix_checks > seeds, "the destination's state was checked against the source's: {total:?}");
    assert!(total.chunks_copied > seeds, "initial copies ran: {total:?}");
    assert!(
        total.snapshots_checked > seeds / 2,
        "snapshot records were taken at the same state on both sides: {total:?}"
    );
    assert!(total.planned_reconnects > seeds / 2, "planned reconnections held sync writes: {total:?}");
    assert!(
        total.diverged_reconnects > seeds / 20,
        "sources lost records their destination held (shipped in parallel with the append) and caught up: {total:?}"
    );
    assert!(
        total.spills > seeds / 20 && total.rebases > seeds / 20,
        "full logs spilled into the bitmap and caught up: {total:?}"
    );
}
