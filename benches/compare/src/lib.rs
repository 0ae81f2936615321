//! Peer comparison benches only; see `benches/compare.rs`.
