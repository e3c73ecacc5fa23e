//! # mtunnel — the socket and process work of a QEMU live migration over ssh
//!
//! Proxmox VE migrates a VM by forwarding a UNIX socket over ssh (`ssh … -L SOCK:SOCK … qm
//! mtunnel`) and telling the source QEMU over QMP to `migrate` into it. This crate does that
//! work: it starts and supervises ssh, reads the tunnel's greeting, decides readiness without
//! touching the forwarded socket, speaks the tunnel's v1 commands and QMP, and closes
//! everything without leaving sockets, children or zombies behind.
//!
//! The pure-Rust modules ([`tunnel`], [`qmp`], `ssh`, `process`, [`target`], [`validate`])
//! do the work; [`ffi`] is only the C boundary. `blockjob`: storage migration, local disks
//! mirrored into the target's NBD export. `sys` holds the raw system calls that neither std
//! nor nix wraps. Modules and items are `pub` only where the C ABI, the fuzz checks
//! (`fuzz/checks.rs`) or the integration tests need them; the rest is crate-private, so
//! dead code shows.
//!
//! ## C ABI conventions (stated once, true for every function)
//!
//! - **Result codes.** Every fallible function returns an `int`: `MTUNNEL_OK` (0) or one of the
//!   fixed `MTUNNEL_ERR_*` codes, which are never renumbered. The detail (ssh's stderr, QEMU's
//!   error class and description, the offending value) is in the thread-local text returned by
//!   `mtunnel_last_error()`, valid until the next call into the library on the same thread.
//! - **NULL.** Every pointer argument may be NULL. A NULL required argument yields
//!   `MTUNNEL_ERR_INVALID_ARGUMENT`; a NULL options string means "all defaults"; NULL handles
//!   are accepted by `tunnel_close` and `tunnel_free` as no-ops. Strings must be UTF-8.
//! - **Ownership.** Handles are opaque and owned by the caller until `tunnel_free`. Output
//!   parameters are written only on success. Strings the library returns are owned by the
//!   caller and released with `mtunnel_string_free`. The library never keeps a caller's pointer
//!   beyond the call, except the log callback and its userdata, kept until `tunnel_free`.
//! - **Options and results as JSON.** Options that may grow cross as one JSON object string,
//!   so the ABI stays stable when options are added; results (migration status, command
//!   output) come back as JSON strings. Unknown option keys are refused.
//! - **Time.** Every wait takes a deadline (`timeout_ms`; negative = no limit). Deadlines are
//!   monotonic and survive EINTR; `alarm` in the host cannot interrupt a call, none is needed.
//! - **Processes and signals.** No threads are started. Children are tracked by pidfd, so a
//!   host with `SIGCHLD` ignored or its own reaper is fine; writes to ssh never raise SIGPIPE;
//!   children inherit no fds beyond stdio. Signal dispositions are never changed; while a call
//!   runs, the calling thread holds back the signals that have a handler, which then run once
//!   the call returns (see `signals`): a Perl host would run them only then anyway, and a
//!   storm of them can neither break a wait nor overflow Perl's pending-signal count.
//! - **Panics** never cross the boundary: they become `MTUNNEL_ERR_PANIC`.
//! - **Logging.** A tunnel may get a callback `(userdata, level, msg)`, called only
//!   synchronously on the caller's thread, during calls on that tunnel.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod blockjob;
pub mod error;
pub mod ffi;
pub mod io;
pub(crate) mod log;
pub(crate) mod options;
pub(crate) mod process;
pub mod qmp;
#[cfg(test)]
mod scratch;
pub(crate) mod share;
pub(crate) mod signals;
pub(crate) mod ssh;
mod sys;
pub mod target;
pub(crate) mod throttle;
pub mod tunnel;
pub mod validate;

pub use error::{Error, Kind, Result};
