//! The lines of PVE's `qm mtunnel` protocol: greeting, version and command replies.

use crate::error::{Error, Kind, Result};
use crate::io::printable;
use serde_json::{Value, json};

/// Checks the first line: `tunnel online`; `no quorum` is its own error.
pub fn online(line: &[u8]) -> Result<()> {
    match line {
        b"tunnel online" => Ok(()),
        b"no quorum" => Err(Error::new(Kind::NoQuorum, "no quorum on target node")),
        _ => Err(Error::new(
            Kind::Protocol,
            format!("got strange reply from tunnel ('{}')", printable(line, 200)),
        )),
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
    ver.ok_or_else(|| {
        Error::new(
            Kind::Protocol,
            format!(
                "received invalid tunnel version string '{}'",
                printable(line, 200)
            ),
        )
    })
}

/// Checks a command for sending: one non-empty line of printable text.
pub fn command(cmd: &str) -> Result<()> {
    if cmd.is_empty() || cmd.bytes().any(|b| b.is_ascii_control()) {
        return Err(Error::invalid(format!(
            "invalid tunnel command '{}': must be one non-empty line",
            printable(cmd.as_bytes(), 200)
        )));
    }
    Ok(())
}

/// Interprets the reply to a v1 command: `OK`; `OK <JSON>`, the answer of a command that
/// returns data (a patched target's post-copy commands), returned as the JSON text; or
/// `ERR: message`.
pub fn reply(line: &[u8], cmd: &str) -> Result<String> {
    if line == b"OK" {
        return Ok("OK".into());
    }
    if let Some(data) = line.strip_prefix(b"OK ") {
        // valid JSON is valid UTF-8
        if let Ok(value) = serde_json::from_slice::<Value>(data) {
            return Ok(value.to_string());
        }
    }
    let kind = if line.starts_with(b"ERR:") {
        Kind::Remote
    } else {
        Kind::Protocol
    };
    Err(Error::new(
        kind,
        format!(
            "tunnel replied '{}' to command '{cmd}'",
            printable(line, 500)
        ),
    ))
}

/// The line to send for a protocol v2 command: `cmd` itself if it is a JSON object with a
/// string `cmd`, or `{"cmd": WORD}` for a bare command name.
pub fn v2_request(cmd: &str) -> Result<String> {
    if cmd.starts_with('{') {
        let value: Value = serde_json::from_str(cmd).map_err(|e| {
            Error::invalid(format!(
                "invalid protocol v2 command '{}': {e}",
                printable(cmd.as_bytes(), 200)
            ))
        })?;
        if value.get("cmd").is_some_and(Value::is_string) {
            return Ok(cmd.to_string());
        }
        return Err(Error::invalid(format!(
            "invalid protocol v2 command '{}': a JSON object with a string 'cmd' is needed",
            printable(cmd.as_bytes(), 200)
        )));
    }
    if cmd
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(json!({"cmd": cmd}).to_string());
    }
    Err(Error::invalid(format!(
        "invalid protocol v2 command '{}': expected a command name or a JSON object with 'cmd'",
        printable(cmd.as_bytes(), 200)
    )))
}

/// Interprets the reply to a v2 command (`request` is the line sent): a JSON object whose
/// `success` is true, returned as received; PVE's texts for the errors.
pub fn v2_reply(line: &[u8], request: &str) -> Result<String> {
    let shown = printable(line, 500);
    let value: Value = match serde_json::from_slice(line) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return Err(Error::new(
                Kind::Protocol,
                format!(
                    "failed to decode tunnel reply '{shown}' (command '{request}') - not a JSON object"
                ),
            ));
        }
        Err(e) => {
            return Err(Error::new(
                Kind::Protocol,
                format!("failed to decode tunnel reply '{shown}' (command '{request}') - {e}"),
            ));
        }
    };
    let success = match value.get("success") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        _ => false,
    };
    if success {
        return Ok(value.to_string());
    }
    // PVE's messages often end in the newline of a Perl die.
    match value.get("msg").and_then(Value::as_str).map(str::trim_end) {
        Some(msg) => Err(Error::new(
            Kind::Remote,
            format!(
                "error - tunnel command '{request}' failed - {}",
                printable(msg.as_bytes(), 500)
            ),
        )),
        None => Err(Error::new(
            Kind::Remote,
            format!("error - tunnel command '{request}' failed"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_requests_are_json_objects_with_cmd() {
        assert_eq!(v2_request("resume").unwrap(), r#"{"cmd":"resume"}"#);
        assert_eq!(
            v2_request(r#"{"cmd":"quit","cleanup":true}"#).unwrap(),
            r#"{"cmd":"quit","cleanup":true}"#
        );
        for bad in [
            "resume 100",
            r#"{"cleanup":1}"#,
            r#"{"cmd":1}"#,
            "{not json",
        ] {
            assert_eq!(
                v2_request(bad).unwrap_err().kind,
                Kind::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn v2_replies_need_json_and_success() {
        let req = r#"{"cmd":"resume"}"#;
        assert_eq!(
            v2_reply(br#"{"success":true}"#, req).unwrap(),
            r#"{"success":true}"#
        );
        assert_eq!(
            v2_reply(br#"{"success":1, "api":2}"#, req).unwrap(),
            r#"{"api":2,"success":1}"#
        );
        let err = v2_reply(b"this is not json", req).unwrap_err();
        assert_eq!(err.kind, Kind::Protocol);
        assert!(err.message.starts_with(r#"failed to decode tunnel reply 'this is not json' (command '{"cmd":"resume"}') - "#), "{}", err.message);
        let err = v2_reply(br#"{"success":false,"msg":"VM 100 not running"}"#, req).unwrap_err();
        assert_eq!(err.kind, Kind::Remote);
        assert_eq!(
            err.message,
            r#"error - tunnel command '{"cmd":"resume"}' failed - VM 100 not running"#
        );
        assert_eq!(
            v2_reply(br#"{"success":false}"#, req).unwrap_err().message,
            r#"error - tunnel command '{"cmd":"resume"}' failed"#
        );
        let err = v2_reply(br#"{"success":false,"msg":"failed to handle 'resume' command - VM 100 not running\n"}"#, req).unwrap_err();
        assert!(
            err.message.ends_with("VM 100 not running"),
            "the trailing newline of a Perl die is dropped: {}",
            err.message
        );
        assert_eq!(v2_reply(b"[1]", req).unwrap_err().kind, Kind::Protocol);
    }

    #[test]
    fn greeting_distinguishes_online_no_quorum_and_strange_replies() {
        assert!(online(b"tunnel online").is_ok());
        assert_eq!(online(b"no quorum").unwrap_err().kind, Kind::NoQuorum);
        let err = online(b"Welcome to node2!").unwrap_err();
        assert_eq!(err.kind, Kind::Protocol);
        assert_eq!(
            err.message,
            "got strange reply from tunnel ('Welcome to node2!')"
        );
        assert_eq!(online(b"tunnel online ").unwrap_err().kind, Kind::Protocol);
    }

    #[test]
    fn version_line_must_be_ver_and_a_positive_number() {
        assert_eq!(version(b"ver 1").unwrap(), 1);
        assert_eq!(version(b"ver 2").unwrap(), 2);
        for bad in [
            &b"ver"[..],
            b"ver ",
            b"ver 0",
            b"ver -1",
            b"ver 1x",
            b"version 1",
            b"ver 99999999999",
            b"\xff",
        ] {
            let err = version(bad).unwrap_err();
            assert!(
                err.message
                    .starts_with("received invalid tunnel version string"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn reply_ok_err_and_garbage() {
        assert_eq!(reply(b"OK", "quit").unwrap(), "OK");
        assert_eq!(
            reply(br#"OK {"status":"stopped"}"#, "postcopy-status 100").unwrap(),
            r#"{"status":"stopped"}"#,
            "an answer with data is its JSON"
        );
        for bad in [
            &b"OK {"[..],
            b"OK ",
            b"OK  ",
            b"OK status",
            b"OKAY",
            b"OK\t{}",
        ] {
            let err = reply(bad, "postcopy-status 100").unwrap_err();
            assert_eq!(err.kind, Kind::Protocol, "{bad:?} taken as {}", err.message);
        }
        let err = reply(b"ERR: VM 100 not running", "resume 100").unwrap_err();
        assert_eq!(err.kind, Kind::Remote);
        assert_eq!(
            err.message,
            "tunnel replied 'ERR: VM 100 not running' to command 'resume 100'"
        );
        assert_eq!(reply(b"ok", "quit").unwrap_err().kind, Kind::Protocol);
    }

    #[test]
    fn commands_are_single_lines() {
        assert!(command("resume 100").is_ok());
        assert!(command("quit\nresume 1").is_err());
        assert!(command("").is_err());
    }
}
