//! OpenSSH connection sharing: a pool of `ControlMaster` connections per destination, shared
//! by tunnels and one-shot commands across processes.
//!
//! A master is a backgrounded `ssh -N -o ControlMaster=yes -o ControlPersist=N` that exits by
//! itself N seconds after its last client left (ssh's own timer, which also runs when every
//! process that used it is gone). Users are mux clients (`-o ControlMaster=no -o
//! ControlPath=…`): no TCP connection, no key exchange, no authentication.
//!
//! The pool lives in a 0700 directory of flock files, like the handshake slots of
//! [`crate::throttle`]. Per master `m` of pool `NAME`:
//!
//! - `NAME.m` — the control socket (ssh creates it, mode 0600, and removes it on a clean exit);
//! - `NAME.m.pid` — the master's pid, written by whoever started it;
//! - `NAME.m.lock` — held while a process checks, starts or stops master `m`;
//! - `NAME.m.sK` (K < max_sessions) — a session slot, held by one user for as long as its session
//!   runs. So a master never carries more than `max_sessions` sessions (sshd's `MaxSessions`,
//!   10 by default), whatever the number of processes; a user who finds every slot of master 0
//!   taken tries master 1, and so on. A process that dies releases its flocks by itself.
//!
//! `NAME` is a hash of everything that makes a master fit a user: the ssh argv prefix and
//! options, the effective uid, the network and mount namespaces (a master's forwards bind in
//! its namespaces), persist_s and max_sessions.
//!
//! When a mux client cannot reach its master, ssh silently falls back to a connection of its
//! own. Clients get `-o ProxyCommand=false` so that such a fallback fails at once, before any
//! remote command could run, instead of bypassing the pool (and the forward readiness check).

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline};
use crate::process::Exit;
use crate::ssh::{self, Ssh};
use serde_json::Value;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::time::Duration;

/// Where control sockets live unless the caller says otherwise.
pub const DEFAULT_CONTROL_DIR: &str = "/run/mtunnel/ssh-ctl";

/// Masters tried per pool before a user waits for a free session slot.
pub(crate) const MAX_MASTERS: u32 = 64;

/// ssh binds its control socket under a temporary name: PATH + "." + 16 random characters.
const SSH_TEMP_SUFFIX: usize = 17;

/// The longest control directory we accept: `DIR/cHASH16.MM` plus ssh's temporary suffix
/// must fit in `sun_path`.
pub const MAX_CONTROL_DIR: usize =
    crate::validate::MAX_SOCKET_PATH - SSH_TEMP_SUFFIX - "/c0123456789abcdef.63".len();

/// The `share` object as given. Numbers and flags are also taken as strings (a command line
/// and Perl hand them over so), hence `Value` for those.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ShareOptions {
    control_dir: Option<String>,
    persist_s: Option<Value>,
    max_sessions: Option<Value>,
    exit_idle: Option<Value>,
}

/// Connection sharing settings (the `share` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory of control sockets and pool files; created 0700, refused if it is not a
    /// directory of ours with mode 0700 (or stricter).
    pub control_dir: String,
    /// `ControlPersist`: a master exits this many seconds after its last session ended.
    pub persist_s: u32,
    /// Sessions per master at most (sshd's `MaxSessions`).
    pub max_sessions: u32,
    /// The last user of a master asks it to exit at once (`-O exit`) instead of letting it
    /// persist for later users.
    pub exit_idle: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            control_dir: DEFAULT_CONTROL_DIR.into(),
            persist_s: 30,
            max_sessions: 10,
            exit_idle: false,
        }
    }
}

fn uint_field(value: Option<&Value>, key: &str) -> Result<Option<u32>> {
    let bad = || Error::invalid(format!("option 'share.{key}' must be a positive integer"));
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(bad),
        // The CLI and Perl hand over numbers as strings.
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| bad())
        }
        Some(_) => Err(bad()),
    }
}

impl Config {
    /// Reads the `share` option: absent, `false`, `"0"`, `"off"` = no sharing; `true`, `"1"`,
    /// `"on"` = the defaults; an object (or a string holding a JSON object, as a command line
    /// passes it) with `control_dir`, `persist_s`, `max_sessions`, `exit_idle`.
    pub fn from_option(value: Option<&Value>) -> Result<Option<Config>> {
        let obj = match value {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => return Ok(Some(Config::default())),
            Some(Value::Number(n)) => {
                return Ok((n.as_u64() != Some(0)).then(Config::default));
            }
            Some(Value::String(s)) => match s.trim() {
                "" | "0" | "off" | "no" | "false" => return Ok(None),
                "1" | "on" | "yes" | "true" => return Ok(Some(Config::default())),
                t if t.starts_with('{') => serde_json::from_str::<Value>(t).map_err(|e| {
                    Error::invalid(format!("option 'share' is not a valid JSON object: {e}"))
                })?,
                _ => {
                    return Err(Error::invalid(
                        "option 'share' must be true/false or an object {control_dir, persist_s, max_sessions, exit_idle}",
                    ));
                }
            },
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(Error::invalid(
                    "option 'share' must be true/false or an object {control_dir, persist_s, max_sessions, exit_idle}",
                ));
            }
        };
        let map = obj
            .as_object()
            .ok_or_else(|| Error::invalid("option 'share' must be true/false or an object"))?;
        let o: ShareOptions = crate::options::from_map(map, "share.")?;
        let mut c = Config::default();
        if let Some(dir) = o.control_dir {
            check_dir_name(&dir)?;
            c.control_dir = dir;
        }
        if let Some(v) = uint_field(o.persist_s.as_ref(), "persist_s")? {
            // 0 would mean "forever" to ssh.
            if v == 0 || v > 86_400 {
                return Err(Error::invalid(
                    "option 'share.persist_s' must be between 1 and 86400 seconds",
                ));
            }
            c.persist_s = v;
        }
        if let Some(v) = uint_field(o.max_sessions.as_ref(), "max_sessions")? {
            if v == 0 || v > 1000 {
                return Err(Error::invalid(
                    "option 'share.max_sessions' must be between 1 and 1000",
                ));
            }
            c.max_sessions = v;
        }
        match o.exit_idle {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => c.exit_idle = b,
            Some(Value::Number(n)) => c.exit_idle = n.as_u64() != Some(0),
            Some(Value::String(s)) => c.exit_idle = !matches!(s.as_str(), "" | "0"),
            Some(_) => return Err(Error::invalid("option 'share.exit_idle' must be a boolean")),
        }
        Ok(Some(c))
    }
}

/// Checks the spelling of a control directory: absolute, normalized, short enough that
/// ssh's control socket (and its temporary name) fits in `sun_path`.
pub fn check_dir_name(dir: &str) -> Result<()> {
    crate::validate::socket_dir(dir).map_err(|_| {
        Error::invalid(format!(
            "invalid share.control_dir '{}': must be an absolute, normalized path",
            io::printable(dir.as_bytes(), 120)
        ))
    })?;
    if dir.len() > MAX_CONTROL_DIR {
        return Err(Error::invalid(format!(
            "invalid share.control_dir '{}': longer than {MAX_CONTROL_DIR} bytes (control sockets must fit in 107 bytes)",
            io::printable(dir.as_bytes(), 120)
        )));
    }
    Ok(())
}

/// Creates the control directory (mode 0700) if it is missing, and refuses one that is a
/// symlink, not a directory, not owned by us, or open to group or others: its sockets give
/// a shell on the target node to whoever can connect to them.
pub fn prepare_dir(dir: &str) -> Result<()> {
    check_dir_name(dir)?;
    let parent = std::path::Path::new(dir)
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| {
            Error::new(
                Kind::Io,
                format!("cannot create the parent of control_dir '{dir}': {e}"),
            )
        })?;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::new(
                Kind::Io,
                format!("cannot create control_dir '{dir}': {e}"),
            ));
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::new(Kind::Io, format!("cannot inspect control_dir '{dir}': {e}")))?;
    let euid = crate::sys::geteuid();
    dir_problem(&meta, euid).map_or(Ok(()), |why| {
        Err(Error::invalid(format!(
            "refusing control_dir '{dir}': {why} (it must be a directory owned by uid {euid} with mode 0700)"
        )))
    })
}

/// What is wrong with a control directory, if anything.
fn dir_problem(meta: &std::fs::Metadata, euid: u32) -> Option<String> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Some("it is a symlink".into());
    }
    if !ft.is_dir() {
        return Some("it is not a directory".into());
    }
    if meta.uid() != euid {
        return Some(format!("it is owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return Some(format!("its mode is {:04o}", meta.mode() & 0o7777));
    }
    None
}

/// FNV-1a, 64 bits: stable across builds and processes (std's hasher is not).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(b"\0") {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The pool name for a master identity (see the module docs).
pub fn pool_name(identity: &[String]) -> String {
    let parts: Vec<&[u8]> = identity.iter().map(|s| s.as_bytes()).collect();
    format!("c{:016x}", fnv1a(&parts))
}

/// What makes masters interchangeable for `ssh`: its argv for the master, our uid and
/// namespaces, and the pool settings.
pub fn identity(ssh: &Ssh, cfg: &Config) -> Vec<String> {
    let ns = |kind: &str| {
        std::fs::read_link(format!("/proc/self/ns/{kind}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let euid = crate::sys::geteuid();
    let mut id = ssh.argv_tail(&[], &[]);
    id.extend([
        format!("uid={euid}"),
        ns("net"),
        ns("mnt"),
        format!("persist={}", cfg.persist_s),
        format!("sessions={}", cfg.max_sessions),
    ]);
    id
}

/// Tries to take an exclusive flock without waiting (held until the file closes).
fn try_lock(file: &File) -> bool {
    crate::sys::try_flock(file.as_fd())
}

/// Takes the first free session slot, filling master 0 first, then master 1, …: returns
/// the master's index and the held slot file.
pub fn take_session(dir: &str, name: &str, max_sessions: u32) -> Result<Option<(u32, File)>> {
    for m in 0..MAX_MASTERS {
        for k in 0..max_sessions {
            let f = crate::throttle::open_lock_file(&format!("{dir}/{name}.{m}.s{k}"))?;
            if try_lock(&f) {
                return Ok(Some((m, f)));
            }
        }
    }
    Ok(None)
}

/// Whether `pid` is a live (not zombie) ssh master for control socket `ctl`: the pid may
/// have been reused, so its command line must name the control path.
pub fn master_alive(pid: i32, ctl: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or("");
    if state.is_empty() || state == "Z" || state == "X" {
        return false;
    }
    let want = format!("ControlPath={ctl}");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|a| a == want.as_bytes()))
        .unwrap_or(false)
}

/// Parses `Master running (pid=1234)` from `ssh -O check`.
pub fn parse_check(text: &str) -> Option<i32> {
    let rest = &text[text.find("Master running (pid=")? + "Master running (pid=".len()..];
    rest[..rest.find(')')?].parse().ok()
}

/// Whether a mux client's stderr says that it could not use its master and fell back to a
/// connection of its own, which `ProxyCommand=false` ended before any remote command.
pub fn fell_back(stderr: &str) -> bool {
    stderr.contains("kex_exchange_identification:")
        || stderr.contains("Connection closed by UNKNOWN")
}

/// Whether a mux client's stderr says that its master refused a forward (the bind failed).
pub fn forward_refused(stderr: &str) -> bool {
    stderr.contains("forwarding request failed") || stderr.contains("master forward request failed")
}

fn remove_if_socket(path: &str) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// One user's session on a shared master: the held session slot plus what a mux client needs.
#[derive(Debug)]
pub struct Lease {
    slot: Option<File>,
    cfg: Config,
    name: String,
    master: u32,
    control_path: String,
    master_pid: i32,
}

impl Lease {
    /// The control socket.
    pub fn control_path(&self) -> &str {
        &self.control_path
    }

    /// The master's pid (it holds the forwards' listening sockets).
    pub fn master_pid(&self) -> i32 {
        self.master_pid
    }

    /// Whether the master still runs.
    pub fn alive(&self) -> bool {
        master_alive(self.master_pid, &self.control_path)
    }

    /// Options that make ssh a client of this master, never a connection of its own.
    pub fn client_options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            "ControlMaster=no".into(),
            "-o".into(),
            format!("ControlPath={}", self.control_path),
            "-o".into(),
            "ProxyCommand=false".into(),
        ]
    }

    /// Asks the master to stop listening on these `-L` forwards (a mux client's forwards stay
    /// in the master after the client exits). Best effort: a dead master has none.
    pub fn cancel_forwards(&self, ssh: &Ssh, specs: &[String]) -> Result<()> {
        if specs.is_empty() || !self.alive() {
            return Ok(());
        }
        let mut enforced = vec![
            "-o".into(),
            format!("ControlPath={}", self.control_path),
            "-O".into(),
            "cancel".into(),
        ];
        for s in specs {
            enforced.extend(["-L".into(), s.clone()]);
        }
        control(ssh, &enforced, "cancel forwards")
    }

    /// Removes what a dead master left behind (its control socket and pid file), unless
    /// another user has started a new master in its place meanwhile.
    pub fn clean_dead_master(&self) {
        if self.alive() {
            return;
        }
        let base = &self.control_path;
        let Ok(_lock) = lock_master(&format!("{base}.lock"), Deadline::after_ms(2000)) else {
            return;
        };
        let pid = read_pid(&format!("{base}.pid"));
        if pid == self.master_pid || !master_alive(pid, base) {
            remove_if_socket(base);
            let _ = std::fs::remove_file(format!("{base}.pid"));
        }
    }

    /// Ends the session: frees its slot; with `exit_idle`, stops the master if no other
    /// session uses it. A dead master's files are removed.
    pub fn release(mut self, ssh: &Ssh) {
        self.slot = None;
        if !self.alive() {
            self.clean_dead_master();
            return;
        }
        if self.cfg.exit_idle {
            let _ = exit_if_idle(
                ssh,
                &self.cfg.control_dir,
                &self.name,
                self.master,
                &self.cfg,
            );
        }
    }
}

/// Runs an `ssh -O …` control command against a master.
fn control(ssh: &Ssh, enforced: &[String], what: &str) -> Result<()> {
    let argv = ssh.argv_tail(enforced, &[]);
    let (out, _) = ssh::run_argv(ssh, &argv, what, b"", &mut None, Deadline::after_ms(10_000))?;
    // Unknown: a host with SIGCHLD ignored reaped it (the control commands are best effort).
    if matches!(out.exit, Exit::Code(0) | Exit::Unknown) {
        return Ok(());
    }
    Err(Error::new(
        Kind::SshExited,
        format!(
            "ssh -O {what} for {} failed: {}: {}",
            ssh.destination(),
            out.exit,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    ))
}

/// Waits for the lock of master `m`.
fn lock_master(path: &str, deadline: Deadline) -> Result<File> {
    let f = crate::throttle::open_lock_file(path)?;
    loop {
        if try_lock(&f) {
            return Ok(f);
        }
        if deadline.expired() {
            return Err(Error::new(
                Kind::Timeout,
                format!("shared ssh master lock '{path}' stayed busy until the deadline"),
            ));
        }
        deadline.sleep(Duration::from_millis(5));
    }
}

fn read_pid(path: &str) -> i32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Stops master `m` of pool `name` if no session slot of it is held (`-O exit`).
fn exit_if_idle(ssh: &Ssh, dir: &str, name: &str, m: u32, cfg: &Config) -> Result<bool> {
    let base = format!("{dir}/{name}.{m}");
    let lock = crate::throttle::open_lock_file(&format!("{base}.lock"))?;
    if !try_lock(&lock) {
        return Ok(false);
    }
    let mut held = Vec::new();
    for k in 0..cfg.max_sessions {
        let f = crate::throttle::open_lock_file(&format!("{base}.s{k}"))?;
        if !try_lock(&f) {
            return Ok(false);
        }
        held.push(f);
    }
    let pid = read_pid(&format!("{base}.pid"));
    if master_alive(pid, &base) {
        let _ = control(
            ssh,
            &[
                "-o".into(),
                format!("ControlPath={base}"),
                "-O".into(),
                "exit".into(),
            ],
            "exit",
        );
        let deadline = Deadline::after_ms(5000);
        while master_alive(pid, &base) && !deadline.expired() {
            deadline.sleep(Duration::from_millis(5));
        }
    }
    if !master_alive(pid, &base) {
        remove_if_socket(&base);
        let _ = std::fs::remove_file(format!("{base}.pid"));
    }
    Ok(true)
}

/// Starts master `m` (its lock held by the caller): `ssh -N` backgrounds itself once the
/// control socket listens; `-O check` then names its pid.
fn start_master(ssh: &Ssh, cfg: &Config, base: &str, deadline: Deadline) -> Result<i32> {
    remove_if_socket(base);
    let _ = std::fs::remove_file(format!("{base}.pid"));
    let enforced = vec![
        "-o".into(),
        "ControlMaster=yes".into(),
        "-o".into(),
        format!("ControlPath={base}"),
        "-o".into(),
        format!("ControlPersist={}", cfg.persist_s),
        "-N".into(),
    ];
    let argv = ssh.argv_tail(&enforced, &[]);
    let (out, stderr) = ssh::run_retrying(ssh, &argv, "shared ssh master", b"", deadline)?;
    // Unknown: a host with SIGCHLD ignored reaped the foreground ssh; `-O check` below tells
    // whether the master came up.
    if !matches!(out.exit, Exit::Code(0) | Exit::Unknown) {
        return Err(Error::new(
            Kind::SshExited,
            format!(
                "cannot start a shared ssh connection to {}: ssh {}{}",
                ssh.destination(),
                out.exit,
                stderr.suffix()
            ),
        ));
    }
    let check = ssh.argv_tail(
        &[
            "-o".into(),
            format!("ControlPath={base}"),
            "-O".into(),
            "check".into(),
        ],
        &[],
    );
    let (out, _) = ssh::run_argv(ssh, &check, "ssh -O check", b"", &mut None, deadline)?;
    let pid = parse_check(&String::from_utf8_lossy(&out.stderr))
        .filter(|&p| master_alive(p, base))
        .ok_or_else(|| {
            Error::new(
                Kind::SshExited,
                format!(
                    "shared ssh connection to {} did not come up: {}",
                    ssh.destination(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )
        })?;
    let tmp = format!("{base}.pid.{}", std::process::id());
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{pid}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, format!("{base}.pid")))
        .map_err(|e| Error::new(Kind::Io, format!("cannot write '{base}.pid': {e}")))?;
    Ok(pid)
}

/// Takes a session on a shared master to `ssh`'s destination, starting the master if needed.
/// `on_start` hears about a master being started (for logs).
pub fn acquire(
    ssh: &Ssh,
    cfg: &Config,
    deadline: Deadline,
    mut on_start: impl FnMut(&str),
) -> Result<Lease> {
    prepare_dir(&cfg.control_dir)?;
    let name = pool_name(&identity(ssh, cfg));
    let dir = &cfg.control_dir;
    let (master, slot) = loop {
        if let Some(got) = take_session(dir, &name, cfg.max_sessions)? {
            break got;
        }
        if deadline.expired() {
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "all {MAX_MASTERS} x {} shared ssh sessions to {} stayed busy until the deadline",
                    cfg.max_sessions,
                    ssh.destination()
                ),
            ));
        }
        deadline.sleep(Duration::from_millis(20));
    };
    let base = format!("{dir}/{name}.{master}");
    let lock = lock_master(&format!("{base}.lock"), deadline)?;
    let mut pid = read_pid(&format!("{base}.pid"));
    let is_socket = std::fs::symlink_metadata(&base).is_ok_and(|m| m.file_type().is_socket());
    if !(is_socket && master_alive(pid, &base)) {
        on_start(&format!(
            "starting shared ssh connection {base} to {}",
            ssh.destination()
        ));
        pid = start_master(ssh, cfg, &base, deadline)?;
    }
    drop(lock);
    Ok(Lease {
        slot: Some(slot),
        cfg: cfg.clone(),
        name,
        master,
        control_path: base,
        master_pid: pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;
    use serde_json::json;

    #[test]
    fn share_option_is_off_by_default_and_accepts_booleans_objects_and_command_line_strings() {
        assert_eq!(Config::from_option(None).unwrap(), None);
        assert_eq!(Config::from_option(Some(&json!(false))).unwrap(), None);
        assert_eq!(Config::from_option(Some(&json!("0"))).unwrap(), None);
        assert_eq!(
            Config::from_option(Some(&json!(true))).unwrap(),
            Some(Config::default())
        );
        assert_eq!(
            Config::from_option(Some(&json!("1"))).unwrap(),
            Some(Config::default())
        );
        let c = Config::from_option(Some(&json!({"control_dir": "/run/x", "persist_s": 5, "max_sessions": "2", "exit_idle": true})))
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            Config {
                control_dir: "/run/x".into(),
                persist_s: 5,
                max_sessions: 2,
                exit_idle: true
            }
        );
        let c = Config::from_option(Some(&json!(r#"{"persist_s": "7"}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(c.persist_s, 7);
    }

    #[test]
    fn bad_share_options_are_refused_naming_the_key() {
        for (v, want) in [
            (json!({"persist_s": 0}), "share.persist_s"),
            (json!({"max_sessions": 0}), "share.max_sessions"),
            (json!({"max_sessions": -1}), "share.max_sessions"),
            (json!({"control_dir": "run/x"}), "share.control_dir"),
            (json!({"control_dir": "/run/../etc"}), "share.control_dir"),
            (
                json!({"control_dir": format!("/{}", "x".repeat(80))}),
                "longer than",
            ),
            (json!({"persist": 5}), "unknown option 'share.persist'"),
            (json!("maybe"), "option 'share'"),
            (json!([1]), "option 'share'"),
        ] {
            let err = Config::from_option(Some(&v)).unwrap_err();
            assert!(err.message.contains(want), "{v}: {}", err.message);
        }
    }

    #[test]
    fn control_dir_is_created_0700_and_bad_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = ScratchDir::new("share-dir");
        let base = scratch.path();
        let dir = base.join("ctl");
        let dir_s = dir.to_str().unwrap();
        prepare_dir(dir_s).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
        // Again: an existing good directory is fine.
        prepare_dir(dir_s).unwrap();

        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_dir(open.to_str().unwrap()).unwrap_err();
        assert!(err.message.contains("its mode is 0755"), "{}", err.message);
        assert_eq!(
            std::fs::symlink_metadata(&open).unwrap().mode() & 0o7777,
            0o755,
            "a refused directory is left as it was"
        );

        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = prepare_dir(link.to_str().unwrap()).unwrap_err();
        assert!(err.message.contains("is a symlink"), "{}", err.message);

        let file = base.join("file");
        std::fs::write(&file, "canary").unwrap();
        let err = prepare_dir(file.to_str().unwrap()).unwrap_err();
        assert!(err.message.contains("not a directory"), "{}", err.message);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "canary");
    }

    #[test]
    fn a_directory_of_another_owner_is_refused() {
        let dir = ScratchDir::new("share-owner");
        let meta = std::fs::symlink_metadata(dir.path()).unwrap();
        let why = dir_problem(&meta, meta.uid().wrapping_add(1)).unwrap();
        assert!(why.contains("owned by uid"), "{why}");
    }

    #[test]
    fn pool_names_are_stable_short_and_differ_by_identity() {
        let a = pool_name(&["ssh".into(), "root@198.18.0.2".into()]);
        assert_eq!(a, pool_name(&["ssh".into(), "root@198.18.0.2".into()]));
        assert_ne!(a, pool_name(&["ssh".into(), "root@198.18.0.3".into()]));
        assert_ne!(
            pool_name(&["ab".into(), "c".into()]),
            pool_name(&["a".into(), "bc".into()])
        );
        assert_eq!(a.len(), 17);
        // The longest control socket ssh binds (with its temporary suffix) fits in sun_path.
        let longest = format!(
            "/{}/{a}.{}",
            "x".repeat(MAX_CONTROL_DIR - 1),
            MAX_MASTERS - 1
        );
        assert!(longest.len() + SSH_TEMP_SUFFIX <= crate::validate::MAX_SOCKET_PATH);
    }

    #[test]
    fn a_master_never_gets_more_than_max_sessions_and_freed_slots_are_reused() {
        let dir = ScratchDir::new("share-pool");
        let d = dir.as_str();
        // flock is per open file description: held slot files act like other processes.
        let mut held = Vec::new();
        for _ in 0..7 {
            held.push(take_session(d, "cx", 3).unwrap().unwrap());
        }
        let masters: Vec<u32> = held.iter().map(|(m, _)| *m).collect();
        assert_eq!(masters, [0, 0, 0, 1, 1, 1, 2]);
        held.remove(1);
        let (m, _f) = take_session(d, "cx", 3).unwrap().unwrap();
        assert_eq!(m, 0, "a freed slot of master 0 is taken first");
    }

    #[test]
    fn check_output_and_fallback_markers_are_recognized() {
        assert_eq!(parse_check("Master running (pid=19731)\r\n"), Some(19731));
        assert_eq!(
            parse_check("Control socket connect(/x): No such file"),
            None
        );
        assert!(fell_back(
            "kex_exchange_identification: Connection closed by remote host\nConnection closed by UNKNOWN port 65535"
        ));
        assert!(forward_refused(
            "mux_client_forward: forwarding request failed: Port forwarding failed"
        ));
        assert!(!fell_back("Permission denied"));
    }

    #[test]
    fn liveness_needs_the_control_path_in_the_command_line() {
        let me = std::process::id() as i32;
        assert!(!master_alive(me, "/run/mtunnel/ssh-ctl/cx.0"));
        assert!(!master_alive(0, "/x"));
    }
}
