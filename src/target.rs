//! The lines the target node prints when `qm start VMID --migratedfrom NODE` succeeds, as
//! QemuMigrate.pm phase2 reads them.

use crate::error::{Error, Kind, Result};
use crate::io::printable;
use crate::validate;
use serde_json::{Map, Value, json};

fn port(s: &str) -> Option<u16> {
    (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten().filter(|&p| p > 0)
}

fn tcp_host_ok(host: &str) -> bool {
    host == "localhost"
        || (!host.is_empty() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        || (host.len() > 2 && host.starts_with('[') && host.ends_with(']') && host[1..host.len() - 1].bytes().all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':'))
}

/// Parses the whole output of `qm start --migratedfrom`. Returns
/// `{"uri": "unix:/run/qemu-server/100.migrate", "socket": "/run/…" (unix only),
///   "nbd": [{"drive", "uri", "socket", "volume"}], "spice_port": N, "messages": [...]}`.
/// A socket whose VMID differs from `vmid` is an error, as is output without an address.
pub fn parse_start_output(output: &str, vmid: &str, socket_dir: &str) -> Result<Value> {
    validate::vmid(vmid)?;
    let mut result = Map::new();
    let mut nbd = Vec::new();
    let mut messages = Vec::new();
    let check_socket = |path: &str| -> Result<()> {
        let id = validate::socket_path(path, socket_dir).map_err(|e| Error::new(Kind::Protocol, e.message))?;
        if id != vmid {
            return Err(Error::new(Kind::Protocol, format!("destination UNIX socket's VMID {id} does not match source VMID {vmid}")));
        }
        Ok(())
    };
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(addr) = line.strip_prefix("migration listens on ") {
            // One address only: a second one could pair a forwarded socket with another URI.
            if result.contains_key("uri") {
                return Err(Error::new(Kind::Protocol, "target reported more than one migration address"));
            }
            if let Some(path) = addr.strip_prefix("unix:") {
                if !path.ends_with(".migrate") || path.ends_with("_nbd.migrate") {
                    return Err(Error::new(Kind::Protocol, format!("unexpected migration socket in '{}'", printable(line.as_bytes(), 200))));
                }
                check_socket(path)?;
                result.insert("uri".into(), json!(addr));
                result.insert("socket".into(), json!(path));
            } else if let Some(p) = addr.strip_prefix("port ").and_then(port) {
                result.insert("uri".into(), json!(format!("tcp:localhost:{p}")));
            } else if let Some((host, p)) = addr.strip_prefix("tcp:").and_then(|a| a.rsplit_once(':')) {
                let p = port(p).filter(|_| tcp_host_ok(host)).ok_or_else(|| Error::new(Kind::Protocol, format!("unexpected migration address in '{}'", printable(line.as_bytes(), 200))))?;
                result.insert("uri".into(), json!(format!("tcp:{host}:{p}")));
            } else {
                return Err(Error::new(Kind::Protocol, format!("unexpected migration address in '{}'", printable(line.as_bytes(), 200))));
            }
        } else if let Some(rest) = line.strip_prefix("storage migration listens on nbd:unix:") {
            let parsed = rest.split_once(":exportname=").and_then(|(path, rest)| {
                let (export, volume) = rest.split_once(" volume:")?;
                let word = |w: &str| !w.is_empty() && !w.chars().any(|c| c.is_whitespace() || c.is_control());
                let ok = word(export) && word(volume);
                ok.then_some((path, export, volume))
            });
            let (path, export, volume) = parsed.ok_or_else(|| Error::new(Kind::Protocol, format!("unexpected storage migration line '{}'", printable(line.as_bytes(), 200))))?;
            check_socket(path)?;
            if !path.ends_with("_nbd.migrate") {
                return Err(Error::new(Kind::Protocol, format!("unexpected NBD socket '{path}'")));
            }
            nbd.push(json!({
                "drive": export.replace("drive-", ""),
                "uri": format!("nbd:unix:{path}:exportname={export}"),
                "socket": path,
                "volume": volume,
            }));
        } else if let Some(p) = line.strip_prefix("spice listens on port ") {
            let p = port(p).ok_or_else(|| Error::new(Kind::Protocol, format!("unexpected spice port in '{}'", printable(line.as_bytes(), 200))))?;
            result.insert("spice_port".into(), json!(p));
        } else if let Some(msg) = line.strip_prefix("QEMU: ") {
            messages.push(json!(msg));
        }
    }
    if !result.contains_key("uri") {
        return Err(Error::new(Kind::Protocol, "unable to detect remote migration address"));
    }
    result.insert("nbd".into(), Value::Array(nbd));
    result.insert("messages".into(), Value::Array(messages));
    Ok(Value::Object(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    const DIR: &str = validate::DEFAULT_SOCKET_DIR;

    #[test]
    fn unix_address_with_matching_vmid() {
        let out = "some noise\nmigration listens on unix:/run/qemu-server/100.migrate\n";
        let r = parse_start_output(out, "100", DIR).unwrap();
        assert_eq!(r["uri"], "unix:/run/qemu-server/100.migrate");
        assert_eq!(r["socket"], "/run/qemu-server/100.migrate");
    }

    #[test]
    fn vmid_mismatch_is_refused() {
        let err = parse_start_output("migration listens on unix:/run/qemu-server/101.migrate\n", "100", DIR).unwrap_err();
        assert!(err.message.contains("VMID 101 does not match source VMID 100"), "{}", err.message);
    }

    #[test]
    fn tcp_and_legacy_port_addresses() {
        assert_eq!(parse_start_output("migration listens on tcp:198.18.0.2:60000", "100", DIR).unwrap()["uri"], "tcp:198.18.0.2:60000");
        assert_eq!(parse_start_output("migration listens on tcp:[fd00::2]:60000", "100", DIR).unwrap()["uri"], "tcp:[fd00::2]:60000");
        assert_eq!(parse_start_output("migration listens on port 60001", "100", DIR).unwrap()["uri"], "tcp:localhost:60001");
        assert!(parse_start_output("migration listens on tcp:$(id):1", "100", DIR).is_err());
        assert!(parse_start_output("migration listens on port 0", "100", DIR).is_err());
    }

    #[test]
    fn nbd_spice_and_qemu_messages() {
        let out = "storage migration listens on nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0 volume:local:100/vm-100-disk-0.raw\n\
                   spice listens on port 61000\nQEMU: warning: something\nmigration listens on unix:/run/qemu-server/100.migrate\n";
        let r = parse_start_output(out, "100", DIR).unwrap();
        assert_eq!(r["nbd"][0]["drive"], "scsi0");
        assert_eq!(r["nbd"][0]["uri"], "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0");
        assert_eq!(r["nbd"][0]["socket"], "/run/qemu-server/100_nbd.migrate");
        assert_eq!(r["nbd"][0]["volume"], "local:100/vm-100-disk-0.raw");
        assert_eq!(r["spice_port"], 61000);
        assert_eq!(r["messages"][0], "warning: something");
    }

    #[test]
    fn a_second_migration_address_is_refused() {
        // Found by fuzzing: the unix socket would be forwarded while QEMU migrates to the tcp URI.
        for second in ["migration listens on tcp:198.18.0.2:60000", "migration listens on port 60001", "migration listens on unix:/run/qemu-server/100.migrate"] {
            let out = format!("migration listens on unix:/run/qemu-server/100.migrate\n{second}\n");
            let err = parse_start_output(&out, "100", DIR).unwrap_err();
            assert_eq!(err.message, "target reported more than one migration address");
        }
    }

    #[test]
    fn control_characters_in_nbd_lines_are_refused() {
        let out = "storage migration listens on nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0\x1b[2J volume:local:x\n\
                   migration listens on unix:/run/qemu-server/100.migrate\n";
        assert!(parse_start_output(out, "100", DIR).is_err());
    }

    #[test]
    fn output_without_address_is_the_pve_error() {
        let err = parse_start_output("Configuration file not found\n", "100", DIR).unwrap_err();
        assert_eq!(err.message, "unable to detect remote migration address");
    }

    #[test]
    fn socket_path_tricks_are_refused() {
        for line in [
            "migration listens on unix:/run/qemu-server/../100.migrate",
            "migration listens on unix:/tmp/100.migrate",
            "migration listens on unix:/run/qemu-server/100_nbd.migrate",
        ] {
            assert!(parse_start_output(line, "100", DIR).is_err(), "{line}");
        }
    }
}
