//! The migration tunnel: `ssh … -L SOCK:SOCK … qm mtunnel`, its greeting, readiness, v1
//! commands and a staged close.

pub mod protocol;
pub(crate) mod sockfile;

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline, LineDecoder, printable};
use crate::listen;
use crate::log::{Level, Log};
use crate::options;
use crate::process::{Child, Exit};
use crate::ssh::{self, Lease, Route, Ssh, Stderr, share};
use crate::validate;
use nix::poll::{PollFd, PollFlags};
use serde_json::{Value, json};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Tunnel lines are short; anything longer is garbage.
const MAX_LINE: usize = 4096;

/// One `-L` forward: a UNIX socket (PVE's secure migration) or a TCP port (PVE's legacy
/// path: a target that answers `tcp:localhost:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Forward {
    /// `-L LOCAL:REMOTE`, both UNIX socket paths.
    Unix {
        /// Where ssh listens on this node.
        local: String,
        /// The socket ssh connects to on the target node.
        remote: String,
    },
    /// `-L localhost:PORT:HOST:HOST_PORT`: ssh listens on this node's loopback addresses only
    /// (whatever `GatewayPorts` says), and connects to HOST:HOST_PORT on the target, HOST
    /// being the target's own loopback.
    Tcp {
        /// The local port.
        port: u16,
        /// `localhost`, `127.0.0.1` or `[::1]`, as given.
        host: String,
        /// The port on the target.
        host_port: u16,
    },
}

/// The targets a TCP forward may name: the target node's own loopback, as PVE's legacy path
/// (`PORT:localhost:PORT`) does. Never another host: the tunnel is no general relay.
const TCP_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// A TCP port as ssh takes it: 1-65535, decimal digits, no sign or leading zero.
fn tcp_port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|p| *p > 0)
}

impl Forward {
    /// Parses `PATH` (the same path on both nodes, as PVE forwards migration sockets) or
    /// `LOCAL:REMOTE`, both validated against `socket_dir`; or a TCP forward to the target's
    /// loopback, `PORT:localhost:HOST_PORT` (PVE's legacy path; also `127.0.0.1` or `[::1]`).
    /// Anything else is refused, naming the spec.
    pub(crate) fn parse(spec: &str, socket_dir: &str) -> Result<Forward> {
        let shown = printable(spec.as_bytes(), 120);
        if !spec.starts_with('/') {
            return Self::parse_tcp(spec).ok_or_else(|| {
                Error::invalid(format!(
                    "unsupported forward '{shown}': expected a UNIX socket forward ('PATH' or 'LOCAL_PATH:REMOTE_PATH') or a TCP forward to the target's loopback ('PORT:localhost:PORT')"
                ))
            });
        }
        let (local, remote) = spec.split_once(':').unwrap_or((spec, spec));
        if !remote.starts_with('/') || remote.contains(':') {
            return Err(Error::invalid(format!(
                "unsupported forward '{shown}': a UNIX socket forward is 'PATH' or 'LOCAL_PATH:REMOTE_PATH'"
            )));
        }
        validate::socket_path(local, socket_dir)?;
        validate::socket_path(remote, socket_dir)?;
        Ok(Forward::Unix {
            local: local.into(),
            remote: remote.into(),
        })
    }

    /// `PORT:HOST:HOST_PORT` with HOST one of [`TCP_HOSTS`].
    fn parse_tcp(spec: &str) -> Option<Forward> {
        let (port, rest) = spec.split_once(':')?;
        let (host, host_port) = rest.rsplit_once(':')?;
        Some(Forward::Tcp {
            port: tcp_port(port)?,
            host: TCP_HOSTS.contains(&host).then(|| host.to_string())?,
            host_port: tcp_port(host_port)?,
        })
    }

    /// The `-L` argument. A TCP forward names its bind address: `localhost` makes ssh listen on
    /// the loopback addresses even where `ssh_config` says `GatewayPorts yes`.
    fn spec(&self) -> String {
        match self {
            Forward::Unix { local, remote } => format!("{local}:{remote}"),
            Forward::Tcp {
                port,
                host,
                host_port,
            } => format!("localhost:{port}:{host}:{host_port}"),
        }
    }

    /// As given: one path when both ends are the same; a TCP forward as `PORT:HOST:PORT`.
    fn shown(&self) -> String {
        match self {
            Forward::Unix { local, remote } if local == remote => local.clone(),
            Forward::Unix { local, remote } => format!("{local}:{remote}"),
            Forward::Tcp {
                port,
                host,
                host_port,
            } => format!("{port}:{host}:{host_port}"),
        }
    }

    /// Where ssh listens, for messages: the socket path, or `localhost:PORT`.
    fn listen_shown(&self) -> String {
        match self {
            Forward::Unix { local, .. } => local.clone(),
            Forward::Tcp { port, .. } => format!("localhost:{port}"),
        }
    }

    /// The local socket file, for a UNIX socket forward.
    fn local_socket(&self) -> Option<&str> {
        match self {
            Forward::Unix { local, .. } => Some(local),
            Forward::Tcp { .. } => None,
        }
    }

    /// The target's socket file, for a UNIX socket forward.
    fn remote_socket(&self) -> Option<&str> {
        match self {
            Forward::Unix { remote, .. } => Some(remote),
            Forward::Tcp { .. } => None,
        }
    }

    /// Whether two forwards listen at the same place on this node.
    fn same_listener(&self, other: &Forward) -> bool {
        match (self, other) {
            (Forward::Unix { local: a, .. }, Forward::Unix { local: b, .. }) => a == b,
            (Forward::Tcp { port: a, .. }, Forward::Tcp { port: b, .. }) => a == b,
            _ => false,
        }
    }

    /// Whether process `pid` listens for this forward (never by connecting): a listening
    /// socket at the path, or on the port, held by `pid`.
    fn held_by(&self, pid: i32) -> Result<bool> {
        match self {
            Forward::Unix { local, .. } => listen::is_listening(local, pid),
            Forward::Tcp { port, .. } => Ok(listen::tcp_port(*port, pid)?.held()),
        }
    }

    /// Whether the forward is ready: listening and held by process `pid`, and, for a TCP
    /// port, no other process listens on that port at a loopback or wildcard address (a
    /// connection to `localhost:PORT` could reach it instead of the tunnel). `Err` for that
    /// conflict, which waiting does not resolve.
    fn ready(&self, pid: i32) -> Result<bool> {
        let Forward::Tcp { port, .. } = self else {
            return self.held_by(pid);
        };
        let state = listen::tcp_port(*port, pid)?;
        if let Some(other) = state.foreign.first() {
            return Err(Error::new(
                Kind::Io,
                format!(
                    "forward {}: another process listens on {} too (socket inode {}), so a connection to localhost:{port} may not reach the tunnel",
                    self.shown(),
                    other.0,
                    other.1
                ),
            ));
        }
        Ok(state.held())
    }
}

/// Removes the sockets among its arguments on the target; prints any other file found at one
/// of those paths (kept) and exits 75 then. Used at the end of the tunnel's remote command
/// and, when that did not run to its end, by a separate connection at close.
const SOCKET_CLEANUP: &str = "kept=; for p; do if [ -S \"$p\" ]; then rm -f -- \"$p\"; elif [ -e \"$p\" ] || [ -L \"$p\" ]; then echo \"$p\"; kept=1; fi; done; [ -z \"$kept\" ] || exit 75";

/// The command the tunnel runs on the target: the caller's, then (when it has forwards and the
/// command ended with 0, as `qm mtunnel` does after `quit`) the removal of the forwards'
/// remote sockets, in the same session, so a normal close needs no second ssh connection.
/// A command that failed or was killed leaves the sockets alone: the migration may still be
/// using the forwards (the ssh client lives on while forwarded connections are open), and
/// close's separate cleanup comes after it. Exit status: the command's, or 75 when a
/// non-socket was kept (then close's separate cleanup names it).
fn remote_command(command: &[String], forwards: &[Forward]) -> Vec<String> {
    let remote = unique(forwards.iter().filter_map(Forward::remote_socket));
    if remote.is_empty() {
        return command.to_vec();
    }
    let paths: Vec<String> = remote.iter().map(|p| validate::shell_quote(p)).collect();
    let script = format!(
        "\"$@\"; rc=$?; [ $rc = 0 ] || exit $rc; set -- {}; {SOCKET_CLEANUP}",
        paths.join(" ")
    );
    ["sh", "-c", &script, "sh"]
        .iter()
        .map(|s| s.to_string())
        .chain(command.iter().cloned())
        .collect()
}

/// What `tunnel_open` takes.
#[derive(Debug, Clone)]
pub(crate) struct OpenOptions {
    /// The ssh invocation (prefix and keepalive settings).
    pub(crate) ssh: Ssh,
    /// UNIX socket and TCP forwards; may be empty (command-only tunnel).
    pub(crate) forwards: Vec<Forward>,
    /// Remote command, default `qm mtunnel`.
    pub(crate) command: Vec<String>,
    /// Directory the forwards must live in.
    pub(crate) socket_dir: String,
    /// Deadline for `tunnel online` (PVE: 60 s).
    pub(crate) greeting_timeout_ms: i64,
    /// Deadline for `ver N` after the greeting (PVE: 10 s).
    pub(crate) version_timeout_ms: i64,
    /// The remote command removes the forwards' sockets when it ends (see
    /// [`remote_command`]); off: only close's separate connection does (a target whose ssh
    /// runs nothing but the command itself, e.g. a forced command).
    pub(crate) cleanup_in_command: bool,
}

impl OpenOptions {
    /// Reads and validates the JSON options of `tunnel_open`.
    pub(crate) fn from_json(opts: &Value) -> Result<OpenOptions> {
        let (ssh, o): (ssh::SshOptions, OpenJson) = options::from_value_split(opts)?;
        let ssh = Ssh::from_parsed(ssh)?;
        let socket_dir = o.socket_dir;
        validate::socket_dir(&socket_dir)?;
        let mut forwards: Vec<Forward> = Vec::new();
        for spec in o.forwards {
            let f = Forward::parse(&spec, &socket_dir)?;
            // Every disk of a VM reports the same NBD socket; ssh must get each -L once.
            match forwards.iter().find(|g| g.same_listener(&f)) {
                Some(g) if *g == f => {}
                Some(g) => {
                    return Err(Error::invalid(format!(
                        "forwards '{}' and '{}' listen on the same local {}",
                        g.shown(),
                        f.shown(),
                        if f.local_socket().is_some() {
                            "socket"
                        } else {
                            "port"
                        }
                    )));
                }
                None => forwards.push(f),
            }
        }
        let command = o.command;
        if command.is_empty() {
            return Err(Error::invalid("option 'command' must not be empty"));
        }
        Ok(OpenOptions {
            ssh,
            forwards,
            command,
            socket_dir,
            greeting_timeout_ms: o.greeting_timeout_ms,
            version_timeout_ms: o.version_timeout_ms,
            cleanup_in_command: o.cleanup_in_command,
        })
    }
}

/// The options of `tunnel_open` besides the ssh ones.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct OpenJson {
    forwards: Vec<String>,
    command: Vec<String>,
    socket_dir: String,
    greeting_timeout_ms: i64,
    version_timeout_ms: i64,
    cleanup_in_command: bool,
}

impl Default for OpenJson {
    fn default() -> Self {
        OpenJson {
            forwards: Vec::new(),
            command: vec!["qm".into(), "mtunnel".into()],
            socket_dir: validate::DEFAULT_SOCKET_DIR.into(),
            greeting_timeout_ms: 60_000,
            version_timeout_ms: 10_000,
            cleanup_in_command: true,
        }
    }
}

/// What `tunnel_close` takes.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CloseOptions {
    /// Deadline for the reply to `quit`.
    pub(crate) quit_timeout_ms: i64,
    /// How long ssh may take to exit after `quit` before it is sent SIGTERM (then SIGKILL).
    pub(crate) exit_timeout_ms: i64,
    /// Also remove leftover socket files on the remote node (one more ssh connection).
    pub(crate) remote_cleanup: bool,
    /// Deadline of that remote cleanup. Short by default, because closing on drop
    /// (`tunnel_free`, Perl's `DESTROY`) must not hang on an unreachable node.
    pub(crate) cleanup_timeout_ms: i64,
    /// Protocol v2 only: `quit` asks the remote to clean up (`{"cmd":"quit","cleanup":true}`).
    pub(crate) cleanup: bool,
    /// More socket paths to remove on both nodes (PVE's `$tunnel->{unix_sockets}`), besides
    /// the forwards; validated like forwards, and only ever removed if they are sockets.
    pub(crate) cleanup_sockets: Vec<String>,
}

impl Default for CloseOptions {
    fn default() -> Self {
        CloseOptions {
            quit_timeout_ms: 10_000,
            exit_timeout_ms: 5_000,
            remote_cleanup: true,
            cleanup_timeout_ms: 5_000,
            cleanup: false,
            cleanup_sockets: Vec::new(),
        }
    }
}

impl CloseOptions {
    /// Reads the JSON options of `tunnel_close`.
    pub(crate) fn from_json(opts: &Value) -> Result<CloseOptions> {
        options::from_value(opts)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Started,
    Online,
    Greeted,
    Ready,
    Closed,
}

/// One ssh tunnel to a target node.
pub(crate) struct Tunnel {
    opts: OpenOptions,
    /// ExitOnForwardFailure and the `-L` forwards (a shared tunnel adds its client options).
    enforced: Vec<String>,
    /// A connection of its own, or a session on a shared master (`share` option) that holds
    /// the forwards.
    route: Route,
    child: Child,
    /// Held from spawn until `tunnel online` proves the handshake is over.
    slot: Option<ssh::throttle::Slot>,
    attempt: u32,
    sock: Option<OwnedFd>,
    stderr: OwnedFd,
    lines: LineDecoder,
    tail: Stderr,
    state: State,
    version: Option<u32>,
    /// The command ssh runs remotely (see [`remote_command`]).
    remote: Vec<String>,
    /// Why the remote cleanup failed at close, if it did (a warning: see `close`).
    cleanup_warning: Option<String>,
    log: Log,
}

impl Tunnel {
    /// Validates the forwards, clears stale sockets and starts ssh. Does not wait for the
    /// greeting: that is [`Tunnel::wait_ready`], so the caller can do other work meanwhile.
    pub(crate) fn open(opts: OpenOptions, mut log: Log) -> Result<Tunnel> {
        let deadline = Deadline::after_ms(opts.greeting_timeout_ms);
        // From here on, an early return releases the route (a lease ends when dropped).
        let route = Self::route(&opts, deadline, &mut log)?;
        for path in opts.forwards.iter().filter_map(Forward::local_socket) {
            if sockfile::prepare(path)? {
                log.emit(Level::Info, &format!("removed stale socket {path}"));
            }
        }
        let mut enforced = vec!["-o".into(), "ExitOnForwardFailure=yes".into()];
        for f in &opts.forwards {
            enforced.extend(["-L".to_string(), f.spec()]);
        }
        let full = Self::full_enforced(&route, &enforced);
        let remote = if opts.cleanup_in_command {
            remote_command(&opts.command, &opts.forwards)
        } else {
            opts.command.clone()
        };
        let argv = opts.ssh.argv(&full, &remote);
        log.emit(
            Level::Debug,
            &format!(
                "starting {}",
                argv.iter()
                    .map(|a| validate::shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        let slot = route.handshake_slot(&opts.ssh, deadline)?;
        let (child, sock, stderr) = opts.ssh.spawn(&full, &remote)?;
        Ok(Tunnel {
            opts,
            enforced,
            route,
            child,
            slot,
            attempt: 0,
            sock: Some(sock),
            stderr,
            lines: LineDecoder::new(MAX_LINE),
            tail: Stderr::default(),
            state: State::Started,
            version: None,
            remote,
            cleanup_warning: None,
            log,
        })
    }

    /// Chooses the route (see [`Route::choose`]). On a shared master, a forward of ours that
    /// the master still listens on (left by a client that was killed before it could cancel
    /// it) is cancelled first: the master would otherwise answer "OK" to our `-L` without
    /// binding the path again.
    fn route(opts: &OpenOptions, deadline: Deadline, log: &mut Log) -> Result<Route> {
        let route = Route::choose(&opts.ssh, deadline, |m| log.emit(Level::Info, m))?;
        let Some(lease) = route.lease() else {
            return Ok(route);
        };
        let stale: Vec<String> = opts
            .forwards
            .iter()
            .filter(|f| f.held_by(lease.master_pid()).unwrap_or(false))
            .map(Forward::spec)
            .collect();
        if !stale.is_empty() {
            log.emit(
                Level::Info,
                &format!(
                    "cancelling stale forwards {} in shared ssh master (pid {})",
                    stale.join(" "),
                    lease.master_pid()
                ),
            );
            lease.cancel_forwards(&stale, deadline)?;
        }
        log.emit(
            Level::Debug,
            &format!(
                "using shared ssh connection {} (master pid {})",
                lease.control_path(),
                lease.master_pid()
            ),
        );
        Ok(route)
    }

    fn full_enforced(route: &Route, enforced: &[String]) -> Vec<String> {
        let mut full = route.client_options();
        full.extend(enforced.iter().cloned());
        full
    }

    /// Starts ssh again after a connection that failed before authentication (or, shared,
    /// after a client that found its master gone: then on a new master).
    fn respawn(&mut self, deadline: Deadline) -> Result<()> {
        let old = std::mem::replace(&mut self.route, Route::Direct);
        old.release(deadline);
        self.route = Self::route(&self.opts, deadline, &mut self.log)?;
        self.slot = self.route.handshake_slot(&self.opts.ssh, deadline)?;
        let full = Self::full_enforced(&self.route, &self.enforced);
        let (child, sock, stderr) = self.opts.ssh.spawn(&full, &self.remote)?;
        self.child = child;
        self.sock = Some(sock);
        self.stderr = stderr;
        self.lines = LineDecoder::new(MAX_LINE);
        self.tail = Stderr::default();
        Ok(())
    }

    /// Shared only: whether a failed client ran nothing remotely because its master is gone,
    /// so that it may be retried on a new master.
    fn master_vanished_before_start(&self) -> bool {
        let text = self.tail.text();
        self.route.lease().is_some_and(|l| !l.alive())
            && share::fell_back(&text)
            && !share::forward_refused(&text)
            && self.lines.pending().is_empty()
    }

    /// Reads `tunnel online`, retrying ssh when it failed before authentication (as under
    /// sshd's MaxStartups); a retry is safe then, since no remote command ran.
    fn wait_online(&mut self, deadline: Deadline) -> Result<Vec<u8>> {
        loop {
            let err = match self.line(deadline, "'tunnel online'") {
                Ok(line) => {
                    self.slot = None;
                    if self.route.lease().is_none() {
                        self.opts.ssh.note_authenticated();
                    }
                    return Ok(line);
                }
                Err(e) => e,
            };
            self.slot = None;
            let exit = match (err.kind, self.child.try_wait()?) {
                (Kind::SshExited, Some(exit)) => exit,
                _ => return Err(err),
            };
            let pause = if self.route.lease().is_some() {
                if !(self.master_vanished_before_start()
                    && self.attempt < self.opts.ssh.connect_retries.max(1))
                {
                    return Err(err);
                }
                std::time::Duration::ZERO
            } else {
                match self.opts.ssh.retry_after(
                    self.attempt,
                    exit,
                    self.lines.pending().is_empty(),
                    self.tail.authenticated(),
                    &self.tail.text(),
                ) {
                    Some(p) if deadline.remaining().is_none_or(|left| left > p) => p,
                    _ => return Err(err),
                }
            };
            self.attempt += 1;
            self.log.emit(
                Level::Warn,
                &format!(
                    "{err}; retrying in {} ms ({})",
                    pause.as_millis(),
                    self.opts.ssh.retry_label(self.attempt)
                ),
            );
            std::thread::sleep(pause);
            self.respawn(deadline)?;
        }
    }

    /// The process that holds the forwards' listening sockets: the shared master, or our ssh.
    fn holder_pid(&self) -> i32 {
        self.route
            .lease()
            .map_or(self.child.pid(), Lease::master_pid)
    }

    /// State, pid, version and forwards as JSON.
    pub(crate) fn status(&self) -> Value {
        let state = match self.state {
            State::Started => "started",
            State::Online => "online",
            State::Greeted => "greeted",
            State::Ready => "ready",
            State::Closed => "closed",
        };
        let forwards: Vec<String> = self.opts.forwards.iter().map(Forward::shown).collect();
        json!({"state": state, "pid": self.child.pid(), "version": self.version, "forwards": forwards,
               "master_pid": self.route.lease().map(Lease::master_pid),
               "control_path": self.route.lease().map(Lease::control_path),
               "cleanup_warning": self.cleanup_warning})
    }

    fn dest(&self) -> &str {
        self.opts.ssh.destination()
    }

    /// Reads one line; maps EOF and timeouts to errors that say what we were waiting for.
    fn line(&mut self, deadline: Deadline, waiting_for: &str) -> Result<Vec<u8>> {
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Closed, "tunnel is closed"))?;
        let started = std::time::Instant::now();
        let log = &mut self.log;
        let got = ssh::read_line(
            &mut self.lines,
            sock,
            &self.stderr,
            &mut self.tail,
            &mut self.child,
            deadline,
            |l| log.emit(Level::Warn, &format!("ssh: {l}")),
        );
        match got {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(self.exited(&format!("waiting for {waiting_for}"))),
            Err(e) if e.kind == Kind::Timeout => Err(Error::new(
                Kind::Timeout,
                format!(
                    "no reply from tunnel to {} within {} ms while waiting for {waiting_for}{}",
                    self.dest(),
                    started.elapsed().as_millis(),
                    self.tail.suffix()
                ),
            )),
            Err(e) => Err(e.context(format!("tunnel to {}", self.dest()))),
        }
    }

    fn exited(&mut self, during: &str) -> Error {
        let how = match self.child.try_wait() {
            Ok(Some(exit)) => exit.to_string(),
            _ => "closed its output".into(),
        };
        if let Some(l) = self.route.lease().filter(|l| !l.alive()) {
            return Error::new(
                Kind::SshExited,
                format!(
                    "shared ssh connection to {} is gone (master pid {} exited; control socket {}); its client ssh {how} while {during}{}",
                    self.dest(),
                    l.master_pid(),
                    l.control_path(),
                    self.tail.suffix()
                ),
            );
        }
        Error::new(
            Kind::SshExited,
            format!(
                "ssh to {} {how} while {during}{}",
                self.dest(),
                self.tail.suffix()
            ),
        )
    }

    /// Reads `tunnel online` and `ver N`, each with its own deadline, capped by `overall`.
    fn greet(&mut self, overall: Deadline) -> Result<()> {
        if self.state == State::Closed {
            return Err(Error::new(Kind::Closed, "tunnel is closed"));
        }
        if self.state == State::Started {
            let line =
                self.wait_online(overall.min(Deadline::after_ms(self.opts.greeting_timeout_ms)))?;
            protocol::online(&line)?;
            self.state = State::Online;
        }
        if self.state == State::Online {
            let line = self
                .line(
                    overall.min(Deadline::after_ms(self.opts.version_timeout_ms)),
                    "'ver N'",
                )
                .map_err(|e| match e.kind {
                    // PVE's words, with ssh's reason after them.
                    Kind::SshExited => Error::new(
                        Kind::SshExited,
                        format!("failed to receive tunnel version string ({})", e.message),
                    ),
                    _ => e,
                })?;
            let ver = protocol::version(&line)?;
            self.version = Some(ver);
            self.state = State::Greeted;
            self.log.emit(Level::Info, &format!("ssh tunnel ver {ver}"));
        }
        Ok(())
    }

    /// Waits for the greeting and until every forward is a listening socket held by our ssh.
    pub(crate) fn wait_ready(&mut self, timeout_ms: i64) -> Result<()> {
        let overall = Deadline::after_ms(timeout_ms);
        self.greet(overall)?;
        if self.state >= State::Ready {
            return Ok(());
        }
        // ssh binds -L before it opens the session, so this normally holds at once.
        for i in 0..self.opts.forwards.len() {
            loop {
                let forward = &self.opts.forwards[i];
                let at = forward.listen_shown();
                if forward.ready(self.holder_pid())? {
                    break;
                }
                let master_gone = self.route.lease().is_some_and(|l| !l.alive());
                if master_gone || self.child.try_wait()?.is_some() {
                    let what = format!("waiting for forward {at} to listen");
                    return Err(self.exited(&what));
                }
                if overall.expired() {
                    return Err(Error::new(
                        Kind::Timeout,
                        format!(
                            "forward {at} is not a listening socket of ssh (pid {}) within {timeout_ms} ms",
                            self.holder_pid()
                        ),
                    ));
                }
                let mut fds = [PollFd::new(self.child.pidfd(), PollFlags::POLLIN)];
                io::poll(&mut fds, overall.min(Deadline::after_ms(10)))?;
            }
        }
        self.state = State::Ready;
        Ok(())
    }

    /// Sends one command and checks its reply. Protocol v1: a command line (`resume VMID`,
    /// `quit`), the reply must be `OK`. Protocol v2: a JSON object with `cmd` (a bare word is
    /// sent as `{"cmd": WORD}`), the reply is a JSON object whose `success` must be true; it is
    /// returned as sent.
    pub(crate) fn command(&mut self, cmd: &str, timeout_ms: i64) -> Result<String> {
        self.command_by(cmd, Deadline::after_ms(timeout_ms))
    }

    /// [`Tunnel::command`] with a deadline.
    fn command_by(&mut self, cmd: &str, deadline: Deadline) -> Result<String> {
        protocol::command(cmd)?;
        self.greet(deadline)?;
        let v2 = self.version.is_some_and(|v| v >= 2);
        let line = if v2 {
            protocol::v2_request(cmd)?
        } else {
            cmd.to_string()
        };
        let sock = self
            .sock
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Closed, "tunnel is closed"))?;
        if let Err(e) = io::send_all(sock.as_fd(), format!("{line}\n").as_bytes(), deadline) {
            let _ = self.child.wait(Deadline::after_ms(500));
            return Err(match e.kind {
                Kind::Timeout => Error::new(
                    Kind::Timeout,
                    format!("writing '{line}' to tunnel to {} timed out", self.dest()),
                ),
                _ => self.exited(&format!("writing '{line}'")),
            });
        }
        let reply = self.line(deadline, &format!("the reply to '{line}'"))?;
        if v2 {
            protocol::v2_reply(&reply, &line)
        } else {
            protocol::reply(&reply, cmd)
        }
    }

    /// Reads the next line the remote sends (after the greeting), without sending anything.
    /// EOF is an error of kind [`Kind::SshExited`].
    pub(crate) fn read_line(&mut self, timeout_ms: i64) -> Result<String> {
        let deadline = Deadline::after_ms(timeout_ms);
        self.greet(deadline)?;
        let line = self.line(deadline, "a line")?;
        String::from_utf8(line).map_err(|e| {
            Error::new(
                Kind::Protocol,
                format!(
                    "tunnel to {} sent a line that is not UTF-8: '{}'",
                    self.dest(),
                    printable(e.as_bytes(), 200)
                ),
            )
        })
    }

    /// Closes in stages: `quit` and its reply, EOF, wait for exit, SIGTERM, SIGKILL; reaps
    /// ssh, removes the local socket files and, if asked, the remote ones. Idempotent. In a
    /// forked child (the handle was inherited) it only lets go of its fds.
    pub(crate) fn close(&mut self, opts: &CloseOptions) -> Result<()> {
        self.close_by(opts, Deadline::never())
    }

    /// [`Tunnel::close`], each step of it that waits for the network or ssh cut short at
    /// `overall`. Killing and reaping ssh and removing the local sockets are done whatever
    /// time is left.
    pub(crate) fn close_by(&mut self, opts: &CloseOptions, overall: Deadline) -> Result<()> {
        if self.state == State::Closed {
            return Ok(());
        }
        if !self.child.owned_here() {
            self.let_go();
            return Ok(());
        }
        self.slot = None;
        let mut errors = Vec::new();
        let extra = self.cleanup_sockets(opts, &mut errors);
        let greeted = self.state >= State::Greeted;
        if greeted {
            self.quit(opts, overall, &mut errors);
        }
        let remote_done = self.stop_ssh(opts, overall, &mut errors);
        self.state = State::Closed;
        self.cancel_shared_forwards(overall, &mut errors);
        self.remove_local_sockets(&extra, &mut errors);
        if opts.remote_cleanup && greeted {
            self.remove_remote_leftovers(&extra, remote_done, opts, overall, &mut errors);
        }
        std::mem::replace(&mut self.route, Route::Direct).release(overall);
        errors.into_iter().next().map_or(Ok(()), Err)
    }

    /// In a forked child that inherited the handle: closes only our copies of the fds. The
    /// child process, the flocks and the sockets stay the owner's.
    fn let_go(&mut self) {
        self.state = State::Closed;
        self.sock = None;
        if let Route::Shared(lease) = std::mem::replace(&mut self.route, Route::Direct) {
            // Dropped in a process that is not its owner: it ends nothing.
            drop(lease);
        }
    }

    /// The caller's extra cleanup sockets, checked first: a bad path must not be half
    /// cleaned up. Refused ones are noted in `errors` and left out.
    fn cleanup_sockets(&self, opts: &CloseOptions, errors: &mut Vec<Error>) -> Vec<String> {
        let mut extra = Vec::new();
        for path in &opts.cleanup_sockets {
            match validate::socket_path(path, &self.opts.socket_dir) {
                Ok(_) => extra.push(path.clone()),
                Err(e) => errors.push(e.context("not removing cleanup socket")),
            }
        }
        extra
    }

    /// Sends `quit` (v2: with the caller's `cleanup` flag) and reads its reply, if ssh still runs.
    fn quit(&mut self, opts: &CloseOptions, overall: Deadline, errors: &mut Vec<Error>) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let quit = if self.version.is_some_and(|v| v >= 2) {
            json!({"cmd": "quit", "cleanup": opts.cleanup}).to_string()
        } else {
            "quit".to_string()
        };
        let deadline = Deadline::after_ms(opts.quit_timeout_ms).min(overall);
        if let Err(e) = self.command_by(&quit, deadline) {
            errors.push(e.context("closing tunnel"));
        }
    }

    /// Shuts the socket and ends ssh: it gets `exit_timeout_ms` to exit by itself, then
    /// SIGTERM and SIGKILL. Returns whether the remote command ran to its end, with the
    /// socket cleanup after it (exit 0 of a command that has one).
    fn stop_ssh(
        &mut self,
        opts: &CloseOptions,
        overall: Deadline,
        errors: &mut Vec<Error>,
    ) -> bool {
        if let Some(sock) = self.sock.take() {
            let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let grace = Deadline::after_ms(opts.exit_timeout_ms);
        match self.child.terminate(grace, overall) {
            Ok((exit, true)) => self.log.emit(
                Level::Warn,
                &format!(
                    "ssh tunnel to {} did not exit in time and was terminated ({exit})",
                    self.dest()
                ),
            ),
            Ok((Exit::Code(0), false)) => return self.opts.cleanup_in_command,
            Ok((Exit::Unknown, false)) => {}
            Ok((exit, false)) => self
                .log
                .emit(Level::Debug, &format!("ssh tunnel ended with {exit}")),
            Err(e) => errors.push(e.context("stopping ssh")),
        }
        false
    }

    /// A shared master keeps a client's forwards after the client exits: cancelled here.
    fn cancel_shared_forwards(&self, overall: Deadline, errors: &mut Vec<Error>) {
        let Some(lease) = self.route.lease() else {
            return;
        };
        let specs: Vec<String> = self.opts.forwards.iter().map(Forward::spec).collect();
        if let Err(e) = lease.cancel_forwards(&specs, overall) {
            errors.push(e.context("closing tunnel"));
        }
    }

    /// Removes the forwards' local socket files and the caller's extra ones on this node.
    fn remove_local_sockets(&self, extra: &[String], errors: &mut Vec<Error>) {
        let local = self.opts.forwards.iter().filter_map(Forward::local_socket);
        for path in unique(local.chain(extra.iter().map(String::as_str))) {
            if let Err(e) = sockfile::remove_socket(path) {
                errors.push(e);
            }
        }
    }

    /// Removes the sockets left on the target node: the forwards' remote ends (unless the
    /// remote command ended normally and removed them itself) and the extra ones, within
    /// `cleanup_timeout_ms`. Sockets left behind are harmless (the next start replaces
    /// them): a failure is a warning, kept for `tunnel_status`; a file there that is no
    /// socket is an error the caller has to look at.
    fn remove_remote_leftovers(
        &mut self,
        extra: &[String],
        remote_done: bool,
        opts: &CloseOptions,
        overall: Deadline,
        errors: &mut Vec<Error>,
    ) {
        let forwards = || self.opts.forwards.iter().filter_map(Forward::remote_socket);
        // the forwards' remote sockets went with the remote command when it ended normally
        let cleaned: Vec<&str> = if remote_done {
            forwards().collect()
        } else {
            Vec::new()
        };
        let remote: Vec<&str> = unique(forwards().chain(extra.iter().map(String::as_str)))
            .into_iter()
            .filter(|p| !cleaned.contains(p))
            .collect();
        if remote.is_empty() {
            return;
        }
        let deadline = Deadline::after_ms(opts.cleanup_timeout_ms).min(overall);
        match remove_remote_sockets(&self.opts.ssh, &self.route, &remote, deadline) {
            Ok(()) => {}
            Err(e) if e.kind == Kind::InvalidArgument => errors.push(e),
            Err(e) => {
                let text = format!("{e} (left on {}: {})", self.dest(), remote.join(", "));
                self.log.emit(Level::Warn, &text);
                self.cleanup_warning = Some(text);
            }
        }
    }
}

/// Removes the sockets among `paths` on `ssh`'s destination; anything else there is kept and
/// named in the error (`Kind::InvalidArgument`). Paths are passed quoted. Through `route`'s
/// shared master while it lives; else over a connection of its own.
fn remove_remote_sockets(
    ssh: &Ssh,
    route: &Route,
    paths: &[&str],
    deadline: Deadline,
) -> Result<()> {
    let mut cmd: Vec<String> = ["sh", "-c", SOCKET_CLEANUP, "sh"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.extend(paths.iter().map(|p| p.to_string()));
    let mut direct = ssh.clone();
    direct.share = None;
    let out = match route.lease() {
        // Our session slot is free again now that the tunnel's client has exited.
        Some(l) if l.alive() => route.run(ssh, &cmd, b"", deadline),
        // A dead master, or no sharing: one connection of our own, nothing left running after us.
        _ => Route::Direct.run(&direct, &cmd, b"", deadline),
    }
    .and_then(|out| match out.exit {
        // the script's "kept a non-socket"
        Exit::Code(75) => Ok(out),
        _ => ssh::checked(&direct, &cmd, out),
    })
    .map_err(|e| e.context("removing remote sockets"))?;
    let kept: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| format!("'{}'", printable(l.as_bytes(), 120)))
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "refusing to remove {} on {}: not a socket (kept)",
        kept.join(", "),
        ssh.destination()
    )))
}

/// The options of `ssh_remove_sockets` besides the ssh ones.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RemoveJson {
    sockets: Vec<String>,
    socket_dir: String,
    timeout_ms: i64,
}

impl Default for RemoveJson {
    fn default() -> Self {
        RemoveJson {
            sockets: Vec::new(),
            socket_dir: validate::DEFAULT_SOCKET_DIR.into(),
            timeout_ms: 30_000,
        }
    }
}

/// `ssh_remove_sockets`: the sockets among `"sockets"` (validated as forwards are) removed on
/// the destination, anything else kept and named; the same cleanup a tunnel's close does,
/// for a caller whose tunnel never got ready (the target's QEMU listening, no tunnel to it).
pub(crate) fn remove_sockets_json(opts: &Value) -> Result<()> {
    let (ssh, o): (ssh::SshOptions, RemoveJson) = options::from_value_split(opts)?;
    let ssh = Ssh::from_parsed(ssh)?;
    validate::socket_dir(&o.socket_dir)?;
    for path in &o.sockets {
        validate::socket_path(path, &o.socket_dir)?;
    }
    let paths = unique(o.sockets.iter().map(String::as_str));
    if paths.is_empty() {
        return Ok(());
    }
    let deadline = Deadline::after_ms(o.timeout_ms);
    let route = Route::choose(&ssh, deadline, |_| {})?;
    let result = remove_remote_sockets(&ssh, &route, &paths, deadline);
    route.release(deadline);
    result
}

/// `paths` without repeats, in order.
fn unique<'a>(paths: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for p in paths {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Dropping a tunnel (`tunnel_free`) closes it with the default options, all of it within
/// their `cleanup_timeout_ms` (plus the kill and reap of ssh, which are always done).
impl Drop for Tunnel {
    fn drop(&mut self) {
        let opts = CloseOptions::default();
        let overall = Deadline::after_ms(opts.cleanup_timeout_ms);
        if let Err(e) = self.close_by(&opts, overall) {
            self.log
                .emit(Level::Warn, &format!("closing tunnel on drop: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const DIR: &str = validate::DEFAULT_SOCKET_DIR;

    /// Runs `remote_command`'s argv locally, as the target's shell would.
    fn run_remote(command: &[&str], forwards: &[Forward]) -> (Option<i32>, String) {
        let command: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        let argv = remote_command(&command, forwards);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into(),
        )
    }

    #[test]
    fn the_remote_command_removes_the_forwarded_sockets_when_it_ends_and_keeps_other_files() {
        let dir = crate::scratch::ScratchDir::new("remote");
        let d = dir.as_str();
        let sock = format!("{d}/100.migrate");
        let nbd = format!("{d}/100_nbd.migrate");
        let forwards = [
            Forward::parse(&sock, d).unwrap(),
            Forward::parse(&nbd, d).unwrap(),
        ];
        // no forwards: the command as it is
        assert_eq!(
            remote_command(&["qm".into(), "mtunnel".into()], &[]),
            ["qm", "mtunnel"]
        );

        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // the command runs first (the socket still exists then), with its arguments intact
        let (code, out) = run_remote(
            &[
                "sh",
                "-c",
                "test -S \"$1\" && echo \"it's $2\"",
                "x",
                &sock,
                "a b;$(c)",
            ],
            &forwards,
        );
        assert_eq!((code, out.as_str()), (Some(0), "it's a b;$(c)\n"));
        assert!(
            !std::path::Path::new(&sock).exists(),
            "the socket was not removed after the command"
        );
        drop(listener);

        // a command that failed keeps its exit status and leaves the sockets (they may still
        // be in use; close cleans up after it)
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(run_remote(&["sh", "-c", "exit 3"], &forwards).0, Some(3));
        assert!(
            std::path::Path::new(&sock).exists(),
            "a failed command's sockets were removed"
        );
        assert_eq!(run_remote(&["true"], &forwards).0, Some(0));
        assert!(!std::path::Path::new(&sock).exists());

        // a regular file at a forward's path is kept and named: exit 75
        std::fs::write(&nbd, "canary\n").unwrap();
        let (code, out) = run_remote(&["true"], &forwards);
        assert_eq!((code, out.trim()), (Some(75), nbd.as_str()));
        assert_eq!(std::fs::read_to_string(&nbd).unwrap(), "canary\n");
    }

    #[test]
    fn a_forward_is_one_path_or_a_local_remote_pair() {
        let f = Forward::parse("/run/qemu-server/100.migrate", DIR).unwrap();
        assert_eq!(
            (f.local_socket(), f.remote_socket()),
            (
                Some("/run/qemu-server/100.migrate"),
                Some("/run/qemu-server/100.migrate")
            )
        );
        assert_eq!(
            f.spec(),
            "/run/qemu-server/100.migrate:/run/qemu-server/100.migrate"
        );
        assert_eq!(f.shown(), "/run/qemu-server/100.migrate");
        let f = Forward::parse(
            "/run/qemu-server/100.migrate:/run/qemu-server/4100.migrate",
            DIR,
        )
        .unwrap();
        assert_eq!(f.remote_socket(), Some("/run/qemu-server/4100.migrate"));
        assert_eq!(
            f.shown(),
            "/run/qemu-server/100.migrate:/run/qemu-server/4100.migrate"
        );
    }

    #[test]
    fn a_tcp_forward_goes_to_the_targets_loopback_and_listens_on_ours_only() {
        let f = Forward::parse("60000:localhost:60001", DIR).unwrap();
        assert_eq!(
            f,
            Forward::Tcp {
                port: 60000,
                host: "localhost".into(),
                host_port: 60001
            }
        );
        assert_eq!(
            f.spec(),
            "localhost:60000:localhost:60001",
            "the bind address keeps ssh on loopback even with GatewayPorts yes"
        );
        assert_eq!(f.shown(), "60000:localhost:60001");
        assert_eq!((f.local_socket(), f.remote_socket()), (None, None));
        for host in ["127.0.0.1", "[::1]"] {
            let f = Forward::parse(&format!("1:{host}:65535"), DIR).unwrap();
            assert_eq!(f.spec(), format!("localhost:1:{host}:65535"));
        }
    }

    #[test]
    fn other_tcp_forwards_are_refused_naming_the_spec() {
        for spec in [
            "60000:198.18.0.2:60000",
            "60000:node2:60000",
            "60000:[::]:60000",
            "0:localhost:60000",
            "60000:localhost:0",
            "65536:localhost:60000",
            "060000:localhost:60000",
            "+6000:localhost:60000",
            "localhost:60000",
            "localhost:60000:localhost:60000",
            "127.0.0.1:60000:localhost:60000",
            "60000",
            "60000:localhost",
            "",
        ] {
            let err = Forward::parse(spec, DIR).unwrap_err();
            assert_eq!(err.kind, Kind::InvalidArgument);
            assert_eq!(
                err.message,
                format!(
                    "unsupported forward '{spec}': expected a UNIX socket forward ('PATH' or 'LOCAL_PATH:REMOTE_PATH') or a TCP forward to the target's loopback ('PORT:localhost:PORT')"
                )
            );
        }
        let err = Forward::parse("/run/qemu-server/100.migrate:localhost:60000", DIR).unwrap_err();
        assert_eq!(
            err.message,
            "unsupported forward '/run/qemu-server/100.migrate:localhost:60000': a UNIX socket forward is 'PATH' or 'LOCAL_PATH:REMOTE_PATH'"
        );
    }

    #[test]
    fn a_tcp_forward_is_ready_only_when_held_and_alone_on_its_port() {
        let me = std::process::id() as i32;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let f = Forward::parse(&format!("{port}:localhost:{port}"), DIR).unwrap();
        assert!(f.ready(me).unwrap(), "our own listener on 127.0.0.1");
        // the same port held by someone else (here: not pid 1): a connection to localhost
        // could reach it, which waiting does not change
        let err = f.ready(1).unwrap_err();
        assert_eq!(err.kind, Kind::Io);
        assert_eq!(
            err.message,
            format!(
                "forward {port}:localhost:{port}: another process listens on 127.0.0.1:{port} too (socket inode {}), so a connection to localhost:{port} may not reach the tunnel",
                listen::tcp_port(port, 1).unwrap().foreign[0].1
            )
        );
        drop(listener);
        assert!(!f.ready(me).unwrap(), "nobody listens: not ready (yet)");
    }

    #[test]
    fn tcp_and_unix_forwards_mix_and_one_local_port_takes_one_forward() {
        let opts = |forwards: Value| {
            OpenOptions::from_json(
                &json!({"ssh": ["ssh", "root@198.18.0.2"], "forwards": forwards}),
            )
        };
        let o = opts(json!([
            "60000:localhost:60000",
            "/run/qemu-server/100_nbd.migrate",
            "60000:localhost:60000"
        ]))
        .unwrap();
        assert_eq!(o.forwards.len(), 2);
        let err = opts(json!(["60000:localhost:60000", "60000:localhost:60001"]))
            .err()
            .unwrap();
        assert_eq!(
            err.message,
            "forwards '60000:localhost:60000' and '60000:localhost:60001' listen on the same local port"
        );
        // the remote command cleans up the UNIX sockets only
        let argv = remote_command(&["qm".into(), "mtunnel".into()], &o.forwards);
        assert!(
            argv[2].contains("set -- /run/qemu-server/100_nbd.migrate;"),
            "{argv:?}"
        );
        let tcp_only = opts(json!(["60000:localhost:60000"])).unwrap();
        assert_eq!(
            remote_command(&["qm".into(), "mtunnel".into()], &tcp_only.forwards),
            ["qm", "mtunnel"],
            "no socket to remove on the target for a TCP forward"
        );
    }

    #[test]
    fn both_ends_of_a_forward_are_validated() {
        let err = Forward::parse("/run/qemu-server/100.migrate:/etc/passwd", DIR).unwrap_err();
        assert!(
            err.message.contains("invalid socket path '/etc/passwd'"),
            "{}",
            err.message
        );
        let err = Forward::parse("/tmp/100.migrate:/run/qemu-server/100.migrate", DIR).unwrap_err();
        assert!(
            err.message
                .contains("invalid socket path '/tmp/100.migrate'"),
            "{}",
            err.message
        );
    }

    #[test]
    fn two_forwards_on_one_local_socket_are_refused_and_repeats_dropped() {
        let opts = |forwards: Value| {
            OpenOptions::from_json(
                &json!({"ssh": ["ssh", "root@198.18.0.2"], "forwards": forwards}),
            )
        };
        let o = opts(json!([
            "/run/qemu-server/100_nbd.migrate",
            "/run/qemu-server/100_nbd.migrate"
        ]))
        .unwrap();
        assert_eq!(o.forwards.len(), 1);
        let err = opts(json!([
            "/run/qemu-server/100.migrate",
            "/run/qemu-server/100.migrate:/run/qemu-server/101.migrate"
        ]))
        .err()
        .unwrap();
        assert!(
            err.message.contains("listen on the same local socket"),
            "{}",
            err.message
        );
    }

    #[test]
    fn open_and_close_options_errors_name_the_key() {
        let err = |v: Value| OpenOptions::from_json(&v).err().unwrap().message;
        let ssh = json!(["ssh", "root@198.18.0.2"]);
        let e = err(json!({"ssh": ssh, "greting_timeout_ms": 5}));
        assert!(
            e.starts_with("unknown option 'greting_timeout_ms' (known: "),
            "{e}"
        );
        assert!(
            e.contains("greeting_timeout_ms") && e.contains("connect_timeout_s"),
            "{e}"
        );
        let e = err(json!({"ssh": ssh, "greeting_timeout_ms": "0042"}));
        assert_eq!(
            e,
            "option 'greeting_timeout_ms' must be an integer number of milliseconds"
        );
        let e = err(json!({"ssh": ssh, "connect_timeout_s": "10\n"}));
        assert_eq!(
            e,
            "option 'connect_timeout_s' must be a non-negative integer"
        );
        let e = err(json!({"forwards": []}));
        assert!(e.starts_with("missing option 'ssh'"), "{e}");
        let e = err(json!({"ssh": ssh, "command": []}));
        assert!(e.contains("'command' must not be empty"), "{e}");
        let o = OpenOptions::from_json(&json!({"ssh": ssh, "socket_dir": null})).unwrap();
        assert_eq!(o.socket_dir, validate::DEFAULT_SOCKET_DIR);
        assert_eq!(o.command, ["qm", "mtunnel"]);
        assert_eq!(o.ssh.ciphers, None, "no ciphers unless asked for");
        let o = OpenOptions::from_json(&json!({"ssh": ssh, "ciphers": "aes128-gcm@openssh.com"}))
            .unwrap();
        assert_eq!(
            o.ssh.ciphers.as_deref(),
            Some("aes128-gcm@openssh.com"),
            "tunnel_open's JSON takes the ciphers option"
        );

        let close = |v: Value| CloseOptions::from_json(&v);
        let c = close(json!({"cleanup_timeout_ms": 100, "remote_cleanup": false})).unwrap();
        assert_eq!(
            (c.cleanup_timeout_ms, c.remote_cleanup, c.quit_timeout_ms),
            (100, false, 10_000)
        );
        let e = close(json!({"quit_timeout": 1})).err().unwrap().message;
        assert!(e.starts_with("unknown option 'quit_timeout'"), "{e}");
        let e = close(json!({"cleanup": "maybe"})).err().unwrap().message;
        assert_eq!(e, "option 'cleanup' must be true or false");
    }
}
