//! Limits concurrent ssh handshakes to one destination across processes, and decides when a
//! failed connection may be retried.
//!
//! sshd's default `MaxStartups 10:30:100` starts dropping connections once 10 are
//! unauthenticated. PVE's `migrateall` forks one worker per VM, so dozens of ssh handshakes to
//! the same node can start at once. Each handshake here first takes one of N slots: an
//! `flock`ed file per slot in a shared directory, released when the handshake is over (or the
//! process dies, which releases flocks by itself).

use crate::error::{Error, Kind, Result};
use crate::io::Deadline;
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

/// Takes one of `slots` handshake slots for `destination`, waiting until one is free or the
/// deadline passes. `slots == 0` disables the limit.
pub fn acquire(
    lock_dir: &str,
    destination: &str,
    slots: u32,
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
    loop {
        // Start at a random slot so that waiters spread over the files.
        let first = random_below(slots as u64) as u32;
        for i in 0..slots {
            let path = format!("{lock_dir}/handshake-{name}.{}.lock", (first + i) % slots);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| {
                    Error::new(Kind::Io, format!("cannot open lock file '{path}': {e}"))
                })?;
            if crate::sys::try_flock(file.as_fd()) {
                return Ok(Some(Slot { _file: file }));
            }
        }
        if deadline.expired() {
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "all {slots} ssh handshake slots for {destination} stayed busy until the deadline"
                ),
            ));
        }
        deadline.sleep(Duration::from_millis(20 + random_below(30)));
    }
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
    fn slots_are_exclusive_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("mtunnel-throttle-{}", std::process::id()));
        let dir_s = dir.to_str().unwrap();
        let a = acquire(dir_s, "root@198.18.0.2", 2, Deadline::after_ms(1000))
            .unwrap()
            .unwrap();
        let b = acquire(dir_s, "root@198.18.0.2", 2, Deadline::after_ms(1000))
            .unwrap()
            .unwrap();
        // flock is per open file description: a third taker in this process must wait too.
        let err = acquire(dir_s, "root@198.18.0.2", 2, Deadline::after_ms(100)).unwrap_err();
        assert_eq!(err.kind, Kind::Timeout);
        assert!(
            acquire(dir_s, "root@198.18.0.3", 2, Deadline::after_ms(100))
                .unwrap()
                .is_some(),
            "another destination has its own slots"
        );
        drop(a);
        assert!(
            acquire(dir_s, "root@198.18.0.2", 2, Deadline::after_ms(1000))
                .unwrap()
                .is_some()
        );
        drop(b);
        assert!(
            acquire(dir_s, "x", 0, Deadline::after_ms(0))
                .unwrap()
                .is_none(),
            "0 slots = no limit"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
