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

/// `name => code` pairs between `open` and the next `)` (a Perl hash literal).
fn perl_pairs(text: &str, open: &str) -> Vec<(String, i64)> {
    let start = text.find(open).expect("the Perl table") + open.len();
    let body = &text[start..start + text[start..].find(')').expect("end of the Perl table")];
    body.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (name, code) = p.split_once("=>").expect("name => code");
            (
                name.trim().to_string(),
                code.trim().parse().expect("a number"),
            )
        })
        .collect()
}

/// The Perl binding keeps its own copy of the result codes (`%PVE::MTunnel::ERROR_CODE`, which
/// callers compare `last_error_code` with); it must name exactly the header's `MTUNNEL_ERR_*`
/// values, which are generated from the constants in `src/ffi/mod.rs`.
#[test]
fn perl_error_codes_match_the_header() {
    let root = env!("CARGO_MANIFEST_DIR");
    let header = std::fs::read_to_string(format!("{root}/include/mtunnel.h")).unwrap();
    let mut from_header: Vec<(String, i64)> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#define MTUNNEL_ERR_"))
        .map(|l| {
            let (name, code) = l.split_once(' ').expect("#define NAME VALUE");
            (name.to_lowercase(), code.trim().parse().expect("a number"))
        })
        .collect();
    let perl = std::fs::read_to_string(format!("{root}/perl/lib/PVE/MTunnel.pm")).unwrap();
    let mut from_perl = perl_pairs(&perl, "our %ERROR_CODE = (");
    from_header.sort();
    from_perl.sort();
    assert!(from_header.len() >= 10, "header codes: {from_header:?}");
    assert_eq!(
        from_perl, from_header,
        "perl/lib/PVE/MTunnel.pm %ERROR_CODE differs from include/mtunnel.h"
    );
}
