//! Which process listens on a UNIX socket path or a TCP port, decided from the kernel's socket
//! tables without ever connecting: a forward's readiness (a connection would be forwarded to
//! the target QEMU, which accepts exactly one and exits on a bad stream) and a shared ssh
//! master's liveness (it holds its control socket).

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// `TCP_LISTEN` in the `st` column of /proc/net/tcp and /proc/net/tcp6.
const TCP_LISTEN: &str = "0A";

/// A socket address as /proc/net/tcp{,6} prints it: the address as 32-bit words in the
/// kernel's byte order, each `%08X`, then `:` and the port `%04X`.
fn proc_tcp_address(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some((ip, port))
}

/// Listening sockets on `port`, from the text of /proc/net/tcp or /proc/net/tcp6: each
/// one's local address and inode.
fn tcp_listeners(table: &str, port: u16) -> Vec<(IpAddr, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != TCP_LISTEN {
                return None;
            }
            let (ip, p) = proc_tcp_address(fields[1])?;
            (p == port).then_some((ip, fields[9].parse().ok()?))
        })
        .collect()
}

/// Whether a connection to `localhost` could reach a socket listening at `ip`: a loopback
/// address (an IPv4-mapped one too) or a wildcard one.
fn reachable_from_localhost(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
    }
}

/// Who listens on a TCP port at addresses `localhost` reaches (see
/// [`reachable_from_localhost`]): the sockets a given process holds, and the others.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TcpPort {
    /// `ADDRESS:PORT` and inode of each listening socket the process holds.
    pub(crate) held: Vec<(String, u64)>,
    /// The same for every other listening socket there.
    pub(crate) foreign: Vec<(String, u64)>,
}

impl TcpPort {
    /// Whether the process holds a listening socket on the port.
    pub(crate) fn held(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Sorts the listeners on `port` in `tables` (/proc/net/tcp's and tcp6's text) into those
/// whose inode is in `held` and the others.
fn sort_tcp_listeners(tables: &[String], port: u16, held: &HashSet<u64>) -> TcpPort {
    let mut out = TcpPort::default();
    for (ip, inode) in tables.iter().flat_map(|t| tcp_listeners(t, port)) {
        if !reachable_from_localhost(ip) {
            continue;
        }
        let at = match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        if held.contains(&inode) {
            out.held.push((at, inode));
        } else {
            out.foreign.push((at, inode));
        }
    }
    out
}

/// Who listens on TCP `port` where `localhost` reaches it, sorted by whether process `pid`
/// holds the socket (see [`TcpPort`]). A host without IPv6 has no /proc/net/tcp6: none there.
pub(crate) fn tcp_port(port: u16, pid: i32) -> Result<TcpPort> {
    let mut tables = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(t) => tables.push(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.ends_with('6') => {}
            Err(e) => {
                return Err(Error::new(
                    crate::error::Kind::Io,
                    format!("reading {path}: {e}"),
                ));
            }
        }
    }
    let any = tables.iter().any(|t| !tcp_listeners(t, port).is_empty());
    let held = if any {
        socket_inodes(pid)?
    } else {
        HashSet::new()
    };
    Ok(sort_tcp_listeners(&tables, port, &held))
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

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:EA60 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0
   1: 00000000:EA60 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5002 1 0000000000000000 100 0 0 10 0
   2: 020012C6:EA60 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5003 1 0000000000000000 100 0 0 10 0
   3: 0100007F:EA60 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5004 1 0000000000000000 100 0 0 10 0
   4: 0100007F:EA61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5005 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:EA60 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:EA60 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6002 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn tcp_listeners_on_a_port_are_read_in_both_families() {
        // 60000 = 0xEA60; 127.0.0.1 is printed 0100007F on this (little-endian) kernel
        let v4 = tcp_listeners(TCP, 60000);
        let shown: Vec<String> = v4.iter().map(|(ip, i)| format!("{ip} {i}")).collect();
        assert_eq!(
            shown,
            ["127.0.0.1 5001", "0.0.0.0 5002", "198.18.0.2 5003"],
            "only LISTEN sockets on the port (not the connected one, not port 60001)"
        );
        let v6 = tcp_listeners(TCP6, 60000);
        let shown: Vec<String> = v6.iter().map(|(ip, i)| format!("{ip} {i}")).collect();
        assert_eq!(shown, ["::1 6001", "::ffff:127.0.0.1 6002"]);
    }

    #[test]
    fn a_tcp_port_is_ours_only_where_localhost_reaches_and_other_listeners_are_named() {
        let tables = [TCP.to_string(), TCP6.to_string()];
        let held: HashSet<u64> = [5001, 6001].into();
        let port = sort_tcp_listeners(&tables, 60000, &held);
        assert!(port.held());
        assert_eq!(
            port.held,
            [
                ("127.0.0.1:60000".into(), 5001),
                ("[::1]:60000".into(), 6001)
            ]
        );
        assert_eq!(
            port.foreign,
            [
                ("0.0.0.0:60000".to_string(), 5002),
                ("[::ffff:127.0.0.1]:60000".to_string(), 6002)
            ],
            "a wildcard and a mapped loopback listener reach localhost too; 198.18.0.2 does not"
        );
        let nobody = sort_tcp_listeners(&tables, 60002, &held);
        assert_eq!(nobody, TcpPort::default());
    }

    #[test]
    fn a_tcp_listener_of_this_process_is_held_and_one_of_another_is_foreign() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = tcp_port(port, std::process::id() as i32).unwrap();
        assert!(me.held(), "{me:?}");
        assert_eq!(me.held[0].0, format!("127.0.0.1:{port}"));
        assert!(me.foreign.is_empty(), "{me:?}");
        // pid 1 does not hold it: for pid 1 it is someone else's listener
        let init = tcp_port(port, 1).unwrap();
        assert!(!init.held());
        assert_eq!(init.foreign.len(), 1, "{init:?}");
        drop(listener);
        assert_eq!(
            tcp_port(port, std::process::id() as i32).unwrap(),
            TcpPort::default()
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
