//! The committed C header must be exactly what cbindgen generates from the current source.

#[test]
fn committed_header_matches_a_fresh_generation() {
    let fresh = include_str!(concat!(env!("OUT_DIR"), "/mtunnel.h"));
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/mtunnel.h"))
            .unwrap_or_default();
    assert!(
        committed == fresh,
        "include/mtunnel.h differs from the header generated from src/ffi/ ({} vs {} bytes): run `make header` and commit it",
        committed.len(),
        fresh.len()
    );
}
