//! Errors of the pure-Rust layer and the fixed result codes they map to.

use std::fmt;

/// What went wrong, as a stable category. Each value is its C result code, fixed forever:
/// this enum is the one source of the numbers. The C boundary's `MTUNNEL_ERR_*` constants
/// (from which the header is generated) are checked against it at compile time, and a test
/// checks the Perl binding's table against the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Kind {
    /// A caller-supplied argument is missing, malformed or refused by validation.
    InvalidArgument = 1,
    /// A deadline passed before the step finished.
    Timeout = 2,
    /// ssh exited (or could not connect); the message carries its stderr tail.
    SshExited = 3,
    /// The remote side answered something the protocol does not allow.
    Protocol = 4,
    /// The target node reported `no quorum`.
    NoQuorum = 5,
    /// The remote side refused a command (`ERR: …`) or a remote command failed.
    Remote = 6,
    /// QEMU answered a QMP command with an error (class and desc in the message).
    Qmp = 7,
    /// A local system call failed.
    Io = 8,
    /// The handle was already closed.
    Closed = 9,
    /// A Rust panic was caught at the C boundary.
    Panic = 10,
}

impl Kind {
    /// The C result code (`MTUNNEL_ERR_*`).
    pub const fn code(self) -> i32 {
        self as i32
    }
}

/// What an error is about beyond its text, for callers that decide on it (never by matching
/// the message).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Detail {
    /// Nothing more than the message.
    #[default]
    None,
    /// QEMU refused a QMP command: its error class (`GenericError`, `DeviceNotActive`, …).
    Qmp {
        /// QEMU's error class.
        class: String,
        /// QEMU's description of the error, as it sent it.
        desc: String,
    },
    /// A process (ssh or a remote command through it) ended badly.
    Exit {
        /// Its exit code, if it exited (255 from ssh: ssh's own failure).
        code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
}

/// An error with its category and a human-readable, self-contained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Category, mapped to the C result code.
    pub kind: Kind,
    /// What failed and why, naming the step and the offending value.
    pub message: String,
    /// Structured facts about the failure (QMP error class, exit status).
    pub detail: Detail,
}

impl Error {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            detail: Detail::None,
        }
    }

    /// Adds structured facts to the error.
    pub fn with(mut self, detail: Detail) -> Self {
        self.detail = detail;
        self
    }

    /// QEMU's error class, for a refused QMP command.
    pub fn qmp_class(&self) -> Option<&str> {
        match &self.detail {
            Detail::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's description, for a refused QMP command.
    pub fn qmp_desc(&self) -> Option<&str> {
        match &self.detail {
            Detail::Qmp { desc, .. } => Some(desc),
            _ => None,
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
            message: format!("{step}: {}", self.message),
            ..self
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
