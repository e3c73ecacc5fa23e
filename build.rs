//! Generates the C header from src/ffi/ with cbindgen into OUT_DIR. `MTUNNEL_WRITE_HEADER=1`
//! (what `make header` sets) also writes the committed include/mtunnel.h; a test fails when
//! the committed header differs from a fresh generation.
//!
//! The version has one source, Cargo.toml: the header's `MTUNNEL_VERSION_*` macros are written
//! from it here, `mtunnel_version()` returns it, and the shared object's soname carries its
//! ABI major (`libmtunnel.so.0`; the Debian package libmtunnel0 installs it under that name).

use std::path::PathBuf;

/// The soname's number: bump it (and the Debian package name libmtunnelN) with every
/// incompatible change of the C ABI.
const SONAME: &str = "libmtunnel.so.0";

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mtunnel.h");
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("reading cbindgen.toml");
    config.after_includes = Some(version_macros());
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("generating the C header");
    bindings.write_to_file(&out);
    if std::env::var_os("MTUNNEL_WRITE_HEADER").is_some_and(|v| v == "1") {
        bindings.write_to_file(crate_dir.join("include/mtunnel.h"));
    }
    // Only the cdylib gets it; the rlib and the test binaries are unaffected.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{SONAME}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=MTUNNEL_WRITE_HEADER");
}

/// The version macros of the header, from Cargo.toml's version (cargo's CARGO_PKG_VERSION_*).
fn version_macros() -> String {
    let var =
        |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set by cargo"));
    let (major, minor, patch) = (
        var("CARGO_PKG_VERSION_MAJOR"),
        var("CARGO_PKG_VERSION_MINOR"),
        var("CARGO_PKG_VERSION_PATCH"),
    );
    let version = var("CARGO_PKG_VERSION");
    format!(
        "\n// The library's version (Cargo.toml's), as `mtunnel_version()` returns it at run time.\n\
         #define MTUNNEL_VERSION_MAJOR {major}\n\
         #define MTUNNEL_VERSION_MINOR {minor}\n\
         #define MTUNNEL_VERSION_PATCH {patch}\n\
         #define MTUNNEL_VERSION_STRING \"{version}\"\n\n\
         // Marks the former names of renamed functions (see DEPRECATED NAMES above).\n\
         #if defined(__GNUC__) || defined(__clang__)\n\
         #define MTUNNEL_DEPRECATED(note) __attribute__((deprecated(note)))\n\
         #else\n\
         #define MTUNNEL_DEPRECATED(note)\n\
         #endif"
    )
}
