//! C functions speaking QMP to a VM's monitor socket. Each call opens its own connection and
//! closes it before returning.

use super::{boundary, opt_str_arg, put_string, str_arg};
use crate::error::Error;
use crate::{options, qmp};
use std::ffi::{c_char, c_int};

/// The largest `downtime-limit` in milliseconds (QEMU's 2000 s): a larger one in
/// `"parameters"` is lowered to it.
pub const MTUNNEL_MAX_DOWNTIME_LIMIT_MS: u64 = 2000 * 1000;

// One number: QEMU's cap, which the setup applies.
const _: () = assert!(MTUNNEL_MAX_DOWNTIME_LIMIT_MS == qmp::MAX_DOWNTIME_LIMIT_MS);

/// Starts a migration of the VM behind `qmp_socket` to `uri` (`unix:/PATH` or `tcp:HOST:PORT`):
/// first the setup of `qmp_migrate_setup` (unless `"setup": false`), then `migrate`. Returns
/// once QEMU accepted the command; poll `qmp_query_migrate` for progress.
///
/// `options_json` may be NULL: `{"capabilities": {"auto-converge": true, …}, "parameters":
/// {"downtime-limit": 100, "max-bandwidth": N, …}, "timeout_ms": 10000, "setup": true,
/// "postcopy": false}` (what is set with `"setup"`: see `qmp_migrate_setup`; a failed setup
/// step fails the call before `migrate` is sent).
/// `qmp_socket` or `uri` NULL → `MTUNNEL_ERR_INVALID_ARGUMENT`. Returns `MTUNNEL_OK`,
/// `MTUNNEL_ERR_INVALID_ARGUMENT` (bad URI or options, a wanted capability QEMU lacks),
/// `MTUNNEL_ERR_QMP` (QEMU's class and desc in the last error), `MTUNNEL_ERR_TIMEOUT` (busy or
/// hung monitor), `MTUNNEL_ERR_IO` (no such socket) or `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate(
    qmp_socket: *const c_char,
    uri: *const c_char,
    options_json: *const c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let uri = unsafe { str_arg(uri, "uri") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = qmp::MigrateOptions::from_json(&options::parse(unsafe {
            opt_str_arg(options_json, "options_json")
        }?)?)?;
        qmp::migrate(path, uri, &opts).map(drop)
    })
}

/// Prepares the VM behind `qmp_socket` for a migration as Proxmox VE does, without starting
/// it (also what PVE does on the target before the incoming migration). It sets what the
/// options name, and only that:
/// - `"capabilities"` given (or `"postcopy": true`): the ones named `true` are turned on and
///   every other one QEMU reports (`query-migrate-capabilities`) off, so nothing left on by
///   an earlier run leaks in; without the key, capabilities are left alone;
/// - `"parameters"` given: `migrate-set-parameters` with them, where `max-bandwidth`
///   defaults to 16 GiB/s (QEMU's own default is 128 MiB/s), `downtime-limit` is capped at
///   `MTUNNEL_MAX_DOWNTIME_LIMIT_MS` (QEMU's 2000 s), and, when the same call turns xbzrle
///   on, `xbzrle-cache-size` defaults to a tenth of the guest's RAM (asked from QEMU) rounded
///   up to a power of two; without the key, parameters are left alone, except that a call
///   with neither key sets the default parameters (as `{"parameters": {}}`);
/// - both: one call, capabilities first, then parameters; the parameters are set even when
///   the capabilities failed (as PVE's phase 2 does). A failed step makes the call fail with
///   a last error naming each step that failed and QEMU's reason:
///   `migrate-set-capabilities failed - REASON`, `migrate-set-parameters failed - REASON`,
///   or both joined by `"; "` (the result code is the first failure's: `MTUNNEL_ERR_QMP`
///   for a refusal). What the caller got wrong (a capability this QEMU does not offer,
///   post-copy on a QEMU without it, a `downtime-limit` that is no integer) is
///   `MTUNNEL_ERR_INVALID_ARGUMENT` before anything is set;
/// - `"postcopy": true` makes the migration able to switch to post-copy
///   (`qmp_migrate_start_postcopy`): `postcopy-ram` on, `postcopy-preempt` on where QEMU
///   offers it, the other capabilities as `"capabilities"` says (off when absent), and, with
///   `"parameters"`, `max-postcopy-bandwidth` as `max-bandwidth` unless given. A QEMU without
///   `postcopy-ram` → `MTUNNEL_ERR_INVALID_ARGUMENT` before anything is set. Set it on the
///   target as well: QEMU needs `postcopy-ram` on both sides before `migrate`.
///
/// `options_json` as for `qmp_migrate` (may be NULL). On success `*applied_out` (may be
/// NULL; free with `mtunnel_string_free`) gets `{"capabilities": {NAME: bool, …},
/// "parameters": {…}}`, what was set (each key only when that step ran). Same codes as
/// `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_setup(
    qmp_socket: *const c_char,
    options_json: *const c_char,
    applied_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = qmp::MigrateOptions::from_json(&options::parse(unsafe {
            opt_str_arg(options_json, "options_json")
        }?)?)?;
        let applied = qmp::setup(path, &opts)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(applied_out, applied.to_string()) };
        Ok(())
    })
}

/// Runs `query-migrate` and writes QEMU's answer as JSON to `*status_out` (free with
/// `mtunnel_string_free`; may be NULL). Unknown statuses are passed through unchanged: treat
/// them as still running. `qmp_socket` NULL → `MTUNNEL_ERR_INVALID_ARGUMENT`. Same codes as
/// `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_query_migrate(
    qmp_socket: *const c_char,
    timeout_ms: i64,
    status_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        let reply = qmp::query_migrate(path, timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(status_out, reply.to_string()) };
        Ok(())
    })
}

/// Sends `migrate_cancel`, then polls until the migration is cancelled, failed or completed
/// (or there was none), all within `timeout_ms`. The last `query-migrate` answer goes to
/// `*status_out` (free with `mtunnel_string_free`; may be NULL). Same codes as `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_cancel(
    qmp_socket: *const c_char,
    timeout_ms: i64,
    status_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        let reply = qmp::migrate_cancel(path, timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(status_out, reply.to_string()) };
        Ok(())
    })
}

/// Runs any QMP command (`cont`, `quit`, `query-status`, …) with optional JSON-object
/// `arguments_json` (NULL = none) and writes its `return` value as JSON to `*reply_out` (free
/// with `mtunnel_string_free`; may be NULL). `qmp_socket` or `command` NULL →
/// `MTUNNEL_ERR_INVALID_ARGUMENT`. Same codes as `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_execute(
    qmp_socket: *const c_char,
    command: *const c_char,
    arguments_json: *const c_char,
    timeout_ms: i64,
    reply_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let command = unsafe { str_arg(command, "command") }?;
        let args =
            // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
            match unsafe { opt_str_arg(arguments_json, "arguments_json") }? {
                None => None,
                Some(text) => Some(serde_json::from_str(text).map_err(|e| {
                    Error::invalid(format!("arguments_json is not valid JSON: {e}"))
                })?),
            };
        let reply = qmp::execute(path, command, args, timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(reply_out, reply.to_string()) };
        Ok(())
    })
}

/// Returns the `query-migrate` answer (as `qmp_query_migrate`) as soon as the migration ends
/// or its post-copy status changes, or when `hold_ms` passed: holds one monitor connection at
/// most that long, waiting for QEMU's `MIGRATION` event with a final status (`completed`,
/// `failed`, `cancelled`) or a post-copy status other than the one at the call's start
/// (`postcopy-active`, `postcopy-paused`, `postcopy-recover`, …), which needs the `events`
/// capability; without it the change is seen when the hold ends. Call it in
/// a loop instead of sleeping between `qmp_query_migrate` calls: completion and failure are
/// noticed within milliseconds, and between calls the monitor is free for other clients.
///
/// `options_json` may be NULL: `{"hold_ms": 250, "timeout_ms": 10000, "pass": false}`
/// (`timeout_ms`: for connecting to a monitor busy with another client, and for each command;
/// `"pass": true` also wakes on QEMU's `MIGRATION_PASS` event, when a new pass over memory
/// begins, so that what the pass starts with can be read at its start). The answer goes
/// to `*status_out` (free with `mtunnel_string_free`; may be NULL). `qmp_socket` NULL or bad
/// options → `MTUNNEL_ERR_INVALID_ARGUMENT`; a monitor that closes while held →
/// `MTUNNEL_ERR_IO` at once. Otherwise the codes of `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_wait_migration(
    qmp_socket: *const c_char,
    options_json: *const c_char,
    status_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = qmp::WaitOptions::from_json(&options::parse(unsafe {
            opt_str_arg(options_json, "options_json")
        }?)?)?;
        let reply = qmp::wait_migration(path, &opts)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(status_out, reply.to_string()) };
        Ok(())
    })
}

/// Switches the running migration of the VM behind `qmp_socket` to post-copy
/// (`migrate-start-postcopy`): the source stops, its device state goes over, and the target
/// runs (once resumed, when started paused) while it pulls the remaining pages. From then on
/// the VM's memory is split between the two nodes until the migration completes: a migration
/// in a post-copy status can only be finished (recovered if it pauses), never cancelled.
/// Needs `"postcopy": true` in the setup of both sides. `qmp_socket` NULL →
/// `MTUNNEL_ERR_INVALID_ARGUMENT`; QEMU's refusal (no migration, post-copy not enabled) →
/// `MTUNNEL_ERR_QMP`. Otherwise the codes of `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_start_postcopy(
    qmp_socket: *const c_char,
    timeout_ms: i64,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        qmp::migrate_start_postcopy(path, timeout_ms)
    })
}

/// Pauses the post-copy migration of the VM behind `qmp_socket` (`migrate-pause`; on the
/// source or the target): QEMU shuts its channel down and goes to `postcopy-paused`. For a
/// channel that hangs instead of failing (a stopped ssh, a cut link), so that it can be
/// recovered. `qmp_socket` NULL → `MTUNNEL_ERR_INVALID_ARGUMENT`; no post-copy migration →
/// `MTUNNEL_ERR_QMP`. Otherwise the codes of `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_pause(qmp_socket: *const c_char, timeout_ms: i64) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        qmp::migrate_pause(path, timeout_ms)
    })
}

/// On the target of a paused post-copy migration (`postcopy-paused`): listens on `uri`
/// (`unix:/PATH` or `tcp:HOST:PORT`) for the source's resume (`migrate-recover`). Where only a
/// stock node's tools reach the target, HMP's `migrate_recover URI` through `qm monitor VMID`
/// does the same. `qmp_socket` or `uri` NULL, or a bad URI → `MTUNNEL_ERR_INVALID_ARGUMENT`;
/// QEMU's refusal (nothing paused) → `MTUNNEL_ERR_QMP`. Otherwise the codes of `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_recover(
    qmp_socket: *const c_char,
    uri: *const c_char,
    timeout_ms: i64,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let uri = unsafe { str_arg(uri, "uri") }?;
        qmp::migrate_recover(path, uri, timeout_ms)
    })
}

/// On the source of a paused post-copy migration (`postcopy-paused`): resumes it into `uri`,
/// where the target listens again (`qmp_migrate_recover`), usually a new tunnel's forward
/// (`migrate` with `resume: true`). Returns once QEMU accepted the command; the status goes
/// `postcopy-recover`, then `postcopy-active` (`qmp_wait_migration` wakes on each).
/// `qmp_socket` or `uri` NULL, or a bad URI → `MTUNNEL_ERR_INVALID_ARGUMENT`; QEMU's refusal
/// (nothing paused) → `MTUNNEL_ERR_QMP`. Otherwise the codes of `qmp_migrate`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_migrate_resume(
    qmp_socket: *const c_char,
    uri: *const c_char,
    timeout_ms: i64,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let uri = unsafe { str_arg(uri, "uri") }?;
        qmp::migrate_resume(path, uri, timeout_ms)
    })
}
