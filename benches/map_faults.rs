//! MapFaults benches (placeholder until the layer lands).
fn main() {}
