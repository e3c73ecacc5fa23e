//! Errors of the pure-Rust layer and the fixed result codes they map to.

use crate::ffi;
use std::fmt;

/// What went wrong, as a stable category. Each value is its C result code: the
/// `MTUNNEL_ERR_*` constants in [`crate::ffi`] are the one source of the numbers (the header is
/// generated from them, and a test checks the Perl binding's table against the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A caller-supplied argument is missing, malformed or refused by validation.
    InvalidArgument = ffi::MTUNNEL_ERR_INVALID_ARGUMENT as isize,
    /// A deadline passed before the step finished.
    Timeout = ffi::MTUNNEL_ERR_TIMEOUT as isize,
    /// ssh exited (or could not connect); the message carries its stderr tail.
    SshExited = ffi::MTUNNEL_ERR_SSH_EXITED as isize,
    /// The remote side answered something the protocol does not allow.
    Protocol = ffi::MTUNNEL_ERR_PROTOCOL as isize,
    /// The target node reported `no quorum`.
    NoQuorum = ffi::MTUNNEL_ERR_NO_QUORUM as isize,
    /// The remote side refused a command (`ERR: …`) or a remote command failed.
    Remote = ffi::MTUNNEL_ERR_REMOTE as isize,
    /// QEMU answered a QMP command with an error (class and desc in the message).
    Qmp = ffi::MTUNNEL_ERR_QMP as isize,
    /// A local system call failed.
    Io = ffi::MTUNNEL_ERR_IO as isize,
    /// The handle was already closed.
    Closed = ffi::MTUNNEL_ERR_CLOSED as isize,
    /// A Rust panic was caught at the C boundary.
    Panic = ffi::MTUNNEL_ERR_PANIC as isize,
}

/// An error with its category and a human-readable, self-contained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Category, mapped to the C result code.
    pub kind: Kind,
    /// What failed and why, naming the step and the offending value.
    pub message: String,
}

impl Error {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`Kind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    /// An I/O error from a failed system call, with what we were doing.
    pub fn io(what: impl fmt::Display, errno: nix::errno::Errno) -> Self {
        Self::new(Kind::Io, format!("{what}: {}", errno.desc()))
    }

    /// Prefixes the message with the step that failed, keeping the kind.
    pub fn context(self, step: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{step}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;
