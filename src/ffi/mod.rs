//! The C boundary: type conversion, NULL and UTF-8 checks, panic catching, result codes and
//! the last-error text. No migration logic lives here.
//!
//! Safety contract of every function: the C conventions in the crate documentation (valid
//! NUL-terminated strings or NULL, handles from `tunnel_open` not yet freed, strings freed
//! once with `mtunnel_string_free`).
#![allow(clippy::missing_safety_doc)]

pub mod blockjob;
pub mod qmp;
pub mod remote;
pub mod tunnel;

use crate::error::{Error, Kind, Result};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Success.
pub const MTUNNEL_OK: c_int = 0;
/// An argument was NULL, not UTF-8, malformed JSON, or refused by validation.
pub const MTUNNEL_ERR_INVALID_ARGUMENT: c_int = 1;
/// A deadline passed.
pub const MTUNNEL_ERR_TIMEOUT: c_int = 2;
/// ssh exited or failed to connect; the last error holds its stderr tail.
pub const MTUNNEL_ERR_SSH_EXITED: c_int = 3;
/// The remote side sent something the protocol does not allow (strange greeting, garbage).
pub const MTUNNEL_ERR_PROTOCOL: c_int = 4;
/// The target node has no quorum.
pub const MTUNNEL_ERR_NO_QUORUM: c_int = 5;
/// The remote side refused a command (`ERR: …`) or a remote command exited non-zero.
pub const MTUNNEL_ERR_REMOTE: c_int = 6;
/// QEMU answered with a QMP error; the last error holds its class and description.
pub const MTUNNEL_ERR_QMP: c_int = 7;
/// A local system call failed.
pub const MTUNNEL_ERR_IO: c_int = 8;
/// The tunnel was already closed.
pub const MTUNNEL_ERR_CLOSED: c_int = 9;
/// A bug in the library was caught (a Rust panic); nothing unwound into the caller.
pub const MTUNNEL_ERR_PANIC: c_int = 10;

/// Log level of errors.
pub const MTUNNEL_LOG_ERROR: c_int = 1;
/// Log level of warnings (ssh's stderr, forced kills).
pub const MTUNNEL_LOG_WARN: c_int = 2;
/// Log level of progress messages.
pub const MTUNNEL_LOG_INFO: c_int = 3;
/// Log level of debugging details.
pub const MTUNNEL_LOG_DEBUG: c_int = 4;

// The result codes are Kind's; these fail the build if a constant ever drifts from it.
const _: () = assert!(MTUNNEL_ERR_INVALID_ARGUMENT == Kind::InvalidArgument.code());
const _: () = assert!(MTUNNEL_ERR_TIMEOUT == Kind::Timeout.code());
const _: () = assert!(MTUNNEL_ERR_SSH_EXITED == Kind::SshExited.code());
const _: () = assert!(MTUNNEL_ERR_PROTOCOL == Kind::Protocol.code());
const _: () = assert!(MTUNNEL_ERR_NO_QUORUM == Kind::NoQuorum.code());
const _: () = assert!(MTUNNEL_ERR_REMOTE == Kind::Remote.code());
const _: () = assert!(MTUNNEL_ERR_QMP == Kind::Qmp.code());
const _: () = assert!(MTUNNEL_ERR_IO == Kind::Io.code());
const _: () = assert!(MTUNNEL_ERR_CLOSED == Kind::Closed.code());
const _: () = assert!(MTUNNEL_ERR_PANIC == Kind::Panic.code());

// The log levels are fixed; these fail the build if the Rust enum ever drifts from them.
const _: () = assert!(MTUNNEL_LOG_ERROR == crate::log::Level::Error as c_int);
const _: () = assert!(MTUNNEL_LOG_WARN == crate::log::Level::Warn as c_int);
const _: () = assert!(MTUNNEL_LOG_INFO == crate::log::Level::Info as c_int);
const _: () = assert!(MTUNNEL_LOG_DEBUG == crate::log::Level::Debug as c_int);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs the body of an exported function: clears the last error, catches panics, maps errors
/// to result codes.
pub(crate) fn boundary(f: impl FnOnce() -> Result<()>) -> c_int {
    let _held = crate::signals::Deferred::handlers();
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => MTUNNEL_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.kind.code()
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("internal error in mtunnel (panic): {what}"));
            MTUNNEL_ERR_PANIC
        }
    }
}

/// A required string argument.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    // SAFETY: not NULL (checked above), and str_arg's caller guarantees a NUL-terminated string valid for 'a.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{name} is not valid UTF-8")))
}

/// An optional string argument (NULL = absent).
pub(crate) unsafe fn opt_str_arg<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        unsafe { str_arg(p, name) }.map(Some)
    }
}

/// Stores a library-owned string in an out-parameter (NULL out = the caller does not want it).
pub(crate) unsafe fn put_string(out: *mut *mut c_char, s: String) {
    if !out.is_null() {
        let c = CString::new(s.replace('\0', "\\u0000")).unwrap_or_default();
        // SAFETY: `out` is not NULL (checked above) and, per put_string's contract, points to writable storage.
        unsafe { *out = c.into_raw() };
    }
}

/// Returns the text describing the last failed call on this thread ("" after a success).
///
/// Ownership: the string belongs to the library and stays valid until the next call into the
/// library on the same thread; copy it if you need it longer. Never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn mtunnel_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Returns the library's version, "MAJOR.MINOR.PATCH" (Cargo.toml's version; the header's
/// `MTUNNEL_VERSION_STRING` names the version the caller was compiled against).
///
/// Ownership: a static string owned by the library, valid for as long as the library is
/// loaded; the caller must not free or modify it. Never NULL; cannot fail (no result code, the
/// last error is left as it was).
#[unsafe(no_mangle)]
pub extern "C" fn mtunnel_version() -> *const c_char {
    VERSION.as_ptr()
}

/// Cargo.toml's version, NUL-terminated for `mtunnel_version`.
static VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the package version contains a NUL byte"),
    };

/// Frees a string returned by the library through an out-parameter.
///
/// NULL is a no-op. Passing a pointer not returned by this library, or freeing twice, is
/// undefined behaviour.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mtunnel_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: not NULL; per the documented contract `s` came from CString::into_raw in put_string and is freed once.
        drop(unsafe { CString::from_raw(s) });
    }
}
