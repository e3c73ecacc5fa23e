//! C functions for one-shot remote commands and the target's start output.

use super::{boundary, put_string, str_arg};
use crate::{options, ssh, target, validate};
use std::ffi::{c_char, c_int};

/// Runs one remote command over ssh and collects its output, e.g. `qm start VMID
/// --migratedfrom NODE`. Every word of the command is shell-quoted for the remote shell.
///
/// `options_json` (required): `{"ssh": [prefix…, "user@host"], "command": ["qm", "start", …],
/// "input": "secret on stdin" (never argv), "timeout_ms": 60000, "check": true}` plus the
/// ssh options of `tunnel_open` (keepalive, `"ciphers"`, handshake slots, retries: a connection that failed
/// before authentication is retried, so the command never runs twice; `"share"`: the command
/// runs as a client of a pooled shared master, holding one of its session slots while it runs). With `"check": true` a non-zero exit is an error
/// (`MTUNNEL_ERR_SSH_EXITED` for ssh's own 255, else `MTUNNEL_ERR_REMOTE`, stderr tail in the
/// last error; an exit status the host reaped itself is unknown and not an error). On success
/// `*result_out` (may be NULL; free with `mtunnel_string_free`) gets
/// `{"exit_code": N|null, "signal": N|null, "stdout": "…", "stderr": "…"}`.
/// On deadline ssh is killed and reaped: `MTUNNEL_ERR_TIMEOUT`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mtunnel_ssh_run(
    options_json: *const c_char,
    result_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = options::parse(Some(unsafe { str_arg(options_json, "options_json") }?))?;
        let result = ssh::run_json(&opts)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(result_out, result.to_string()) };
        Ok(())
    })
}

/// Deprecated name of [`mtunnel_ssh_run`] (`ssh_` is libssh's namespace), kept for one
/// release: same arguments, ownership and result codes.
#[deprecated(note = "use mtunnel_ssh_run")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ssh_run(
    options_json: *const c_char,
    result_out: *mut *mut c_char,
) -> c_int {
    // SAFETY: the caller's arguments, passed on unchanged under the same contract.
    unsafe { mtunnel_ssh_run(options_json, result_out) }
}

/// Removes socket files on the remote node, as a tunnel's close does for its forwards: for a
/// caller whose tunnel never got ready (the target's QEMU was started and listens, but no
/// tunnel ran the cleanup) or that finds stale sockets there. Only sockets are removed; any
/// other file at one of the paths is kept and named in the error.
///
/// `options_json` (required): `{"ssh": [prefix…, "user@host"], "sockets": ["/run/qemu-server/
/// 100.migrate", …], "socket_dir": "/run/qemu-server", "timeout_ms": 30000}` plus the ssh
/// options of `tunnel_open`. Each path must be a socket path in `socket_dir`, as forwards
/// are. Returns `MTUNNEL_OK` (also when there was nothing to remove),
/// `MTUNNEL_ERR_INVALID_ARGUMENT` (bad options or path; a non-socket kept:
/// "refusing to remove '…' on user@host: not a socket (kept)"), `MTUNNEL_ERR_SSH_EXITED`,
/// `MTUNNEL_ERR_REMOTE` or `MTUNNEL_ERR_TIMEOUT` (the connection failed; ssh's stderr tail in
/// the last error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mtunnel_ssh_remove_sockets(options_json: *const c_char) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = options::parse(Some(unsafe { str_arg(options_json, "options_json") }?))?;
        crate::tunnel::remove_sockets_json(&opts)
    })
}

/// Deprecated name of [`mtunnel_ssh_remove_sockets`], kept for one release: same arguments
/// and result codes.
#[deprecated(note = "use mtunnel_ssh_remove_sockets")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ssh_remove_sockets(options_json: *const c_char) -> c_int {
    // SAFETY: the caller's argument, passed on unchanged under the same contract.
    unsafe { mtunnel_ssh_remove_sockets(options_json) }
}

/// Parses the output of `qm start VMID --migratedfrom NODE` as QemuMigrate.pm does:
/// `migration listens on unix:/run/qemu-server/VMID.migrate` (the VMID must match), `tcp:H:P`
/// or `port N`; `storage migration listens on nbd:unix:…`; `spice listens on port N`;
/// `mtunnel commands: …` (a patched target); `QEMU: …`. On success `*result_out` (may be
/// NULL; free with `mtunnel_string_free`) gets `{"uri": …, "socket": … (unix only), "nbd":
/// [{"drive", "uri", "socket", "volume"}], "spice_port": N, "commands": […], "messages": […]}`. `output` or `vmid` NULL →
/// `MTUNNEL_ERR_INVALID_ARGUMENT`; no address or a VMID mismatch → `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mtunnel_migrate_listen_parse(
    output: *const c_char,
    vmid: *const c_char,
    result_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let output = unsafe { str_arg(output, "output") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let vmid = unsafe { str_arg(vmid, "vmid") }?;
        let result = target::parse_start_output(output, vmid, validate::DEFAULT_SOCKET_DIR)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(result_out, result.to_string()) };
        Ok(())
    })
}

/// Deprecated name of [`mtunnel_migrate_listen_parse`], kept for one release: same
/// arguments, ownership and result codes.
#[deprecated(note = "use mtunnel_migrate_listen_parse")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn migrate_listen_parse(
    output: *const c_char,
    vmid: *const c_char,
    result_out: *mut *mut c_char,
) -> c_int {
    // SAFETY: the caller's arguments, passed on unchanged under the same contract.
    unsafe { mtunnel_migrate_listen_parse(output, vmid, result_out) }
}
