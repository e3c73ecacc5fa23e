//! Generates the C header from src/ffi/ with cbindgen into OUT_DIR. `MTUNNEL_WRITE_HEADER=1`
//! (what `make header` sets) also writes the committed include/mtunnel.h; a test fails when
//! the committed header differs from a fresh generation.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("mtunnel.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("reading cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("generating the C header");
    bindings.write_to_file(&out);
    if std::env::var_os("MTUNNEL_WRITE_HEADER").is_some_and(|v| v == "1") {
        bindings.write_to_file(crate_dir.join("include/mtunnel.h"));
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=MTUNNEL_WRITE_HEADER");
}
