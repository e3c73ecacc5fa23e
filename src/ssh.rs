//! The ssh command line, and one-shot remote commands (`qm start`, remote cleanup).

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline, LineDecoder, Read};
use crate::process::{Child, Exit};
use crate::validate;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use serde_json::Value;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// How much of ssh's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// An ssh invocation: the caller's argv prefix (binary, options, `user@host`) plus the options
/// the library always adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    prefix: Vec<String>,
    /// `ConnectTimeout` in seconds (0 = leave ssh's default).
    pub connect_timeout_s: u32,
    /// `ServerAliveInterval` in seconds (0 = off).
    pub server_alive_interval_s: u32,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: u32,
    /// Concurrent handshakes to this destination across processes (0 = no limit).
    pub handshake_slots: u32,
    /// Whether a destination that drops handshakes gets fewer slots for a while (see
    /// [`crate::throttle::Window`]); off: always `handshake_slots`.
    pub adaptive_slots: bool,
    /// How often a connection that failed before authentication is retried at most; the
    /// default ([`UNTIL_DEADLINE`]) retries until the caller's deadline.
    pub connect_retries: u32,
    /// Directory of the handshake slot files.
    pub lock_dir: String,
    /// Cipher preference for the bulk transfer (`-o Ciphers=`); `None` leaves ssh's default.
    pub ciphers: Option<String>,
    /// OpenSSH connection sharing (see [`crate::share`]); `None` = a connection per use.
    pub share: Option<crate::share::Config>,
}

/// `connect_retries` default: a handshake the destination dropped is retried until the
/// caller's deadline (with jittered backoff), not a fixed number of times.
pub(crate) const UNTIL_DEADLINE: u32 = u32::MAX;

/// With AES instructions, AES-GCM moves migration data ~30% faster than OpenSSH's default
/// chacha20-poly1305 (measured by `make bench`); chacha20 stays as the fallback.
const AES_GCM_FIRST: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

fn cpu_has_aes() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "aes"))
        })
        .unwrap_or(false)
}

/// The ssh options of every call that connects (`tunnel_open`, `ssh_run`), beside the
/// call's own options in the same object (so it does not deny unknown fields: the call's own
/// struct does, see [`crate::options::from_value_split`]).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct SshOptions {
    ssh: Option<Vec<String>>,
    connect_timeout_s: Option<u32>,
    server_alive_interval_s: Option<u32>,
    server_alive_count_max: Option<u32>,
    handshake_slots: Option<u32>,
    adaptive_slots: Option<bool>,
    connect_retries: Option<u32>,
    lock_dir: Option<String>,
    ciphers: Option<String>,
    /// Several spellings (see [`crate::share::Config::from_option`]).
    share: Option<Value>,
}

impl Ssh {
    /// Validates a prefix such as `["/usr/bin/ssh", "-o", "HostKeyAlias=node2", "root@198.18.0.2"]`:
    /// at least a binary and a destination, which must not look like an option.
    pub fn new(prefix: Vec<String>) -> Result<Ssh> {
        if prefix.len() < 2 {
            return Err(Error::invalid(
                "ssh prefix needs at least the ssh binary and user@host",
            ));
        }
        validate::destination(prefix.last().unwrap())?;
        Ok(Ssh {
            prefix,
            connect_timeout_s: 10,
            server_alive_interval_s: 15,
            server_alive_count_max: 3,
            // Below sshd's default MaxStartups (10) so that our own handshakes are never dropped.
            handshake_slots: 8,
            adaptive_slots: true,
            connect_retries: UNTIL_DEADLINE,
            lock_dir: crate::throttle::DEFAULT_LOCK_DIR.into(),
            ciphers: cpu_has_aes().then(|| AES_GCM_FIRST.to_string()),
            share: None,
        })
    }

    /// Reads the prefix and the optional keepalive settings from a JSON options object
    /// (other keys are left to the caller).
    #[cfg(test)]
    pub fn from_options(opts: &Value) -> Result<Ssh> {
        Ssh::from_parsed(crate::options::from_value(opts)?)
    }

    /// The ssh invocation the options describe, validated.
    pub(crate) fn from_parsed(o: SshOptions) -> Result<Ssh> {
        let prefix = o
            .ssh
            .ok_or_else(|| Error::invalid("missing option 'ssh' (the ssh argv prefix)"))?;
        let mut ssh = Ssh::new(prefix)?;
        ssh.connect_timeout_s = o.connect_timeout_s.unwrap_or(ssh.connect_timeout_s);
        ssh.server_alive_interval_s = o
            .server_alive_interval_s
            .unwrap_or(ssh.server_alive_interval_s);
        ssh.server_alive_count_max = o
            .server_alive_count_max
            .unwrap_or(ssh.server_alive_count_max);
        ssh.handshake_slots = o.handshake_slots.unwrap_or(ssh.handshake_slots);
        ssh.adaptive_slots = o.adaptive_slots.unwrap_or(ssh.adaptive_slots);
        ssh.connect_retries = o.connect_retries.unwrap_or(ssh.connect_retries);
        if let Some(c) = o.ciphers {
            if c.bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b"-@.,".contains(&b)))
            {
                return Err(Error::invalid(format!(
                    "invalid ciphers '{}': expected a comma-separated cipher list",
                    io::printable(c.as_bytes(), 120)
                )));
            }
            // "" = leave the choice to ssh.
            ssh.ciphers = (!c.is_empty()).then_some(c);
        }
        if let Some(dir) = o.lock_dir {
            validate::socket_dir(&dir).map_err(|_| {
                Error::invalid(format!(
                    "invalid lock_dir '{}': must be an absolute, normalized path",
                    io::printable(dir.as_bytes(), 120)
                ))
            })?;
            ssh.lock_dir = dir;
        }
        ssh.share = crate::share::Config::from_option(o.share.as_ref())?;
        Ok(ssh)
    }

    /// `user@host`, for messages.
    pub fn destination(&self) -> &str {
        self.prefix.last().unwrap()
    }

    /// Waits for a handshake slot to this destination (see [`crate::throttle`]).
    pub fn handshake_slot(&self, deadline: Deadline) -> Result<Option<crate::throttle::Slot>> {
        crate::throttle::acquire(
            &self.lock_dir,
            self.destination(),
            self.handshake_slots,
            self.adaptive_slots,
            deadline,
        )
    }

    /// Whether a failed attempt may be retried, and after how long: only failures before
    /// authentication (no remote command can have run), at most `connect_retries` times (the
    /// caller stops at its deadline). Also feeds the destination's handshake window: a drop
    /// shrinks it, an authenticated connection grows it back.
    pub fn retry_after(
        &self,
        attempt: u32,
        exit: Exit,
        stdout_empty: bool,
        stderr: &Stderr,
    ) -> Option<std::time::Duration> {
        let before_auth = !stderr.authenticated()
            && crate::throttle::failed_before_auth(
                exit == Exit::Code(255),
                stdout_empty,
                &stderr.text(),
            );
        if before_auth && self.adaptive_slots {
            crate::throttle::note_drop(&self.lock_dir, self.destination(), self.handshake_slots);
        } else if stderr.authenticated() {
            self.note_authenticated();
        }
        (before_auth && attempt < self.connect_retries)
            .then(|| crate::throttle::backoff(attempt + 1))
    }

    /// A handshake to this destination got through: its handshake window grows back.
    pub fn note_authenticated(&self) {
        if !self.adaptive_slots {
            return;
        }
        crate::throttle::note_success(&self.lock_dir, self.destination(), self.handshake_slots);
    }

    /// "retry N" or "retry N of M" for the log.
    pub fn retry_label(&self, attempt: u32) -> String {
        if self.connect_retries == UNTIL_DEADLINE {
            format!("retry {attempt}, until the deadline")
        } else {
            format!("retry {attempt} of {}", self.connect_retries)
        }
    }

    /// The full argv. `enforced` options go right after the binary, so they win over the
    /// caller's (ssh keeps the first value of an option); the keepalive defaults go after the
    /// caller's options, so a caller can override them. The remote command is quoted word by
    /// word, because ssh joins it into one string for the remote shell.
    pub fn argv(&self, enforced: &[String], remote: &[String]) -> Vec<String> {
        self.argv_tail(enforced, &["--".into(), validate::shell_join(remote)])
    }

    /// The argv without a remote command: `tail` goes after every option (`-N` masters and
    /// `-O` control commands pass their words in `enforced` and an empty tail).
    pub fn argv_tail(&self, enforced: &[String], tail: &[String]) -> Vec<String> {
        let mut argv = vec![self.prefix[0].clone()];
        // VERBOSE makes ssh say "Authenticated to …": the end of the handshake, and proof
        // that a failure before it ran no remote command. Those lines are filtered out.
        for opt in [
            "-e",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=VERBOSE",
        ] {
            argv.push(opt.into());
        }
        argv.extend(enforced.iter().cloned());
        argv.extend(self.prefix[1..].iter().cloned());
        if self.connect_timeout_s > 0 {
            argv.extend([
                "-o".into(),
                format!("ConnectTimeout={}", self.connect_timeout_s),
            ]);
        }
        if let Some(c) = &self.ciphers {
            argv.extend(["-o".into(), format!("Ciphers={c}")]);
        }
        if self.server_alive_interval_s > 0 {
            argv.extend([
                "-o".into(),
                format!("ServerAliveInterval={}", self.server_alive_interval_s),
            ]);
            argv.extend([
                "-o".into(),
                format!("ServerAliveCountMax={}", self.server_alive_count_max),
            ]);
        }
        argv.extend(tail.iter().cloned());
        argv
    }

    /// Starts ssh with one socket as its stdin and stdout (writes use MSG_NOSIGNAL) and a pipe
    /// as stderr. Returns the child and our ends, both non-blocking.
    pub fn spawn(
        &self,
        enforced: &[String],
        remote: &[String],
    ) -> Result<(Child, OwnedFd, OwnedFd)> {
        if remote.is_empty() {
            return Err(Error::invalid("remote command is empty"));
        }
        self.spawn_argv(&self.argv(enforced, remote))
    }

    /// [`Ssh::spawn`] with a ready-made argv.
    pub fn spawn_argv(&self, argv: &[String]) -> Result<(Child, OwnedFd, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| Error::io("socketpair", e))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe2", e))?;
        // Only our end is non-blocking; ssh gets blocking fds as usual.
        nix::fcntl::fcntl(
            err_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::io("fcntl", e))?;
        nix::fcntl::fcntl(
            theirs.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| Error::io("fcntl", e))?;
        let child = Child::spawn(argv, [theirs.as_fd(), theirs.as_fd(), err_w.as_fd()])
            .map_err(|e| e.context(format!("starting ssh to {}", self.destination())))?;
        Ok((child, ours, err_r))
    }
}

/// ssh's stderr as it arrives: split into lines, ssh's own `LogLevel=VERBOSE` lines taken
/// out (the one saying "Authenticated to" marks the end of the handshake), the last few KiB
/// kept for error messages.
#[derive(Debug, Default)]
pub struct Stderr {
    partial: Vec<u8>,
    tail: std::collections::VecDeque<String>,
    tail_len: usize,
    authenticated: bool,
}

impl Stderr {
    /// Takes freshly read bytes; returns the complete lines that are not ssh's verbose chatter.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=pos).collect();
            if let Some(line) = self.accept(&raw) {
                lines.push(line);
            }
        }
        if self.partial.len() > STDERR_TAIL {
            let raw = std::mem::take(&mut self.partial);
            lines.extend(self.accept(&raw));
        }
        lines
    }

    /// Reads what ssh's stderr pipe `err_r` holds now (it is non-blocking) into the tail;
    /// returns the new complete lines (and the unterminated last one at EOF) and whether the
    /// pipe is at EOF. The one loop that drains ssh's stderr.
    pub(crate) fn drain(&mut self, err_r: BorrowedFd<'_>) -> Result<(Vec<String>, bool)> {
        let mut bytes = Vec::new();
        let eof = loop {
            match io::read_some(err_r, &mut bytes)? {
                Read::Data(_) => {}
                Read::Eof => break true,
                Read::WouldBlock => break false,
            }
        };
        let mut lines = self.push(&bytes);
        if eof {
            lines.extend(self.finish());
        }
        Ok((lines, eof))
    }

    /// Flushes an unterminated last line (at EOF).
    pub fn finish(&mut self) -> Vec<String> {
        let raw = std::mem::take(&mut self.partial);
        self.accept(&raw).into_iter().collect()
    }

    fn accept(&mut self, raw: &[u8]) -> Option<String> {
        let line = String::from_utf8_lossy(raw).trim().to_string();
        if line.starts_with("Authenticated to ") {
            self.authenticated = true;
            return None;
        }
        if line.is_empty()
            || line.starts_with("Transferred: sent ")
            || line.starts_with("Bytes per second: ")
        {
            return None;
        }
        self.tail_len += line.len();
        self.tail.push_back(line.clone());
        while self.tail_len > STDERR_TAIL && self.tail.len() > 1 {
            self.tail_len -= self.tail.pop_front().map_or(0, |l| l.len());
        }
        Some(line)
    }

    /// Whether ssh reported that authentication succeeded (the remote command may run).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The kept lines joined with " | ", empty if there were none.
    pub fn text(&self) -> String {
        self.tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// "; stderr: …" or nothing.
    pub fn suffix(&self) -> String {
        let t = self.text();
        if t.is_empty() {
            String::new()
        } else {
            format!("; stderr: {t}")
        }
    }
}

/// What a one-shot remote command produced.
#[derive(Debug)]
pub struct Output {
    /// How ssh ended (ssh passes the remote command's exit code through; 255 = ssh error).
    pub exit: Exit,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr (both the remote command's and ssh's own).
    pub stderr: Vec<u8>,
}

/// Cap on captured output of a one-shot command.
const MAX_OUTPUT: usize = 4 << 20;

/// Runs `remote` on the destination, feeding `input` on stdin (for secrets: never argv) and
/// collecting output until ssh exits. On deadline, ssh is terminated and reaped. Holds a
/// handshake slot until ssh has authenticated; retries a connection that failed before.
pub fn run(ssh: &Ssh, remote: &[String], input: &[u8], deadline: Deadline) -> Result<Output> {
    if let Some(cfg) = &ssh.share {
        return run_shared(ssh, cfg, remote, input, deadline);
    }
    let what = format!(
        "'{}' on {}",
        validate::shell_join(remote),
        ssh.destination()
    );
    run_retrying(ssh, &ssh.argv(&[], remote), &what, input, deadline).map(|(out, _)| out)
}

/// Runs `argv` to its end ([`run_argv`]), holding a handshake slot until ssh has
/// authenticated, and runs it again after a failure before authentication (see
/// [`Ssh::retry_after`]) while the deadline leaves time for the pause: the one retry loop of
/// one-shot ssh runs. Returns the last run.
pub(crate) fn run_retrying(
    ssh: &Ssh,
    argv: &[String],
    what: &str,
    input: &[u8],
    deadline: Deadline,
) -> Result<(Output, Stderr)> {
    let mut attempt = 0;
    loop {
        let mut slot = ssh.handshake_slot(deadline)?;
        let (out, stderr) = run_argv(ssh, argv, what, input, &mut slot, deadline)?;
        drop(slot);
        match ssh.retry_after(attempt, out.exit, out.stdout.is_empty(), &stderr) {
            Some(pause) if deadline.remaining().is_none_or(|left| left > pause) => {
                attempt += 1;
                std::thread::sleep(pause);
            }
            _ => return Ok((out, stderr)),
        }
    }
}

/// [`run`] through a shared connection: a session slot of the pool for the duration of the
/// command. A client that found its master gone (it exited by its ControlPersist timer just
/// then, or was killed) ran nothing remotely: it is retried on a new master.
fn run_shared(
    ssh: &Ssh,
    cfg: &crate::share::Config,
    remote: &[String],
    input: &[u8],
    deadline: Deadline,
) -> Result<Output> {
    let mut attempt = 0;
    loop {
        let lease = crate::share::acquire(ssh, cfg, deadline, |_| {})?;
        let result = run_with_lease(ssh, &lease, remote, input, deadline);
        let retry = matches!(&result, Ok(out) if out.exit == Exit::Code(255)
            && !lease.alive()
            && crate::share::fell_back(&String::from_utf8_lossy(&out.stderr)));
        lease.release(ssh);
        if retry && attempt < ssh.connect_retries.max(1) && !deadline.expired() {
            attempt += 1;
            continue;
        }
        return result;
    }
}

/// Runs `remote` as a client of the master of `lease` (the caller holds its session slot).
pub fn run_with_lease(
    ssh: &Ssh,
    lease: &crate::share::Lease,
    remote: &[String],
    input: &[u8],
    deadline: Deadline,
) -> Result<Output> {
    let argv = ssh.argv(&lease.client_options(), remote);
    let what = format!(
        "'{}' on {} (shared connection)",
        validate::shell_join(remote),
        ssh.destination()
    );
    run_argv(ssh, &argv, &what, input, &mut None, deadline).map(|(out, _)| out)
}

/// Runs one ssh invocation to its end: `input` on stdin, stdout and stderr collected; on
/// error or deadline ssh is terminated and reaped. `what` names it in errors.
pub fn run_argv(
    ssh: &Ssh,
    argv: &[String],
    what: &str,
    input: &[u8],
    slot: &mut Option<crate::throttle::Slot>,
    deadline: Deadline,
) -> Result<(Output, Stderr)> {
    let (mut child, sock, err_r) = ssh.spawn_argv(argv)?;
    let result = collect(&mut child, &sock, &err_r, input, slot, deadline);
    match result {
        Ok((stdout, stderr_lines, stderr)) => {
            let exit = child
                .wait(deadline.min(Deadline::after_ms(5000)))?
                .ok_or_else(|| {
                    Error::new(
                        Kind::Timeout,
                        format!("ssh for {what} closed its output but did not exit"),
                    )
                })?;
            Ok((
                Output {
                    exit,
                    stdout,
                    stderr: stderr_lines,
                },
                stderr,
            ))
        }
        Err(e) => {
            let _ = child.terminate(Deadline::after_ms(0));
            Err(e.context(format!("running {what}")))
        }
    }
}

fn collect(
    child: &mut Child,
    sock: &OwnedFd,
    err_r: &OwnedFd,
    input: &[u8],
    slot: &mut Option<crate::throttle::Slot>,
    deadline: Deadline,
) -> Result<(Vec<u8>, Vec<u8>, Stderr)> {
    if !input.is_empty() {
        // A remote that exits without reading its input is not our error; its exit code tells.
        let _ = io::send_all(sock.as_fd(), input, deadline);
    }
    let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    let (mut out, mut err_text, mut stderr) = (Vec::new(), Vec::new(), Stderr::default());
    let mut take_err = |lines: Vec<String>| {
        for l in lines {
            if err_text.len() < MAX_OUTPUT {
                err_text.extend_from_slice(l.as_bytes());
                err_text.push(b'\n');
            }
        }
    };
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let mut fds = Vec::new();
        if out_open {
            fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
        }
        if err_open {
            fds.push(PollFd::new(err_r.as_fd(), PollFlags::POLLIN));
        }
        if io::poll(&mut fds, deadline)? == 0 {
            return Err(Error::new(Kind::Timeout, "no result before the deadline"));
        }
        if out_open && io::read_some(sock.as_fd(), &mut out)? == Read::Eof {
            out_open = false;
        }
        if err_open {
            let (lines, eof) = stderr.drain(err_r.as_fd())?;
            err_open = !eof;
            take_err(lines);
            if stderr.authenticated() {
                // The handshake is over: let the next connection to this node start.
                *slot = None;
            }
        }
        if out.len() > MAX_OUTPUT {
            return Err(Error::new(
                Kind::Protocol,
                format!("more than {MAX_OUTPUT} bytes of output"),
            ));
        }
        // A remote process that keeps our pipes open after ssh exits would hang us: stop at exit.
        if child.try_wait()?.is_some() {
            let _ = io::read_some(sock.as_fd(), &mut out);
            let mut lines = stderr.drain(err_r.as_fd()).map_or(Vec::new(), |(l, _)| l);
            lines.extend(stderr.finish());
            take_err(lines);
            break;
        }
    }
    Ok((out, err_text, stderr))
}

/// Helper for callers that treat any non-zero exit as failure: the error names the command,
/// the exit and the stderr tail. Exit 255 is ssh's own failure. A status that the host
/// process reaped itself (`$SIG{CHLD}='IGNORE'`, its own reaper) is unknown, not a failure:
/// the caller still has the output to judge.
pub fn run_checked(
    ssh: &Ssh,
    remote: &[String],
    input: &[u8],
    deadline: Deadline,
) -> Result<Output> {
    let out = run(ssh, remote, input, deadline)?;
    checked(ssh, remote, out)
}

/// The check of [`run_checked`] on an output at hand.
pub fn checked(ssh: &Ssh, remote: &[String], out: Output) -> Result<Output> {
    if matches!(out.exit, Exit::Code(0) | Exit::Unknown) {
        return Ok(out);
    }
    let mut tail = Stderr::default();
    tail.push(&out.stderr);
    let kind = if out.exit == Exit::Code(255) {
        Kind::SshExited
    } else {
        Kind::Remote
    };
    Err(Error::new(
        kind,
        format!(
            "'{}' on {} failed: {}{}",
            validate::shell_join(remote),
            ssh.destination(),
            out.exit,
            tail.suffix()
        ),
    ))
}

/// Reads the next line of a tunnel-style stream, draining ssh's stderr meanwhile (each new
/// line goes to `on_stderr`) and noticing when the child exits. Returns `Ok(None)` on EOF.
pub fn read_line(
    lines: &mut LineDecoder,
    sock: &OwnedFd,
    err_r: &OwnedFd,
    stderr: &mut Stderr,
    child: &mut Child,
    deadline: Deadline,
    mut on_stderr: impl FnMut(&str),
) -> Result<Option<Vec<u8>>> {
    let mut eof = false;
    loop {
        if let Some(line) = lines.next_line()? {
            return Ok(Some(line));
        }
        if eof {
            return Ok(None);
        }
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(err_r.as_fd(), PollFlags::POLLIN),
        ];
        if io::poll(&mut fds, deadline)? == 0 {
            return Err(Error::new(Kind::Timeout, "deadline passed"));
        }
        for l in stderr.drain(err_r.as_fd())?.0 {
            on_stderr(&l);
        }
        if io::read_some(sock.as_fd(), lines.buffer())? == Read::Eof {
            // ssh closed its stdout: it is exiting. Give it a moment so its stderr and exit
            // status make it into the error.
            let _ = child.wait(deadline.min(Deadline::after_ms(2000)));
            stderr.drain(err_r.as_fd())?;
            stderr.finish();
            eof = true;
        }
    }
}

/// The options of `ssh_run` besides the ssh ones.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RunOptions {
    command: Option<Vec<String>>,
    input: String,
    timeout_ms: i64,
    check: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            command: None,
            input: String::new(),
            timeout_ms: 60_000,
            check: true,
        }
    }
}

/// A one-shot remote command as `ssh_run` takes it: `{"ssh": [...], "command": [...],
/// "input": "...", "timeout_ms": N, "check": bool}` plus the ssh options. Returns
/// `{"exit_code", "signal", "stdout", "stderr"}`.
pub fn run_json(opts: &Value) -> Result<Value> {
    let (ssh, o): (SshOptions, RunOptions) = crate::options::from_value_split(opts)?;
    let ssh = Ssh::from_parsed(ssh)?;
    let command = o
        .command
        .ok_or_else(|| Error::invalid("missing option 'command'"))?;
    let (input, deadline) = (o.input, Deadline::after_ms(o.timeout_ms));
    let out = if o.check {
        run_checked(&ssh, &command, input.as_bytes(), deadline)?
    } else {
        run(&ssh, &command, input.as_bytes(), deadline)?
    };
    let (code, signal) = match out.exit {
        Exit::Code(c) => (serde_json::json!(c), Value::Null),
        Exit::Signal(s) => (Value::Null, serde_json::json!(s)),
        Exit::Unknown => (Value::Null, Value::Null),
    };
    Ok(serde_json::json!({
        "exit_code": code,
        "signal": signal,
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Vec<String> {
        [
            "/usr/bin/ssh",
            "-o",
            "HostKeyAlias=node2",
            "root@198.18.0.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn argv_puts_enforced_options_before_the_callers_and_quotes_the_remote_command() {
        let mut ssh = Ssh::new(prefix()).unwrap();
        ssh.ciphers = Some("aes128-gcm@openssh.com".into());
        let argv = ssh.argv(
            &["-o".into(), "ExitOnForwardFailure=yes".into()],
            &["qm".into(), "stop".into(), "$(touch /tmp/x)".into()],
        );
        assert_eq!(
            argv,
            [
                "/usr/bin/ssh",
                "-e",
                "none",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=VERBOSE",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "HostKeyAlias=node2",
                "root@198.18.0.2",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "Ciphers=aes128-gcm@openssh.com",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
                "--",
                "qm stop '$(touch /tmp/x)'"
            ]
        );
    }

    #[test]
    fn prefix_must_end_in_a_destination_that_is_not_an_option() {
        assert!(Ssh::new(vec!["/usr/bin/ssh".into()]).is_err());
        let err = Ssh::new(vec!["/usr/bin/ssh".into(), "-oProxyCommand=sh".into()]).unwrap_err();
        assert!(
            err.message.contains("invalid ssh destination"),
            "{}",
            err.message
        );
    }

    #[test]
    fn ciphers_option_is_checked_and_empty_means_ssh_default() {
        let mut opts = serde_json::json!({"ssh": prefix(), "ciphers": ""});
        assert_eq!(Ssh::from_options(&opts).unwrap().ciphers, None);
        opts["ciphers"] = serde_json::json!("aes256-gcm@openssh.com");
        assert_eq!(
            Ssh::from_options(&opts).unwrap().ciphers.as_deref(),
            Some("aes256-gcm@openssh.com")
        );
        opts["ciphers"] = serde_json::json!("aes; rm -rf /");
        assert!(Ssh::from_options(&opts).is_err());
    }

    #[test]
    fn share_option_is_read_and_a_master_argv_ends_without_a_remote_command() {
        let opts = serde_json::json!({"ssh": prefix(), "share": {"persist_s": 5}});
        let ssh = Ssh::from_options(&opts).unwrap();
        assert_eq!(ssh.share.as_ref().map(|c| c.persist_s), Some(5));
        assert_eq!(
            Ssh::from_options(&serde_json::json!({"ssh": prefix()}))
                .unwrap()
                .share,
            None,
            "sharing is off unless asked for"
        );
        let argv = ssh.argv_tail(&["-O".into(), "check".into()], &[]);
        assert_eq!(argv[7..9], ["-O", "check"]);
        assert!(!argv.contains(&"--".to_string()), "{argv:?}");
        assert!(argv.last().unwrap().starts_with("ServerAliveCountMax="));
    }

    #[test]
    fn keepalive_options_can_be_turned_off() {
        let mut ssh = Ssh::new(prefix()).unwrap();
        ssh.connect_timeout_s = 0;
        ssh.server_alive_interval_s = 0;
        let argv = ssh.argv(&[], &["true".into()]);
        assert!(
            !argv
                .iter()
                .any(|a| a.starts_with("ConnectTimeout") || a.starts_with("ServerAlive")),
            "{argv:?}"
        );
    }

    #[test]
    fn stderr_drops_ssh_verbose_lines_and_notes_authentication() {
        let mut e = Stderr::default();
        assert_eq!(e.push(b"first\r\n\nAuthenticated to 198.18.0.2 ([198.18.0.2]:22) using \"publickey\".\r\nPermission"), vec!["first"]);
        assert!(e.authenticated());
        assert_eq!(
            e.push(b" denied\nTransferred: sent 3488, received 3352 bytes, in 0.1 seconds\n"),
            vec!["Permission denied"]
        );
        assert_eq!(
            e.push(b"Bytes per second: sent 1.0, received 2.0\nlast"),
            Vec::<String>::new()
        );
        assert_eq!(e.finish(), vec!["last"]);
        assert_eq!(e.text(), "first | Permission denied | last");
    }

    #[test]
    fn stderr_keeps_only_the_tail() {
        let mut e = Stderr::default();
        for i in 0..1000 {
            e.push(format!("line {i}\n").as_bytes());
        }
        assert!(e.tail_len <= STDERR_TAIL, "{}", e.tail_len);
        assert!(e.text().ends_with("line 999") && !e.text().contains("line 0 "));
    }

    #[test]
    fn run_collects_output_input_and_exit_code_of_a_fake_ssh() {
        // A stand-in for ssh that runs the remote command locally: enough to test plumbing.
        let dir = crate::scratch::ScratchDir::new("fake-ssh");
        let fake = dir.path().join("ssh");
        std::fs::write(
            &fake,
            "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done; shift; exec sh -c \"$1\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let ssh = Ssh::new(vec![fake.to_str().unwrap().into(), "root@node".into()]).unwrap();
        let out = run(
            &ssh,
            &[
                "sh".into(),
                "-c".into(),
                "read x; echo got $x; echo oops >&2; exit 3".into(),
            ],
            b"secret\n",
            Deadline::after_ms(10_000),
        )
        .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout, b"got secret\n");
        assert_eq!(out.stderr, b"oops\n");
        let err = run_checked(
            &ssh,
            &["sh".into(), "-c".into(), "echo denied >&2; exit 255".into()],
            b"",
            Deadline::after_ms(10_000),
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::SshExited);
        assert!(
            err.message.contains("exit code 255; stderr: denied"),
            "{}",
            err.message
        );
        let err = run(
            &ssh,
            &["sleep".into(), "30".into()],
            b"",
            Deadline::after_ms(200),
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::Timeout);
    }
}
