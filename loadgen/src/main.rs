//! The `pingme-loadgen` binary.
fn main() {}
