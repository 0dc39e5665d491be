//! The `pingme` binary.
fn main() {}
