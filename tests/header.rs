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

/// Everything the header declares is in mtunnel's namespaces: `MTUNNEL_*` macros,
/// `mtunnel_*` types, and functions of the `tunnel_*`, `qmp_*` and `mtunnel_*` families; the
/// only exceptions are the deprecated former names, which still link for one release.
#[test]
fn nothing_unprefixed_leaks_into_the_header() {
    let root = env!("CARGO_MANIFEST_DIR");
    let header = std::fs::read_to_string(format!("{root}/include/mtunnel.h")).unwrap();
    const DEPRECATED: [&str; 3] = ["ssh_run", "ssh_remove_sockets", "migrate_listen_parse"];
    let mut leaks = Vec::new();
    for line in header.lines() {
        if let Some(rest) = line.strip_prefix("#define ") {
            let name = rest.split(['(', ' ']).next().unwrap_or("");
            if !name.starts_with("MTUNNEL_") {
                leaks.push(format!("macro {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("typedef ") {
            // `typedef struct X NAME;` or `typedef RET (*NAME)(ARGS);`
            let name = match rest.split_once("(*") {
                Some((_, after)) => after.split(')').next().unwrap_or(""),
                None => rest.trim_end_matches(';').rsplit(' ').next().unwrap_or(""),
            };
            if !name.starts_with("mtunnel_") {
                leaks.push(format!("type in '{line}'"));
            }
        } else if line.starts_with("MTUNNEL_DEPRECATED(") && line.ends_with(')') {
            // the attribute of the declaration on the next line
        } else if !line.starts_with([' ', '/', '#', '*', '}']) && line.contains('(') {
            // a declaration: `[MTUNNEL_DEPRECATED("…")] TYPE *?NAME(ARGS…`
            let decl = line.rsplit(") ").next().unwrap_or(line);
            let name = decl
                .split('(')
                .next()
                .unwrap_or("")
                .rsplit([' ', '*'])
                .next()
                .unwrap();
            let family = ["tunnel_", "qmp_", "mtunnel_"]
                .iter()
                .any(|p| name.starts_with(p));
            if !family && !DEPRECATED.contains(&name) {
                leaks.push(format!("function {name}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "unprefixed names in include/mtunnel.h: {leaks:?}"
    );
    for name in DEPRECATED {
        assert!(
            header.contains(&format!("MTUNNEL_DEPRECATED(\"use mtunnel_{name}\")")),
            "{name} is not marked deprecated in favour of mtunnel_{name}"
        );
    }
}

/// The header is all a C caller reads: it states the ABI's rules itself.
#[test]
fn the_header_states_its_rules() {
    let root = env!("CARGO_MANIFEST_DIR");
    let header = std::fs::read_to_string(format!("{root}/include/mtunnel.h")).unwrap();
    for rule in [
        "RESULT CODES.",
        "OWNERSHIP.",
        "THREADS.",
        "signal mask is\n * per thread",
        "parent-death signal follows the creating thread",
        "LOG CALLBACK.",
        "never unwind",
        "never\n * longjmp",
        "never call into\n * the same tunnel",
        "FREEING.",
        "cleanup_timeout_ms",
    ] {
        assert!(header.contains(rule), "the header does not state '{rule}'");
    }
}
