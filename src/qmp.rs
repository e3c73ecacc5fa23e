//! A QMP client that holds the monitor only for the duration of one call: connect with a
//! deadline, greeting, `qmp_capabilities`, commands with ids, events skipped.

use crate::error::{Detail, Error, Kind, Result};
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
pub(crate) const DEFAULT_TIMEOUT_MS: i64 = 10_000;

/// `max-bandwidth` without a bandwidth limit: 16 GiB/s, as PVE sets it. QEMU's own default
/// (128 MiB/s) would throttle every migration, so `max-bandwidth` is always set.
pub(crate) const DEFAULT_MAX_BANDWIDTH: u64 = 16 << 30;

/// QEMU's largest `downtime-limit` (2000 s, `MAX_MIGRATE_DOWNTIME_SECONDS`); PVE caps there.
pub(crate) const MAX_DOWNTIME_LIMIT_MS: u64 = 2000 * 1000;

/// One message from the monitor.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, sent once on connect.
    Greeting(Value),
    /// `{"event": NAME, "data": DATA, ...}`, may arrive at any time (`DATA` is `null` when
    /// absent).
    Event(String, Value),
    /// `{"return": VALUE, "id": ID}`.
    Return(Option<Value>, Value),
    /// `{"error": {"class", "desc"}, "id": ID}`.
    Error(Option<Value>, String, String),
}

/// Decodes one line of the QMP stream.
pub fn decode(line: &[u8]) -> Result<Message> {
    let bad = || {
        Error::new(
            Kind::Protocol,
            format!("unexpected QMP message '{}'", io::printable(line, 200)),
        )
    };
    let value: Value = serde_json::from_slice(line).map_err(|_| bad())?;
    let obj = value.as_object().ok_or_else(bad)?;
    let id = obj.get("id").cloned();
    if let Some(g) = obj.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(ev) = obj.get("event") {
        let name = ev.as_str().ok_or_else(bad)?.to_string();
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        return Ok(Message::Event(name, data));
    }
    if let Some(ret) = obj.get("return") {
        return Ok(Message::Return(id, ret.clone()));
    }
    if let Some(err) = obj.get("error") {
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_string();
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("(no description)")
            .to_string();
        return Ok(Message::Error(id, class, desc));
    }
    Err(bad())
}

/// A connection to one QMP monitor socket.
pub(crate) struct Qmp {
    sock: OwnedFd,
    lines: LineDecoder,
    path: String,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all before `deadline`.
    pub(crate) fn connect(path: &str, deadline: Deadline) -> Result<Qmp> {
        if path.is_empty() || path.len() > MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "invalid QMP socket path '{}'",
                io::printable(path.as_bytes(), 120)
            )));
        }
        let addr =
            UnixAddr::new(path).map_err(|e| Error::io(format!("QMP socket path '{path}'"), e))?;
        let sock = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| Error::io("socket", e))?;
        loop {
            match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                // The listen backlog is full; QEMU will catch up.
                Err(Errno::EAGAIN) if !deadline.expired() => {
                    deadline.sleep(Duration::from_millis(20))
                }
                Err(Errno::ENOENT) => {
                    return Err(Error::new(
                        Kind::Io,
                        format!("QMP socket '{path}' does not exist (VM not running?)"),
                    ));
                }
                Err(Errno::ECONNREFUSED) => {
                    return Err(Error::new(
                        Kind::Io,
                        format!("nobody is listening on QMP socket '{path}' (VM not running?)"),
                    ));
                }
                Err(e) => return Err(Error::io(format!("connecting to QMP socket '{path}'"), e)),
            }
        }
        let mut qmp = Qmp {
            sock,
            lines: LineDecoder::new(MAX_LINE),
            path: path.to_string(),
            next_id: 0,
        };
        loop {
            match qmp.read(deadline) {
                Ok(Message::Greeting(_)) => break,
                // QEMU greets first, but an event is harmless wherever it comes.
                Ok(Message::Event(..)) => continue,
                Ok(other) => {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("QMP socket '{path}' sent {other:?} instead of a greeting"),
                    ));
                }
                Err(e) if e.kind == Kind::Timeout => {
                    return Err(Error::new(
                        Kind::Timeout,
                        format!(
                            "no QMP greeting on '{path}' before the deadline (monitor busy with another client?)"
                        ),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        qmp.execute("qmp_capabilities", None, deadline)?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Deadline) -> Result<Message> {
        loop {
            if let Some(line) = self
                .lines
                .next_line()
                .map_err(|e| e.context(format!("QMP socket '{}'", self.path)))?
            {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return decode(&line).map_err(|e| e.context(format!("QMP socket '{}'", self.path)));
            }
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            if io::poll(&mut fds, deadline)? == 0 {
                return Err(Error::new(
                    Kind::Timeout,
                    format!("no reply on QMP socket '{}' before the deadline", self.path),
                ));
            }
            if io::read_some(self.sock.as_fd(), self.lines.buffer())? == Read::Eof {
                return Err(Error::new(
                    Kind::Io,
                    format!("QEMU closed QMP socket '{}'", self.path),
                ));
            }
        }
    }

    /// The next event before `deadline` (`None` once it passed); replies are not expected
    /// between commands and are skipped.
    pub(crate) fn next_event(&mut self, deadline: Deadline) -> Result<Option<(String, Value)>> {
        loop {
            match self.read(deadline) {
                Ok(Message::Event(name, data)) => return Ok(Some((name, data))),
                Ok(_) => continue,
                Err(e) if e.kind == Kind::Timeout => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs one command and returns its `return` value; a QMP error carries class and desc.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Deadline,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = Value::String(format!("mtunnel-{}-{}", std::process::id(), self.next_id));
        let mut req = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            req["arguments"] = args;
        }
        let mut text = req.to_string();
        text.push('\n');
        io::send_all(self.sock.as_fd(), text.as_bytes(), deadline)
            .map_err(|e| e.context(format!("sending '{command}' to QMP socket '{}'", self.path)))?;
        loop {
            let msg = self.read(deadline).map_err(|e| match e.kind {
                Kind::Timeout => Error::new(
                    Kind::Timeout,
                    format!(
                        "no reply to QMP command '{command}' on '{}' before the deadline",
                        self.path
                    ),
                ),
                _ => e,
            })?;
            match msg {
                Message::Return(Some(rid), value) if rid == id => return Ok(value),
                Message::Error(rid, class, desc) if rid.as_ref().is_none_or(|r| *r == id) => {
                    return Err(Error::new(
                        Kind::Qmp,
                        format!("QMP command '{command}' failed: {class}: {desc}"),
                    )
                    .with(Detail::Qmp { class, desc }));
                }
                // Events, and replies to someone else's ids, are not ours.
                _ => continue,
            }
        }
    }
}

/// Runs one command on a fresh connection.
pub(crate) fn execute(
    path: &str,
    command: &str,
    arguments: Option<Value>,
    timeout_ms: i64,
) -> Result<Value> {
    if command.is_empty() || command.bytes().any(|b| b.is_ascii_control() || b == b'"') {
        return Err(Error::invalid(format!(
            "invalid QMP command name '{}'",
            io::printable(command.as_bytes(), 80)
        )));
    }
    let deadline = Deadline::after_ms(timeout_ms);
    Qmp::connect(path, deadline)?.execute(command, arguments, deadline)
}

/// Options of [`migrate`] and [`setup`].
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MigrateOptions {
    /// The capabilities wanted on, by name (`true`); `None` leaves QEMU's capabilities as
    /// they are. When given, every other capability QEMU knows is turned off, as PVE's
    /// `set_migration_caps` does, so one left on by an earlier run cannot leak in.
    pub(crate) capabilities: Option<Map<String, Value>>,
    /// `migrate-set-parameters`; see [`parameters`] for the defaults filled in. `None` (the
    /// key absent) leaves QEMU's parameters alone when capabilities are set in the same call;
    /// a call that sets neither sets the default parameters (see [`setup_on`]).
    pub(crate) parameters: Option<Map<String, Value>>,
    /// Deadline of the whole call.
    pub(crate) timeout_ms: i64,
    /// Whether [`migrate`] sets capabilities and parameters first (default) or only migrates.
    pub(crate) setup: bool,
    /// Post-copy: `postcopy-ram` on (refused where QEMU lacks it), `postcopy-preempt` too
    /// where QEMU offers it, and the post-copy phase held to the pre-copy bandwidth. Implies
    /// that capabilities are set, as if `capabilities` were given (empty when absent).
    pub(crate) postcopy: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            capabilities: None,
            parameters: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            setup: true,
            postcopy: false,
        }
    }
}

impl MigrateOptions {
    /// Reads `{"capabilities": {...}, "parameters": {...}, "timeout_ms": N, "setup": bool,
    /// "postcopy": bool}`.
    pub(crate) fn from_json(opts: &Value) -> Result<MigrateOptions> {
        let o: MigrateOptions = options::from_value(opts)?;
        for (name, state) in o.capabilities.iter().flatten() {
            if !state.is_boolean() {
                return Err(Error::invalid(format!(
                    "capability '{name}' must be true or false"
                )));
            }
        }
        Ok(o)
    }

    /// Whether this call sets capabilities: they are given, or post-copy adds its own.
    fn sets_capabilities(&self) -> bool {
        self.capabilities.is_some() || self.postcopy
    }

    /// The parameters this call sets: those given; when no capabilities are set either, the
    /// defaults (`{}` filled in by [`parameters`]), so that a bare setup still lifts QEMU's
    /// 128 MiB/s; `None` when only capabilities are set.
    fn parameters_to_set(&self) -> Option<Map<String, Value>> {
        match &self.parameters {
            Some(p) => Some(p.clone()),
            None if !self.sets_capabilities() => Some(Map::new()),
            None => None,
        }
    }

    /// The capabilities to turn on, with post-copy's added; `None` leaves them alone.
    fn wanted_capabilities(&self, offered: &[String]) -> Option<Map<String, Value>> {
        if !self.postcopy {
            return self.capabilities.clone();
        }
        let mut wanted = self.capabilities.clone().unwrap_or_default();
        wanted.insert(POSTCOPY_RAM.into(), json!(true));
        if offered.iter().any(|n| n == POSTCOPY_PREEMPT) {
            wanted.entry(POSTCOPY_PREEMPT).or_insert(json!(true));
        }
        Some(wanted)
    }
}

/// The capability that makes a migration able to switch to post-copy (source and target).
pub(crate) const POSTCOPY_RAM: &str = "postcopy-ram";
/// The capability that sends faulted pages ahead of the background stream (QEMU 7.2+).
pub(crate) const POSTCOPY_PREEMPT: &str = "postcopy-preempt";

/// Checks a migration URI: the transports PVE uses.
pub fn check_uri(uri: &str) -> Result<()> {
    let ok = (uri.starts_with("unix:/") || uri.starts_with("tcp:"))
        && !uri.bytes().any(|b| b.is_ascii_control());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid migration URI '{}': expected unix:/PATH or tcp:HOST:PORT",
            io::printable(uri.as_bytes(), 200)
        )))
    }
}

/// PVE's rounding of the xbzrle cache: up to the next power of two (1 below 2).
pub(crate) fn round_up_power_of_two(n: u64) -> u64 {
    n.max(1).next_power_of_two()
}

/// Checks the parameters the library reads itself, before anything is set.
fn check_parameters(given: &Map<String, Value>) -> Result<()> {
    if let Some(limit) = given.get("downtime-limit") {
        if limit.as_u64().is_none() {
            return Err(Error::invalid(format!(
                "parameter 'downtime-limit' must be a non-negative number of milliseconds, not {limit}"
            )));
        }
    }
    Ok(())
}

/// The `migrate-set-parameters` arguments, as PVE's phase 2 sets them: the caller's, with
/// `max-bandwidth` always present ([`DEFAULT_MAX_BANDWIDTH`] unless given), `downtime-limit`
/// capped at QEMU's maximum, with `postcopy` `max-postcopy-bandwidth` as `max-bandwidth`
/// unless given, and — when xbzrle is on and no size is given — an
/// `xbzrle-cache-size` of a tenth of `memory_bytes`, rounded up to a power of two.
pub(crate) fn parameters(
    given: &Map<String, Value>,
    postcopy: bool,
    xbzrle: bool,
    memory_bytes: Option<u64>,
) -> Result<Map<String, Value>> {
    check_parameters(given)?;
    let mut p = given.clone();
    p.entry("max-bandwidth")
        .or_insert(json!(DEFAULT_MAX_BANDWIDTH));
    if let Some(ms) = p.get("downtime-limit").and_then(Value::as_u64) {
        p.insert(
            "downtime-limit".into(),
            json!(ms.min(MAX_DOWNTIME_LIMIT_MS)),
        );
    }
    if postcopy && !p.contains_key("max-postcopy-bandwidth") {
        // QEMU's 0 is unlimited: the limit the caller set for the migration holds after the
        // switch too.
        let limit = p["max-bandwidth"].clone();
        p.insert("max-postcopy-bandwidth".into(), limit);
    }
    if let (true, false, Some(mem)) = (xbzrle, p.contains_key("xbzrle-cache-size"), memory_bytes) {
        p.insert(
            "xbzrle-cache-size".into(),
            json!(round_up_power_of_two(mem / 10)),
        );
    }
    Ok(p)
}

/// The guest's RAM in bytes, as QEMU reports it (base plus hot-plugged memory).
pub(crate) fn memory_size(qmp: &mut Qmp, deadline: Deadline) -> Result<u64> {
    let summary = qmp.execute("query-memory-size-summary", None, deadline)?;
    let part = |key: &str| summary.get(key).and_then(Value::as_u64).unwrap_or(0);
    Ok(part("base-memory") + part("plugged-memory"))
}

/// The capabilities QEMU offers (`query-migrate-capabilities`), by name.
fn offered_capabilities(qmp: &mut Qmp, deadline: Deadline) -> Result<Vec<String>> {
    let known = qmp.execute("query-migrate-capabilities", None, deadline)?;
    Ok(known
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("capability").and_then(Value::as_str))
        .map(str::to_string)
        .collect())
}

/// The name a failed step of the setup goes by in its error: the QMP command that sets it.
const CAPABILITIES_STEP: &str = "migrate-set-capabilities";
/// See [`CAPABILITIES_STEP`].
const PARAMETERS_STEP: &str = "migrate-set-parameters";

/// Why a QMP command of the setup failed: QEMU's own description for a refused command (as
/// PVE logs a monitor error), else the library's message; `command` named unless it is the
/// step's own.
fn reason(step: &str, command: &str, e: &Error) -> String {
    let why = e.qmp_desc().unwrap_or(&e.message);
    if command == step || e.qmp_desc().is_none() {
        why.to_string()
    } else {
        format!("{command}: {why}")
    }
}

/// Sets capabilities (see [`MigrateOptions::capabilities`]) and parameters (see
/// [`parameters`]) on a connected monitor, each only when the call asks for it: capabilities
/// only → only capabilities; parameters only → only parameters; neither → the default
/// parameters. With both, capabilities first, and the parameters are still set when the
/// capabilities failed (as PVE's phase 2 does); the error then names each step that failed
/// with QEMU's reason (`migrate-set-capabilities failed - …; migrate-set-parameters failed -
/// …`) and has the first failure's kind. What the caller got wrong (a capability QEMU does not
/// offer, post-copy on a QEMU without it, a bad `downtime-limit`) is refused before anything
/// is set. Returns what was applied: `{"capabilities": {NAME: bool, …}, "parameters": {…}}`
/// (each only when set), with `"postcopy-preempt-refused": QEMU's error` when post-copy's
/// preempt was refused and left off.
pub(crate) fn setup_on(qmp: &mut Qmp, opts: &MigrateOptions, deadline: Deadline) -> Result<Value> {
    let mut applied = Map::new();
    let given_params = opts.parameters_to_set();
    if let Some(p) = &given_params {
        check_parameters(p)?;
    }
    // each failed step: "STEP failed - REASON", and its error
    let mut failed: Vec<(String, Error)> = Vec::new();
    let mut wanted = None;
    if opts.sets_capabilities() {
        let step = CAPABILITIES_STEP;
        let caps = offered_capabilities(qmp, deadline)
            .map_err(|e| (reason(step, "query-migrate-capabilities", &e), e))
            .and_then(|names| {
                wanted = opts.wanted_capabilities(&names);
                capabilities_on(qmp, opts, &names, deadline)
                    .map_err(|e| (reason(step, step, &e), e))
            });
        match caps {
            Ok(caps) => applied.extend(caps),
            // the caller's mistake: nothing is set
            Err((_, e)) if e.kind == Kind::InvalidArgument => return Err(e),
            Err((why, e)) => failed.push((format!("{step} failed - {why}"), e)),
        }
    }
    if let Some(given) = given_params {
        let xbzrle = wanted
            .as_ref()
            .is_some_and(|c| c.get("xbzrle") == Some(&json!(true)));
        let step = PARAMETERS_STEP;
        let params = if xbzrle && !given.contains_key("xbzrle-cache-size") {
            memory_size(qmp, deadline)
                .map_err(|e| (reason(step, "query-memory-size-summary", &e), e))
                .map(Some)
        } else {
            Ok(None)
        }
        .and_then(|memory| {
            parameters(&given, opts.postcopy, xbzrle, memory).map_err(|e| (e.message.clone(), e))
        })
        .and_then(|params| {
            qmp.execute(step, Some(Value::Object(params.clone())), deadline)
                .map(|_| params)
                .map_err(|e| (reason(step, step, &e), e))
        });
        match params {
            Ok(params) => {
                applied.insert("parameters".into(), Value::Object(params));
            }
            Err((why, e)) => failed.push((format!("{step} failed - {why}"), e)),
        }
    }
    let Some((_, first)) = failed.first() else {
        return Ok(Value::Object(applied));
    };
    let message = failed
        .iter()
        .map(|(text, _)| text.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::new(first.kind, message).with(first.detail.clone()))
}

/// The capabilities step of [`setup_on`], QEMU offering `names`: the wanted ones on, every
/// other one off. Returns `{"capabilities": {…}}` and post-copy's preempt refusal, if any.
fn capabilities_on(
    qmp: &mut Qmp,
    opts: &MigrateOptions,
    names: &[String],
    deadline: Deadline,
) -> Result<Map<String, Value>> {
    let mut applied = Map::new();
    if opts.postcopy && !names.iter().any(|n| n == POSTCOPY_RAM) {
        return Err(Error::invalid(format!(
            "post-copy needs the migration capability '{POSTCOPY_RAM}', which this QEMU does not offer (supported: {})",
            names.join(", ")
        )));
    }
    let wanted = opts
        .wanted_capabilities(names)
        .expect("capabilities are given or post-copy adds them");
    if let Some((name, _)) = wanted
        .iter()
        .find(|(name, on)| **on == json!(true) && !names.contains(name))
    {
        return Err(Error::invalid(format!(
            "migration capability '{name}' is not supported by this QEMU (supported: {})",
            names.join(", ")
        )));
    }
    let mut states: Map<String, Value> = names
        .iter()
        .map(|n| (n.clone(), json!(wanted.get(n) == Some(&json!(true)))))
        .collect();
    // postcopy-preempt that post-copy added (the caller did not ask for it) may be refused
    // where QEMU offers it: QEMU 8.1 and later on a target whose incoming migration
    // already listens (-incoming unix:). Then post-copy goes on without it, and the
    // refusal is returned for the caller to match on the other side.
    let preempt_optional = opts.postcopy
        && states.get(POSTCOPY_PREEMPT) == Some(&json!(true))
        && !opts
            .capabilities
            .as_ref()
            .is_some_and(|c| c.contains_key(POSTCOPY_PREEMPT));
    match set_capabilities(qmp, &states, deadline) {
        Err(e) if preempt_optional && e.kind == Kind::Qmp => {
            states.insert(POSTCOPY_PREEMPT.into(), json!(false));
            set_capabilities(qmp, &states, deadline)?;
            applied.insert("postcopy-preempt-refused".into(), json!(e.message));
        }
        other => other?,
    }
    applied.insert("capabilities".into(), Value::Object(states));
    Ok(applied)
}

fn set_capabilities(qmp: &mut Qmp, states: &Map<String, Value>, deadline: Deadline) -> Result<()> {
    let caps: Vec<Value> = states
        .iter()
        .map(|(k, v)| json!({"capability": k, "state": v}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": caps})),
        deadline,
    )
    .map(drop)
}

/// [`setup_on`] on a fresh connection.
pub(crate) fn setup(path: &str, opts: &MigrateOptions) -> Result<Value> {
    let deadline = Deadline::after_ms(opts.timeout_ms);
    setup_on(&mut Qmp::connect(path, deadline)?, opts, deadline)
}

/// Sets capabilities and parameters (unless `opts.setup` is false), then starts `migrate` to
/// `uri`. Returns what [`setup_on`] applied (`{}` without setup).
pub(crate) fn migrate(path: &str, uri: &str, opts: &MigrateOptions) -> Result<Value> {
    check_uri(uri)?;
    let deadline = Deadline::after_ms(opts.timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    let applied = if opts.setup {
        setup_on(&mut qmp, opts, deadline)?
    } else {
        json!({})
    };
    qmp.execute("migrate", Some(json!({"uri": uri})), deadline)?;
    Ok(applied)
}

/// `query-migrate`, as QEMU returns it.
pub(crate) fn query_migrate(path: &str, timeout_ms: i64) -> Result<Value> {
    execute(path, "query-migrate", None, timeout_ms)
}

/// The `status` field of a `query-migrate` reply; `none` when absent (no migration yet).
pub fn status(reply: &Value) -> &str {
    reply
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
}

/// Whether a migration status is final. Unknown statuses (newer QEMU) count as still running.
pub fn is_finished(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "none")
}

/// Whether a migration status is one of post-copy's (`postcopy-active`, `postcopy-paused`,
/// `postcopy-recover`, and newer QEMU's `postcopy-recover-setup`): the VM's state is split
/// between source and target, and only finishing the migration puts it back in one piece.
pub fn is_postcopy(status: &str) -> bool {
    status.starts_with("postcopy-")
}

/// Default of [`WaitOptions::hold_ms`]: short enough that another client of the monitor
/// (pvestatd, a `qm` command) waiting behind us is served within a fraction of a second.
pub(crate) const DEFAULT_HOLD_MS: i64 = 250;

/// Options of [`wait_migration`].
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WaitOptions {
    /// How long the monitor connection is held waiting for the migration to end.
    pub(crate) hold_ms: i64,
    /// Deadline for connecting (the monitor may be busy with another client) and for each
    /// `query-migrate`.
    pub(crate) timeout_ms: i64,
    /// Wake on QEMU's `MIGRATION_PASS` event too: a new pass over memory began, so the
    /// answer shows what that pass starts with (a decision taken at pass boundaries).
    pub(crate) pass: bool,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            hold_ms: DEFAULT_HOLD_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            pass: false,
        }
    }
}

impl WaitOptions {
    /// Reads `{"hold_ms": N, "timeout_ms": N, "pass": bool}` (all optional).
    pub(crate) fn from_json(opts: &Value) -> Result<WaitOptions> {
        let o: WaitOptions = options::from_value(opts)?;
        if o.hold_ms < 0 {
            return Err(Error::invalid(format!(
                "option 'hold_ms' must be 0 or more milliseconds, not {}",
                o.hold_ms
            )));
        }
        Ok(o)
    }
}
/// Whether an event is QEMU announcing a migration status worth waking for (the `MIGRATION`
/// event, sent when the `events` capability is on): a final one, or a post-copy one other
/// than `current` (post-copy's pauses and recoveries need acting on at once).
pub(crate) fn is_wake_migration_event(name: &str, data: &Value, current: &str) -> bool {
    name == "MIGRATION"
        && data
            .get("status")
            .and_then(Value::as_str)
            .is_some_and(|s| is_finished(s) || (is_postcopy(s) && s != current))
}

/// `query-migrate`, returned as soon as the migration is over or its post-copy status changes
/// (with `pass`, also when a new pass over memory begins):
/// on one connection held at most `hold_ms`, asks once, then waits for QEMU's `MIGRATION`
/// event with such a status (see [`is_wake_migration_event`]) and asks again. Events only wake the wait; the answer is always `query-migrate`'s, so a migration
/// without the `events` capability is still seen, at the latest when the hold ends. Call it in
/// a loop: between calls the monitor is free for other clients.
pub(crate) fn wait_migration(path: &str, opts: &WaitOptions) -> Result<Value> {
    let deadline = Deadline::after_ms(opts.timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    let hold = Deadline::after_ms(opts.hold_ms);
    let reply = qmp.execute("query-migrate", None, deadline)?;
    let current = status(&reply);
    if is_finished(current) {
        return with_final_figures(&mut qmp, reply, deadline);
    }
    while let Some((name, data)) = qmp.next_event(hold)? {
        if is_wake_migration_event(&name, &data, current) || (opts.pass && name == "MIGRATION_PASS")
        {
            break;
        }
    }
    let deadline = Deadline::after_ms(opts.timeout_ms);
    let reply = qmp.execute("query-migrate", None, deadline)?;
    with_final_figures(&mut qmp, reply, deadline)
}

/// How long to wait for QEMU's figures of a completed migration.
const FIGURES_WAIT_MS: i64 = 100;

/// QEMU sets `completed` (and sends the event) in the migration thread a moment before it
/// computes `total-time` and `downtime` (`migration_calculate_complete`); a query in between
/// reports them as 0. Asks again, every millisecond for at most [`FIGURES_WAIT_MS`], until
/// they are there. The migration is complete either way: only the figures wait.
fn with_final_figures(qmp: &mut Qmp, mut reply: Value, deadline: Deadline) -> Result<Value> {
    let settle = Deadline::after_ms(FIGURES_WAIT_MS).min(deadline);
    let unset = |r: &Value| {
        status(r) == "completed" && r.get("total-time").and_then(Value::as_u64).unwrap_or(0) == 0
    };
    if !unset(&reply) {
        return Ok(reply);
    }
    // Still unset at the end of the wait: the migration is complete all the same.
    io::poll_until(settle, Duration::from_millis(1), || {
        reply = qmp.execute("query-migrate", None, deadline)?;
        Ok((!unset(&reply)).then_some(()))
    })?;
    Ok(reply)
}

/// Switches a running migration to post-copy (`migrate-start-postcopy`): the source stops,
/// its devices go over, and the target runs while it pulls the remaining pages. Both sides
/// must have had `postcopy-ram` on before `migrate`; QEMU refuses otherwise.
pub(crate) fn migrate_start_postcopy(path: &str, timeout_ms: i64) -> Result<()> {
    execute(path, "migrate-start-postcopy", None, timeout_ms).map(drop)
}

/// Resumes a paused post-copy migration (`postcopy-paused`) into `uri`, where the target
/// listens again (see [`migrate_recover`]): `migrate` with `resume: true`.
pub(crate) fn migrate_resume(path: &str, uri: &str, timeout_ms: i64) -> Result<()> {
    check_uri(uri)?;
    let args = json!({"uri": uri, "resume": true});
    execute(path, "migrate", Some(args), timeout_ms).map(drop)
}

/// On the target of a paused post-copy migration: listens on `uri` for the source's resume
/// (`migrate-recover`).
pub(crate) fn migrate_recover(path: &str, uri: &str, timeout_ms: i64) -> Result<()> {
    check_uri(uri)?;
    execute(
        path,
        "migrate-recover",
        Some(json!({"uri": uri})),
        timeout_ms,
    )
    .map(drop)
}

/// Pauses a post-copy migration whose channel hangs instead of failing (`migrate-pause`, on
/// either side): QEMU shuts the channel down and goes to `postcopy-paused`, from where it can
/// be recovered.
pub(crate) fn migrate_pause(path: &str, timeout_ms: i64) -> Result<()> {
    execute(path, "migrate-pause", None, timeout_ms).map(drop)
}

/// Sends `migrate_cancel` and waits until the migration is no longer running; returns the last
/// `query-migrate` reply.
pub(crate) fn migrate_cancel(path: &str, timeout_ms: i64) -> Result<Value> {
    let deadline = Deadline::after_ms(timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    qmp.execute("migrate_cancel", None, deadline)?;
    let mut last = Value::Null;
    io::poll_until(deadline, Duration::from_millis(50), || {
        last = qmp.execute("query-migrate", None, deadline)?;
        Ok(is_finished(status(&last)).then_some(()))
    })?
    .ok_or_else(|| {
        Error::new(
            Kind::Timeout,
            format!("migration still '{}' after migrate_cancel", status(&last)),
        )
    })?;
    Ok(last)
}

#[cfg(test)]
mod tests;
