//! The deterministic simulator (see `tandem_tests::sim`): thousands of seeds of
//! writes, out-of-order IO completions and power losses against the real
//! engine core and recovery. A failure prints its seed;
//! `TANDEM_SIM_SEED=N` replays one seed, `TANDEM_SIM_SEEDS=N` runs more.

use tandem_tests::sim::run_seed;

#[test]
fn power_loss_at_random_points_never_loses_an_acknowledged_write() {
    let steps = 400;
    if let Some(seed) = std::env::var("TANDEM_SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        let stats = run_seed(seed, steps).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {stats:?}");
        return;
    }
    let seeds: u64 = std::env::var("TANDEM_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let (mut acked, mut crashes, mut checkpoints, mut replayed, mut peer_acks) = (0, 0, 0, 0, 0);
    for seed in 0..seeds {
        let stats = run_seed(seed, steps).unwrap_or_else(|e| panic!("{e} (replay: TANDEM_SIM_SEED={seed})"));
        acked += stats.writes_acked;
        crashes += stats.crashes;
        checkpoints += stats.checkpoints;
        replayed += stats.records_replayed;
        peer_acks += stats.peer_acknowledgements;
    }
    eprintln!(
        "{seeds} seeds: {acked} writes acknowledged, {crashes} power losses, {checkpoints} checkpoints, \
         {replayed} records replayed, {peer_acks} peer acknowledgements"
    );
    assert!(peer_acks > seeds, "the simulated peer acknowledged records ({peer_acks})");
    assert!(acked > seeds * 50, "the workload acknowledged writes ({acked})");
    assert!(
        crashes > seeds * 3 && checkpoints > seeds && replayed > seeds,
        "crashes, checkpoints and replays all happened"
    );
}
