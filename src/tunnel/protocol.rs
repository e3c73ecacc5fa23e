//! The lines of PVE's `qm mtunnel` protocol: greeting, version and command replies.

use crate::error::{Error, Kind, Result};
use crate::io::printable;

/// Checks the first line: `tunnel online`; `no quorum` is its own error.
pub fn online(line: &[u8]) -> Result<()> {
    match line {
        b"tunnel online" => Ok(()),
        b"no quorum" => Err(Error::new(Kind::NoQuorum, "no quorum on target node")),
        _ => Err(Error::new(Kind::Protocol, format!("got strange reply from tunnel ('{}')", printable(line, 200)))),
    }
}

/// Parses the second line, `ver N`, and returns N (at least 1).
pub fn version(line: &[u8]) -> Result<u32> {
    let text = std::str::from_utf8(line).ok();
    let ver = text
        .and_then(|t| t.strip_prefix("ver "))
        .filter(|n| !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|&n| n >= 1);
    ver.ok_or_else(|| Error::new(Kind::Protocol, format!("received invalid tunnel version string '{}'", printable(line, 200))))
}

/// Checks a command for sending: one non-empty line of printable text.
pub fn command(cmd: &str) -> Result<()> {
    if cmd.is_empty() || cmd.bytes().any(|b| b.is_ascii_control()) {
        return Err(Error::invalid(format!("invalid tunnel command '{}': must be one non-empty line", printable(cmd.as_bytes(), 200))));
    }
    Ok(())
}

/// Interprets the reply to a v1 command: `OK`, or `ERR: message`.
pub fn reply(line: &[u8], cmd: &str) -> Result<String> {
    if line == b"OK" {
        return Ok("OK".into());
    }
    let kind = if line.starts_with(b"ERR:") { Kind::Remote } else { Kind::Protocol };
    Err(Error::new(kind, format!("tunnel replied '{}' to command '{cmd}'", printable(line, 500))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_distinguishes_online_no_quorum_and_strange_replies() {
        assert!(online(b"tunnel online").is_ok());
        assert_eq!(online(b"no quorum").unwrap_err().kind, Kind::NoQuorum);
        let err = online(b"Welcome to node2!").unwrap_err();
        assert_eq!(err.kind, Kind::Protocol);
        assert_eq!(err.message, "got strange reply from tunnel ('Welcome to node2!')");
        assert_eq!(online(b"tunnel online ").unwrap_err().kind, Kind::Protocol);
    }

    #[test]
    fn version_line_must_be_ver_and_a_positive_number() {
        assert_eq!(version(b"ver 1").unwrap(), 1);
        assert_eq!(version(b"ver 2").unwrap(), 2);
        for bad in [&b"ver"[..], b"ver ", b"ver 0", b"ver -1", b"ver 1x", b"version 1", b"ver 99999999999", b"\xff"] {
            let err = version(bad).unwrap_err();
            assert!(err.message.starts_with("received invalid tunnel version string"), "{}", err.message);
        }
    }

    #[test]
    fn reply_ok_err_and_garbage() {
        assert_eq!(reply(b"OK", "quit").unwrap(), "OK");
        let err = reply(b"ERR: VM 100 not running", "resume 100").unwrap_err();
        assert_eq!(err.kind, Kind::Remote);
        assert_eq!(err.message, "tunnel replied 'ERR: VM 100 not running' to command 'resume 100'");
        assert_eq!(reply(b"ok", "quit").unwrap_err().kind, Kind::Protocol);
    }

    #[test]
    fn commands_are_single_lines() {
        assert!(command("resume 100").is_ok());
        assert!(command("quit\nresume 1").is_err());
        assert!(command("").is_err());
    }
}
