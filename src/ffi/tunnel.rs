//! C functions on a tunnel handle.

use super::{boundary, opt_str_arg, put_string, str_arg};
use crate::error::{Error, Result};
use crate::log::{Level, Log};
use crate::options;
use crate::tunnel::{CloseOptions, OpenOptions, Tunnel};
use std::ffi::{CString, c_char, c_int, c_void};

/// An open tunnel: an ssh child with its forwards. Opaque; create with `tunnel_open`,
/// release with `tunnel_free`. Not safe to use from two threads at once.
#[allow(non_camel_case_types)]
pub struct mtunnel_tunnel {
    tunnel: Tunnel,
}

/// Log callback: `userdata` as given to `tunnel_open`, a `MTUNNEL_LOG_*` level and a
/// NUL-terminated message valid only during the call. Called synchronously on the caller's
/// thread, only from within calls on the tunnel it was given to.
#[allow(non_camel_case_types)]
pub type mtunnel_log_fn =
    Option<unsafe extern "C" fn(userdata: *mut c_void, level: c_int, msg: *const c_char)>;

unsafe fn handle<'a>(t: *mut mtunnel_tunnel) -> Result<&'a mut Tunnel> {
    if t.is_null() {
        return Err(Error::invalid("tunnel is NULL"));
    }
    // SAFETY: not NULL (checked above); per handle's contract `t` came from tunnel_open, is not freed and not used by another thread.
    Ok(unsafe { &mut (*t).tunnel })
}

/// Starts `ssh … -o ExitOnForwardFailure=yes -L SOCK:SOCK … -- qm mtunnel` and returns a handle
/// at once; call `tunnel_wait_ready` next.
///
/// `options_json` (required) is an object:
/// - `"ssh"`: argv prefix, the binary, its options and `user@host` last (required); the library
///   adds `-e none -o BatchMode=yes -o ExitOnForwardFailure=yes` ahead of it, and
///   `ConnectTimeout`/`ServerAlive*` defaults after it (yours win);
/// - `"forwards"`: forwards (default `[]`: a command-only tunnel). A UNIX socket forward is
///   one path, forwarded to the same path on the remote (as PVE does), or `"LOCAL:REMOTE"`;
///   every path must be `<socket_dir>/<vmid>.migrate` or `<vmid>_nbd.migrate`; a stale socket
///   at a local path is removed, anything else there is refused. A TCP forward
///   (`"PORT:localhost:PORT"`, PVE's legacy path for a target that answers
///   `tcp:localhost:PORT`; also `127.0.0.1` or `[::1]` as the host) goes to the target's own
///   loopback and listens on this node's loopback only (`-L localhost:PORT:…`, whatever
///   `GatewayPorts` says); it is ready when ssh holds a listening socket on the port and no
///   other process listens there on a loopback or wildcard address (that is an error,
///   `MTUNNEL_ERR_IO`: `forward P:localhost:P: another process listens on ADDR:P too …`).
///   Any other spec is refused, naming it (`unsupported forward '…': expected a UNIX socket
///   forward … or a TCP forward to the target's loopback ('PORT:localhost:PORT')`);
/// - `"command"`: remote argv, each word shell-quoted (default `["qm", "mtunnel"]`);
/// - `"socket_dir"` (default `/run/qemu-server`), `"greeting_timeout_ms"` (60000),
///   `"version_timeout_ms"` (10000), `"connect_timeout_s"` (10), `"server_alive_interval_s"`
///   (15, 0 = off), `"server_alive_count_max"` (3);
/// - `"handshake_slots"` (8, 0 = no limit): concurrent ssh handshakes to this destination
///   across all processes, so that sshd's `MaxStartups` never drops ours; `tunnel_open` waits
///   for a slot (up to the greeting timeout) and holds it until `tunnel online`. A destination
///   that drops handshakes anyway (a hardened or busy sshd) gets half as many for a while,
///   and they grow back one per second of successes, in every process;
/// - `"adaptive_slots"` (true): the shrinking and regrowing of the slots above; false: always
///   `handshake_slots`;
/// - `"connect_retries"` (default: until the greeting timeout): retries of a connection that
///   failed before authentication (nothing ran remotely), with jittered backoff;
/// - `"cleanup_in_command"` (true): the remote command runs as `sh -c '"$@"; rc=$?; [ $rc = 0 ]
///   || exit $rc; <remove the forwards' sockets>' sh qm mtunnel`, so the target's sockets go
///   when `qm mtunnel` ends normally (after `quit`) and a normal close needs no second
///   connection; a `qm` that failed or was killed leaves them to close; false: the command as
///   given (a target that runs nothing else, e.g. a forced command), the sockets removed by
///   close;
/// - `"lock_dir"` (default `/run/mtunnel`): where the slot files live;
/// - `"ciphers"` (default none): a `-o Ciphers=` list, e.g.
///   `"aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"`
///   (AES-GCM moved RAM 1.17-1.36x as fast as ssh's chacha20-poly1305 default on an AES-NI
///   CPU, docs/ssh-options.md); without it, or `""`, ssh and the admin's `ssh_config` choose;
/// - `"share"` (default off): OpenSSH connection sharing (docs/sharing.md). `true` or an
///   object `{"control_dir": "/run/mtunnel/ssh-ctl", "persist_s": 30, "max_sessions": 10,
///   "exit_idle": false}`. The tunnel becomes a client (`-o ControlMaster=no -o ControlPath=…
///   -o ProxyCommand=false`) of a pooled master to the same destination, started when none
///   has a free session: no handshake of its own. The master holds the forwards' listening
///   sockets (readiness checks the master's pid); close cancels them in the master
///   (`-O cancel`). At most `max_sessions` sessions per master, across processes; a master
///   exits `persist_s` seconds after its last session (`ControlPersist`), or at once with
///   `exit_idle` when its last user closes. The control directory is created 0700 and
///   refused (`MTUNNEL_ERR_INVALID_ARGUMENT`) if it is a symlink, not ours or open to
///   others. A master that dies under a tunnel is an error naming the shared connection.
///
/// `log` may be NULL; it and `userdata` are kept until `tunnel_free`.
/// On success `*tunnel_out` receives the handle (owned by the caller; release with
/// `tunnel_free`). `tunnel_out` must not be NULL.
/// Returns `MTUNNEL_OK`, `MTUNNEL_ERR_INVALID_ARGUMENT` (bad options, path, destination) or
/// `MTUNNEL_ERR_IO` (ssh could not be started).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_open(
    options_json: *const c_char,
    log: mtunnel_log_fn,
    userdata: *mut c_void,
    tunnel_out: *mut *mut mtunnel_tunnel,
) -> c_int {
    boundary(|| {
        if tunnel_out.is_null() {
            return Err(Error::invalid("tunnel_out is NULL"));
        }
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = options::parse(Some(unsafe { str_arg(options_json, "options_json") }?))?;
        let opts = OpenOptions::from_json(&opts)?;
        let log = match log {
            None => Log::none(),
            Some(cb) => Log::new(move |level: Level, msg: &str| {
                let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: the caller's callback gets back its own userdata and a NUL-terminated message that lives until it returns, as mtunnel_log_fn documents.
                unsafe { cb(userdata, level as c_int, c.as_ptr()) };
            }),
        };
        let tunnel = Tunnel::open(opts, log)?;
        // SAFETY: tunnel_out is not NULL (checked above) and points to writable storage for a handle (crate conventions).
        unsafe { *tunnel_out = Box::into_raw(Box::new(mtunnel_tunnel { tunnel })) };
        Ok(())
    })
}

/// Waits until the tunnel is ready: `tunnel online` and `ver N` received (each within its
/// own deadline), and every forward is a listening socket held by our ssh (a TCP forward's
/// port: also listened on by no other process where `localhost` reaches it). Never connects
/// to a forward. `timeout_ms` bounds the whole wait (negative = only the greeting
/// deadlines apply). Calling it again on a ready tunnel returns at once.
///
/// `tunnel` NULL → `MTUNNEL_ERR_INVALID_ARGUMENT`. Returns `MTUNNEL_OK`, `MTUNNEL_ERR_TIMEOUT`,
/// `MTUNNEL_ERR_SSH_EXITED` (with ssh's stderr), `MTUNNEL_ERR_NO_QUORUM`,
/// `MTUNNEL_ERR_PROTOCOL` (strange greeting or version) or `MTUNNEL_ERR_CLOSED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_wait_ready(tunnel: *mut mtunnel_tunnel, timeout_ms: i64) -> c_int {
    // SAFETY: the handle is NULL or a live one from tunnel_open, used by one thread at a time (crate conventions).
    boundary(|| unsafe { handle(tunnel) }?.wait_ready(timeout_ms))
}

/// Sends one command and waits up to `timeout_ms` for its reply. Reads the greeting first if
/// `tunnel_wait_ready` was not called. The tunnel's protocol version decides the format:
/// - v1: one line (`resume VMID`, `quit`); the reply must be `OK`, or `OK ` followed by a
///   JSON value (the answer of a command that returns data, such as a patched target's
///   `postcopy-status VMID`); anything else is an error `tunnel replied '…' to command '…'`;
/// - v2: a JSON object with a string `"cmd"` (a bare command name such as `resume` is sent as
///   `{"cmd":"resume"}`); the reply must be a JSON object with a true `"success"`, else the
///   error is `failed to decode tunnel reply …` or `error - tunnel command '…' failed - MSG`.
///
/// On success `*reply_out` (if not NULL) receives the reply (`"OK"`, v1's JSON after `OK `,
/// or v2's JSON object), to
/// be freed with `mtunnel_string_free`. `tunnel` or `command` NULL →
/// `MTUNNEL_ERR_INVALID_ARGUMENT`. Returns `MTUNNEL_OK`, `MTUNNEL_ERR_REMOTE` (the remote
/// refused: `ERR: …`, v2 `success` false), `MTUNNEL_ERR_PROTOCOL` (a reply the protocol does
/// not allow), `MTUNNEL_ERR_TIMEOUT` (an unknown v1 command gets no reply),
/// `MTUNNEL_ERR_SSH_EXITED` or `MTUNNEL_ERR_CLOSED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_command(
    tunnel: *mut mtunnel_tunnel,
    command: *const c_char,
    timeout_ms: i64,
    reply_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the handle is NULL or a live one from tunnel_open, used by one thread at a time (crate conventions).
        let t = unsafe { handle(tunnel) }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let cmd = unsafe { str_arg(command, "command") }?;
        let reply = t.command(cmd, timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(reply_out, reply) };
        Ok(())
    })
}

/// Closes the tunnel in stages: `quit` and its reply, EOF, wait for ssh to exit, SIGTERM,
/// SIGKILL; reaps ssh; removes the local socket files (only if they are sockets). The remote
/// ones go with the tunnel's remote command: it removes them when it ends, in the same
/// session, so a normal close makes no second connection. Only when that did not happen (the
/// command failed or was killed, the link died) and unless disabled, a second ssh removes
/// them, with quoted arguments; if that fails (unreachable node, refused connection) it is a
/// warning, through the log callback and `tunnel_status`'s `cleanup_warning`, not an error:
/// sockets left behind are harmless. A path that holds anything but a socket is kept, on
/// either node, and named in the error. Everything is cleaned up even when a stage fails; the
/// first failure is returned: an error from close means the caller has to act.
///
/// `options_json` may be NULL: `{"quit_timeout_ms": 10000, "exit_timeout_ms": 5000,
/// "remote_cleanup": true, "cleanup_timeout_ms": 5000, "cleanup": false, "cleanup_sockets": []}`;
/// `cleanup_timeout_ms` bounds the remote cleanup (and, when `tunnel_free` closes, the whole
/// close); `cleanup` is sent with
/// a v2 `quit` (`{"cmd":"quit","cleanup":…}`); `cleanup_sockets` are more socket paths to
/// remove on both nodes (validated as forwards are). Idempotent: closing a closed tunnel
/// returns `MTUNNEL_OK`.
/// `tunnel` NULL is a no-op returning `MTUNNEL_OK`. In a forked child that inherited the
/// handle, only the child's fds are released; the parent's ssh is not touched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_close(
    tunnel: *mut mtunnel_tunnel,
    options_json: *const c_char,
) -> c_int {
    boundary(|| {
        if tunnel.is_null() {
            return Ok(());
        }
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = options::parse(unsafe { opt_str_arg(options_json, "options_json") }?)?;
        let opts = CloseOptions::from_json(&opts)?;
        // SAFETY: the handle is NULL or a live one from tunnel_open, used by one thread at a time (crate conventions).
        unsafe { handle(tunnel) }?.close(&opts)
    })
}

/// Reads the next line the remote sends, after the greeting (read first if needed), without
/// sending anything; waits up to `timeout_ms`. On success `*line_out` (if not NULL) receives
/// the line without its newline, to be freed with `mtunnel_string_free`. `tunnel` NULL →
/// `MTUNNEL_ERR_INVALID_ARGUMENT`. Returns `MTUNNEL_OK`, `MTUNNEL_ERR_TIMEOUT`,
/// `MTUNNEL_ERR_SSH_EXITED` (end of stream: ssh exited or closed its output; ssh's stderr in
/// the last error), `MTUNNEL_ERR_PROTOCOL` (not UTF-8, or a broken greeting) or
/// `MTUNNEL_ERR_CLOSED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_read_line(
    tunnel: *mut mtunnel_tunnel,
    timeout_ms: i64,
    line_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the handle is NULL or a live one from tunnel_open, used by one thread at a time (crate conventions).
        let line = unsafe { handle(tunnel) }?.read_line(timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(line_out, line) };
        Ok(())
    })
}

/// Writes the tunnel's state as JSON to `*status_out` (free with `mtunnel_string_free`):
/// `{"state": "started"|"online"|"greeted"|"ready"|"closed", "pid": N, "version": N|null,
/// "forwards": [...], "master_pid": N|null, "control_path": "…"|null, "cleanup_warning":
/// "…"|null}` (`master_pid` and `control_path` for a shared connection: the master that holds
/// the forwards, and its control socket; `cleanup_warning`: why close could not remove the
/// remote sockets). `tunnel` NULL → `MTUNNEL_ERR_INVALID_ARGUMENT`; `status_out` may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_status(
    tunnel: *mut mtunnel_tunnel,
    status_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the handle is NULL or a live one from tunnel_open, used by one thread at a time (crate conventions).
        let status = unsafe { handle(tunnel) }?.status().to_string();
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(status_out, status) };
        Ok(())
    })
}

/// Closes the tunnel with default options if still open, then frees the handle. NULL is a
/// no-op. The handle must not be used afterwards.
///
/// Bounded: the close takes at most the default `cleanup_timeout_ms` (5000 ms) in total
/// (quit, the remote socket cleanup, a shared master's forwards and idle exit), plus the kill
/// and reap of ssh and the removal of the local socket files, which are always done.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tunnel_free(tunnel: *mut mtunnel_tunnel) {
    if !tunnel.is_null() {
        // Drop closes; a panic inside must not unwind into C.
        let _ = boundary(|| {
            // SAFETY: not NULL; per the documented contract the handle came from Box::into_raw in tunnel_open and is freed once.
            drop(unsafe { Box::from_raw(tunnel) });
            Ok(())
        });
    }
}
