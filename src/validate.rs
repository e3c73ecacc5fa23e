//! Validation of everything that ends up in a path we unlink or an argv we run remotely.

use crate::error::{Error, Result};

/// Where PVE keeps migration sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/run/qemu-server";

/// `sun_path` holds 108 bytes including the terminating NUL.
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Checks a VMID: 1–9 decimal digits, no sign, no leading zero (PVE's 100..999999999 range
/// is a policy of the caller; we only refuse what cannot be a VMID).
pub fn vmid(vmid: &str) -> Result<()> {
    let ok = !vmid.is_empty()
        && vmid.len() <= 9
        && vmid.bytes().all(|b| b.is_ascii_digit())
        && !vmid.starts_with('0');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid VMID '{}': expected 1-9 digits",
            crate::io::printable(vmid.as_bytes(), 40)
        )))
    }
}

/// Checks a forwarded socket path: `<socket_dir>/<vmid>.migrate`,
/// `<socket_dir>/<vmid>_nbd.migrate` or, for the new channel of a recovered post-copy
/// migration, `<socket_dir>/<vmid>_recover<N>.migrate` (N: 1-10 digits, no leading zero: the
/// driver's pid and its attempt, unique per run), shorter than
/// `sun_path`. Returns the VMID.
pub fn socket_path<'a>(path: &'a str, socket_dir: &str) -> Result<&'a str> {
    let shown = crate::io::printable(path.as_bytes(), 120);
    let bad = |why: &str| Error::invalid(format!("invalid socket path '{shown}': {why}"));
    if path.len() > MAX_SOCKET_PATH {
        return Err(bad(&format!("longer than {MAX_SOCKET_PATH} bytes")));
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err(bad("contains '.' or '..'"));
    }
    let name = path
        .strip_prefix(socket_dir)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(|| bad(&format!("not in {socket_dir}")))?;
    const EXPECTED: &str =
        "expected <vmid>.migrate, <vmid>_nbd.migrate or <vmid>_recover<N>.migrate";
    let stem = name.strip_suffix(".migrate").ok_or_else(|| bad(EXPECTED))?;
    let id = match stem.rsplit_once('_') {
        None => stem,
        Some((id, "nbd")) => id,
        Some((id, rest)) => {
            let n = rest.strip_prefix("recover").ok_or_else(|| bad(EXPECTED))?;
            let ok = (1..=10).contains(&n.len())
                && n.bytes().all(|b| b.is_ascii_digit())
                && !n.starts_with('0');
            if !ok {
                return Err(bad(EXPECTED));
            }
            id
        }
    };
    vmid(id).map_err(|_| bad(EXPECTED))?;
    Ok(id)
}

/// Checks a socket directory given by the caller: absolute, no `.`/`..`, no trailing slash.
pub fn socket_dir(dir: &str) -> Result<()> {
    let ok = dir.starts_with('/')
        && dir.len() > 1
        && !dir.ends_with('/')
        && !dir.split('/').any(|c| c == ".." || c == ".")
        && !dir.bytes().any(|b| b.is_ascii_control());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid socket_dir '{}': must be an absolute, normalized path",
            crate::io::printable(dir.as_bytes(), 120)
        )))
    }
}

/// Checks the `user@host` destination of an ssh argv prefix: neither part may start with `-`
/// (ssh would take it as an option) or be empty, and no whitespace or control characters.
pub fn destination(dest: &str) -> Result<()> {
    let shown = crate::io::printable(dest.as_bytes(), 80);
    let (user, host) = match dest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, dest),
    };
    let part_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if !part_ok(host) || user.is_some_and(|u| !part_ok(u)) {
        return Err(Error::invalid(format!(
            "invalid ssh destination '{shown}': user and host must be non-empty, not start with '-' and contain no whitespace"
        )));
    }
    Ok(())
}

/// Quotes one word for the POSIX shell that sshd runs the remote command with.
/// ssh joins its argv with spaces, so every remote word must be quoted on its own.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        // No '=': as a first word, `FOO=bar` would be a variable assignment.
        && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:@,+%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Joins words into one remote command line, each word quoted.
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_pve_migration_socket_paths() {
        assert_eq!(
            socket_path("/run/qemu-server/100.migrate", DEFAULT_SOCKET_DIR).unwrap(),
            "100"
        );
        assert_eq!(
            socket_path("/run/qemu-server/4242_nbd.migrate", DEFAULT_SOCKET_DIR).unwrap(),
            "4242"
        );
        assert_eq!(socket_path("/tmp/x/7.migrate", "/tmp/x").unwrap(), "7");
        assert_eq!(
            socket_path(
                "/run/qemu-server/100_recover4194304999.migrate",
                DEFAULT_SOCKET_DIR
            )
            .unwrap(),
            "100",
            "a recovered post-copy migration's new channel"
        );
    }

    #[test]
    fn refuses_socket_paths_outside_the_pattern() {
        for bad in [
            "/run/qemu-server/../100.migrate",
            "/run/qemu-server/./100.migrate",
            "/run/qemu-server/100.sock",
            "/run/qemu-server/abc.migrate",
            "/run/qemu-server/0100.migrate",
            "/run/qemu-server/1000000000.migrate",
            "/run/qemu-server/sub/100.migrate",
            "/run/qemu-serverX/100.migrate",
            "/etc/passwd",
            "run/qemu-server/100.migrate",
            "/run/qemu-server/$(touch x).migrate",
            "/run/qemu-server/100_recover.migrate",
            "/run/qemu-server/100_recover0.migrate",
            "/run/qemu-server/100_recover12345678901.migrate",
            "/run/qemu-server/100_recover0123.migrate",
            "/run/qemu-server/100_recover1x.migrate",
            "/run/qemu-server/100_other.migrate",
            "/run/qemu-server/_nbd.migrate",
            "/run/qemu-server/100_nbd_nbd.migrate",
            "",
        ] {
            let err = socket_path(bad, DEFAULT_SOCKET_DIR).unwrap_err();
            assert!(
                err.message.contains("invalid socket path"),
                "{bad}: {}",
                err.message
            );
        }
    }

    #[test]
    fn refuses_socket_path_longer_than_sun_path() {
        let dir = format!("/{}", "d".repeat(100));
        let err = socket_path(&format!("{dir}/100.migrate"), &dir).unwrap_err();
        assert!(err.message.contains("longer than 107"), "{}", err.message);
    }

    #[test]
    fn vmid_is_digits_only() {
        assert!(vmid("100").is_ok());
        assert!(vmid("999999999").is_ok());
        for bad in ["", "0", "01", "1234567890", "-1", "10a", "1 0", "$(id)"] {
            assert!(vmid(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destination_must_not_look_like_an_option() {
        assert!(destination("root@198.18.0.2").is_ok());
        assert!(destination("node2").is_ok());
        for bad in [
            "-oProxyCommand=x",
            "root@-oProxyCommand=x",
            "-l@host",
            "@host",
            "root@",
            "ro ot@h",
            "",
        ] {
            assert!(destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shell_quote_neutralizes_metacharacters() {
        assert_eq!(shell_quote("qm"), "qm");
        assert_eq!(
            shell_quote("/run/qemu-server/100.migrate"),
            "/run/qemu-server/100.migrate"
        );
        assert_eq!(shell_quote("$(touch /tmp/x)"), "'$(touch /tmp/x)'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("FOO=bar"), "'FOO=bar'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            shell_join(&["rm".into(), "-f".into(), "a b".into()]),
            "rm -f 'a b'"
        );
    }

    #[test]
    fn shell_quoted_words_round_trip_through_sh() {
        let words: Vec<String> = [
            "plain",
            "a b",
            "$(echo pwned)",
            "`id`",
            "it's",
            "x;y",
            "\"q\"",
            "*",
            "\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let script = format!("printf '%s\\0' {}", shell_join(&words));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let body = out.stdout.strip_suffix(b"\0").unwrap();
        let got: Vec<String> = body
            .split(|&b| b == 0)
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        assert_eq!(got, words);
    }
}
