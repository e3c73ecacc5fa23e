//! Deadlines, EINTR-proof polling and line framing shared by the tunnel, ssh and QMP code.
//!
//! Inside a Perl host every blocking syscall can return EINTR (handlers are installed without
//! SA_RESTART), so every wait here recomputes its remaining time from a monotonic deadline and
//! retries; an interrupted call never shortens or extends a deadline.

use crate::error::{Error, Kind, Result};
use nix::errno::Errno;
use nix::poll::{PollFd, PollTimeout};
use nix::sys::socket::MsgFlags;
#[cfg(test)]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// A point in monotonic time after which a step has failed; `None` never expires.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// Expires `ms` milliseconds from now; a negative value means "never".
    pub(crate) fn after_ms(ms: i64) -> Self {
        if ms < 0 {
            Deadline(None)
        } else {
            Deadline(Some(Instant::now() + Duration::from_millis(ms as u64)))
        }
    }

    /// Never expires.
    pub(crate) fn never() -> Self {
        Deadline(None)
    }

    /// The earlier of two deadlines.
    pub(crate) fn min(self, other: Deadline) -> Deadline {
        match (self.0, other.0) {
            (Some(a), Some(b)) => Deadline(Some(a.min(b))),
            (a, b) => Deadline(a.or(b)),
        }
    }

    /// Whether the deadline has passed.
    pub(crate) fn expired(&self) -> bool {
        self.0.is_some_and(|end| Instant::now() >= end)
    }

    /// Time left, `None` for a deadline that never expires.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|end| end.saturating_duration_since(Instant::now()))
    }

    fn poll_timeout(&self) -> PollTimeout {
        match self.remaining() {
            None => PollTimeout::NONE,
            // Round up so that we never wake before the deadline and spin.
            Some(left) => {
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
                PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    /// Sleeps for `step` or until the deadline, whichever comes first.
    pub(crate) fn sleep(&self, step: Duration) {
        let d = self.remaining().map_or(step, |left| left.min(step));
        // std's sleep resumes after EINTR with the remaining time.
        std::thread::sleep(d);
    }
}

/// The one sleep-and-poll loop: runs `check` until it gives a value, sleeping `step` between
/// tries; `Ok(None)` once the deadline has passed (after a last try). An error of `check`
/// ends the wait. For conditions nothing can be polled for (flocks, a remote monitor's state);
/// fds are waited for with [`poll`].
pub(crate) fn poll_until<T>(
    deadline: Deadline,
    step: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    loop {
        if let Some(value) = check()? {
            return Ok(Some(value));
        }
        if deadline.expired() {
            return Ok(None);
        }
        deadline.sleep(step);
    }
}

/// `poll(2)` that survives EINTR; returns the number of ready fds, 0 when the deadline passed.
pub(crate) fn poll(fds: &mut [PollFd], deadline: Deadline) -> Result<usize> {
    loop {
        let timeout = deadline.poll_timeout();
        match nix::poll::poll(fds, timeout) {
            Ok(n) => {
                if n == 0 && !deadline.expired() {
                    continue;
                }
                return Ok(n as usize);
            }
            Err(Errno::EINTR) => {
                if deadline.expired() {
                    return Ok(0);
                }
            }
            Err(e) => return Err(Error::io("poll", e)),
        }
    }
}

/// Outcome of one non-blocking read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// This many bytes were appended.
    Data(usize),
    /// The peer closed its end.
    Eof,
    /// Nothing available right now.
    WouldBlock,
}

/// Reads once from a non-blocking fd, appending to `buf`. EINTR is retried.
pub(crate) fn read_some(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<Read> {
    let mut chunk = [0u8; 16384];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut chunk) {
            Ok(0) => return Ok(Read::Eof),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(Read::Data(n));
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(Read::WouldBlock),
            // A socket whose peer died with unread data reports a reset: same as EOF for us.
            Err(Errno::ECONNRESET) => return Ok(Read::Eof),
            Err(e) => return Err(Error::io("read", e)),
        }
    }
}

/// Writes all of `data` to a non-blocking socket with `MSG_NOSIGNAL`, so that a dead peer
/// yields `EPIPE` instead of raising SIGPIPE in the host process.
pub(crate) fn send_all(fd: BorrowedFd<'_>, mut data: &[u8], deadline: Deadline) -> Result<()> {
    while !data.is_empty() {
        match nix::sys::socket::send(fd.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
                if poll(&mut fds, deadline)? == 0 {
                    return Err(Error::new(
                        Kind::Timeout,
                        "write did not complete before the deadline",
                    ));
                }
            }
            Err(e) => return Err(Error::io("write", e)),
        }
    }
    Ok(())
}

/// Splits a byte stream into lines (`\n`, with an optional `\r` before it), buffering at most
/// a limit, so that a peer sending garbage cannot make us buffer without bound: the one line
/// splitter of the crate (protocol streams, QMP, ssh's stderr).
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    max_line: usize,
    /// Longer lines are cut into pieces of `max_line` bytes instead of refused.
    cut: bool,
}

impl LineDecoder {
    /// A decoder that rejects lines longer than `max_line` bytes (a protocol error).
    pub fn new(max_line: usize) -> Self {
        LineDecoder {
            buf: Vec::new(),
            max_line,
            cut: false,
        }
    }

    /// A decoder for free text (stderr): a line longer than `max_line` bytes comes out in
    /// pieces of at most that length.
    pub fn cutting(max_line: usize) -> Self {
        LineDecoder {
            cut: true,
            ..LineDecoder::new(max_line)
        }
    }

    /// What is left at the end of the stream (an unterminated last line), emptying the buffer.
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The buffer to append freshly read bytes to.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes received that do not yet form a whole line.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete line without its terminator, if one is buffered.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(pos) if pos > self.max_line && self.cut => {
                Ok(Some(self.buf.drain(..self.max_line).collect()))
            }
            None if self.buf.len() > self.max_line && self.cut => {
                Ok(Some(self.buf.drain(..self.max_line).collect()))
            }
            Some(pos) => {
                if pos > self.max_line {
                    return Err(self.too_long());
                }
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None if self.buf.len() > self.max_line => Err(self.too_long()),
            None => Ok(None),
        }
    }

    fn too_long(&mut self) -> Error {
        self.buf.clear();
        Error::new(
            Kind::Protocol,
            format!("received a line longer than {} bytes", self.max_line),
        )
    }
}

/// Renders bytes from a peer for an error message: lossy UTF-8, control characters escaped,
/// cut to a readable length.
pub(crate) fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_decoder_splits_lines_and_strips_crlf() {
        let mut d = LineDecoder::new(100);
        d.buffer()
            .extend_from_slice(b"tunnel online\r\nver 1\npart");
        assert_eq!(d.next_line().unwrap().unwrap(), b"tunnel online");
        assert_eq!(d.next_line().unwrap().unwrap(), b"ver 1");
        assert_eq!(d.next_line().unwrap(), None);
        assert_eq!(d.pending(), b"part");
    }

    #[test]
    fn a_cutting_line_decoder_hands_out_overlong_lines_in_pieces_and_the_rest_at_eof() {
        let mut d = LineDecoder::cutting(4);
        d.buffer().extend_from_slice(b"abcdefghij\r\nxy");
        assert_eq!(d.next_line().unwrap().unwrap(), b"abcd");
        assert_eq!(d.next_line().unwrap().unwrap(), b"efgh");
        assert_eq!(d.next_line().unwrap().unwrap(), b"ij");
        assert_eq!(d.next_line().unwrap(), None);
        assert_eq!(d.take_rest(), b"xy");
        assert_eq!(d.pending(), b"");
    }

    #[test]
    fn poll_until_returns_the_first_value_or_none_at_the_deadline() {
        let mut tries = 0;
        let got = poll_until(Deadline::never(), Duration::from_millis(1), || {
            tries += 1;
            Ok((tries == 3).then_some(tries))
        });
        assert_eq!(got.unwrap(), Some(3));
        let mut tries = 0;
        let none = poll_until(Deadline::after_ms(20), Duration::from_millis(5), || {
            tries += 1;
            Ok(None::<()>)
        });
        assert_eq!(none.unwrap(), None);
        assert!(tries >= 2, "checked {tries} times");
        let err = poll_until(Deadline::never(), Duration::from_millis(1), || {
            Err::<Option<()>, _>(Error::new(Kind::Io, "gone"))
        });
        assert_eq!(err.unwrap_err().message, "gone");
    }

    #[test]
    fn line_decoder_refuses_overlong_line_even_without_newline() {
        let mut d = LineDecoder::new(8);
        d.buffer().extend_from_slice(b"0123456789");
        let err = d.next_line().unwrap_err();
        assert_eq!(err.kind, Kind::Protocol);
        assert!(err.message.contains("longer than 8"), "{}", err.message);
        let mut d = LineDecoder::new(8);
        d.buffer().extend_from_slice(b"0123456789\n");
        assert!(d.next_line().is_err());
    }

    #[test]
    fn printable_escapes_control_characters_and_truncates() {
        assert_eq!(printable(b"a\x1b[2Jb", 50), "a\\u{1b}[2Jb");
        assert_eq!(printable(b"abcdef", 3), "abc…");
    }

    #[test]
    fn a_storm_of_eintr_neither_shortens_nor_breaks_a_wait() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        extern "C" fn nothing(_: libc::c_int) {}
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        // A handler without SA_RESTART, as Perl installs them: every delivery is an EINTR.
        let sa = SigAction::new(
            SigHandler::Handler(nothing),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGUSR1 in
        // this test process.
        unsafe { sigaction(Signal::SIGUSR1, &sa) }.unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let storm = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: `me` is the test thread, alive until `stop` is set and this thread is joined.
                    unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
                    n += 1;
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
                n
            })
        };
        let start = Instant::now();
        let mut fds = [PollFd::new(r.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ready = poll(&mut fds, Deadline::after_ms(300)).unwrap();
        let took = start.elapsed();
        stop.store(true, Ordering::SeqCst);
        let signals = storm.join().unwrap();
        assert_eq!(ready, 0, "nothing became readable");
        assert!(
            took >= Duration::from_millis(300),
            "the wait ended early after {took:?}"
        );
        assert!(signals > 50, "only {signals} signals were sent");
    }

    #[test]
    fn deadline_min_prefers_the_earlier() {
        let never = Deadline::never();
        let soon = Deadline::after_ms(10);
        assert!(never.min(soon).remaining().is_some());
        assert!(Deadline::after_ms(-1).remaining().is_none());
        assert!(Deadline::after_ms(0).expired());
    }
}
