//! Benchmark helpers shared by the criterion benches.
