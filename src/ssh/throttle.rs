//! Limits concurrent ssh handshakes to one destination across processes, and decides when a
//! failed connection may be retried.
//!
//! sshd's default `MaxStartups 10:30:100` starts dropping connections once 10 are
//! unauthenticated. PVE's `migrateall` forks one worker per VM, so dozens of ssh handshakes to
//! the same node can start at once. Each handshake here first takes one of N slots: an
//! `flock`ed file per slot in a shared directory, released when the handshake is over (or the
//! process dies, which releases flocks by itself).

use crate::error::{Error, Kind, Result};
use crate::io::{Deadline, poll_until};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::time::Duration;

/// Where the slot files live unless the caller says otherwise.
pub const DEFAULT_LOCK_DIR: &str = "/run/mtunnel";

/// A held handshake slot; dropping it releases the slot.
#[derive(Debug)]
pub struct Slot {
    _file: File,
}

fn lock_name(destination: &str) -> String {
    destination
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A random number in `0..n`, for jitter (no RNG crate: the kernel has one).
pub fn random_below(n: u64) -> u64 {
    let r = crate::sys::random_u64().unwrap_or_else(|| {
        std::process::id() as u64
            ^ std::time::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.subsec_nanos() as u64)
    });
    if n == 0 { 0 } else { r % n }
}

/// The adaptive share of a destination's handshake slots, kept in a small file next to the
/// slot files so that every process sees it: a destination that drops handshakes (sshd's
/// `MaxStartups`, a busy node) gets fewer concurrent ones for a while, and successes give the
/// slots back one at a time (additive increase, multiplicative decrease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// How many of the configured slots may be used now (1..=slots).
    pub limit: u32,
    /// When `limit` last changed (ms since the epoch).
    pub changed_ms: u64,
}

/// Drops within this long of the last decrease belong to the same burst: one halving.
const SHRINK_GAP_MS: u64 = 1000;
/// A success grows the window by one slot at most this often.
const GROW_GAP_MS: u64 = 1000;
/// A window untouched this long is forgotten: the node's load has long changed.
const FORGET_MS: u64 = 60_000;

impl Window {
    /// The window as stored (`"LIMIT CHANGED_MS"`); all `slots` when absent, unreadable or stale
    /// (as if set long ago: the next drop halves it at once).
    pub(crate) fn parse(text: &str, slots: u32, now_ms: u64) -> Window {
        let full = Window {
            limit: slots,
            changed_ms: 0,
        };
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(limit)), Some(Ok(changed_ms)))
                if now_ms.saturating_sub(changed_ms) < FORGET_MS =>
            {
                Window {
                    limit: (limit.clamp(1, slots as u64)) as u32,
                    changed_ms,
                }
            }
            _ => full,
        }
    }

    /// After a handshake the destination dropped: half the slots, once per burst.
    pub(crate) fn after_drop(self, now_ms: u64) -> Window {
        if now_ms.saturating_sub(self.changed_ms) < SHRINK_GAP_MS && self.limit > 0 {
            return self;
        }
        Window {
            limit: (self.limit / 2).max(1),
            changed_ms: now_ms,
        }
    }

    /// After a handshake that got through: one slot back, at most once per `GROW_GAP_MS`.
    pub(crate) fn after_success(self, slots: u32, now_ms: u64) -> Window {
        if self.limit >= slots || now_ms.saturating_sub(self.changed_ms) < GROW_GAP_MS {
            return self;
        }
        Window {
            limit: self.limit + 1,
            changed_ms: now_ms,
        }
    }
}

fn now_ms() -> u64 {
    std::time::UNIX_EPOCH
        .elapsed()
        .map_or(0, |d| d.as_millis() as u64)
}

/// Opens (creating, mode 0600) a lock or state file of ours; never follows a symlink. The
/// handshake slots and the connection-sharing pool keep theirs this way.
pub(crate) fn open_lock_file(path: &str) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::new(Kind::Io, format!("cannot open lock file '{path}': {e}")))
}

/// The destination's window now, changed by `change` (under the window file's flock) unless
/// `change` is None. An unusable window file leaves every slot usable: throttling must never
/// stop a migration by itself.
fn window(
    lock_dir: &str,
    destination: &str,
    slots: u32,
    change: Option<&dyn Fn(Window, u64) -> Window>,
) -> Window {
    use std::io::{Read, Seek, Write};
    let now = now_ms();
    let full = Window {
        limit: slots,
        changed_ms: 0,
    };
    let path = format!("{lock_dir}/handshake-{}.window", lock_name(destination));
    let Ok(mut file) = open_lock_file(&path) else {
        return full;
    };
    // a short critical section: try briefly instead of blocking forever
    let locked = poll_until(Deadline::after_ms(200), Duration::from_millis(1), || {
        Ok(crate::sys::try_flock(file.as_fd()).then_some(()))
    });
    if !matches!(locked, Ok(Some(()))) {
        return full;
    }
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let current = Window::parse(&text, slots, now);
    let Some(change) = change else {
        return current;
    };
    let next = change(current, now);
    if next != current {
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(format!("{} {}\n", next.limit, next.changed_ms).as_bytes());
    }
    next
}

/// Records that `destination` dropped a handshake before authentication: fewer slots for it.
pub(crate) fn note_drop(lock_dir: &str, destination: &str, slots: u32) -> u32 {
    if slots == 0 {
        return 0;
    }
    window(
        lock_dir,
        destination,
        slots,
        Some(&|w, now| w.after_drop(now)),
    )
    .limit
}

/// Records a handshake that got through to `destination`: its slots grow back.
pub(crate) fn note_success(lock_dir: &str, destination: &str, slots: u32) {
    if slots > 0 {
        window(
            lock_dir,
            destination,
            slots,
            Some(&|w, now| w.after_success(slots, now)),
        );
    }
}

/// Takes one of `slots` handshake slots for `destination`, waiting until one is free or the
/// deadline passes. With `adaptive`, only the destination's current window of them is used
/// (see [`Window`]). `slots == 0` disables the limit.
pub fn acquire(
    lock_dir: &str,
    destination: &str,
    slots: u32,
    adaptive: bool,
    deadline: Deadline,
) -> Result<Option<Slot>> {
    if slots == 0 {
        return Ok(None);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(lock_dir)
        .map_err(|e| {
            Error::new(
                Kind::Io,
                format!("cannot create lock directory '{lock_dir}': {e}"),
            )
        })?;
    let name = lock_name(destination);
    // Jittered, so that waiters spread out.
    let step = Duration::from_millis(20 + random_below(30));
    poll_until(deadline, step, || {
        let usable = if adaptive {
            window(lock_dir, destination, slots, None).limit
        } else {
            slots
        };
        // Start at a random slot so that waiters spread over the files.
        let first = random_below(usable as u64) as u32;
        for i in 0..usable {
            let path = format!("{lock_dir}/handshake-{name}.{}.lock", (first + i) % usable);
            let file = open_lock_file(&path)?;
            if crate::sys::try_flock(file.as_fd()) {
                return Ok(Some(Slot { _file: file }));
            }
        }
        Ok(None)
    })?
    .map(Some)
    .ok_or_else(|| {
        Error::new(
            Kind::Timeout,
            format!(
                "all {slots} ssh handshake slots for {destination} stayed busy until the deadline"
            ),
        )
    })
}

/// Whether ssh failed before authentication, so that no remote command can have run: exit 255,
/// nothing on stdout, and stderr shows a connection dropped during the handshake (as sshd's
/// MaxStartups does) or refused.
pub fn failed_before_auth(exit_255: bool, stdout_empty: bool, stderr: &str) -> bool {
    const MARKERS: [&str; 5] = [
        "kex_exchange_identification:",
        "banner exchange:",
        "Connection closed by ",
        "Connection reset by ",
        "Connection refused",
    ];
    exit_255
        && stdout_empty
        && stderr
            .lines()
            .any(|l| MARKERS.iter().any(|m| l.contains(m)))
}

/// Jittered exponential backoff before retry `attempt` (1-based): 200 ms doubling, at most 3 s,
/// times a random factor in [0.5, 1.5).
pub fn backoff(attempt: u32) -> Duration {
    let base = (200u64 << attempt.saturating_sub(1).min(4)).min(3000);
    Duration::from_millis(base / 2 + random_below(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_handshake_drops_count_as_failed_before_auth() {
        assert!(failed_before_auth(
            true,
            true,
            "kex_exchange_identification: read: Connection reset by peer\r\n"
        ));
        assert!(failed_before_auth(
            true,
            true,
            "Connection closed by 198.18.0.2 port 22\n"
        ));
        assert!(failed_before_auth(
            true,
            true,
            "ssh: connect to host 198.18.0.2 port 22: Connection refused\n"
        ));
        // After authentication the remote command may have run: never retried.
        assert!(!failed_before_auth(
            true,
            true,
            "Connection to 198.18.0.2 closed by remote host.\n"
        ));
        assert!(!failed_before_auth(
            true,
            true,
            "root@198.18.0.2: Permission denied (publickey).\n"
        ));
        assert!(!failed_before_auth(
            true,
            true,
            "ssh: connect to host 198.18.0.99 port 22: Connection timed out\n"
        ));
        assert!(!failed_before_auth(
            true,
            false,
            "kex_exchange_identification: Connection closed by remote host\n"
        ));
        assert!(!failed_before_auth(
            false,
            true,
            "kex_exchange_identification: Connection closed by remote host\n"
        ));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 1..10 {
            let d = backoff(attempt).as_millis() as u64;
            let base = (200u64 << (attempt - 1).min(4)).min(3000);
            assert!(
                d >= base / 2 && d < base / 2 + base,
                "attempt {attempt}: {d} ms"
            );
        }
    }

    #[test]
    fn the_window_halves_once_per_burst_of_drops_and_grows_back_one_slot_at_a_time() {
        let w = Window::parse("", 8, 10_000);
        assert_eq!(w.limit, 8, "no record: every slot");
        let w = w.after_drop(20_000);
        assert_eq!(
            w,
            Window {
                limit: 4,
                changed_ms: 20_000
            }
        );
        // more drops of the same burst: no further halving
        assert_eq!(w.after_drop(20_500), w);
        let w = w.after_drop(21_000).after_drop(22_000).after_drop(23_000);
        assert_eq!(w.limit, 1, "never below one slot");
        assert_eq!(w.after_drop(24_000).limit, 1);
        // successes: one slot back per second, up to the configured count
        assert_eq!(
            w.after_success(8, 23_500),
            w,
            "too soon after the last change"
        );
        let mut w = w.after_success(8, 24_000);
        assert_eq!(w.limit, 2);
        for t in 1..20 {
            w = w.after_success(8, 24_000 + t * 1000);
        }
        assert_eq!(w.limit, 8);
        // stored and read back; stale or garbage records mean every slot
        assert_eq!(
            Window::parse("3 50000\n", 8, 51_000),
            Window {
                limit: 3,
                changed_ms: 50_000
            }
        );
        assert_eq!(Window::parse("3 50000\n", 8, 50_000 + FORGET_MS).limit, 8);
        assert_eq!(
            Window::parse("99 50000", 8, 51_000).limit,
            8,
            "clamped to the slots"
        );
        assert_eq!(Window::parse("0 50000", 8, 51_000).limit, 1);
        assert_eq!(Window::parse("x y", 8, 51_000).limit, 8);
    }

    #[test]
    fn a_dropping_destination_gets_fewer_slots_in_every_process() {
        let dir = crate::scratch::ScratchDir::new("window");
        let dir_s = dir.as_str();
        let dest = "root@198.18.0.2";
        let _a = acquire(dir_s, dest, 4, true, Deadline::after_ms(1000))
            .unwrap()
            .unwrap();
        assert_eq!(note_drop(dir_s, dest, 4), 2);
        // the window is in the file: what another process would read
        let text = std::fs::read_to_string(dir.file("handshake-root@198.18.0.2.window")).unwrap();
        assert!(text.starts_with("2 "), "{text:?}");
        // two slots usable, one held by _a (it may be slot 0 or 1, or beyond the window)
        let held: Vec<_> = (0..4)
            .filter_map(|_| {
                acquire(dir_s, dest, 4, true, Deadline::after_ms(50))
                    .ok()
                    .flatten()
            })
            .collect();
        assert!(
            held.len() <= 2,
            "{} slots taken in a window of 2",
            held.len() + 1
        );
    }

    #[test]
    fn slots_are_exclusive_and_released_on_drop() {
        let dir = crate::scratch::ScratchDir::new("throttle");
        let dir_s = dir.as_str();
        let a = acquire(dir_s, "root@198.18.0.2", 2, true, Deadline::after_ms(1000))
            .unwrap()
            .unwrap();
        let b = acquire(dir_s, "root@198.18.0.2", 2, true, Deadline::after_ms(1000))
            .unwrap()
            .unwrap();
        // flock is per open file description: a third taker in this process must wait too.
        let err = acquire(dir_s, "root@198.18.0.2", 2, true, Deadline::after_ms(100)).unwrap_err();
        assert_eq!(err.kind, Kind::Timeout);
        assert!(
            acquire(dir_s, "root@198.18.0.3", 2, true, Deadline::after_ms(100))
                .unwrap()
                .is_some(),
            "another destination has its own slots"
        );
        drop(a);
        assert!(
            acquire(dir_s, "root@198.18.0.2", 2, true, Deadline::after_ms(1000))
                .unwrap()
                .is_some()
        );
        drop(b);
        assert!(
            acquire(dir_s, "x", 0, true, Deadline::after_ms(0))
                .unwrap()
                .is_none(),
            "0 slots = no limit"
        );
    }
}
