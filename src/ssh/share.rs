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

use super::command::{SSH_TEMP_SUFFIX, ShareConfig, Ssh, check_dir_name};
use super::run::{run_argv, run_retrying};
use super::throttle::open_lock_file;
use crate::error::{Error, Kind, Result};
use crate::io::{Deadline, poll_until};
use crate::process::Exit;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::time::Duration;

/// How long a lease's end (`-O exit` of an idle master) may take when nobody bounds it.
const RELEASE_TIMEOUT_MS: i64 = 5_000;

/// Masters tried per pool before a user waits for a free session slot.
pub(crate) const MAX_MASTERS: u32 = 64;

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
pub fn identity(ssh: &Ssh, cfg: &ShareConfig) -> Vec<String> {
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
            let f = open_lock_file(&format!("{dir}/{name}.{m}.s{k}"))?;
            if try_lock(&f) {
                return Ok(Some((m, f)));
            }
        }
    }
    Ok(None)
}

/// Whether `pid` is a live ssh master for control socket `ctl`: it holds the socket that
/// listens there. Proven from the socket table, like a forward's readiness, so neither a
/// reused pid nor a stale socket file nor another process's argv can pass for it. ssh binds
/// the socket under a temporary name (`ctl` + `.` + 16 random characters) and then links it
/// to `ctl`; the table shows the name it was bound to.
pub fn master_alive(pid: i32, ctl: &str) -> bool {
    let bound_for_ctl = |p: &str| {
        p == ctl
            || p.strip_prefix(ctl)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|r| {
                    r.len() + 1 == SSH_TEMP_SUFFIX && r.bytes().all(|b| b.is_ascii_alphanumeric())
                })
    };
    pid > 0 && crate::listen::holds_listener(pid, bound_for_ctl).unwrap_or(false)
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
    /// The ssh invocation the master was started with (for `-O` control commands).
    ssh: Ssh,
    cfg: ShareConfig,
    control_path: String,
    master_pid: i32,
    /// The process that took the lease: a forked child that inherited it ends nothing.
    owner: u32,
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
    pub fn cancel_forwards(&self, specs: &[String], deadline: Deadline) -> Result<()> {
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
        control(&self.ssh, &enforced, "cancel forwards", deadline)
    }

    /// Removes what a dead master left behind (its control socket and pid file), unless
    /// another user has started a new master in its place meanwhile.
    pub fn clean_dead_master(&self, deadline: Deadline) {
        if self.alive() {
            return;
        }
        let base = &self.control_path;
        let Ok(_lock) = lock_master(&format!("{base}.lock"), deadline) else {
            return;
        };
        let pid = read_pid(&format!("{base}.pid"));
        if pid == self.master_pid || !master_alive(pid, base) {
            remove_if_socket(base);
            let _ = std::fs::remove_file(format!("{base}.pid"));
        }
    }

    /// Ends the session by `deadline`: frees its slot; with `exit_idle`, stops the master if
    /// no other session uses it. A dead master's files are removed. Dropping a lease ends it
    /// too (within [`RELEASE_TIMEOUT_MS`]), so no path can skip this.
    pub fn release(mut self, deadline: Deadline) {
        self.end(deadline);
    }

    fn end(&mut self, deadline: Deadline) {
        if self.slot.take().is_none() {
            return;
        }
        if !self.alive() {
            self.clean_dead_master(deadline);
            return;
        }
        if self.cfg.exit_idle {
            let base = &self.control_path;
            let _ = exit_if_idle(&self.ssh, base, &self.cfg, deadline);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // In a forked child the flocks are the parent's: only our copy of the fd closes.
        if self.owner != std::process::id() {
            self.slot = None;
            return;
        }
        self.end(Deadline::after_ms(RELEASE_TIMEOUT_MS));
    }
}

/// Runs an `ssh -O …` control command against a master.
fn control(ssh: &Ssh, enforced: &[String], what: &str, deadline: Deadline) -> Result<()> {
    let argv = ssh.argv_tail(enforced, &[]);
    let deadline = deadline.min(Deadline::after_ms(10_000));
    let (out, _) = run_argv(ssh, &argv, what, b"", &mut None, deadline)?;
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
    let f = open_lock_file(path)?;
    poll_until(deadline, Duration::from_millis(5), || {
        Ok(try_lock(&f).then_some(()))
    })?
    .ok_or_else(|| {
        Error::new(
            Kind::Timeout,
            format!("shared ssh master lock '{path}' stayed busy until the deadline"),
        )
    })?;
    Ok(f)
}

fn read_pid(path: &str) -> i32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Stops the master at control socket `base` if no session slot of it is held (`-O exit`),
/// by `deadline`.
fn exit_if_idle(ssh: &Ssh, base: &str, cfg: &ShareConfig, deadline: Deadline) -> Result<bool> {
    let lock = open_lock_file(&format!("{base}.lock"))?;
    if !try_lock(&lock) {
        return Ok(false);
    }
    let mut held = Vec::new();
    for k in 0..cfg.max_sessions {
        let f = open_lock_file(&format!("{base}.s{k}"))?;
        if !try_lock(&f) {
            return Ok(false);
        }
        held.push(f);
    }
    let pid = read_pid(&format!("{base}.pid"));
    if master_alive(pid, base) {
        let exit = [
            "-o".into(),
            format!("ControlPath={base}"),
            "-O".into(),
            "exit".into(),
        ];
        let _ = control(ssh, &exit, "exit", deadline);
        let wait = deadline.min(Deadline::after_ms(5000));
        poll_until(wait, Duration::from_millis(5), || {
            Ok((!master_alive(pid, base)).then_some(()))
        })?;
    }
    if !master_alive(pid, base) {
        remove_if_socket(base);
        let _ = std::fs::remove_file(format!("{base}.pid"));
    }
    Ok(true)
}

/// Starts master `m` (its lock held by the caller): `ssh -N` backgrounds itself once the
/// control socket listens; `-O check` then names its pid.
fn start_master(ssh: &Ssh, cfg: &ShareConfig, base: &str, deadline: Deadline) -> Result<i32> {
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
    let (out, stderr) = run_retrying(ssh, &argv, "shared ssh master", b"", deadline)?;
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
    let (out, _) = run_argv(ssh, &check, "ssh -O check", b"", &mut None, deadline)?;
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
    cfg: &ShareConfig,
    deadline: Deadline,
    mut on_start: impl FnMut(&str),
) -> Result<Lease> {
    prepare_dir(&cfg.control_dir)?;
    let name = pool_name(&identity(ssh, cfg));
    let dir = &cfg.control_dir;
    let (master, slot) = poll_until(deadline, Duration::from_millis(20), || {
        take_session(dir, &name, cfg.max_sessions)
    })?
    .ok_or_else(|| {
        Error::new(
            Kind::Timeout,
            format!(
                "all {MAX_MASTERS} x {} shared ssh sessions to {} stayed busy until the deadline",
                cfg.max_sessions,
                ssh.destination()
            ),
        )
    })?;
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
        ssh: ssh.clone(),
        cfg: cfg.clone(),
        control_path: base,
        master_pid: pid,
        owner: std::process::id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;
    use crate::ssh::command::MAX_CONTROL_DIR;

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
    fn a_master_is_alive_only_while_it_holds_the_listening_control_socket() {
        let scratch = ScratchDir::new("share-alive");
        let ctl = scratch.path().join("c0123.0");
        let ctl_s = ctl.to_str().unwrap();
        let me = std::process::id() as i32;
        assert!(!master_alive(me, ctl_s), "no socket yet");
        let listener = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
        assert!(
            master_alive(me, ctl_s),
            "we hold the listening control socket"
        );
        // A process that merely names the path in its argv is no master (pid 1 holds no such
        // socket), and neither is a pid that does not exist.
        assert!(!master_alive(1, ctl_s));
        assert!(!master_alive(0, ctl_s));
        drop(listener);
        assert!(ctl.exists(), "the stale socket file stays");
        assert!(!master_alive(me, ctl_s), "a stale socket file is no master");
        // As ssh does it: bound under a temporary name, then linked to the control path.
        std::fs::remove_file(&ctl).unwrap();
        let temp = scratch.path().join("c0123.0.AbCdEfGh12345678");
        let listener = std::os::unix::net::UnixListener::bind(&temp).unwrap();
        std::fs::hard_link(&temp, &ctl).unwrap();
        std::fs::remove_file(&temp).unwrap();
        assert!(
            master_alive(me, ctl_s),
            "a master that bound a temporary name is alive"
        );
        let other = scratch.path().join("c0123.0.lock");
        assert!(!master_alive(me, other.to_str().unwrap()));
        drop(listener);
    }

    #[test]
    fn dropping_a_lease_of_a_dead_master_removes_its_files() {
        let scratch = ScratchDir::new("share-drop");
        let base = scratch.path().join("c0123456789abcdef.0");
        let base_s = base.to_str().unwrap().to_string();
        // A master that died: its socket file and pid file stay, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&base).unwrap());
        let dead_pid = i32::MAX;
        std::fs::write(format!("{base_s}.pid"), format!("{dead_pid}\n")).unwrap();
        let slot = open_lock_file(&format!("{base_s}.s0")).unwrap();
        assert!(try_lock(&slot));
        let lease = Lease {
            slot: Some(slot),
            ssh: Ssh::new(vec!["ssh".into(), "root@198.18.0.2".into()]).unwrap(),
            cfg: ShareConfig::default(),
            control_path: base_s.clone(),
            master_pid: dead_pid,
            owner: std::process::id(),
        };
        // An early return drops the lease without calling release.
        drop(lease);
        assert!(!base.exists(), "the dead master's control socket was left");
        assert!(
            !std::path::Path::new(&format!("{base_s}.pid")).exists(),
            "the dead master's pid file was left"
        );
        let again = open_lock_file(&format!("{base_s}.s0")).unwrap();
        assert!(try_lock(&again), "the session slot is still held");
    }
}
