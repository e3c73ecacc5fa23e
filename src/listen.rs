//! Which process listens on a UNIX socket path, decided from the kernel's socket table without
//! ever connecting: a forward's readiness (a connection would be forwarded to the target QEMU,
//! which accepts exactly one and exits on a bad stream) and a shared ssh master's liveness
//! (it holds its control socket).

use crate::error::{Error, Result};
use std::collections::HashSet;

/// `__SO_ACCEPTCON` in the Flags column of /proc/net/unix: the socket is listening.
const ACCEPTCON: u32 = 0x0001_0000;

/// Inodes of listening sockets whose bound path passes `bound`, from the text of
/// /proc/net/unix. The path is the one given to
/// `bind`: a socket file renamed or linked elsewhere afterwards still shows its first name.
fn listening_inodes_where(proc_net_unix: &str, bound: impl Fn(&str) -> bool) -> Vec<u64> {
    proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !bound(&fields[7..].join(" ")) {
                return None;
            }
            let flags = u32::from_str_radix(fields[3], 16).ok()?;
            let inode = fields[6].parse().ok()?;
            (flags & ACCEPTCON != 0).then_some(inode)
        })
        .collect()
}

/// Socket inodes that process `pid` holds open.
pub(crate) fn socket_inodes(pid: i32) -> Result<HashSet<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::new(crate::error::Kind::Io, format!("reading {dir}: {e}")))?;
    Ok(entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect())
}

/// Whether `path` is a listening socket held by process `pid`. A stale socket file, or one
/// bound by some other process, does not count.
pub(crate) fn is_listening(path: &str, pid: i32) -> Result<bool> {
    holds_listener(pid, |p| p == path)
}

/// Whether process `pid` holds a listening socket whose bound path passes `bound`.
pub(crate) fn holds_listener(pid: i32, bound: impl Fn(&str) -> bool) -> Result<bool> {
    let table = std::fs::read_to_string("/proc/net/unix").map_err(|e| {
        Error::new(
            crate::error::Kind::Io,
            format!("reading /proc/net/unix: {e}"),
        )
    })?;
    let candidates = listening_inodes_where(&table, bound);
    if candidates.is_empty() {
        return Ok(false);
    }
    let held = socket_inodes(pid)?;
    Ok(candidates.iter().any(|i| held.contains(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/qemu-server/100.migrate
0000000000000000: 00000003 00000000 00000000 0001 03 4243 /run/qemu-server/100.migrate
0000000000000000: 00000002 00000000 00010000 0001 01 4244 /run/qemu-server/1000.migrate
0000000000000000: 00000002 00000000 00010000 0001 01 4245 @abstract
0000000000000000: 00000003 00000000 00000000 0001 03 4246
";

    #[test]
    fn only_listening_sockets_at_exactly_the_path_count() {
        assert_eq!(
            listening_inodes_where(TABLE, |p| p == "/run/qemu-server/100.migrate"),
            vec![4242]
        );
        assert_eq!(
            listening_inodes_where(TABLE, |p| p == "/run/qemu-server/10.migrate"),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn a_listener_held_by_this_process_is_seen_and_others_are_not() {
        let dir = crate::scratch::ScratchDir::new("ready");
        let path = dir.path().join("100.migrate");
        let path_s = path.to_str().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(is_listening(path_s, std::process::id() as i32).unwrap());
        // pid 1 does not hold our socket.
        assert!(!is_listening(path_s, 1).unwrap());
        drop(listener);
        // The file stays behind but nobody listens: a stale socket is not ready.
        assert!(path.exists());
        assert!(!is_listening(path_s, std::process::id() as i32).unwrap());
    }
}
