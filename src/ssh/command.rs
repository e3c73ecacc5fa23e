//! The ssh command line: the caller's prefix, the options the library always adds, and
//! starting ssh with our ends of its stdio.

use super::throttle;
use crate::error::{Error, Result};
use crate::io::{self, Deadline};
use crate::process::{Child, Exit};
use crate::validate;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use serde_json::Value;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// An ssh invocation: the caller's argv prefix (binary, options, `user@host`) plus the options
/// the library always adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    prefix: Vec<String>,
    /// `ConnectTimeout` in seconds (0 = leave ssh's default).
    pub connect_timeout_s: u32,
    /// `ServerAliveInterval` in seconds (0 = off).
    pub server_alive_interval_s: u32,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: u32,
    /// Concurrent handshakes to this destination across processes (0 = no limit).
    pub handshake_slots: u32,
    /// Whether a destination that drops handshakes gets fewer slots for a while (see
    /// [`throttle::Window`]); off: always `handshake_slots`.
    pub adaptive_slots: bool,
    /// How often a connection that failed before authentication is retried at most; the
    /// default ([`UNTIL_DEADLINE`]) retries until the caller's deadline.
    pub connect_retries: u32,
    /// Directory of the handshake slot files.
    pub lock_dir: String,
    /// Cipher preference for the bulk transfer (`-o Ciphers=`), only when the caller asks for
    /// one (the `ciphers` option); `None` (the default) leaves the choice to ssh and the
    /// admin's `ssh_config`.
    pub ciphers: Option<String>,
    /// OpenSSH connection sharing (see [`super::share`]); `None` = a connection per use.
    pub share: Option<ShareConfig>,
}

/// `connect_retries` default: a handshake the destination dropped is retried until the
/// caller's deadline (with jittered backoff), not a fixed number of times.
pub(crate) const UNTIL_DEADLINE: u32 = u32::MAX;

/// The ssh options of every call that connects (`tunnel_open`, `ssh_run`), beside the
/// call's own options in the same object (so it does not deny unknown fields: the call's own
/// struct does, see [`crate::options::from_value_split`]).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct SshOptions {
    ssh: Option<Vec<String>>,
    connect_timeout_s: Option<u32>,
    server_alive_interval_s: Option<u32>,
    server_alive_count_max: Option<u32>,
    handshake_slots: Option<u32>,
    adaptive_slots: Option<bool>,
    connect_retries: Option<u32>,
    lock_dir: Option<String>,
    ciphers: Option<String>,
    /// Several spellings (see [`ShareConfig::from_option`]).
    share: Option<Value>,
}

impl Ssh {
    /// Validates a prefix such as `["/usr/bin/ssh", "-o", "HostKeyAlias=node2", "root@198.18.0.2"]`:
    /// at least a binary and a destination, which must not look like an option.
    pub fn new(prefix: Vec<String>) -> Result<Ssh> {
        if prefix.len() < 2 {
            return Err(Error::invalid(
                "ssh prefix needs at least the ssh binary and user@host",
            ));
        }
        validate::destination(prefix.last().unwrap())?;
        Ok(Ssh {
            prefix,
            connect_timeout_s: 10,
            server_alive_interval_s: 15,
            server_alive_count_max: 3,
            // Below sshd's default MaxStartups (10) so that our own handshakes are never dropped.
            handshake_slots: 8,
            adaptive_slots: true,
            connect_retries: UNTIL_DEADLINE,
            lock_dir: throttle::DEFAULT_LOCK_DIR.into(),
            ciphers: None,
            share: None,
        })
    }

    /// Reads the prefix and the optional keepalive settings from a JSON options object
    /// (other keys are left to the caller).
    #[cfg(test)]
    pub fn from_options(opts: &Value) -> Result<Ssh> {
        Ssh::from_parsed(crate::options::from_value(opts)?)
    }

    /// The ssh invocation the options describe, validated.
    pub(crate) fn from_parsed(o: SshOptions) -> Result<Ssh> {
        let prefix = o
            .ssh
            .ok_or_else(|| Error::invalid("missing option 'ssh' (the ssh argv prefix)"))?;
        let mut ssh = Ssh::new(prefix)?;
        ssh.connect_timeout_s = o.connect_timeout_s.unwrap_or(ssh.connect_timeout_s);
        ssh.server_alive_interval_s = o
            .server_alive_interval_s
            .unwrap_or(ssh.server_alive_interval_s);
        ssh.server_alive_count_max = o
            .server_alive_count_max
            .unwrap_or(ssh.server_alive_count_max);
        ssh.handshake_slots = o.handshake_slots.unwrap_or(ssh.handshake_slots);
        ssh.adaptive_slots = o.adaptive_slots.unwrap_or(ssh.adaptive_slots);
        ssh.connect_retries = o.connect_retries.unwrap_or(ssh.connect_retries);
        if let Some(c) = o.ciphers {
            if c.bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b"-@.,".contains(&b)))
            {
                return Err(Error::invalid(format!(
                    "invalid ciphers '{}': expected a comma-separated cipher list",
                    io::printable(c.as_bytes(), 120)
                )));
            }
            // "" = leave the choice to ssh.
            ssh.ciphers = (!c.is_empty()).then_some(c);
        }
        if let Some(dir) = o.lock_dir {
            validate::socket_dir(&dir).map_err(|_| {
                Error::invalid(format!(
                    "invalid lock_dir '{}': must be an absolute, normalized path",
                    io::printable(dir.as_bytes(), 120)
                ))
            })?;
            ssh.lock_dir = dir;
        }
        ssh.share = ShareConfig::from_option(o.share.as_ref())?;
        Ok(ssh)
    }

    /// `user@host`, for messages.
    pub fn destination(&self) -> &str {
        self.prefix.last().unwrap()
    }

    /// Waits for a handshake slot to this destination (see [`crate::throttle`]).
    pub fn handshake_slot(&self, deadline: Deadline) -> Result<Option<throttle::Slot>> {
        throttle::acquire(
            &self.lock_dir,
            self.destination(),
            self.handshake_slots,
            self.adaptive_slots,
            deadline,
        )
    }

    /// Whether a failed attempt may be retried, and after how long: only failures before
    /// authentication (no remote command can have run), at most `connect_retries` times (the
    /// caller stops at its deadline). `authenticated` and `stderr` come from ssh's stderr
    /// (see `run::Stderr`). Also feeds the destination's handshake window: a drop
    /// shrinks it, an authenticated connection grows it back.
    pub fn retry_after(
        &self,
        attempt: u32,
        exit: Exit,
        stdout_empty: bool,
        authenticated: bool,
        stderr: &str,
    ) -> Option<std::time::Duration> {
        let before_auth = !authenticated
            && throttle::failed_before_auth(exit == Exit::Code(255), stdout_empty, stderr);
        if before_auth && self.adaptive_slots {
            throttle::note_drop(&self.lock_dir, self.destination(), self.handshake_slots);
        } else if authenticated {
            self.note_authenticated();
        }
        (before_auth && attempt < self.connect_retries).then(|| throttle::backoff(attempt + 1))
    }

    /// A handshake to this destination got through: its handshake window grows back.
    pub fn note_authenticated(&self) {
        if !self.adaptive_slots {
            return;
        }
        throttle::note_success(&self.lock_dir, self.destination(), self.handshake_slots);
    }

    /// "retry N" or "retry N of M" for the log.
    pub fn retry_label(&self, attempt: u32) -> String {
        if self.connect_retries == UNTIL_DEADLINE {
            format!("retry {attempt}, until the deadline")
        } else {
            format!("retry {attempt} of {}", self.connect_retries)
        }
    }

    /// The full argv. `enforced` options go right after the binary, so they win over the
    /// caller's (ssh keeps the first value of an option); the keepalive defaults go after the
    /// caller's options, so a caller can override them. The remote command is quoted word by
    /// word, because ssh joins it into one string for the remote shell.
    pub fn argv(&self, enforced: &[String], remote: &[String]) -> Vec<String> {
        self.argv_tail(enforced, &["--".into(), validate::shell_join(remote)])
    }

    /// The argv without a remote command: `tail` goes after every option (`-N` masters and
    /// `-O` control commands pass their words in `enforced` and an empty tail).
    pub fn argv_tail(&self, enforced: &[String], tail: &[String]) -> Vec<String> {
        let mut argv = vec![self.prefix[0].clone()];
        // VERBOSE makes ssh say "Authenticated to …": the end of the handshake, and proof
        // that a failure before it ran no remote command. Those lines are filtered out.
        for opt in [
            "-e",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=VERBOSE",
        ] {
            argv.push(opt.into());
        }
        argv.extend(enforced.iter().cloned());
        argv.extend(self.prefix[1..].iter().cloned());
        if self.connect_timeout_s > 0 {
            argv.extend([
                "-o".into(),
                format!("ConnectTimeout={}", self.connect_timeout_s),
            ]);
        }
        if let Some(c) = &self.ciphers {
            argv.extend(["-o".into(), format!("Ciphers={c}")]);
        }
        if self.server_alive_interval_s > 0 {
            argv.extend([
                "-o".into(),
                format!("ServerAliveInterval={}", self.server_alive_interval_s),
            ]);
            argv.extend([
                "-o".into(),
                format!("ServerAliveCountMax={}", self.server_alive_count_max),
            ]);
        }
        argv.extend(tail.iter().cloned());
        argv
    }

    /// Starts ssh with one socket as its stdin and stdout (writes use MSG_NOSIGNAL) and a pipe
    /// as stderr. Returns the child and our ends, both non-blocking.
    pub fn spawn(
        &self,
        enforced: &[String],
        remote: &[String],
    ) -> Result<(Child, OwnedFd, OwnedFd)> {
        if remote.is_empty() {
            return Err(Error::invalid("remote command is empty"));
        }
        self.spawn_argv(&self.argv(enforced, remote))
    }

    /// [`Ssh::spawn`] with a ready-made argv.
    pub fn spawn_argv(&self, argv: &[String]) -> Result<(Child, OwnedFd, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| Error::io("socketpair", e))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe2", e))?;
        // Only our end is non-blocking; ssh gets blocking fds as usual.
        nix::fcntl::fcntl(
            err_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::io("fcntl", e))?;
        nix::fcntl::fcntl(
            theirs.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| Error::io("fcntl", e))?;
        let child = Child::spawn(argv, [theirs.as_fd(), theirs.as_fd(), err_w.as_fd()])
            .map_err(|e| e.context(format!("starting ssh to {}", self.destination())))?;
        Ok((child, ours, err_r))
    }
}

/// Where control sockets live unless the caller says otherwise.
pub const DEFAULT_CONTROL_DIR: &str = "/run/mtunnel/ssh-ctl";

/// ssh binds its control socket under a temporary name: PATH + "." + 16 random characters.
pub(crate) const SSH_TEMP_SUFFIX: usize = 17;

/// The longest control directory we accept: `DIR/cHASH16.MM` plus ssh's temporary suffix
/// must fit in `sun_path`.
pub const MAX_CONTROL_DIR: usize =
    crate::validate::MAX_SOCKET_PATH - SSH_TEMP_SUFFIX - "/c0123456789abcdef.63".len();

/// The `share` object as given. Numbers are also taken as strings (a command line and Perl
/// hand them over so), hence `Value` for those; `exit_idle` is read by the one boolean rule.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ShareOptions {
    control_dir: Option<String>,
    persist_s: Option<Value>,
    max_sessions: Option<Value>,
    exit_idle: Option<bool>,
}

/// Connection sharing settings (the `share` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// Directory of control sockets and pool files; created 0700, refused if it is not a
    /// directory of ours with mode 0700 (or stricter).
    pub control_dir: String,
    /// `ControlPersist`: a master exits this many seconds after its last session ended.
    pub persist_s: u32,
    /// Sessions per master at most (sshd's `MaxSessions`).
    pub max_sessions: u32,
    /// The last user of a master asks it to exit at once (`-O exit`) instead of letting it
    /// persist for later users.
    pub exit_idle: bool,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig {
            control_dir: DEFAULT_CONTROL_DIR.into(),
            persist_s: 30,
            max_sessions: 10,
            exit_idle: false,
        }
    }
}

fn uint_field(value: Option<&Value>, key: &str) -> Result<Option<u32>> {
    let bad = || Error::invalid(format!("option 'share.{key}' must be a positive integer"));
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(bad),
        // The CLI and Perl hand over numbers as strings.
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| bad())
        }
        Some(_) => Err(bad()),
    }
}

impl ShareConfig {
    /// Reads the `share` option: absent or false = no sharing, true = the defaults (the
    /// spellings of [`crate::options::boolean`]); an object (or a string holding a JSON object, as a command line
    /// passes it) with `control_dir`, `persist_s`, `max_sessions`, `exit_idle`.
    pub fn from_option(value: Option<&Value>) -> Result<Option<ShareConfig>> {
        let obj = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(v) if crate::options::boolean(v).is_some() => {
                return Ok(crate::options::boolean(v)
                    .unwrap_or(false)
                    .then(ShareConfig::default));
            }
            Some(Value::String(s)) => match s.trim() {
                t if t.starts_with('{') => serde_json::from_str::<Value>(t).map_err(|e| {
                    Error::invalid(format!("option 'share' is not a valid JSON object: {e}"))
                })?,
                _ => {
                    return Err(Error::invalid(
                        "option 'share' must be true/false or an object {control_dir, persist_s, max_sessions, exit_idle}",
                    ));
                }
            },
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(Error::invalid(
                    "option 'share' must be true/false or an object {control_dir, persist_s, max_sessions, exit_idle}",
                ));
            }
        };
        let map = obj
            .as_object()
            .ok_or_else(|| Error::invalid("option 'share' must be true/false or an object"))?;
        let o: ShareOptions = crate::options::from_map(map, "share.")?;
        let mut c = ShareConfig::default();
        if let Some(dir) = o.control_dir {
            check_dir_name(&dir)?;
            c.control_dir = dir;
        }
        if let Some(v) = uint_field(o.persist_s.as_ref(), "persist_s")? {
            // 0 would mean "forever" to ssh.
            if v == 0 || v > 86_400 {
                return Err(Error::invalid(
                    "option 'share.persist_s' must be between 1 and 86400 seconds",
                ));
            }
            c.persist_s = v;
        }
        if let Some(v) = uint_field(o.max_sessions.as_ref(), "max_sessions")? {
            if v == 0 || v > 1000 {
                return Err(Error::invalid(
                    "option 'share.max_sessions' must be between 1 and 1000",
                ));
            }
            c.max_sessions = v;
        }
        c.exit_idle = o.exit_idle.unwrap_or(c.exit_idle);
        Ok(Some(c))
    }
}

/// Checks the spelling of a control directory: absolute, normalized, short enough that
/// ssh's control socket (and its temporary name) fits in `sun_path`.
pub fn check_dir_name(dir: &str) -> Result<()> {
    crate::validate::socket_dir(dir).map_err(|_| {
        Error::invalid(format!(
            "invalid share.control_dir '{}': must be an absolute, normalized path",
            io::printable(dir.as_bytes(), 120)
        ))
    })?;
    if dir.len() > MAX_CONTROL_DIR {
        return Err(Error::invalid(format!(
            "invalid share.control_dir '{}': longer than {MAX_CONTROL_DIR} bytes (control sockets must fit in 107 bytes)",
            io::printable(dir.as_bytes(), 120)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prefix() -> Vec<String> {
        [
            "/usr/bin/ssh",
            "-o",
            "HostKeyAlias=node2",
            "root@198.18.0.2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn argv_puts_enforced_options_before_the_callers_and_quotes_the_remote_command() {
        let mut ssh = Ssh::new(prefix()).unwrap();
        ssh.ciphers = Some("aes128-gcm@openssh.com".into());
        let argv = ssh.argv(
            &["-o".into(), "ExitOnForwardFailure=yes".into()],
            &["qm".into(), "stop".into(), "$(touch /tmp/x)".into()],
        );
        assert_eq!(
            argv,
            [
                "/usr/bin/ssh",
                "-e",
                "none",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=VERBOSE",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "HostKeyAlias=node2",
                "root@198.18.0.2",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "Ciphers=aes128-gcm@openssh.com",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
                "--",
                "qm stop '$(touch /tmp/x)'"
            ]
        );
    }

    #[test]
    fn prefix_must_end_in_a_destination_that_is_not_an_option() {
        assert!(Ssh::new(vec!["/usr/bin/ssh".into()]).is_err());
        let err = Ssh::new(vec!["/usr/bin/ssh".into(), "-oProxyCommand=sh".into()]).unwrap_err();
        assert!(
            err.message.contains("invalid ssh destination"),
            "{}",
            err.message
        );
    }

    #[test]
    fn no_ciphers_are_set_unless_the_caller_asks_so_ssh_config_decides() {
        let ssh = Ssh::from_options(&serde_json::json!({"ssh": prefix()})).unwrap();
        assert_eq!(ssh.ciphers, None);
        let argv = ssh.argv(&[], &["true".into()]);
        assert!(
            !argv.iter().any(|a| a.starts_with("Ciphers")),
            "a Ciphers option was added by default: {argv:?}"
        );
        let opts = serde_json::json!({"ssh": prefix(), "ciphers": "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"});
        let argv = Ssh::from_options(&opts)
            .unwrap()
            .argv(&[], &["true".into()]);
        assert!(
            argv.windows(2).any(|w| w
                == [
                    "-o",
                    "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
                ]),
            "{argv:?}"
        );
    }

    #[test]
    fn ciphers_option_is_checked_and_empty_means_ssh_default() {
        let mut opts = serde_json::json!({"ssh": prefix(), "ciphers": ""});
        assert_eq!(Ssh::from_options(&opts).unwrap().ciphers, None);
        opts["ciphers"] = serde_json::json!("aes256-gcm@openssh.com");
        assert_eq!(
            Ssh::from_options(&opts).unwrap().ciphers.as_deref(),
            Some("aes256-gcm@openssh.com")
        );
        opts["ciphers"] = serde_json::json!("aes; rm -rf /");
        assert!(Ssh::from_options(&opts).is_err());
    }

    #[test]
    fn share_option_is_read_and_a_master_argv_ends_without_a_remote_command() {
        let opts = serde_json::json!({"ssh": prefix(), "share": {"persist_s": 5}});
        let ssh = Ssh::from_options(&opts).unwrap();
        assert_eq!(ssh.share.as_ref().map(|c| c.persist_s), Some(5));
        assert_eq!(
            Ssh::from_options(&serde_json::json!({"ssh": prefix()}))
                .unwrap()
                .share,
            None,
            "sharing is off unless asked for"
        );
        let argv = ssh.argv_tail(&["-O".into(), "check".into()], &[]);
        assert_eq!(argv[7..9], ["-O", "check"]);
        assert!(!argv.contains(&"--".to_string()), "{argv:?}");
        assert!(argv.last().unwrap().starts_with("ServerAliveCountMax="));
    }

    #[test]
    fn keepalive_options_can_be_turned_off() {
        let mut ssh = Ssh::new(prefix()).unwrap();
        ssh.connect_timeout_s = 0;
        ssh.server_alive_interval_s = 0;
        let argv = ssh.argv(&[], &["true".into()]);
        assert!(
            !argv
                .iter()
                .any(|a| a.starts_with("ConnectTimeout") || a.starts_with("ServerAlive")),
            "{argv:?}"
        );
    }

    #[test]
    fn share_option_is_off_by_default_and_accepts_booleans_objects_and_command_line_strings() {
        assert_eq!(ShareConfig::from_option(None).unwrap(), None);
        assert_eq!(ShareConfig::from_option(Some(&json!(false))).unwrap(), None);
        assert_eq!(ShareConfig::from_option(Some(&json!("0"))).unwrap(), None);
        assert_eq!(
            ShareConfig::from_option(Some(&json!(true))).unwrap(),
            Some(ShareConfig::default())
        );
        assert_eq!(
            ShareConfig::from_option(Some(&json!("1"))).unwrap(),
            Some(ShareConfig::default())
        );
        let c = ShareConfig::from_option(Some(&json!({"control_dir": "/run/x", "persist_s": 5, "max_sessions": "2", "exit_idle": true})))
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            ShareConfig {
                control_dir: "/run/x".into(),
                persist_s: 5,
                max_sessions: 2,
                exit_idle: true
            }
        );
        let c = ShareConfig::from_option(Some(&json!(r#"{"persist_s": "7"}"#)))
            .unwrap()
            .unwrap();
        assert_eq!(c.persist_s, 7);
    }

    #[test]
    fn exit_idle_and_share_follow_the_one_boolean_rule() {
        let exit_idle = |v: Value| {
            ShareConfig::from_option(Some(&json!({ "exit_idle": v }))).map(|c| c.unwrap().exit_idle)
        };
        for off in [
            json!(false),
            json!(0),
            json!("0"),
            json!("false"),
            json!("no"),
            json!("off"),
            json!("OFF"),
            json!(""),
        ] {
            assert!(!exit_idle(off.clone()).unwrap(), "exit_idle {off}");
            assert_eq!(
                ShareConfig::from_option(Some(&off)).unwrap(),
                None,
                "share {off}"
            );
        }
        for on in [
            json!(true),
            json!(1),
            json!("1"),
            json!("true"),
            json!("yes"),
            json!("on"),
        ] {
            assert!(exit_idle(on.clone()).unwrap(), "exit_idle {on}");
            assert!(
                ShareConfig::from_option(Some(&on)).unwrap().is_some(),
                "share {on}"
            );
        }
        let err = exit_idle(json!("maybe")).unwrap_err().message;
        assert_eq!(err, "option 'share.exit_idle' must be true or false");
    }

    #[test]
    fn bad_share_options_are_refused_naming_the_key() {
        for (v, want) in [
            (json!({"persist_s": 0}), "share.persist_s"),
            (json!({"max_sessions": 0}), "share.max_sessions"),
            (json!({"max_sessions": -1}), "share.max_sessions"),
            (json!({"control_dir": "run/x"}), "share.control_dir"),
            (json!({"control_dir": "/run/../etc"}), "share.control_dir"),
            (
                json!({"control_dir": format!("/{}", "x".repeat(80))}),
                "longer than",
            ),
            (json!({"persist": 5}), "unknown option 'share.persist'"),
            (json!("maybe"), "option 'share'"),
            (json!([1]), "option 'share'"),
        ] {
            let err = ShareConfig::from_option(Some(&v)).unwrap_err();
            assert!(err.message.contains(want), "{v}: {}", err.message);
        }
    }
}
