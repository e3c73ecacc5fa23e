#![no_main]
//! Input layout and properties: see `checks::tunnel_lines` in fuzz/checks.rs (shared with
//! tests/fuzz_corpus.rs, which replays the committed corpus on stable).

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::tunnel_lines(data));
