//! Child processes started without threads, tracked by pidfd.
//!
//! A Perl host may have `$SIG{CHLD}='IGNORE'` or its own `waitpid(-1)` reaper, may block or
//! ignore signals, and does not mark its fds close-on-exec. So the child is created with
//! `clone(CLONE_PIDFD)`: every wait and signal goes through the pidfd (never a pid that could
//! be reused), a status collected by someone else is tolerated, and the child resets signal
//! dispositions and mask, keeps only fds 0–2, and asks for SIGTERM when its parent dies.

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline};
use crate::sys::ChildStep;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus};
use std::ffi::{CString, c_int};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Exited, but its status was collected by another waiter in the host process.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => f.write_str("exited (status reaped by another waiter)"),
        }
    }
}

/// A running or finished child process.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    owner: libc::pid_t,
    exit: Option<Exit>,
}

/// Finds `prog` on `PATH` unless it contains a slash; resolved before clone so the child
/// only calls async-signal-safe functions.
fn resolve(prog: &str) -> Result<CString> {
    let to_c = |s: &str| {
        CString::new(s).map_err(|_| {
            Error::invalid(format!(
                "program '{}' contains a NUL byte",
                io::printable(prog.as_bytes(), 80)
            ))
        })
    };
    if prog.contains('/') {
        return to_c(prog);
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{prog}");
        let c = to_c(&candidate)?;
        if nix::unistd::access(c.as_c_str(), nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(c);
        }
    }
    Err(Error::invalid(format!(
        "program '{}' not found in PATH",
        io::printable(prog.as_bytes(), 80)
    )))
}

/// Moves an fd to 3 or above (close-on-exec), so that installing the child's stdio with dup2
/// cannot overwrite another of its sources. (`try_clone_to_owned` is `F_DUPFD_CLOEXEC` from 3.)
fn above_stdio(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    let copy = fd.try_clone_to_owned().map_err(|e| {
        Error::io(
            "fcntl(F_DUPFD_CLOEXEC)",
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    if copy.as_raw_fd() < 3 {
        return Err(Error::new(Kind::Io, "a duplicated fd landed on stdio"));
    }
    Ok(copy)
}

impl Child {
    /// Starts `argv` with the given fds as its stdin, stdout and stderr. Returns once exec
    /// succeeded, or with the reason it failed.
    pub fn spawn(argv: &[String], stdio: [BorrowedFd<'_>; 3]) -> Result<Child> {
        let prog_name = argv.first().ok_or_else(|| Error::invalid("empty argv"))?;
        let prog = resolve(prog_name)?;
        let args: Vec<CString> = argv
            .iter()
            .map(|a| {
                CString::new(a.as_str()).map_err(|_| {
                    Error::invalid(format!(
                        "argument '{}' contains a NUL byte",
                        io::printable(a.as_bytes(), 80)
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let moved: Vec<OwnedFd> = stdio
            .iter()
            .map(|fd| above_stdio(fd.as_fd()))
            .collect::<Result<_>>()?;
        let (report_r, report_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe2", e))?;
        let (pid, pidfd) = crate::sys::spawn(
            &prog,
            &args,
            [moved[0].as_fd(), moved[1].as_fd(), moved[2].as_fd()],
            report_w.as_fd(),
        )
        .map_err(|e| Error::io("clone", e))?;
        drop(report_w);
        drop(moved);
        let mut child = Child {
            pid,
            pidfd,
            owner: nix::unistd::getpid().as_raw(),
            exit: None,
        };

        // EOF on the report pipe means exec succeeded (close-on-exec); 8 bytes are the step
        // that failed and its errno.
        let mut buf = [0u8; 8];
        let n = loop {
            match nix::unistd::read(report_r.as_raw_fd(), &mut buf) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::io("read exec status", e)),
                Ok(n) => break n,
            }
        };
        if n == 8 {
            let word = |i: usize| i32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
            let errno = Errno::from_raw(word(4));
            child.wait(Deadline::after_ms(5000))?;
            let prog = io::printable(prog_name.as_bytes(), 80);
            let what = match ChildStep::from_report(word(0)) {
                Some(ChildStep::Exec) | None => format!("cannot execute '{prog}'"),
                Some(ChildStep::Stdio) => format!("cannot give '{prog}' its stdio"),
                Some(ChildStep::CloseFds) => {
                    format!("cannot keep the host's fds from '{prog}' (close-on-exec)")
                }
                Some(ChildStep::Setsid) => format!("cannot start a session for '{prog}'"),
                Some(ChildStep::DeathSignal) => {
                    format!("cannot set the parent-death signal of '{prog}'")
                }
            };
            return Err(Error::new(Kind::Io, format!("{what}: {}", errno.desc())));
        }
        Ok(child)
    }

    /// The child's pid (for logs and /proc lookups; never used to signal or wait).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The pidfd, readable once the child has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the current process is the one that spawned the child (false in a fork).
    pub fn owned_here(&self) -> bool {
        self.owner == nix::unistd::getpid().as_raw()
    }

    /// How the child ended, if it has; reaps it.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        let status = loop {
            match nix::sys::wait::waitid(
                Id::PIDFd(self.pidfd.as_fd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
            ) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        self.exit = match status {
            Ok(WaitStatus::Exited(_, code)) => Some(Exit::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(Exit::Signal(sig as i32)),
            Ok(_) => None,
            // Someone else reaped it (SIGCHLD ignored, or a waitpid(-1) reaper): the pidfd
            // still tells whether it has exited.
            Err(Errno::ECHILD) => {
                let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
                if io::poll(&mut fds, Deadline::after_ms(0))? > 0 {
                    Some(Exit::Unknown)
                } else {
                    None
                }
            }
            Err(e) => return Err(Error::io("waitid", e)),
        };
        Ok(self.exit)
    }

    /// Waits until the child exits or the deadline passes.
    pub fn wait(&mut self, deadline: Deadline) -> Result<Option<Exit>> {
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            if io::poll(&mut fds, deadline)? == 0 {
                return self.try_wait();
            }
        }
    }

    /// Sends `sig` through the pidfd; a child that already exited is left alone.
    pub fn signal(&mut self, sig: c_int) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        match crate::sys::pidfd_send_signal(self.pidfd.as_fd(), sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::io(format!("signal {sig} to pid {}", self.pid), e)),
        }
    }

    /// Waits until `grace` passes, then SIGTERM (2 s, but not beyond `overall`), then
    /// SIGKILL, and reaps. Returns how it ended and whether it had to be signalled. The kill
    /// and the reap happen whatever `overall` says: nothing is left running or unreaped.
    pub fn terminate(&mut self, grace: Deadline, overall: Deadline) -> Result<(Exit, bool)> {
        if let Some(exit) = self.wait(grace.min(overall))? {
            return Ok((exit, false));
        }
        self.signal(libc::SIGTERM)?;
        // A stopped process only acts on SIGTERM once continued.
        self.signal(libc::SIGCONT)?;
        if let Some(exit) = self.wait(Deadline::after_ms(2000).min(overall))? {
            return Ok((exit, true));
        }
        self.signal(libc::SIGKILL)?;
        match self.wait(Deadline::after_ms(10_000))? {
            Some(exit) => Ok((exit, true)),
            None => Err(Error::new(
                Kind::Timeout,
                format!("pid {} did not exit after SIGKILL", self.pid),
            )),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Never leave a zombie or an orphaned ssh behind; in a fork the child belongs to the parent.
        if self.exit.is_none() && self.owned_here() {
            let _ = self.signal(libc::SIGKILL);
            let _ = self.wait(Deadline::after_ms(5000));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn run(argv: &[&str]) -> (Exit, String) {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let null = devnull();
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let mut child = Child::spawn(&argv, [null.as_fd(), theirs.as_fd(), null.as_fd()]).unwrap();
        drop(theirs);
        let mut out = Vec::new();
        let f = std::fs::File::from(ours);
        use std::io::Read;
        (&f).read_to_end(&mut out).unwrap();
        let exit = child.wait(Deadline::after_ms(10_000)).unwrap().unwrap();
        (exit, String::from_utf8(out).unwrap())
    }

    #[test]
    fn child_reports_exit_code_via_pidfd() {
        assert_eq!(run(&["sh", "-c", "exit 7"]).0, Exit::Code(7));
    }

    #[test]
    fn child_inherits_only_stdio() {
        // An fd without close-on-exec in the parent must not reach the child.
        let leaked = std::io::stdout().as_fd().try_clone_to_owned().unwrap();
        nix::fcntl::fcntl(
            leaked.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let (_, out) = run(&["sh", "-c", "ls /proc/self/fd"]);
        drop(leaked);
        let mut fds: Vec<&str> = out.split_whitespace().collect();
        fds.sort();
        // 0-2 plus the fd ls uses to read the directory.
        assert!(
            fds.len() <= 4 && fds.starts_with(&["0", "1", "2"]),
            "child saw fds {fds:?}"
        );
    }

    #[test]
    fn without_close_range_cloexec_the_host_fds_are_marked_one_by_one() {
        // An fd without close-on-exec at a number no shell opens by itself.
        let leaked = std::io::stdout().as_fd().try_clone_to_owned().unwrap();
        // SAFETY: dup2 onto fd 200, which this test owns (closed again below); the new fd has
        // no close-on-exec.
        assert_eq!(unsafe { libc::dup2(leaked.as_raw_fd(), 200) }, 200);
        crate::sys::NO_CLOSE_RANGE.store(true, std::sync::atomic::Ordering::Relaxed);
        let (_, out) = run(&[
            "sh",
            "-c",
            "test -e /proc/self/fd/200 && echo leaked || echo clean",
        ]);
        crate::sys::NO_CLOSE_RANGE.store(false, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: closes the fd 200 made above, which nothing else uses.
        unsafe { libc::close(200) };
        assert_eq!(out.trim(), "clean", "fd 200 reached the child");
    }

    #[test]
    fn a_failed_mask_restore_after_clone_leaks_neither_the_pidfd_nor_the_child() {
        let null = devnull();
        let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let prog = CString::new("/bin/sleep").unwrap();
        let args = [CString::new("sleep").unwrap(), CString::new("60").unwrap()];
        let (pid, pidfd) = crate::sys::spawn(
            &prog,
            &args,
            [null.as_fd(), null.as_fd(), null.as_fd()],
            report_w.as_fd(),
        )
        .unwrap();
        drop((report_r, report_w));
        let err = crate::sys::adopt(pid, pidfd, Err(Errno::EINVAL)).unwrap_err();
        assert_eq!(err, Errno::EINVAL);
        // Killed and reaped: no such child any more (not running, not a zombie).
        let waited = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        assert_eq!(waited, Err(Errno::ECHILD), "child {pid} is still there");
    }

    #[test]
    fn child_starts_with_empty_mask_and_default_dispositions() {
        let (_, out) = run(&["sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status"]);
        for line in out.lines() {
            let value = line.split_whitespace().nth(1).unwrap();
            assert!(value.chars().all(|c| c == '0'), "child has {line}");
        }
    }

    #[test]
    fn missing_program_is_a_clear_error_and_leaves_no_zombie() {
        let null = devnull();
        let err = Child::spawn(
            &["/nonexistent/ssh".to_string()],
            [null.as_fd(), null.as_fd(), null.as_fd()],
        )
        .unwrap_err();
        assert!(
            err.message.contains("cannot execute '/nonexistent/ssh'"),
            "{}",
            err.message
        );
        let err = Child::spawn(
            &["no-such-program-mtunnel".to_string()],
            [null.as_fd(), null.as_fd(), null.as_fd()],
        )
        .unwrap_err();
        assert!(err.message.contains("not found in PATH"), "{}", err.message);
    }

    #[test]
    fn terminate_ends_a_stopped_child() {
        let null = devnull();
        let mut child = Child::spawn(
            &["sleep".into(), "60".into()],
            [null.as_fd(), null.as_fd(), null.as_fd()],
        )
        .unwrap();
        child.signal(libc::SIGSTOP).unwrap();
        let (exit, signalled) = child
            .terminate(Deadline::after_ms(50), Deadline::never())
            .unwrap();
        assert!(signalled);
        assert_eq!(exit, Exit::Signal(libc::SIGTERM));
    }

    #[test]
    fn terminate_past_the_overall_deadline_kills_and_reaps_at_once() {
        let null = devnull();
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        // A child that ignores SIGTERM (once it says so): only SIGKILL ends it.
        let mut child = Child::spawn(
            &[
                "sh".into(),
                "-c".into(),
                "trap '' TERM; echo ready; sleep 60 & wait".into(),
            ],
            [null.as_fd(), theirs.as_fd(), null.as_fd()],
        )
        .unwrap();
        drop(theirs);
        let mut ready = [0u8; 6];
        use std::io::Read;
        (&std::fs::File::from(ours)).read_exact(&mut ready).unwrap();
        let (exit, signalled) = child
            .terminate(Deadline::after_ms(0), Deadline::after_ms(0))
            .unwrap();
        assert!(signalled);
        assert_eq!(exit, Exit::Signal(libc::SIGKILL));
    }

    #[test]
    fn terminate_escalates_to_sigterm() {
        let null = devnull();
        let mut child = Child::spawn(
            &["sleep".into(), "60".into()],
            [null.as_fd(), null.as_fd(), null.as_fd()],
        )
        .unwrap();
        let (exit, signalled) = child
            .terminate(Deadline::after_ms(50), Deadline::never())
            .unwrap();
        assert!(signalled);
        assert_eq!(exit, Exit::Signal(libc::SIGTERM));
    }
}
