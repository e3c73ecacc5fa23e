//! Storage migration: local disks mirrored into the target's NBD export with QMP
//! `drive-mirror` or `blockdev-mirror`, finished or cancelled as Proxmox VE's
//! `QemuServer/BlockJob.pm` does.
//!
//! The flow: [`mirror_start`] once per disk (`auto-dismiss: false` so that a failed job stays
//! visible with its error), [`wait_ready`] until every job is `ready`, migrate RAM, then
//! [`finish`] (`block-job-cancel` without force: a READY mirror first syncs the target and then
//! ends without pivoting, the target holds the data). The abort path is [`cancel`]
//! (`force: true`), which tolerates jobs that are already gone.
//!
//! Which call mirrors a disk follows from what the VM's QEMU has attached, never from a version
//! number ([`mirror_method`]): a disk attached with `-drive` (QEMU 7.2, and machine versions
//! below 10.0 on Proxmox VE 9) has a BlockBackend named after it (`drive-scsi0`) and gets
//! `drive-mirror` (job id = device). A disk attached with `-blockdev` (Proxmox VE 9, machine
//! versions ≥ 10.0) has no BlockBackend of that name, only a top node `drive-scsi0` (a
//! `throttle` filter above the format and file nodes); it gets `blockdev-mirror`, as upstream's
//! `blockdev_mirror` does: the target is a node of our own (`blockdev-add` of an `nbd` node,
//! named by [`blockdev::target_node_names`] from the job id), the job (`mirror-scsi0`) mirrors the top
//! node and `replaces` the node below the throttle filter, and once the job is gone the target
//! node is deleted (`blockdev-del`) unless the job switched the disk over to it (`complete`),
//! in which case the old node is deleted instead. See `blockjob/blockdev.rs`.
//!
//! Every look at the jobs (`query-block-jobs`) uses its own QMP connection, closed before the
//! next poll, so other clients of the monitor (PVE's `pvestatd`) are never starved while we
//! wait. A job we started and that concluded is dismissed (`job-dismiss`) when we see it,
//! so no concluded job is left holding the disk.

use crate::error::{Error, Kind, Result};
use crate::io::{self, Deadline};
use crate::options;
use crate::qmp::{self, Qmp};
use crate::validate::MAX_SOCKET_PATH;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod blockdev;

pub use blockdev::Method;

/// Longest device or job id accepted (QEMU ids are short; PVE's are `drive-scsi0`).
pub(crate) const MAX_ID: usize = 64;

/// Poll interval of [`wait_ready`] when the caller does not give one.
pub(crate) const DEFAULT_POLL_MS: u64 = 500;

/// Poll interval while jobs end in [`finish`] and [`cancel`]: the guest is paused during
/// `finish` in a migration, so ending quickly shortens its downtime.
const END_POLL_MS: u64 = 50;

/// Deadline of one look at the jobs, whatever is left of the whole wait.
const LOOK_TIMEOUT_MS: i64 = qmp::DEFAULT_TIMEOUT_MS;

/// How long [`finish`] and [`cancel`] may still take past their deadline to delete the target
/// nodes of the blockdev-mirror jobs that did end.
const CLEANUP_GRACE_MS: i64 = 1000;

/// Options of [`mirror_start`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorOptions {
    /// The target's format; `None` = `nbd` for an `nbd:` target, required otherwise (a
    /// guessed format could write raw data into a qcow2 file).
    pub format: Option<String>,
    /// `existing` (default: the target exists, as the NBD export does) or `absolute-paths`
    /// (`drive-mirror` only: `blockdev-mirror` always writes into a target that exists).
    pub mode: String,
    /// `full` (default), `top` or `none`.
    pub sync: String,
    /// Bandwidth limit in bytes per second (PVE: bwlimit KiB/s × 1024); `None` = no limit.
    pub speed: Option<u64>,
    /// The job id; `None` = as PVE names it: the device name for `drive-mirror`, `mirror-ID`
    /// for `blockdev-mirror` of the node `drive-ID` (`mirror-NODE` for another node name).
    pub job_id: Option<String>,
    /// Deadline of the call.
    pub timeout_ms: i64,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            format: None,
            mode: "existing".into(),
            sync: "full".into(),
            speed: None,
            job_id: None,
            timeout_ms: qmp::DEFAULT_TIMEOUT_MS,
        }
    }
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "option '{key}' must be one of {}, not '{}'",
        allowed.join(", "),
        io::printable(value.as_bytes(), 40)
    )))
}

impl MirrorOptions {
    /// Reads `{"format", "mode", "sync", "speed", "job_id", "timeout_ms"}`; unknown keys are
    /// refused.
    pub fn from_json(opts: &Value) -> Result<MirrorOptions> {
        let o: MirrorOptions = options::from_value(opts)?;
        if let Some(f) = &o.format {
            let ok = !f.is_empty()
                && f.len() <= 32
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(Error::invalid(format!(
                    "option 'format' must be a format name such as nbd, raw or qcow2, not '{}'",
                    io::printable(f.as_bytes(), 40)
                )));
            }
        }
        if let Some(id) = &o.job_id {
            check_id("job id", id)?;
        }
        one_of("mode", &o.mode, &["existing", "absolute-paths"])?;
        one_of("sync", &o.sync, &["full", "top", "none"])?;
        Ok(o)
    }
}

fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Checks a device or job id (`what` names it in the error): 1–64 characters of
/// `[A-Za-z0-9_.-]`.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if !id.is_empty() && id.len() <= MAX_ID && id.bytes().all(id_char) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} '{}': expected 1-{MAX_ID} characters of A-Z a-z 0-9 _ . -",
            io::printable(id.as_bytes(), 80)
        )))
    }
}

/// Checks a mirror target: `nbd:unix:/PATH:exportname=NAME` (PVE's secure migration),
/// `nbd:HOST:PORT:exportname=NAME` (insecure; HOST may be `[IPv6]`) or an absolute path.
/// No control characters; the export name follows the id rules of [`check_id`].
pub fn check_target(target: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "invalid mirror target '{}': {why}",
            io::printable(target.as_bytes(), 200)
        ))
    };
    if target.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad("contains control characters"));
    }
    let Some(rest) = target.strip_prefix("nbd:") else {
        return if target.starts_with('/') && target.len() > 1 {
            Ok(())
        } else {
            Err(bad(
                "expected nbd:unix:/PATH:exportname=NAME, nbd:HOST:PORT:exportname=NAME or an absolute path",
            ))
        };
    };
    let (address, export) = rest
        .split_once(":exportname=")
        .ok_or_else(|| bad("an NBD target needs ':exportname=NAME'"))?;
    if export.is_empty() || export.len() > MAX_ID || !export.bytes().all(id_char) {
        return Err(bad(&format!(
            "export name must be 1-{MAX_ID} characters of A-Z a-z 0-9 _ . -"
        )));
    }
    if let Some(path) = address.strip_prefix("unix:") {
        if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH || path.contains(' ') {
            return Err(bad(&format!(
                "the NBD socket must be an absolute path of at most {MAX_SOCKET_PATH} bytes without spaces"
            )));
        }
        return Ok(());
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("expected nbd:HOST:PORT:exportname=NAME"))?;
    if port.parse::<u16>().map_or(true, |p| p == 0) || port.starts_with(['0', '+']) {
        return Err(bad("the NBD port must be 1-65535"));
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            !host.is_empty()
                && !host.starts_with('-')
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    if host_ok {
        Ok(())
    } else {
        Err(bad(
            "the NBD host must be a name, an IPv4 address or an [IPv6] address",
        ))
    }
}

/// Reads the caller's list of job ids: a JSON array of distinct ids (see [`check_id`]).
/// `what` names the argument in errors.
pub fn parse_jobs(json: &str, what: &str) -> Result<Vec<String>> {
    let not_a_list = || Error::invalid(format!("{what} must be a JSON array of job ids"));
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("{what} is not valid JSON: {e}")))?;
    let mut jobs: Vec<String> = Vec::new();
    for item in value.as_array().ok_or_else(not_a_list)? {
        let id = item.as_str().ok_or_else(not_a_list)?;
        check_id("job id", id)?;
        if jobs.iter().any(|j| j == id) {
            return Err(Error::invalid(format!("{what} lists job '{id}' twice")));
        }
        jobs.push(id.to_string());
    }
    Ok(jobs)
}

fn require_jobs(jobs: &[String]) -> Result<()> {
    if jobs.is_empty() {
        return Err(Error::invalid("no block jobs given"));
    }
    for id in jobs {
        check_id("job id", id)?;
    }
    Ok(())
}

/// The `drive-mirror` arguments for `device` → `target`, and the job id. Checks everything
/// first: nothing is sent for a bad device, target or option.
pub fn mirror_arguments(
    device: &str,
    target: &str,
    opts: &MirrorOptions,
) -> Result<(String, Value)> {
    check_id("device", device)?;
    check_target(target)?;
    let format = match (&opts.format, target.starts_with("nbd:")) {
        (Some(f), _) => f.clone(),
        (None, true) => "nbd".to_string(),
        (None, false) => {
            return Err(Error::invalid(format!(
                "option 'format' is required for mirror target '{}' (only nbd: targets default to nbd)",
                io::printable(target.as_bytes(), 200)
            )));
        }
    };
    let job = opts.job_id.clone().unwrap_or_else(|| device.to_string());
    let mut args = json!({
        "device": device,
        "target": target,
        "format": format,
        "mode": opts.mode,
        "sync": opts.sync,
        "auto-dismiss": false,
    });
    if let Some(speed) = opts.speed {
        args["speed"] = json!(speed);
    }
    if job != device {
        args["job-id"] = json!(job);
    }
    Ok((job, args))
}

/// Which call mirrors `device` of the VM behind `path`: [`Method::DriveMirror`] when
/// `query-block` lists a device (BlockBackend) of that name, [`Method::BlockdevMirror`] when
/// there is none but a block node of that name (`query-named-block-nodes`), the top node of a
/// `-blockdev` disk. Neither: a [`Kind::InvalidArgument`] error naming the device.
pub fn mirror_method(path: &str, device: &str, timeout_ms: i64) -> Result<Method> {
    check_id("device", device)?;
    let deadline = Deadline::after_ms(timeout_ms);
    blockdev::method(&mut Qmp::connect(path, deadline)?, device, deadline)
}

/// Starts mirroring `device` of the VM behind `path` into `target` (`auto-dismiss: false`) and
/// returns the job id. The call follows [`mirror_method`]: `drive-mirror` of the device (job id
/// = device), or for a `-blockdev` top node `blockdev-add` of the target node
/// ([`blockdev::target_node_names`]) and `blockdev-mirror` (job id `mirror-ID` for `drive-ID`,
/// `replaces` the node below a throttle top); if `blockdev-mirror` fails, the target node is
/// deleted again. An explicit `job_id` option wins. Arguments are checked before anything is
/// sent. QEMU's refusal (a busy device, an NBD server that cannot be reached) is a
/// [`Kind::Qmp`] error with QEMU's description; so is a job id already in use.
pub fn mirror_start(
    path: &str,
    device: &str,
    target: &str,
    opts: &MirrorOptions,
) -> Result<String> {
    let (job, args) = mirror_arguments(device, target, opts)?;
    let deadline = Deadline::after_ms(opts.timeout_ms);
    let mut qmp = Qmp::connect(path, deadline)?;
    let step = |e: Error| e.context(format!("{device}: starting the mirror to '{target}'"));
    match blockdev::method(&mut qmp, device, deadline) {
        Ok(Method::DriveMirror) => {
            qmp.execute("drive-mirror", Some(args), deadline)
                .map_err(step)?;
            Ok(job)
        }
        Ok(Method::BlockdevMirror) => {
            blockdev::start(&mut qmp, device, target, opts, deadline).map_err(step)
        }
        // names the device itself
        Err(e) if e.kind == Kind::InvalidArgument => Err(e),
        Err(e) => Err(step(e)),
    }
}

/// How [`finish`] ends the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `block-job-cancel` without force: the target gets every write, the VM keeps its disk
    /// (what a migration wants).
    Cancel,
    /// `job-complete`: the VM switches over to the target (a local disk move).
    Complete,
}

impl Finish {
    /// `"cancel"` (also `None`) or `"complete"`.
    pub fn parse(mode: Option<&str>) -> Result<Finish> {
        match mode {
            None | Some("cancel") => Ok(Finish::Cancel),
            Some("complete") => Ok(Finish::Complete),
            Some(other) => Err(Error::invalid(format!(
                "invalid finish mode '{}': expected cancel or complete",
                io::printable(other.as_bytes(), 40)
            ))),
        }
    }
}

fn text<'a>(info: &'a Value, key: &str) -> &'a str {
    info.get(key).and_then(Value::as_str).unwrap_or("")
}

fn number(info: &Value, key: &str) -> u64 {
    info.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn is_ready(info: &Value) -> bool {
    info.get("ready").and_then(Value::as_bool).unwrap_or(false) || text(info, "status") == "ready"
}

/// `JOB at X of Y bytes (P%)`.
fn progress(id: &str, info: &Value) -> String {
    let (offset, len) = (number(info, "offset"), number(info, "len"));
    let percent = if len > 0 {
        offset as f64 * 100.0 / len as f64
    } else {
        0.0
    };
    format!("{id} at {offset} of {len} bytes ({percent:.2}%)")
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One look at the block jobs on a fresh connection: the jobs by id (`device` in
/// `query-block-jobs` is the job id), and the connection, for dismissals in the same look.
fn look(path: &str, deadline: Deadline) -> Result<(Qmp, Map<String, Value>)> {
    let deadline = deadline.min(Deadline::after_ms(LOOK_TIMEOUT_MS));
    let mut qmp = Qmp::connect(path, deadline)?;
    let reply = qmp.execute("query-block-jobs", None, deadline)?;
    let list = reply.as_array().ok_or_else(|| {
        Error::new(
            Kind::Protocol,
            format!("query-block-jobs on '{path}' did not return a list"),
        )
    })?;
    let jobs = list
        .iter()
        .filter_map(|j| Some((j.get("device")?.as_str()?.to_string(), j.clone())))
        .collect();
    Ok((qmp, jobs))
}

/// Dismisses a concluded job; `Err` holds why `job-dismiss` failed.
fn dismiss(qmp: &mut Qmp, id: &str, deadline: Deadline) -> Result<()> {
    qmp.execute("job-dismiss", Some(json!({"id": id})), deadline)
        .map(drop)
        .map_err(|e| e.context(format!("{id}: dismissing the concluded job")))
}

/// A [`Kind::Qmp`] error about a concluded job, with why `job-dismiss` failed, if it did.
fn noted(mut message: String, dismissed: &Result<()>) -> Error {
    if let Err(e) = dismissed {
        message.push_str(&format!("; {e}"));
    }
    Error::new(Kind::Qmp, message)
}

/// The error QEMU recorded for a concluded job, as our error naming the job.
fn failure(id: &str, info: &Value, dismissed: &Result<()>) -> Option<Error> {
    let error = info.get("error")?.as_str()?;
    let io_status = info.get("io-status").and_then(Value::as_str);
    Some(noted(
        format!(
            "{id}: mirror failed: {error} (io-status: {})",
            io_status.unwrap_or("unknown")
        ),
        dismissed,
    ))
}

/// What [`jobs_status`] reports of one job.
fn summary(id: &str, info: &Value) -> Value {
    json!({
        "id": id,
        "type": info.get("type"),
        "status": info.get("status"),
        "len": number(info, "len"),
        "offset": number(info, "offset"),
        "ready": is_ready(info),
        "busy": info.get("busy").and_then(Value::as_bool).unwrap_or(false),
        "io_status": info.get("io-status"),
        "speed": number(info, "speed"),
    })
}

/// Several errors as one: the first one's kind, the messages joined by `; `.
fn joined(errors: Vec<Error>) -> Result<()> {
    let Some(kind) = errors.first().map(|e| e.kind) else {
        return Ok(());
    };
    let text: Vec<String> = errors.into_iter().map(|e| e.message).collect();
    Err(Error::new(kind, text.join("; ")))
}

/// One look, judged: every listed job must be there and not concluded. A concluded job is
/// dismissed (a failed one is reported with QEMU's error), so none is left behind; the target
/// node of a blockdev-mirror job that ended so is deleted (a failure to delete it is part of
/// the error).
fn status_once(path: &str, jobs: &[String], deadline: Deadline) -> Result<Value> {
    let (mut qmp, found) = look(path, deadline)?;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let mut ended = Vec::new();
    for id in jobs {
        match found.get(id) {
            None => {
                errors.push(Error::new(
                    Kind::Qmp,
                    format!("{id}: block job has vanished (cancelled?)"),
                ));
                ended.push(id.clone());
            }
            Some(info) if text(info, "status") == "concluded" => {
                let dismissed = dismiss(&mut qmp, id, deadline);
                if dismissed.is_ok() {
                    ended.push(id.clone());
                }
                errors.push(failure(id, info, &dismissed).unwrap_or_else(|| {
                    noted(
                        format!("{id}: mirror ended before it was finished (cancelled or completed by another client?)"),
                        &dismissed,
                    )
                }));
            }
            Some(info) => out.push(summary(id, info)),
        }
    }
    if !ended.is_empty() {
        let done = blockdev::cleanup(&mut qmp, &ended, &BTreeMap::new(), deadline);
        errors.extend(done.errors);
    }
    joined(errors)?;
    let all_ready = out.iter().all(|j| j["ready"] == json!(true));
    Ok(json!({"all_ready": all_ready, "jobs": out}))
}

/// One `query-block-jobs` look at the listed jobs: `{"all_ready": bool, "jobs": [{"id",
/// "type", "status", "len", "offset", "ready", "busy", "io_status", "speed"}…]}` in the
/// caller's order. A listed job that is missing, or that concluded (it is dismissed first;
/// QEMU's error and io-status are named), is a [`Kind::Qmp`] error naming the job.
pub fn jobs_status(path: &str, jobs: &[String], timeout_ms: i64) -> Result<Value> {
    require_jobs(jobs)?;
    status_once(path, jobs, Deadline::after_ms(timeout_ms))
}

/// Repeats [`jobs_status`] every `poll_ms`, on a fresh connection each time, until every job
/// is ready; returns that status. Past the deadline: a [`Kind::Timeout`] error naming the
/// jobs not ready with their progress.
pub fn wait_ready(path: &str, jobs: &[String], timeout_ms: i64, poll_ms: u64) -> Result<Value> {
    require_jobs(jobs)?;
    let started = Instant::now();
    let deadline = Deadline::after_ms(timeout_ms);
    let mut last: Option<Value> = None;
    let step = Duration::from_millis(poll_ms.max(1));
    let ready = io::poll_until(deadline, step, || {
        match status_once(path, jobs, deadline) {
            Ok(status) if status["all_ready"] == json!(true) => return Ok(Some(status)),
            Ok(status) => last = Some(status),
            // The wait's deadline passed during a look: report the progress seen so far.
            Err(e) if e.kind == Kind::Timeout && deadline.expired() && last.is_some() => {}
            Err(e) => return Err(e),
        }
        Ok(None)
    })?;
    ready.ok_or_else(|| {
        let behind: Vec<String> = last
            .iter()
            .flat_map(|s| s["jobs"].as_array().cloned().unwrap_or_default())
            .filter(|j| j["ready"] != json!(true))
            .map(|j| progress(text(&j, "id"), &j))
            .collect();
        Error::new(
            Kind::Timeout,
            format!(
                "mirror not ready after {}: {}",
                seconds(started.elapsed()),
                behind.join(", ")
            ),
        )
    })
}

/// Polls until none of `pending` is left: gone, or concluded and dismissed. `failed_is_error`
/// says whether a job that concluded with an error fails the call (finish) or not (cancel,
/// where a forced cancel always leaves "Operation canceled"). `seen` keeps each job's last
/// `query-block-jobs` entry. Past the deadline: [`Kind::Timeout`] naming what is left.
fn wait_gone(
    path: &str,
    pending: &mut Vec<String>,
    seen: &mut Map<String, Value>,
    failed_is_error: bool,
    deadline: Deadline,
    started: Instant,
) -> Result<()> {
    let mut errors = Vec::new();
    let step = Duration::from_millis(END_POLL_MS);
    let gone = io::poll_until(deadline, step, || {
        match look(path, deadline) {
            Ok((mut qmp, found)) => pending.retain(|id| {
                let Some(info) = found.get(id) else {
                    return false;
                };
                seen.insert(id.clone(), info.clone());
                if text(info, "status") != "concluded" {
                    return true;
                }
                let dismissed = dismiss(&mut qmp, id, deadline);
                match failure(id, info, &dismissed) {
                    Some(failed) if failed_is_error => {
                        errors.push(failed);
                        false
                    }
                    // Dismissed: gone. Not dismissed: try again in the next look.
                    _ => dismissed.is_err(),
                }
            }),
            Err(e) if e.kind == Kind::Timeout && deadline.expired() => {}
            Err(e) => return Err(e),
        }
        Ok(pending.is_empty().then_some(()))
    })?;
    if gone.is_none() {
        let left: Vec<String> = pending
            .iter()
            .map(|id| match seen.get(id) {
                Some(info) => {
                    format!("{} (status '{}')", progress(id, info), text(info, "status"))
                }
                None => id.clone(),
            })
            .collect();
        errors.push(Error::new(
            Kind::Timeout,
            format!(
                "block jobs still present after {}: {}",
                seconds(started.elapsed()),
                left.join(", ")
            ),
        ));
        // The timeout first: it is what the caller has to act on.
        errors.rotate_right(1);
    }
    joined(errors)
}

/// Deletes, on a connection of its own, what the blockdev-mirror jobs among `gone` left
/// behind (see `blockdev::cleanup`); nothing is sent for drive-mirror jobs but one query. Once
/// the call's deadline has passed (the jobs that are left make it fail) it still gets
/// [`CLEANUP_GRACE_MS`], so that the nodes of the jobs that did end are not left behind.
fn clean_up(
    path: &str,
    gone: &[String],
    replaced: &BTreeMap<String, String>,
    deadline: Deadline,
) -> blockdev::Cleanup {
    if gone.is_empty() {
        return blockdev::Cleanup::default();
    }
    let deadline = if deadline.expired() {
        Deadline::after_ms(CLEANUP_GRACE_MS)
    } else {
        deadline.min(Deadline::after_ms(LOOK_TIMEOUT_MS))
    };
    match Qmp::connect(path, deadline) {
        Ok(mut qmp) => blockdev::cleanup(&mut qmp, gone, replaced, deadline),
        Err(e) => blockdev::Cleanup {
            detached: Vec::new(),
            errors: vec![e.context("deleting the mirror target nodes")],
        },
    }
}

/// `errors` joined, with the cleanup's errors after them.
fn joined_with(mut errors: Vec<Error>, done: blockdev::Cleanup) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    errors.extend(done.errors);
    joined(errors)
}

/// Ends every job; all must be ready (else [`Kind::InvalidArgument`] naming the ones that are
/// not, and nothing is sent). [`Finish::Cancel`] sends `block-job-cancel` without force,
/// [`Finish::Complete`] `job-complete`; then waits until each job is gone or concluded
/// (concluded ones are dismissed; one that concluded with an error fails the call, naming
/// it). Then, for blockdev-mirror jobs, deletes the target nodes left unused (cancel, or a
/// failed job) and, after `complete`, the node the disk was switched away from (found before
/// `job-complete` was sent). Returns `{"jobs": [{"id", "offset", "len"}…]}`, the last figures
/// seen, with `"detached": [node names deleted]` when nodes were deleted and
/// `"detach_errors": [why a node could not be deleted]` when one could not be: that does not
/// fail the call (the data is on the target). When the call fails, those errors are part of
/// its error. Past the deadline, deleting may take up to [`CLEANUP_GRACE_MS`] more.
pub fn finish(path: &str, jobs: &[String], mode: Finish, timeout_ms: i64) -> Result<Value> {
    require_jobs(jobs)?;
    let started = Instant::now();
    let deadline = Deadline::after_ms(timeout_ms);
    let status = status_once(path, jobs, deadline)?;
    let listed = status["jobs"].as_array().cloned().unwrap_or_default();
    joined(
        listed
            .iter()
            .filter(|j| j["ready"] != json!(true))
            .map(|j| {
                Error::invalid(format!(
                    "{} is not ready (status '{}'): wait until every mirror is ready before finishing",
                    progress(text(j, "id"), j),
                    text(j, "status")
                ))
            })
            .collect(),
    )?;
    let mut seen: Map<String, Value> = listed
        .into_iter()
        .map(|j| (text(&j, "id").to_string(), j))
        .collect();

    let mut errors = Vec::new();
    let mut pending = Vec::new();
    let mut qmp = Qmp::connect(path, deadline.min(Deadline::after_ms(LOOK_TIMEOUT_MS)))?;
    // the node each blockdev job replaces, to delete once the disk was switched over
    let replaced = match mode {
        Finish::Cancel => BTreeMap::new(),
        Finish::Complete => blockdev::replaced_nodes(&mut qmp, jobs, deadline)?,
    };
    for id in jobs {
        let sent = match mode {
            Finish::Cancel => {
                qmp.execute("block-job-cancel", Some(json!({"device": id})), deadline)
            }
            Finish::Complete => qmp.execute("job-complete", Some(json!({"id": id})), deadline),
        };
        match sent {
            Ok(_) => pending.push(id.clone()),
            Err(e) => errors.push(e.context(id)),
        }
    }
    drop(qmp);
    let sent = pending.clone();
    errors.extend(wait_gone(path, &mut pending, &mut seen, true, deadline, started).err());
    let gone: Vec<String> = sent
        .into_iter()
        .filter(|id| !pending.contains(id))
        .collect();
    let done = clean_up(path, &gone, &replaced, deadline);
    let figures: Vec<Value> = jobs
        .iter()
        .map(|id| {
            let info = seen.get(id).cloned().unwrap_or_default();
            json!({"id": id, "offset": number(&info, "offset"), "len": number(&info, "len")})
        })
        .collect();
    let mut result = json!({"jobs": figures});
    done.report(&mut result);
    joined_with(errors, done)?;
    Ok(result)
}

/// Whether a `block-job-cancel` error says the job does not exist: QEMU answers class
/// `DeviceNotActive` ("Block job 'X' not found") for a job id it does not know.
fn is_not_found(e: &Error) -> bool {
    e.qmp_class() == Some("DeviceNotActive")
}

/// The abort path: `block-job-cancel` with `force: true` for each job (one that does not exist
/// is already gone: fine), concluded ones dismissed, then waits until none is left, and deletes
/// the target nodes the blockdev-mirror jobs among them left behind (also of jobs that were
/// already gone). Returns `{"cancelled": [ids that were still there], "already_gone": [ids]}`,
/// with `"detached"` and `"detach_errors"` as for [`finish`]. An empty list does nothing.
/// Fails on the deadline ([`Kind::Timeout`], naming what is left; deleting may take up to
/// [`CLEANUP_GRACE_MS`] more) or when the monitor cannot be reached, never because a job was
/// already gone.
pub fn cancel(path: &str, jobs: &[String], timeout_ms: i64) -> Result<Value> {
    for id in jobs {
        check_id("job id", id)?;
    }
    if jobs.is_empty() {
        return Ok(json!({"cancelled": [], "already_gone": []}));
    }
    let started = Instant::now();
    let deadline = Deadline::after_ms(timeout_ms);
    let mut qmp = Qmp::connect(path, deadline.min(Deadline::after_ms(LOOK_TIMEOUT_MS)))?;
    let (mut pending, mut gone) = (Vec::new(), Vec::new());
    let mut refused = Map::new();
    for id in jobs {
        match qmp.execute(
            "block-job-cancel",
            Some(json!({"device": id, "force": true})),
            deadline,
        ) {
            Ok(_) => pending.push(id.clone()),
            Err(e) if is_not_found(&e) => gone.push(id.clone()),
            // e.g. "Job 'X' in state 'concluded' cannot accept command verb 'cancel'": it is
            // there, and dismissed below; any other refusal shows up if it stays.
            Err(e) if e.kind == Kind::Qmp => {
                refused.insert(id.clone(), json!(e.message));
                pending.push(id.clone());
            }
            Err(e) => return Err(e.context(format!("{id}: cancelling the block job"))),
        }
    }
    drop(qmp);
    let cancelled = pending.clone();
    let mut seen = Map::new();
    let waited = wait_gone(path, &mut pending, &mut seen, false, deadline, started).map_err(|e| {
        let why: Vec<String> = pending
            .iter()
            .filter_map(|id| Some(format!("{id}: {}", refused.get(id)?.as_str()?)))
            .collect();
        if why.is_empty() {
            e
        } else {
            Error::new(e.kind, format!("{} ({})", e.message, why.join("; ")))
        }
    });
    let ended: Vec<String> = jobs
        .iter()
        .filter(|id| !pending.contains(id))
        .cloned()
        .collect();
    let done = clean_up(path, &ended, &BTreeMap::new(), deadline);
    let mut result = json!({"cancelled": cancelled, "already_gone": gone});
    done.report(&mut result);
    joined_with(waited.err().into_iter().collect(), done)?;
    Ok(result)
}

#[cfg(test)]
mod tests;
