//! The optional log sink of a tunnel, called synchronously on the caller's thread.

/// Severity of a log message; values are part of the C ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something unexpected that we handled (ssh stderr, a forced kill).
    Warn = 2,
    /// Progress a migration log shows (`ssh tunnel ver 1`).
    Info = 3,
    /// Details for debugging (the ssh argv).
    Debug = 4,
}

type Sink = Box<dyn FnMut(Level, &str)>;

/// A log sink; `Log::none()` discards.
pub struct Log(Option<Sink>);

impl Log {
    /// Discards every message.
    pub fn none() -> Log {
        Log(None)
    }

    /// Sends messages to `f`.
    pub fn new(f: impl FnMut(Level, &str) + 'static) -> Log {
        Log(Some(Box::new(f)))
    }

    /// Emits one message.
    pub fn emit(&mut self, level: Level, msg: &str) {
        if let Some(f) = self.0.as_mut() {
            f(level, msg);
        }
    }
}
