//! A QMP client that holds the monitor only for the duration of one call: connect with a
//! deadline, greeting, `qmp_capabilities`, commands with ids, events skipped.

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline, LineDecoder, Read};
use crate::options;
use crate::validate::MAX_SOCKET_PATH;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
use serde_json::{Map, Value, json};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// Replies we wait for are small; a monitor sending more than this per line is broken.
const MAX_LINE: usize = 1 << 20;

/// Default deadline for one QMP call.
pub const DEFAULT_TIMEOUT_MS: i64 = 10_000;

/// Proxmox VE's "basically unlimited" migration speed, 8192 MiB/s; QEMU's own default
/// (128 MiB/s) would throttle every migration, so `max-bandwidth` is always set.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 8192 * 1024 * 1024;

/// One message from the monitor.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, sent once on connect.
    Greeting(Value),
    /// `{"event": NAME, ...}`, may arrive at any time.
    Event(String),
    /// `{"return": VALUE, "id": ID}`.
    Return(Option<Value>, Value),
    /// `{"error": {"class", "desc"}, "id": ID}`.
    Error(Option<Value>, String, String),
}

/// Decodes one line of the QMP stream.
pub fn decode(line: &[u8]) -> Result<Message> {
    let bad = || Error::new(Kind::Protocol, format!("unexpected QMP message '{}'", io::printable(line, 200)));
    let value: Value = serde_json::from_slice(line).map_err(|_| bad())?;
    let obj = value.as_object().ok_or_else(bad)?;
    let id = obj.get("id").cloned();
    if let Some(g) = obj.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(ev) = obj.get("event") {
        return Ok(Message::Event(ev.as_str().ok_or_else(bad)?.to_string()));
    }
    if let Some(ret) = obj.get("return") {
        return Ok(Message::Return(id, ret.clone()));
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_string();
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("(no description)").to_string();
        return Ok(Message::Error(id, class, desc));
    }
    Err(bad())
}

/// A connection to one QMP monitor socket.
pub struct Qmp {
    sock: OwnedFd,
    lines: LineDecoder,
    path: String,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all before `deadline`.
    pub fn connect(path: &str, deadline: Deadline) -> Result<Qmp> {
        if path.is_empty() || path.len() > MAX_SOCKET_PATH {
            return Err(Error::invalid(format!("invalid QMP socket path '{}'", io::printable(path.as_bytes(), 120))));
        }
        let addr = UnixAddr::new(path).map_err(|e| Error::io(format!("QMP socket path '{path}'"), e))?;
        let sock = nix::sys::socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
            .map_err(|e| Error::io("socket", e))?;
        loop {
            match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                // The listen backlog is full; QEMU will catch up.
                Err(Errno::EAGAIN) if !deadline.expired() => deadline.sleep(Duration::from_millis(20)),
                Err(Errno::ENOENT) => return Err(Error::new(Kind::Io, format!("QMP socket '{path}' does not exist (VM not running?)"))),
                Err(Errno::ECONNREFUSED) => return Err(Error::new(Kind::Io, format!("nobody is listening on QMP socket '{path}' (VM not running?)"))),
                Err(e) => return Err(Error::io(format!("connecting to QMP socket '{path}'"), e)),
            }
        }
        let mut qmp = Qmp { sock, lines: LineDecoder::new(MAX_LINE), path: path.to_string(), next_id: 0 };
        loop {
            match qmp.read(deadline) {
                Ok(Message::Greeting(_)) => break,
                // QEMU greets first, but an event is harmless wherever it comes.
                Ok(Message::Event(_)) => continue,
                Ok(other) => return Err(Error::new(Kind::Protocol, format!("QMP socket '{path}' sent {other:?} instead of a greeting"))),
                Err(e) if e.kind == Kind::Timeout => {
                    return Err(Error::new(Kind::Timeout, format!("no QMP greeting on '{path}' before the deadline (monitor busy with another client?)")));
                }
                Err(e) => return Err(e),
            }
        }
        qmp.execute("qmp_capabilities", None, deadline)?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Deadline) -> Result<Message> {
        loop {
            if let Some(line) = self.lines.next_line().map_err(|e| e.context(format!("QMP socket '{}'", self.path)))? {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return decode(&line).map_err(|e| e.context(format!("QMP socket '{}'", self.path)));
            }
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            if io::poll(&mut fds, deadline)? == 0 {
                return Err(Error::new(Kind::Timeout, format!("no reply on QMP socket '{}' before the deadline", self.path)));
            }
            if io::read_some(self.sock.as_fd(), self.lines.buffer())? == Read::Eof {
                return Err(Error::new(Kind::Io, format!("QEMU closed QMP socket '{}'", self.path)));
            }
        }
    }

    /// Runs one command and returns its `return` value; a QMP error carries class and desc.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>, deadline: Deadline) -> Result<Value> {
        self.next_id += 1;
        let id = Value::String(format!("mtunnel-{}-{}", std::process::id(), self.next_id));
        let mut req = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            req["arguments"] = args;
        }
        let mut text = req.to_string();
        text.push('\n');
        io::send_all(self.sock.as_fd(), text.as_bytes(), deadline).map_err(|e| e.context(format!("sending '{command}' to QMP socket '{}'", self.path)))?;
        loop {
            let msg = self.read(deadline).map_err(|e| match e.kind {
                Kind::Timeout => Error::new(Kind::Timeout, format!("no reply to QMP command '{command}' on '{}' before the deadline", self.path)),
                _ => e,
            })?;
            match msg {
                Message::Return(Some(rid), value) if rid == id => return Ok(value),
                Message::Error(rid, class, desc) if rid.as_ref().is_none_or(|r| *r == id) => {
                    return Err(Error::new(Kind::Qmp, format!("QMP command '{command}' failed: {class}: {desc}")));
                }
                // Events, and replies to someone else's ids, are not ours.
                _ => continue,
            }
        }
    }
}

/// Runs one command on a fresh connection.
pub fn execute(path: &str, command: &str, arguments: Option<Value>, timeout_ms: i64) -> Result<Value> {
    if command.is_empty() || command.bytes().any(|b| b.is_ascii_control() || b == b'"') {
        return Err(Error::invalid(format!("invalid QMP command name '{}'", io::printable(command.as_bytes(), 80))));
    }
    let deadline = Deadline::after_ms(timeout_ms);
    Qmp::connect(path, deadline)?.execute(command, arguments, deadline)
}

/// Options of [`migrate`].
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// `migrate-set-capabilities`, by name.
    pub capabilities: Map<String, Value>,
    /// `migrate-set-parameters`; `max-bandwidth` defaults to [`DEFAULT_MAX_BANDWIDTH`].
    pub parameters: Map<String, Value>,
    /// Deadline of the whole call.
    pub timeout_ms: i64,
}

impl MigrateOptions {
    /// Reads `{"capabilities": {...}, "parameters": {...}, "timeout_ms": N}`.
    pub fn from_json(opts: &Value) -> Result<MigrateOptions> {
        options::only_known(opts, &["capabilities", "parameters", "timeout_ms"])?;
        let capabilities = options::object(opts, "capabilities")?.cloned().unwrap_or_default();
        for (name, state) in &capabilities {
            if !state.is_boolean() {
                return Err(Error::invalid(format!("capability '{name}' must be true or false")));
            }
        }
        Ok(MigrateOptions {
            capabilities,
            parameters: options::object(opts, "parameters")?.cloned().unwrap_or_default(),
            timeout_ms: options::timeout_ms(opts, "timeout_ms", DEFAULT_TIMEOUT_MS)?,
        })
    }
}

/// Checks a migration URI: the transports PVE uses.
pub fn check_uri(uri: &str) -> Result<()> {
    let ok = (uri.starts_with("unix:/") || uri.starts_with("tcp:")) && !uri.bytes().any(|b| b.is_ascii_control());
    if ok { Ok(()) } else { Err(Error::invalid(format!("invalid migration URI '{}': expected unix:/PATH or tcp:HOST:PORT", io::printable(uri.as_bytes(), 200)))) }
}

/// The `migrate-set-parameters` arguments: the caller's, with `max-bandwidth` always present.
pub fn parameters_with_bandwidth(parameters: &Map<String, Value>) -> Map<String, Value> {
    let mut p = parameters.clone();
    p.entry("max-bandwidth").or_insert(json!(DEFAULT_MAX_BANDWIDTH));
    p
}

/// Sets capabilities and parameters (always `max-bandwidth`), then starts `migrate` to `uri`.
pub fn migrate(path: &str, uri: &str, opts: &MigrateOptions) -> Result<()> {
    check_uri(uri)?;
    let deadline = Deadline::after_ms(opts.timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    if !opts.capabilities.is_empty() {
        let caps: Vec<Value> = opts.capabilities.iter().map(|(k, v)| json!({"capability": k, "state": v})).collect();
        qmp.execute("migrate-set-capabilities", Some(json!({"capabilities": caps})), deadline)?;
    }
    qmp.execute("migrate-set-parameters", Some(Value::Object(parameters_with_bandwidth(&opts.parameters))), deadline)?;
    qmp.execute("migrate", Some(json!({"uri": uri})), deadline)?;
    Ok(())
}

/// `query-migrate`, as QEMU returns it.
pub fn query_migrate(path: &str, timeout_ms: i64) -> Result<Value> {
    execute(path, "query-migrate", None, timeout_ms)
}

/// The `status` field of a `query-migrate` reply; `none` when absent (no migration yet).
pub fn status(reply: &Value) -> &str {
    reply.get("status").and_then(Value::as_str).unwrap_or("none")
}

/// Whether a migration status is final. Unknown statuses (newer QEMU) count as still running.
pub fn is_finished(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "none")
}

/// Sends `migrate_cancel` and waits until the migration is no longer running; returns the last
/// `query-migrate` reply.
pub fn migrate_cancel(path: &str, timeout_ms: i64) -> Result<Value> {
    let deadline = Deadline::after_ms(timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    qmp.execute("migrate_cancel", None, deadline)?;
    loop {
        let reply = qmp.execute("query-migrate", None, deadline)?;
        if is_finished(status(&reply)) {
            return Ok(reply);
        }
        if deadline.expired() {
            return Err(Error::new(Kind::Timeout, format!("migration still '{}' after migrate_cancel", status(&reply))));
        }
        deadline.sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests;
