//! The lines the target node prints when `qm start VMID --migratedfrom NODE` succeeds, as
//! QemuMigrate.pm phase2 reads them.

use crate::error::{Error, Kind, Result};
use crate::io::printable;
use crate::validate;
use serde_json::{Map, Value, json};

/// One word: non-empty, no whitespace or control characters.
fn word(w: &str) -> bool {
    !w.is_empty() && !w.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `EXPORT volume:VOLUME`, the end of a storage migration line.
fn export_volume(rest: &str) -> Option<(&str, &str)> {
    rest.split_once(" volume:")
        .filter(|(e, v)| word(e) && word(v))
}

fn port(s: &str) -> Option<u16> {
    (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
        .filter(|&p| p > 0)
}

fn tcp_host_ok(host: &str) -> bool {
    host == "localhost"
        || (!host.is_empty() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        || (host.len() > 2
            && host.starts_with('[')
            && host.ends_with(']')
            && host[1..host.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':'))
}

/// Parses the whole output of `qm start --migratedfrom`, every line QemuMigrate.pm's phase 2
/// reads. Returns `{"uri": "unix:/run/qemu-server/100.migrate", "socket": "/run/…" (unix
/// only), "nbd": [{"drive", "uri", "socket" (unix only), "volume"}], "replicated": [{"drive",
/// "volume"}], "spice_port": N, "commands": [...], "messages": [...]}`; `commands` are the
/// words of a patched target's `mtunnel commands: …` line (what its `qm mtunnel` accepts
/// beyond `resume` and `quit`; none from a released target); `messages` holds the text of
/// `QEMU: …` lines and every line the parser does not know, so nothing is dropped silently.
/// A socket whose VMID differs from `vmid` is an error, as is output without an address or
/// with a legacy `port N` address (a TCP port on the target's localhost, from a qemu-server
/// older than this parser takes; QemuMigrate.pm forwards it with a TCP forward).
pub fn parse_start_output(output: &str, vmid: &str, socket_dir: &str) -> Result<Value> {
    validate::vmid(vmid)?;
    let mut parsed = StartOutput {
        vmid,
        socket_dir,
        result: Map::new(),
        nbd: Vec::new(),
        replicated: Vec::new(),
        commands: Vec::new(),
        messages: Vec::new(),
    };
    for line in output.lines() {
        parsed.line(line.trim_end_matches('\r'))?;
    }
    parsed.finish()
}

/// What the lines of `qm start` said so far; one method per kind of line.
struct StartOutput<'a> {
    vmid: &'a str,
    socket_dir: &'a str,
    result: Map<String, Value>,
    nbd: Vec<Value>,
    replicated: Vec<Value>,
    commands: Vec<Value>,
    messages: Vec<Value>,
}

/// A [`Kind::Protocol`] error: the target said something QemuMigrate.pm would not take.
fn protocol(message: impl Into<String>) -> Error {
    Error::new(Kind::Protocol, message)
}

impl StartOutput<'_> {
    /// Takes one line: an address line, a storage line, a replicated volume, spice's port,
    /// or a message (a `QEMU: ` line or any other text).
    fn line(&mut self, line: &str) -> Result<()> {
        let shown = printable(line.as_bytes(), 200);
        if let Some(addr) = line.strip_prefix("migration listens on ") {
            self.migration_address(addr, &shown)
        } else if let Some(rest) = line.strip_prefix("storage migration listens on nbd:unix:") {
            self.nbd_unix(rest, &shown)
        } else if let Some(rest) = line.strip_prefix("storage migration listens on nbd:") {
            self.nbd_tcp(rest, &shown)
        } else if let Some(rest) = line.strip_prefix("re-using replicated volume: ") {
            self.replicated_volume(rest, &shown)
        } else if let Some(words) = line.strip_prefix("mtunnel commands: ") {
            self.tunnel_commands(words, &shown)
        } else if let Some(p) = line.strip_prefix("spice listens on port ") {
            let p =
                port(p).ok_or_else(|| protocol(format!("unexpected spice port in '{shown}'")))?;
            self.result.insert("spice_port".into(), json!(p));
            Ok(())
        } else {
            let msg = line.strip_prefix("QEMU: ").unwrap_or(line);
            if !msg.trim().is_empty() || line.starts_with("QEMU: ") {
                self.messages.push(json!(printable(msg.as_bytes(), 1000)));
            }
            Ok(())
        }
    }

    /// A socket the target named must be in the socket directory and carry our VMID.
    fn check_socket(&self, path: &str) -> Result<()> {
        let id = validate::socket_path(path, self.socket_dir).map_err(|e| protocol(e.message))?;
        if id != self.vmid {
            return Err(protocol(format!(
                "destination UNIX socket's VMID {id} does not match source VMID {}",
                self.vmid
            )));
        }
        Ok(())
    }

    /// `migration listens on unix:PATH` or `tcp:HOST:PORT`; the legacy `port N` is refused.
    fn migration_address(&mut self, addr: &str, shown: &str) -> Result<()> {
        // One address only: a second one could pair a forwarded socket with another URI.
        if self.result.contains_key("uri") {
            return Err(protocol("target reported more than one migration address"));
        }
        let unexpected = || protocol(format!("unexpected migration address in '{shown}'"));
        if let Some(path) = addr.strip_prefix("unix:") {
            if !path.ends_with(".migrate") || path.ends_with("_nbd.migrate") {
                return Err(protocol(format!(
                    "unexpected migration socket in '{shown}'"
                )));
            }
            self.check_socket(path)?;
            self.result.insert("uri".into(), json!(addr));
            self.result.insert("socket".into(), json!(path));
        } else if addr.strip_prefix("port ").and_then(port).is_some() {
            return Err(protocol(format!(
                "target answered with the legacy address '{shown}' (a TCP port on its localhost, from a qemu-server older than this parser takes): upgrade qemu-server on the target"
            )));
        } else {
            let (host, p) = addr
                .strip_prefix("tcp:")
                .and_then(|a| a.rsplit_once(':'))
                .ok_or_else(unexpected)?;
            let p = port(p)
                .filter(|_| tcp_host_ok(host))
                .ok_or_else(unexpected)?;
            self.result
                .insert("uri".into(), json!(format!("tcp:{host}:{p}")));
        }
        Ok(())
    }

    /// `storage migration listens on nbd:unix:PATH:exportname=EXPORT volume:VOLUME`.
    fn nbd_unix(&mut self, rest: &str, shown: &str) -> Result<()> {
        let bad = || protocol(format!("unexpected storage migration line '{shown}'"));
        let (path, rest) = rest.split_once(":exportname=").ok_or_else(bad)?;
        let (export, volume) = export_volume(rest).ok_or_else(bad)?;
        self.check_socket(path)?;
        if !path.ends_with("_nbd.migrate") {
            return Err(protocol(format!("unexpected NBD socket '{path}'")));
        }
        self.nbd.push(json!({
            "drive": export.replace("drive-", ""),
            "uri": format!("nbd:unix:{path}:exportname={export}"),
            "socket": path,
            "volume": volume,
        }));
        Ok(())
    }

    /// `storage migration listens on nbd:HOST:PORT:exportname=EXPORT volume:VOLUME`.
    fn nbd_tcp(&mut self, rest: &str, shown: &str) -> Result<()> {
        let bad = || protocol(format!("unexpected storage migration line '{shown}'"));
        let (addr, rest) = rest.split_once(":exportname=").ok_or_else(bad)?;
        let (host, p) = addr.rsplit_once(':').ok_or_else(bad)?;
        let p = port(p).filter(|_| tcp_host_ok(host)).ok_or_else(bad)?;
        let (export, volume) = export_volume(rest).ok_or_else(bad)?;
        self.nbd.push(json!({
            "drive": export.replace("drive-", ""),
            "uri": format!("nbd:{host}:{p}:exportname={export}"),
            "volume": volume,
        }));
        Ok(())
    }

    /// `mtunnel commands: WORD…`: command names (`[a-z0-9-]`), in the order given.
    fn tunnel_commands(&mut self, words: &str, shown: &str) -> Result<()> {
        for w in words.split(' ').filter(|w| !w.is_empty()) {
            if !w
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(protocol(format!(
                    "unexpected mtunnel commands line '{shown}'"
                )));
            }
            self.commands.push(json!(w));
        }
        Ok(())
    }

    /// `re-using replicated volume: DRIVE - VOLUME`.
    fn replicated_volume(&mut self, rest: &str, shown: &str) -> Result<()> {
        let (drive, volume) = rest
            .split_once(" - ")
            .filter(|(d, v)| word(d) && !v.is_empty() && !v.chars().any(char::is_control))
            .ok_or_else(|| protocol(format!("unexpected replicated volume line '{shown}'")))?;
        self.replicated
            .push(json!({"drive": drive, "volume": volume}));
        Ok(())
    }

    /// The result once every line is read: without a migration address there is none.
    fn finish(mut self) -> Result<Value> {
        if !self.result.contains_key("uri") {
            return Err(protocol("unable to detect remote migration address"));
        }
        self.result.insert("nbd".into(), Value::Array(self.nbd));
        self.result
            .insert("replicated".into(), Value::Array(self.replicated));
        self.result
            .insert("commands".into(), Value::Array(self.commands));
        self.result
            .insert("messages".into(), Value::Array(self.messages));
        Ok(Value::Object(self.result))
    }
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
        let err = parse_start_output(
            "migration listens on unix:/run/qemu-server/101.migrate\n",
            "100",
            DIR,
        )
        .unwrap_err();
        assert!(
            err.message
                .contains("VMID 101 does not match source VMID 100"),
            "{}",
            err.message
        );
    }

    #[test]
    fn tcp_addresses_ipv4_ipv6_and_localhost() {
        assert_eq!(
            parse_start_output("migration listens on tcp:198.18.0.2:60000", "100", DIR).unwrap()["uri"],
            "tcp:198.18.0.2:60000"
        );
        assert_eq!(
            parse_start_output("migration listens on tcp:[fd00::2]:60000", "100", DIR).unwrap()["uri"],
            "tcp:[fd00::2]:60000"
        );
        assert_eq!(
            parse_start_output("migration listens on tcp:localhost:60000", "100", DIR).unwrap()["uri"],
            "tcp:localhost:60000"
        );
        assert!(parse_start_output("migration listens on tcp:$(id):1", "100", DIR).is_err());
        assert!(parse_start_output("migration listens on port 0", "100", DIR).is_err());
    }

    #[test]
    fn nbd_spice_and_qemu_messages() {
        let out = "storage migration listens on nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0 volume:local:100/vm-100-disk-0.raw\n\
                   spice listens on port 61000\nQEMU: warning: something\nmigration listens on unix:/run/qemu-server/100.migrate\n";
        let r = parse_start_output(out, "100", DIR).unwrap();
        assert_eq!(r["nbd"][0]["drive"], "scsi0");
        assert_eq!(
            r["nbd"][0]["uri"],
            "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0"
        );
        assert_eq!(r["nbd"][0]["socket"], "/run/qemu-server/100_nbd.migrate");
        assert_eq!(r["nbd"][0]["volume"], "local:100/vm-100-disk-0.raw");
        assert_eq!(r["spice_port"], 61000);
        assert_eq!(r["messages"][0], "warning: something");
    }

    #[test]
    fn a_patched_targets_tunnel_commands_are_listed_not_messages() {
        let out = "migration listens on unix:/run/qemu-server/100.migrate\n\
                   mtunnel commands: nbdstop postcopy-status postcopy-recover\n";
        let r = parse_start_output(out, "100", DIR).unwrap();
        assert_eq!(
            r["commands"],
            json!(["nbdstop", "postcopy-status", "postcopy-recover"])
        );
        assert_eq!(r["messages"], json!([]));
        let released = parse_start_output(
            "migration listens on unix:/run/qemu-server/100.migrate\n",
            "100",
            DIR,
        )
        .unwrap();
        assert_eq!(
            released["commands"],
            json!([]),
            "a released target names none"
        );
        let err = parse_start_output(
            "mtunnel commands: nbdstop $(id)\nmigration listens on unix:/run/qemu-server/100.migrate\n",
            "100",
            DIR,
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::Protocol, "{}", err.message);
    }

    #[test]
    fn legacy_port_answer_is_refused_clearly() {
        let err = parse_start_output("migration listens on port 60001\n", "100", DIR).unwrap_err();
        assert_eq!(err.kind, Kind::Protocol);
        assert!(
            err.message.starts_with(
                "target answered with the legacy address 'migration listens on port 60001'"
            ),
            "{}",
            err.message
        );
    }

    #[test]
    fn nbd_over_tcp_replicated_volumes_and_unknown_lines() {
        let out = "storage migration listens on nbd:198.18.0.2:60001:exportname=drive-scsi0 volume:local-lvm:vm-100-disk-0\n\
                   storage migration listens on nbd:[fd00::2]:60001:exportname=drive-virtio1 volume:local:100/vm-100-disk-1.qcow2\n\
                   re-using replicated volume: scsi1 - local-zfs:vm-100-disk-2\n\
                   Resuming suspended VM\n\
                   \n\
                   migration listens on tcp:198.18.0.2:60000\n";
        let r = parse_start_output(out, "100", DIR).unwrap();
        assert_eq!(
            r["nbd"][0],
            json!({"drive": "scsi0", "uri": "nbd:198.18.0.2:60001:exportname=drive-scsi0", "volume": "local-lvm:vm-100-disk-0"})
        );
        assert_eq!(
            r["nbd"][1]["uri"],
            "nbd:[fd00::2]:60001:exportname=drive-virtio1"
        );
        assert_eq!(
            r["replicated"],
            json!([{"drive": "scsi1", "volume": "local-zfs:vm-100-disk-2"}])
        );
        assert_eq!(
            r["messages"],
            json!(["Resuming suspended VM"]),
            "an unknown line is returned, an empty one is not"
        );
        for bad in [
            "storage migration listens on nbd:$(id):1:exportname=drive-scsi0 volume:x",
            "storage migration listens on nbd:198.18.0.2:0:exportname=drive-scsi0 volume:x",
            "re-using replicated volume: scsi0",
        ] {
            let err = parse_start_output(
                &format!("{bad}\nmigration listens on tcp:198.18.0.2:60000\n"),
                "100",
                DIR,
            )
            .unwrap_err();
            assert_eq!(err.kind, Kind::Protocol, "{bad}");
        }
    }

    #[test]
    fn a_second_migration_address_is_refused() {
        // Found by fuzzing: the unix socket would be forwarded while QEMU migrates to the tcp URI.
        for second in [
            "migration listens on tcp:198.18.0.2:60000",
            "migration listens on port 60001",
            "migration listens on unix:/run/qemu-server/100.migrate",
        ] {
            let out = format!("migration listens on unix:/run/qemu-server/100.migrate\n{second}\n");
            let err = parse_start_output(&out, "100", DIR).unwrap_err();
            assert_eq!(
                err.message,
                "target reported more than one migration address"
            );
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
