//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every kept crash input
//! (`fuzz/regressions/<target>/`) through the same property checks the cargo-fuzz targets run
//! (`fuzz/checks.rs`), on the stable toolchain, so `cargo test` guards what fuzzing found.
//! Fuzzing itself: `make fuzz` (nightly + cargo-fuzz).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::io::Write;
use std::path::{Path, PathBuf};

/// The property check a target runs on each input; panics on a violation.
type Check = fn(&[u8]);

/// Every fuzz target, with its check.
const TARGETS: &[(&str, Check)] = &[
    ("qmp_stream", checks::qmp_stream),
    ("query_migrate", checks::query_migrate),
    ("tunnel_lines", checks::tunnel_lines),
    ("listen_lines", checks::listen_lines),
    ("validation", checks::validation),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The regular files in `dir`, sorted; `None` if `dir` does not exist.
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Some(files)
}

/// Names of the subdirectories (or `*.rs` files, without extension) of `dir`, sorted.
fn names(dir: &Path, rs_files: bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            if rs_files {
                p.extension().is_some_and(|x| x == "rs")
            } else {
                p.is_dir()
            }
        })
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("?")
}

/// The open finding an input is kept for: `open-<name>` or `open-<name>.<anything>`.
fn open_finding(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let name = file.strip_prefix("open-")?;
    Some(name.split('.').next().unwrap_or(name).to_string())
}

fn replay(target: &str) {
    let check = TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("known target")
        .1;
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    let corpus = files(&corpus_dir).unwrap_or_else(|| {
        panic!(
            "{} is missing: the replay would test nothing",
            corpus_dir.display()
        )
    });
    assert!(
        !corpus.is_empty(),
        "{} is empty: the replay would test nothing",
        corpus_dir.display()
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target)).unwrap_or_default();
    let (open, fixed): (Vec<&PathBuf>, Vec<&PathBuf>) =
        regressions.iter().partition(|p| open_finding(p).is_some());

    for path in corpus.iter().chain(fixed.iter().copied()) {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            panic!(
                "{target}: input {} ({} bytes) violates a property: {}\n  reproduce: cd fuzz && cargo +nightly fuzz run {target} {}",
                path.display(),
                data.len(),
                panic_text(&*panic),
                path.strip_prefix(fuzz_dir()).unwrap_or(path).display()
            );
        }
    }

    // Open findings (reported, src/ not fixed yet): tolerated above, but with the tolerance off
    // the kept input must still fail; when it no longer does, the finding is fixed.
    for path in &open {
        let name = open_finding(path).unwrap();
        assert!(
            checks::OPEN_FINDINGS.contains(&name.as_str()),
            "{}: '{name}' is not in checks::OPEN_FINDINGS",
            path.display()
        );
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let strict = std::panic::catch_unwind(|| checks::strictly(|| check(&data)));
        assert!(
            strict.is_err(),
            "{}: open finding '{name}' no longer reproduces, so src/ fixed it: remove its tolerance from \
             fuzz/checks.rs (OPEN_FINDINGS) and rename the file without the 'open-' prefix",
            path.display()
        );
        let _ = writeln!(
            std::io::stderr(),
            "fuzz corpus {target}: open finding '{name}' still reproduces ({})",
            path.display()
        );
    }

    // Written to stderr directly, not through eprintln!, so libtest does not capture it.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz corpus {target}: replayed {} corpus + {} regression inputs ({} of them open findings)",
        corpus.len(),
        regressions.len(),
        open.len()
    );
}

#[test]
fn every_fuzz_target_has_a_corpus_and_is_replayed_here() {
    let targets: Vec<String> = {
        let mut t: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
        t.sort();
        t
    };
    assert_eq!(
        names(&fuzz_dir().join("fuzz_targets"), true),
        targets,
        "fuzz/fuzz_targets/*.rs and TARGETS differ"
    );
    assert_eq!(
        names(&fuzz_dir().join("corpus"), false),
        targets,
        "fuzz/corpus/*/ and TARGETS differ"
    );
    if fuzz_dir().join("regressions").is_dir() {
        for dir in names(&fuzz_dir().join("regressions"), false) {
            assert!(
                targets.contains(&dir),
                "fuzz/regressions/{dir}/ belongs to no target"
            );
        }
    }
}

#[test]
fn qmp_stream_corpus_never_panics_and_keeps_properties() {
    replay("qmp_stream");
}

#[test]
fn query_migrate_corpus_never_panics_and_only_final_statuses_finish() {
    replay("query_migrate");
}

#[test]
fn tunnel_lines_corpus_never_panics_and_accepts_only_protocol_lines() {
    replay("tunnel_lines");
}

#[test]
fn listen_lines_corpus_never_panics_and_returns_only_valid_sockets_of_the_vmid() {
    replay("listen_lines");
}

#[test]
fn validation_corpus_never_panics_and_accepts_only_safe_paths_destinations_and_quoting() {
    replay("validation");
}
