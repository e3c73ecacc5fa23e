//! C functions for storage migration: local disks mirrored with `drive-mirror` or
//! `blockdev-mirror` (whichever fits how the VM attached the disk) into the target's NBD
//! export, waited for, finished or cancelled. Each look at the jobs opens its own QMP
//! connection and closes it before the next, so the monitor is never held during a wait. Job
//! lists cross as a JSON array of job ids (`["drive-scsi0", "mirror-virtio1"]`).

use super::{boundary, opt_str_arg, put_string, str_arg};
use crate::blockjob::{self, Finish, MirrorOptions};
use crate::error::Result;
use crate::options;
use serde_json::Value;
use std::ffi::{c_char, c_int};

/// The body shared by the functions on a job list: checks `qmp_socket` and `jobs_json` (a
/// required JSON array of distinct job ids), runs `f` and stores its JSON result in `out`.
unsafe fn on_jobs(
    qmp_socket: *const c_char,
    jobs_json: *const c_char,
    out: *mut *mut c_char,
    f: impl FnOnce(&str, &[String]) -> Result<Value>,
) -> c_int {
    boundary(|| {
        // SAFETY: on_jobs's caller passes NULL or a NUL-terminated string valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: on_jobs's caller passes NULL or a NUL-terminated string valid during the call (crate conventions).
        let jobs = blockjob::parse_jobs(unsafe { str_arg(jobs_json, "jobs_json") }?, "jobs_json")?;
        let result = f(path, &jobs)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(out, result.to_string()) };
        Ok(())
    })
}

/// Which QMP call `qmp_mirror_start` uses for `device` of the VM behind `qmp_socket`, decided
/// from what the VM's QEMU has attached (never from its version): `"drive-mirror"` when
/// `query-block` lists a device (BlockBackend) named `device` (a disk attached with `-drive`),
/// `"blockdev-mirror"` when there is none but a block node of that name (the top node of a
/// disk attached with `-blockdev`, as Proxmox VE 9 does for machine versions 10.0 and later).
/// On success `*method_out` (may be NULL; free with `mtunnel_string_free`) gets that name, a
/// plain string. `timeout_ms` bounds the call (negative = no limit).
///
/// Returns `MTUNNEL_OK`; `MTUNNEL_ERR_INVALID_ARGUMENT` (`qmp_socket` or `device` NULL, a
/// device that is not 1-64 characters of `A-Za-z0-9_.-`, or a device that is neither a drive
/// nor a block node of the VM: the message names it); `MTUNNEL_ERR_TIMEOUT`; `MTUNNEL_ERR_IO`
/// (no such socket); `MTUNNEL_ERR_QMP`; `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_method(
    qmp_socket: *const c_char,
    device: *const c_char,
    timeout_ms: i64,
    method_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let device = unsafe { str_arg(device, "device") }?;
        let method = blockjob::mirror_method(path, device, timeout_ms)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(method_out, method.as_str().to_string()) };
        Ok(())
    })
}

/// Starts mirroring `device` (e.g. `drive-scsi0`) of the VM behind `qmp_socket` into `target`,
/// `auto-dismiss` false so a failed job keeps its error until it is dismissed. `target` is
/// `nbd:unix:/PATH:exportname=NAME`, `nbd:HOST:PORT:exportname=NAME` (HOST may be `[IPv6]`) or
/// an absolute path.
///
/// The call is the one `qmp_mirror_method` names. `drive-mirror` (a disk attached with
/// `-drive`): the job id is the device. `blockdev-mirror` (a disk attached with `-blockdev`,
/// `device` its top node): the target is added as a block node of its own, named `mt-JOB`
/// (`mt2-JOB` when that name is the disk itself after an earlier completed mirror; a job id
/// too long for QEMU's 31 characters is cut to `mt-` + 19 characters + `-` + 8 hex digits of
/// its FNV-1a hash), and the job, `mirror-ID` for the node `drive-ID` (`mirror-NODE`
/// otherwise), mirrors the top node and replaces the node below its throttle filter, as
/// Proxmox VE 9 does. If the job cannot start, the target node is deleted again.
/// `qmp_mirror_finish` and `qmp_mirror_cancel` delete the target node once the job is gone.
///
/// `options_json` may be NULL: `{"format": "nbd" (default for nbd: targets, required for a
/// path), "mode": "existing" (default) | "absolute-paths" (drive-mirror only), "sync": "full"
/// (default) | "top" | "none", "speed": bytes per second (no limit without it), "job_id":
/// default as above, "timeout_ms": 10000}`; unknown keys are refused. On success `*job_out`
/// (may be NULL; free with `mtunnel_string_free`) gets the job id, a plain string.
///
/// Returns `MTUNNEL_OK`; `MTUNNEL_ERR_INVALID_ARGUMENT` (`qmp_socket`, `device` or `target`
/// NULL, a device that is not 1-64 characters of `A-Za-z0-9_.-`, a bad target or option:
/// nothing is sent; a device that is neither a drive nor a block node of the VM);
/// `MTUNNEL_ERR_QMP` (QEMU refused, e.g. a busy device or an NBD server it cannot reach:
/// QEMU's class and description in the last error; or the job id is in use already);
/// `MTUNNEL_ERR_TIMEOUT` (busy or hung monitor); `MTUNNEL_ERR_IO` (no such socket);
/// `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_start(
    qmp_socket: *const c_char,
    device: *const c_char,
    target: *const c_char,
    options_json: *const c_char,
    job_out: *mut *mut c_char,
) -> c_int {
    boundary(|| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let path = unsafe { str_arg(qmp_socket, "qmp_socket") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let device = unsafe { str_arg(device, "device") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let target = unsafe { str_arg(target, "target") }?;
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let opts = MirrorOptions::from_json(&options::parse(unsafe {
            opt_str_arg(options_json, "options_json")
        }?)?)?;
        let job = blockjob::mirror_start(path, device, target, &opts)?;
        // SAFETY: the out-parameter is NULL or points to writable storage for one pointer (crate conventions).
        unsafe { put_string(job_out, job) };
        Ok(())
    })
}

/// One `query-block-jobs` look at the jobs in `jobs_json` (a JSON array of job ids, at least
/// one). On success `*status_out` (may be NULL; free with `mtunnel_string_free`) gets
/// `{"all_ready": bool, "jobs": [{"id", "type", "status", "len", "offset", "ready", "busy",
/// "io_status", "speed"}…]}` in the order given.
///
/// Returns `MTUNNEL_OK`; `MTUNNEL_ERR_INVALID_ARGUMENT` (`qmp_socket` or `jobs_json` NULL,
/// not a JSON array of distinct valid ids, or empty); `MTUNNEL_ERR_QMP` when a listed job has
/// vanished (`JOB: block job has vanished (cancelled?)`) or concluded — it is dismissed first,
/// and one that failed is reported as `JOB: mirror failed: ERROR (io-status: S)`; the target
/// node of a blockdev-mirror job that ended so is deleted (a failure to, named in the error);
/// `MTUNNEL_ERR_TIMEOUT` (within `timeout_ms`; negative = no limit), `MTUNNEL_ERR_IO` or
/// `MTUNNEL_ERR_PROTOCOL` as for `qmp_execute`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_status(
    qmp_socket: *const c_char,
    jobs_json: *const c_char,
    timeout_ms: i64,
    status_out: *mut *mut c_char,
) -> c_int {
    // SAFETY: the C caller passes NULL or NUL-terminated strings and a NULL or writable out-parameter (crate conventions).
    unsafe {
        on_jobs(qmp_socket, jobs_json, status_out, |path, jobs| {
            blockjob::jobs_status(path, jobs, timeout_ms)
        })
    }
}

/// Repeats `qmp_mirror_status` (every 500 ms, a new QMP connection each time) until every
/// job in `jobs_json` is ready; on success `*status_out` (may be NULL; free with
/// `mtunnel_string_free`) gets that last status. Past `timeout_ms` (negative = no limit):
/// `MTUNNEL_ERR_TIMEOUT`, the last error naming each job not ready with its progress
/// (`mirror not ready after N s: JOB at X of Y bytes (P%)`). Other codes as for
/// `qmp_mirror_status`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_wait_ready(
    qmp_socket: *const c_char,
    jobs_json: *const c_char,
    timeout_ms: i64,
    status_out: *mut *mut c_char,
) -> c_int {
    // SAFETY: the C caller passes NULL or NUL-terminated strings and a NULL or writable out-parameter (crate conventions).
    unsafe {
        on_jobs(qmp_socket, jobs_json, status_out, |path, jobs| {
            blockjob::wait_ready(path, jobs, timeout_ms, blockjob::DEFAULT_POLL_MS)
        })
    }
}

/// Ends the jobs in `jobs_json`, all of which must be ready: `mode` `"cancel"` (NULL = cancel;
/// `block-job-cancel` without force: the target gets every write, the VM keeps its disk — a
/// migration) or `"complete"` (`job-complete`: the VM switches to the target). Then waits
/// until each job is gone or concluded (concluded jobs are dismissed). Then, for
/// blockdev-mirror jobs, deletes the target nodes left unused (`blockdev-del`: after cancel,
/// or of a job that failed) and, after complete, the node the disk was switched away from.
/// On success `*result_out` (may be NULL; free with `mtunnel_string_free`) gets `{"jobs":
/// [{"id", "offset", "len"}…]}`, the last figures seen, plus `"detached": [node names
/// deleted]` when nodes were deleted and `"detach_errors": [messages]` when one could not be:
/// that does not fail the call (the data is on the target); when the call fails for another
/// reason, they are part of its error. Deleting may take up to 1 s past `timeout_ms`.
///
/// Returns `MTUNNEL_OK`; `MTUNNEL_ERR_INVALID_ARGUMENT` (NULL `qmp_socket` or `jobs_json`, a
/// bad list or mode, or a job that is not ready yet: nothing is sent then);
/// `MTUNNEL_ERR_QMP` (a job vanished, failed — `JOB: mirror failed: ERROR (io-status: S)` —
/// or QEMU refused the command); `MTUNNEL_ERR_TIMEOUT` past `timeout_ms` (negative = no
/// limit), naming the jobs still present; `MTUNNEL_ERR_IO`; `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_finish(
    qmp_socket: *const c_char,
    jobs_json: *const c_char,
    mode: *const c_char,
    timeout_ms: i64,
    result_out: *mut *mut c_char,
) -> c_int {
    let finish = |path: &str, jobs: &[String]| {
        // SAFETY: the C caller passes NULL or a NUL-terminated string that stays valid during the call (crate conventions).
        let mode = Finish::parse(unsafe { opt_str_arg(mode, "mode") }?)?;
        blockjob::finish(path, jobs, mode, timeout_ms)
    };
    // SAFETY: the C caller passes NULL or NUL-terminated strings and a NULL or writable out-parameter (crate conventions).
    unsafe { on_jobs(qmp_socket, jobs_json, result_out, finish) }
}

/// The abort path: `block-job-cancel` with `force: true` for each job in `jobs_json` (an empty
/// array does nothing), concluded ones dismissed, then waits until none is left. A job that
/// does not exist is already gone, which is fine. Then the target nodes the blockdev-mirror
/// jobs among them left behind are deleted (also those of jobs that were already gone). On
/// success `*result_out` (may be NULL; free with `mtunnel_string_free`) gets `{"cancelled":
/// [ids that were still there], "already_gone": [ids]}`, plus `"detached"` and
/// `"detach_errors"` as for `qmp_mirror_finish` (up to 1 s past `timeout_ms`).
///
/// Returns `MTUNNEL_OK`; `MTUNNEL_ERR_INVALID_ARGUMENT` (NULL `qmp_socket` or `jobs_json`, a
/// bad list); `MTUNNEL_ERR_TIMEOUT` past `timeout_ms` (negative = no limit), naming the jobs
/// still present; `MTUNNEL_ERR_IO` (no such socket: the VM is not running),
/// `MTUNNEL_ERR_QMP` (QEMU refused `query-block-jobs`), `MTUNNEL_ERR_PROTOCOL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qmp_mirror_cancel(
    qmp_socket: *const c_char,
    jobs_json: *const c_char,
    timeout_ms: i64,
    result_out: *mut *mut c_char,
) -> c_int {
    // SAFETY: the C caller passes NULL or NUL-terminated strings and a NULL or writable out-parameter (crate conventions).
    unsafe {
        on_jobs(qmp_socket, jobs_json, result_out, |path, jobs| {
            blockjob::cancel(path, jobs, timeout_ms)
        })
    }
}
