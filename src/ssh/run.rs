//! Running ssh: one invocation to its end (stdin fed, stdout and stderr collected, the
//! handshake slot let go once authenticated), the retry of a connection dropped before
//! authentication, reading a tunnel-style stream line by line, and ssh's stderr.

use super::command::Ssh;
use super::throttle::Slot;
use crate::error::{Detail, Error, Kind, Result};
use crate::io::{self, Deadline, LineDecoder, Read};
use crate::process::{Child, Exit};
use crate::validate;
use nix::poll::{PollFd, PollFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// How much of ssh's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

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
        match ssh.retry_after(
            attempt,
            out.exit,
            out.stdout.is_empty(),
            stderr.authenticated(),
            &stderr.text(),
        ) {
            Some(pause) if deadline.remaining().is_none_or(|left| left > pause) => {
                attempt += 1;
                std::thread::sleep(pause);
            }
            _ => return Ok((out, stderr)),
        }
    }
}

/// Runs one ssh invocation to its end: `input` on stdin, stdout and stderr collected; on
/// error or deadline ssh is terminated and reaped. `what` names it in errors.
pub fn run_argv(
    ssh: &Ssh,
    argv: &[String],
    what: &str,
    input: &[u8],
    slot: &mut Option<Slot>,
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
            // Bounded: the caller's deadline has passed, or an error ended the run.
            let _ = child.terminate(Deadline::after_ms(0), Deadline::after_ms(200));
            Err(e.context(format!("running {what}")))
        }
    }
}

fn collect(
    child: &mut Child,
    sock: &OwnedFd,
    err_r: &OwnedFd,
    input: &[u8],
    slot: &mut Option<Slot>,
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

/// The check of [`super::run_checked`] on an output at hand: any exit but 0 (or one the host
/// reaped itself, unknown) is an error naming the command, with the exit in its detail.
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
    let (code, signal) = match out.exit {
        Exit::Code(c) => (Some(c), None),
        Exit::Signal(s) => (None, Some(s)),
        Exit::Unknown => (None, None),
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
    )
    .with(Detail::Exit { code, signal }))
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
        // A closed stderr is polled no more: it would wake us at once, every time.
        let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        if !stderr.closed() {
            fds.push(PollFd::new(err_r.as_fd(), PollFlags::POLLIN));
        }
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

/// ssh's stderr as it arrives: split into lines, ssh's own `LogLevel=VERBOSE` lines taken
/// out (the one saying "Authenticated to" marks the end of the handshake), the last few KiB
/// kept for error messages.
#[derive(Debug)]
pub struct Stderr {
    lines: LineDecoder,
    tail: std::collections::VecDeque<String>,
    tail_len: usize,
    authenticated: bool,
    /// The pipe reached its end: nothing more will come, and polling it would only report
    /// POLLHUP again and again.
    closed: bool,
}

impl Default for Stderr {
    fn default() -> Self {
        Stderr {
            lines: LineDecoder::cutting(STDERR_TAIL),
            tail: Default::default(),
            tail_len: 0,
            authenticated: false,
            closed: false,
        }
    }
}

impl Stderr {
    /// Takes freshly read bytes; returns the complete lines that are not ssh's verbose chatter.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.lines.buffer().extend_from_slice(bytes);
        let mut out = Vec::new();
        // A cutting decoder never refuses a line.
        while let Ok(Some(raw)) = self.lines.next_line() {
            out.extend(self.accept(&raw));
        }
        out
    }

    /// Reads what ssh's stderr pipe `err_r` holds now (it is non-blocking) into the tail;
    /// returns the new complete lines (and the unterminated last one at EOF) and whether the
    /// pipe is at EOF. The one loop that drains ssh's stderr; once at EOF it reads no more.
    pub(crate) fn drain(&mut self, err_r: BorrowedFd<'_>) -> Result<(Vec<String>, bool)> {
        if self.closed {
            return Ok((Vec::new(), true));
        }
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

    /// Flushes an unterminated last line (at EOF); nothing more is read after it.
    pub fn finish(&mut self) -> Vec<String> {
        self.closed = true;
        let raw = self.lines.take_rest();
        self.accept(&raw).into_iter().collect()
    }

    /// Whether the stream has ended.
    pub(crate) fn closed(&self) -> bool {
        self.closed
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// CPU time the calling thread has used.
    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the local it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn read_line_waits_quietly_once_stderr_is_closed() {
        let ssh = Ssh::new(vec!["ssh".into(), "root@node".into()]).unwrap();
        // Closes its stderr at once, keeps stdout open and sends nothing.
        let argv = ["sh", "-c", "exec 2>&-; sleep 5"].map(String::from);
        let (mut child, sock, err_r) = ssh.spawn_argv(&argv).unwrap();
        let (mut lines, mut stderr) = (LineDecoder::new(4096), Stderr::default());
        let cpu = thread_cpu();
        let got = read_line(
            &mut lines,
            &sock,
            &err_r,
            &mut stderr,
            &mut child,
            Deadline::after_ms(2000),
            |_| {},
        );
        let used = thread_cpu() - cpu;
        assert_eq!(got.unwrap_err().kind, Kind::Timeout);
        assert!(stderr.closed(), "the end of stderr was not noticed");
        // Polling the closed pipe again and again would burn the 2 s in a loop.
        assert!(
            used < std::time::Duration::from_millis(200),
            "waiting 2 s for a line used {used:?} of CPU"
        );
        let _ = child.terminate(Deadline::after_ms(0), Deadline::after_ms(0));
    }
}
