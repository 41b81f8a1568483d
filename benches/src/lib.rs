//! Criterion micro-benchmarks of the hot paths live in `benches/`:
//! `cargo bench -p tandem-benches`.
