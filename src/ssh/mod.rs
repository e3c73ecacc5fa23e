//! ssh: the command line ([`command`]), running it ([`run`]), the handshake window toward a
//! destination ([`throttle`]) and OpenSSH connection sharing ([`share`]). [`Route`] is the
//! one place that chooses between a connection of its own and a session on a shared master.
//!
//! Dependencies point one way: `share` → `run` → `command` → `throttle`; this file uses
//! them all, and none of them uses it.

pub(crate) mod command;
pub(crate) mod run;
pub(crate) mod share;
pub(crate) mod throttle;

pub(crate) use command::{Ssh, SshOptions};
pub(crate) use run::{Output, Stderr, checked, read_line};
pub(crate) use share::Lease;

use crate::error::{Error, Result};
use crate::io::Deadline;
use crate::process::Exit;
use crate::validate;
use serde_json::Value;

/// How one use of ssh reaches its destination.
#[derive(Debug)]
pub(crate) enum Route {
    /// A connection of its own: a handshake slot until it has authenticated, and a retry when
    /// the destination dropped it before authentication.
    Direct,
    /// A session on a shared master (the `share` option): no handshake at all.
    Shared(Box<Lease>),
}

impl Route {
    /// The route `ssh`'s options ask for: a session on a shared master (started if need be;
    /// `on_start` hears of it) or a connection of its own.
    pub(crate) fn choose(
        ssh: &Ssh,
        deadline: Deadline,
        on_start: impl FnMut(&str),
    ) -> Result<Route> {
        match &ssh.share {
            Some(cfg) => Ok(Route::Shared(Box::new(share::acquire(
                ssh, cfg, deadline, on_start,
            )?))),
            None => Ok(Route::Direct),
        }
    }

    /// The session on a shared master, if this route has one.
    pub(crate) fn lease(&self) -> Option<&Lease> {
        match self {
            Route::Shared(lease) => Some(lease),
            Route::Direct => None,
        }
    }

    /// Options that make ssh take this route (a shared master's client options).
    pub(crate) fn client_options(&self) -> Vec<String> {
        self.lease().map(Lease::client_options).unwrap_or_default()
    }

    /// A handshake slot toward the destination, for a connection of its own (see
    /// [`throttle`]); a client of a shared master does no handshake.
    pub(crate) fn handshake_slot(
        &self,
        ssh: &Ssh,
        deadline: Deadline,
    ) -> Result<Option<throttle::Slot>> {
        match self {
            Route::Direct => ssh.handshake_slot(deadline),
            Route::Shared(_) => Ok(None),
        }
    }

    /// Runs `remote` over this route to its end (see [`run::run_argv`]).
    pub(crate) fn run(
        &self,
        ssh: &Ssh,
        remote: &[String],
        input: &[u8],
        deadline: Deadline,
    ) -> Result<Output> {
        let argv = ssh.argv(&self.client_options(), remote);
        let what = format!(
            "'{}' on {}",
            validate::shell_join(remote),
            ssh.destination()
        );
        match self {
            Route::Direct => run::run_retrying(ssh, &argv, &what, input, deadline),
            Route::Shared(_) => {
                let what = format!("{what} (shared connection)");
                run::run_argv(ssh, &argv, &what, input, &mut None, deadline)
            }
        }
        .map(|(out, _)| out)
    }

    /// Ends the route by `deadline` (a shared session is released, see [`Lease::release`]).
    pub(crate) fn release(self, deadline: Deadline) {
        if let Route::Shared(lease) = self {
            lease.release(deadline);
        }
    }
}

/// Runs `remote` on the destination, feeding `input` on stdin (for secrets: never argv) and
/// collecting output until ssh exits. On deadline, ssh is terminated and reaped. A
/// connection of its own holds a handshake slot until ssh has authenticated and is retried
/// when it failed before; a client that found its shared master gone (it exited by its
/// ControlPersist timer just then, or was killed) ran nothing remotely and is retried on a
/// new master.
pub(crate) fn run(
    ssh: &Ssh,
    remote: &[String],
    input: &[u8],
    deadline: Deadline,
) -> Result<Output> {
    let mut attempt = 0;
    loop {
        let route = Route::choose(ssh, deadline, |_| {})?;
        let result = route.run(ssh, remote, input, deadline);
        let master_gone = route.lease().is_some_and(|l| {
            matches!(&result, Ok(out) if out.exit == Exit::Code(255)
                && !l.alive()
                && share::fell_back(&String::from_utf8_lossy(&out.stderr)))
        });
        route.release(deadline);
        if master_gone && attempt < ssh.connect_retries.max(1) && !deadline.expired() {
            attempt += 1;
            continue;
        }
        return result;
    }
}

/// [`run`], then [`checked`]: any exit but 0 is an error naming the command.
pub(crate) fn run_checked(
    ssh: &Ssh,
    remote: &[String],
    input: &[u8],
    deadline: Deadline,
) -> Result<Output> {
    let out = run(ssh, remote, input, deadline)?;
    checked(ssh, remote, out)
}

/// The options of `ssh_run` besides the ssh ones.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RunOptions {
    command: Option<Vec<String>>,
    input: String,
    timeout_ms: i64,
    check: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            command: None,
            input: String::new(),
            timeout_ms: 60_000,
            check: true,
        }
    }
}

/// A one-shot remote command as `ssh_run` takes it: `{"ssh": [...], "command": [...],
/// "input": "...", "timeout_ms": N, "check": bool}` plus the ssh options. Returns
/// `{"exit_code", "signal", "stdout", "stderr"}`.
pub fn run_json(opts: &Value) -> Result<Value> {
    let (ssh, o): (SshOptions, RunOptions) = crate::options::from_value_split(opts)?;
    let ssh = Ssh::from_parsed(ssh)?;
    let command = o
        .command
        .ok_or_else(|| Error::invalid("missing option 'command'"))?;
    let (input, deadline) = (o.input, Deadline::after_ms(o.timeout_ms));
    let out = if o.check {
        run_checked(&ssh, &command, input.as_bytes(), deadline)?
    } else {
        run(&ssh, &command, input.as_bytes(), deadline)?
    };
    let (code, signal) = match out.exit {
        Exit::Code(c) => (serde_json::json!(c), Value::Null),
        Exit::Signal(s) => (Value::Null, serde_json::json!(s)),
        Exit::Unknown => (Value::Null, Value::Null),
    };
    Ok(serde_json::json!({
        "exit_code": code,
        "signal": signal,
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn run_collects_output_input_and_exit_code_of_a_fake_ssh() {
        // The tests' fake ssh runs the remote command here: enough to test the plumbing.
        let fake = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake-ssh");
        let ssh = Ssh::new(vec![fake.into(), "root@node".into()]).unwrap();
        let out = run(
            &ssh,
            &[
                "sh".into(),
                "-c".into(),
                "read x; echo got $x; echo oops >&2; exit 3".into(),
            ],
            b"secret\n",
            Deadline::after_ms(10_000),
        )
        .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout, b"got secret\n");
        assert_eq!(out.stderr, b"oops\n");
        let err = run_checked(
            &ssh,
            &["sh".into(), "-c".into(), "echo denied >&2; exit 255".into()],
            b"",
            Deadline::after_ms(10_000),
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::SshExited);
        assert!(
            err.message.contains("exit code 255; stderr: denied"),
            "{}",
            err.message
        );
        let err = run(
            &ssh,
            &["sleep".into(), "30".into()],
            b"",
            Deadline::after_ms(200),
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::Timeout);
    }
}
