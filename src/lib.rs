//! # mtunnel — the socket and process work of a QEMU live migration over ssh
//!
//! Proxmox VE migrates a VM by forwarding a UNIX socket over ssh (`ssh … -L SOCK:SOCK … qm
//! mtunnel`) and telling the source QEMU over QMP to `migrate` into it. This crate does that
//! work: it starts and supervises ssh, reads the tunnel's greeting, decides readiness without
//! touching the forwarded socket, speaks the tunnel's v1 commands and QMP, and closes
//! everything without leaving sockets, children or zombies behind.
//!
//! The pure-Rust modules ([`tunnel`], [`qmp`], `ssh`, `process`, [`target`], [`validate`])
//! do the work; [`ffi`] is only the C boundary, and nothing else imports it. `blockjob`: storage migration, local disks
//! mirrored into the target's NBD export. `sys` holds the raw system calls that neither std
//! nor nix wraps. Modules and items are `pub` only where the C ABI, the fuzz checks
//! (`fuzz/checks.rs`) or the integration tests need them; the rest is crate-private, so
//! dead code shows.
//!
//! ## C ABI conventions
//!
//! Stated once, in the preamble of `include/mtunnel.h` (written from `cbindgen.toml`), since
//! the header is all a C caller reads: result codes and `mtunnel_last_error()`, ownership,
//! NULL and UTF-8, options as JSON, deadlines, threads and the signal mask, children and
//! signals, what a log callback must never do, and the bound of `tunnel_free`.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod blockjob;
pub mod error;
#[cfg(test)]
mod fake_qmp;
pub mod ffi;
pub mod io;
pub(crate) mod listen;
pub(crate) mod log;
pub(crate) mod options;
pub(crate) mod process;
pub mod qmp;
#[cfg(test)]
mod scratch;
pub(crate) mod signals;
pub(crate) mod ssh;
mod sys;
pub mod target;
pub mod tunnel;
pub mod validate;

pub use error::{Error, Kind, Result};
