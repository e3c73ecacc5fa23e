//! Block jobs against a scripted QMP monitor. Like QEMU's, it serves one client at a time
//! but any number of them in turn, since every look at the jobs is a new connection.

use super::*;
use crate::fake_qmp::{FakeQmp, Reply};

/// A monitor answering every command but `qmp_capabilities` with `respond(command, args)`.
fn monitor(tag: &str, respond: impl FnMut(&str, &Value) -> Reply + Send + 'static) -> FakeQmp {
    FakeQmp::answering(&format!("blockjob-{tag}"), respond)
}

/// A monitor whose `query-block-jobs` answers are `looks`, one per call (the last one
/// repeats), that has no named block node (a `-drive` VM whose nodes QEMU named itself: none
/// is a mirror target), and that answers every other command with `other(command, arguments)`.
fn jobs_monitor(
    tag: &str,
    looks: Vec<Value>,
    mut other: impl FnMut(&str, &Value) -> Reply + Send + 'static,
) -> FakeQmp {
    let mut n = 0;
    monitor(tag, move |command, args| match command {
        "query-block-jobs" => {
            n += 1;
            Ok(looks[(n - 1).min(looks.len() - 1)].clone())
        }
        "query-named-block-nodes" => Ok(json!([])),
        _ => other(command, args),
    })
}

/// `query-block` of a VM with a `-drive` disk (a BlockBackend) of each name.
fn drives(names: &[&str]) -> Value {
    names
        .iter()
        .map(|d| json!({"device": d, "qdev": "/machine/peripheral/x", "inserted": {"node-name": "#block123", "drv": "raw"}}))
        .collect()
}

/// A monitor of a VM with `-drive` disks named `names`, answering the rest with `other`.
fn drive_monitor(
    tag: &str,
    names: &'static [&'static str],
    mut other: impl FnMut(&str, &Value) -> Reply + Send + 'static,
) -> FakeQmp {
    monitor(tag, move |command, args| match command {
        "query-block" => Ok(drives(names)),
        _ => other(command, args),
    })
}

/// `(command, arguments)` of every request but `qmp_capabilities`, in order.
fn seen(m: &FakeQmp) -> Vec<(String, Value)> {
    m.requests()
        .into_iter()
        .map(|r| {
            let command = r["execute"].as_str().unwrap_or("").to_string();
            (command, r.get("arguments").cloned().unwrap_or(Value::Null))
        })
        .filter(|(c, _)| c != "qmp_capabilities")
        .collect()
}

/// The commands it was sent, the looks at the jobs and at the block devices and nodes
/// (`query-block-jobs`, `query-block`, `query-named-block-nodes`) left out.
fn commands(m: &FakeQmp) -> Vec<(String, Value)> {
    seen(m)
        .into_iter()
        .filter(|(c, _)| {
            !matches!(
                c.as_str(),
                "query-block-jobs" | "query-block" | "query-named-block-nodes"
            )
        })
        .collect()
}

/// How often it was asked for the jobs.
fn looks(m: &FakeQmp) -> usize {
    seen(m)
        .iter()
        .filter(|(c, _)| c == "query-block-jobs")
        .count()
}

fn ok(_: &str, _: &Value) -> Reply {
    Ok(json!({}))
}

/// A `query-block-jobs` entry of a mirror, as QEMU 7.2 reports it.
fn job(id: &str, status: &str, offset: u64, len: u64) -> Value {
    json!({"auto-finalize": true, "io-status": "ok", "device": id, "auto-dismiss": false,
           "busy": false, "len": len, "offset": offset, "status": status, "paused": false,
           "speed": 0, "ready": status == "ready", "type": "mirror"})
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const NBD: &str = "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0";
const MIB16: u64 = 16 << 20;

#[test]
fn start_sends_drive_mirror_with_pve_arguments_and_speed_only_when_given() {
    let m = drive_monitor("start", &["drive-scsi0", "drive-scsi1"], ok);
    let job = mirror_start(&m.path, "drive-scsi0", NBD, &MirrorOptions::default()).unwrap();
    assert_eq!(job, "drive-scsi0", "the job id is the device");
    let opts =
        MirrorOptions::from_json(&json!({"speed": 10240 * 1024, "timeout_ms": 5000})).unwrap();
    mirror_start(
        &m.path,
        "drive-scsi1",
        "nbd:198.18.0.2:60001:exportname=drive-scsi1",
        &opts,
    )
    .unwrap();
    assert_eq!(
        commands(&m),
        [
            (
                "drive-mirror".to_string(),
                json!({"device": "drive-scsi0", "target": NBD, "format": "nbd", "mode": "existing",
                       "sync": "full", "auto-dismiss": false})
            ),
            (
                "drive-mirror".to_string(),
                json!({"device": "drive-scsi1", "target": "nbd:198.18.0.2:60001:exportname=drive-scsi1",
                       "format": "nbd", "mode": "existing", "sync": "full", "auto-dismiss": false,
                       "speed": 10485760})
            ),
        ]
    );
}

#[test]
fn start_options_job_id_format_and_their_errors() {
    let opts = MirrorOptions::from_json(
        &json!({"job_id": "mirror-1", "format": "qcow2", "mode": "absolute-paths", "sync": "top"}),
    )
    .unwrap();
    let (job, args) =
        mirror_arguments("drive-virtio0", "/var/lib/vz/images/100/disk.qcow2", &opts).unwrap();
    assert_eq!(job, "mirror-1");
    assert_eq!(args["job-id"], "mirror-1");
    assert_eq!(
        (&args["format"], &args["mode"], &args["sync"]),
        (&json!("qcow2"), &json!("absolute-paths"), &json!("top"))
    );
    let err = |v: Value| MirrorOptions::from_json(&v).unwrap_err().message;
    assert!(err(json!({"sped": 1})).starts_with("unknown option 'sped'"));
    assert!(err(json!({"speed": -1})).contains("'speed' must be a non-negative integer"));
    assert!(err(json!({"speed": "100"})).contains("'speed' must be a non-negative integer"));
    assert!(
        err(json!({"mode": "absolute"})).contains("'mode' must be one of existing, absolute-paths")
    );
    assert!(err(json!({"sync": "incremental"})).contains("'sync' must be one of full, top, none"));
    assert!(err(json!({"format": "raw\"x"})).contains("'format' must be a format name"));
    assert!(err(json!({"job_id": ""})).starts_with("invalid job id ''"));
    let e = mirror_arguments(
        "drive-scsi0",
        "/dev/zvol/rpool/disk",
        &MirrorOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.message
            .starts_with("option 'format' is required for mirror target '/dev/zvol/rpool/disk'"),
        "{}",
        e.message
    );
}

#[test]
fn bad_devices_and_targets_are_refused_before_connecting() {
    // The socket does not exist: an InvalidArgument (not an Io error) proves nothing was sent.
    let start = |device: &str, target: &str| {
        mirror_start(
            "/nonexistent-mtunnel/100.qmp",
            device,
            target,
            &MirrorOptions::default(),
        )
        .unwrap_err()
    };
    for device in [
        "",
        "drive scsi0",
        "drive-scsi0\"",
        "drive/scsi0",
        &"d".repeat(65),
    ] {
        let e = start(device, NBD);
        assert_eq!(e.kind, Kind::InvalidArgument, "{device}");
        assert!(e.message.starts_with("invalid device '"), "{}", e.message);
    }
    for target in [
        "",
        "relative/path",
        "nbd:unix:/run/qemu-server/100_nbd.migrate",
        "nbd:unix:relative.sock:exportname=drive-scsi0",
        "nbd:unix:/run/x:exportname=",
        "nbd:unix:/run/x:exportname=a b",
        "nbd:198.18.0.2:0:exportname=drive-scsi0",
        "nbd:198.18.0.2:65536:exportname=drive-scsi0",
        "nbd:-oProxy:60001:exportname=drive-scsi0",
        "nbd:198.18.0.2:exportname=drive-scsi0",
        "/var/lib/vz/disk\n.raw",
        "json:{\"driver\": \"file\"}",
    ] {
        let e = start("drive-scsi0", target);
        assert_eq!(e.kind, Kind::InvalidArgument, "{target}");
        assert!(
            e.message.starts_with("invalid mirror target '"),
            "{}",
            e.message
        );
    }
    for target in [
        NBD,
        "nbd:198.18.0.2:60001:exportname=drive-scsi0",
        "nbd:[fd00::2]:60001:exportname=drive-scsi0",
        "nbd:node2.example:60001:exportname=drive-scsi0",
        "/var/lib/vz/images/100/vm-100-disk-0.raw",
    ] {
        check_target(target).unwrap();
    }
}

#[test]
fn qemus_refusal_is_a_qmp_error_with_its_description() {
    let m = drive_monitor("refused", &["drive-ide0"], |_, _| {
        Err(("GenericError", "Device 'drive-ide0' is busy".into()))
    });
    let e = mirror_start(&m.path, "drive-ide0", NBD, &MirrorOptions::default()).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert!(
        e.message
            .starts_with("drive-ide0: starting the mirror to 'nbd:unix:"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .ends_with("GenericError: Device 'drive-ide0' is busy"),
        "{}",
        e.message
    );
}

#[test]
fn status_reports_each_listed_job_in_the_callers_order() {
    let m = jobs_monitor(
        "status",
        vec![json!([
            job("drive-scsi0", "ready", MIB16, MIB16),
            job("other", "running", 0, 1),
            job("drive-scsi1", "running", 4 << 20, MIB16)
        ])],
        ok,
    );
    let st = jobs_status(&m.path, &ids(&["drive-scsi1", "drive-scsi0"]), 5000).unwrap();
    assert_eq!(
        st,
        json!({"all_ready": false, "jobs": [
            {"id": "drive-scsi1", "type": "mirror", "status": "running", "len": MIB16, "offset": 4 << 20,
             "ready": false, "busy": false, "io_status": "ok", "speed": 0},
            {"id": "drive-scsi0", "type": "mirror", "status": "ready", "len": MIB16, "offset": MIB16,
             "ready": true, "busy": false, "io_status": "ok", "speed": 0},
        ]})
    );
    assert!(
        commands(&m).is_empty(),
        "a look sends nothing else: {:?}",
        commands(&m)
    );
}

#[test]
fn a_vanished_job_is_named() {
    let m = jobs_monitor(
        "vanished",
        vec![json!([job("drive-scsi0", "ready", 1, 1)])],
        ok,
    );
    let e = jobs_status(&m.path, &ids(&["drive-scsi0", "drive-scsi1"]), 5000).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert_eq!(
        e.message,
        "drive-scsi1: block job has vanished (cancelled?)"
    );
}

#[test]
fn a_job_concluded_with_an_error_is_dismissed_and_named() {
    let mut failed = job("drive-scsi0", "concluded", 3 << 20, MIB16);
    failed["error"] = json!("Input/output error");
    failed["io-status"] = json!("failed");
    let m = jobs_monitor("failed", vec![json!([failed])], ok);
    let e = jobs_status(&m.path, &ids(&["drive-scsi0"]), 5000).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert_eq!(
        e.message,
        "drive-scsi0: mirror failed: Input/output error (io-status: failed)"
    );
    assert_eq!(
        commands(&m),
        [("job-dismiss".to_string(), json!({"id": "drive-scsi0"}))]
    );
}

#[test]
fn wait_ready_looks_on_a_new_connection_each_time_until_all_are_ready() {
    let running = json!([
        job("drive-scsi0", "running", 1 << 20, MIB16),
        job("drive-scsi1", "ready", 1, 1)
    ]);
    let ready = json!([
        job("drive-scsi0", "ready", MIB16, MIB16),
        job("drive-scsi1", "ready", 1, 1)
    ]);
    let m = jobs_monitor("ready", vec![running.clone(), running, ready], ok);
    let st = wait_ready(&m.path, &ids(&["drive-scsi0", "drive-scsi1"]), 5000, 10).unwrap();
    assert_eq!(st["all_ready"], true);
    assert_eq!(st["jobs"][0]["offset"], MIB16);
    assert_eq!(looks(&m), 3);
    assert_eq!(m.connections(), 3, "the monitor is not held between looks");
}

#[test]
fn wait_ready_timeout_names_the_jobs_not_ready_with_their_progress() {
    let m = jobs_monitor(
        "notready",
        vec![json!([
            job("drive-scsi0", "running", 1 << 20, MIB16),
            job("drive-scsi1", "ready", 1, 1),
            job("drive-scsi2", "running", 0, 0)
        ])],
        ok,
    );
    let t0 = Instant::now();
    let e = wait_ready(
        &m.path,
        &ids(&["drive-scsi0", "drive-scsi1", "drive-scsi2"]),
        300,
        50,
    )
    .unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(e.kind, Kind::Timeout);
    assert!(
        e.message.starts_with("mirror not ready after 0."),
        "{}",
        e.message
    );
    assert!(
        e.message.ends_with(" s: drive-scsi0 at 1048576 of 16777216 bytes (6.25%), drive-scsi2 at 0 of 0 bytes (0.00%)"),
        "{}",
        e.message
    );
    assert!(looks(&m) >= 3, "polled: {}", looks(&m));
}

#[test]
fn finish_cancels_without_force_and_waits_until_the_jobs_are_gone() {
    let m = jobs_monitor(
        "finish",
        vec![
            json!([
                job("drive-scsi0", "ready", MIB16, MIB16),
                job("drive-scsi1", "ready", 1, 1)
            ]),
            json!([
                job("drive-scsi0", "running", MIB16, MIB16 + 4096),
                job("drive-scsi1", "concluded", 1, 1)
            ]),
            json!([job("drive-scsi0", "waiting", MIB16 + 4096, MIB16 + 4096)]),
            json!([job("drive-scsi0", "concluded", MIB16 + 8192, MIB16 + 8192)]),
            json!([]),
        ],
        ok,
    );
    let r = finish(
        &m.path,
        &ids(&["drive-scsi0", "drive-scsi1"]),
        Finish::Cancel,
        5000,
    )
    .unwrap();
    assert_eq!(
        r,
        json!({"jobs": [{"id": "drive-scsi0", "offset": MIB16 + 8192, "len": MIB16 + 8192},
                        {"id": "drive-scsi1", "offset": 1, "len": 1}]}),
        "drive-mirror jobs: no node to delete, the result as it always was"
    );
    let c = |name: &str, args: Value| (name.to_string(), args);
    assert_eq!(
        commands(&m),
        [
            c("block-job-cancel", json!({"device": "drive-scsi0"})),
            c("block-job-cancel", json!({"device": "drive-scsi1"})),
            c("job-dismiss", json!({"id": "drive-scsi1"})),
            c("job-dismiss", json!({"id": "drive-scsi0"})),
        ],
        "no force: a ready mirror syncs the target, then ends without pivoting"
    );
    assert_eq!(
        looks(&m),
        4,
        "every concluded job was dismissed once, then nothing was left"
    );
}

#[test]
fn finish_with_complete_sends_job_complete() {
    let m = jobs_monitor(
        "complete",
        vec![json!([job("drive-scsi0", "ready", 1, 1)]), json!([])],
        ok,
    );
    finish(&m.path, &ids(&["drive-scsi0"]), Finish::Complete, 5000).unwrap();
    assert_eq!(
        commands(&m),
        [("job-complete".to_string(), json!({"id": "drive-scsi0"}))]
    );
}

#[test]
fn finish_refuses_jobs_that_are_not_ready_and_sends_nothing() {
    let m = jobs_monitor(
        "finishnotready",
        vec![json!([
            job("drive-scsi0", "ready", 1, 1),
            job("drive-scsi1", "running", 1 << 20, 4 << 20)
        ])],
        ok,
    );
    let e = finish(
        &m.path,
        &ids(&["drive-scsi0", "drive-scsi1"]),
        Finish::Cancel,
        5000,
    )
    .unwrap_err();
    assert_eq!(e.kind, Kind::InvalidArgument);
    assert_eq!(
        e.message,
        "drive-scsi1 at 1048576 of 4194304 bytes (25.00%) is not ready (status 'running'): wait until every mirror is ready before finishing"
    );
    assert!(commands(&m).is_empty(), "{:?}", commands(&m));
}

#[test]
fn finish_names_a_job_that_failed_while_ending() {
    let mut failed = job("drive-scsi0", "concluded", 1, 2);
    failed["error"] = json!("Input/output error");
    let m = jobs_monitor(
        "finishfailed",
        vec![json!([job("drive-scsi0", "ready", 1, 1)]), json!([failed])],
        ok,
    );
    let e = finish(&m.path, &ids(&["drive-scsi0"]), Finish::Cancel, 5000).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert_eq!(
        e.message,
        "drive-scsi0: mirror failed: Input/output error (io-status: ok)"
    );
    assert_eq!(
        commands(&m).last().unwrap(),
        &("job-dismiss".to_string(), json!({"id": "drive-scsi0"}))
    );
}

#[test]
fn cancel_forces_tolerates_unknown_and_concluded_jobs_and_dismisses() {
    let mut cancelled = job("drive-scsi0", "concluded", 1, 2);
    cancelled["error"] = json!("Operation canceled");
    let m = jobs_monitor(
        "cancel",
        vec![
            json!([cancelled, job("drive-scsi2", "concluded", 2, 2)]),
            json!([]),
        ],
        |command, args| match (command, args["device"].as_str()) {
            ("block-job-cancel", Some("drive-scsi1")) => Err((
                "DeviceNotActive",
                "Block job 'drive-scsi1' not found".into(),
            )),
            ("block-job-cancel", Some("drive-scsi2")) => Err((
                "GenericError",
                "Job 'drive-scsi2' in state 'concluded' cannot accept command verb 'cancel'".into(),
            )),
            _ => Ok(json!({})),
        },
    );
    let r = cancel(
        &m.path,
        &ids(&["drive-scsi0", "drive-scsi1", "drive-scsi2"]),
        5000,
    )
    .unwrap();
    assert_eq!(
        r,
        json!({"cancelled": ["drive-scsi0", "drive-scsi2"], "already_gone": ["drive-scsi1"]})
    );
    let c = |name: &str, args: Value| (name.to_string(), args);
    assert_eq!(
        commands(&m),
        [
            c(
                "block-job-cancel",
                json!({"device": "drive-scsi0", "force": true})
            ),
            c(
                "block-job-cancel",
                json!({"device": "drive-scsi1", "force": true})
            ),
            c(
                "block-job-cancel",
                json!({"device": "drive-scsi2", "force": true})
            ),
            c("job-dismiss", json!({"id": "drive-scsi0"})),
            c("job-dismiss", json!({"id": "drive-scsi2"})),
        ]
    );
}

#[test]
fn cancel_fails_on_its_deadline_naming_what_is_left() {
    let m = jobs_monitor(
        "cancelstuck",
        vec![json!([job("drive-scsi0", "running", 1 << 20, 2 << 20)])],
        ok,
    );
    let e = cancel(&m.path, &ids(&["drive-scsi0", "drive-scsi1"]), 300).unwrap_err();
    assert_eq!(e.kind, Kind::Timeout);
    assert!(
        e.message.starts_with("block jobs still present after 0."),
        "{}",
        e.message
    );
    assert!(
        e.message
            .ends_with(" s: drive-scsi0 at 1048576 of 2097152 bytes (50.00%) (status 'running')"),
        "{}",
        e.message
    );
}

#[test]
fn cancel_of_nothing_does_nothing_and_a_missing_monitor_is_an_error() {
    assert_eq!(
        cancel("/nonexistent-mtunnel/100.qmp", &[], 1000).unwrap(),
        json!({"cancelled": [], "already_gone": []})
    );
    let e = cancel("/nonexistent-mtunnel/100.qmp", &ids(&["drive-scsi0"]), 1000).unwrap_err();
    assert_eq!(e.kind, Kind::Io);
    assert!(e.message.contains("does not exist"), "{}", e.message);
}

#[test]
fn job_lists_and_finish_modes_are_checked() {
    assert_eq!(
        parse_jobs(r#"["drive-scsi0", "drive-efidisk0"]"#, "jobs_json").unwrap(),
        ids(&["drive-scsi0", "drive-efidisk0"])
    );
    let err = |text: &str| parse_jobs(text, "jobs_json").unwrap_err().message;
    assert!(err("[").starts_with("jobs_json is not valid JSON"));
    assert_eq!(
        err(r#"{"drive-scsi0": 1}"#),
        "jobs_json must be a JSON array of job ids"
    );
    assert_eq!(err("[1]"), "jobs_json must be a JSON array of job ids");
    assert_eq!(err(r#"["a", "a"]"#), "jobs_json lists job 'a' twice");
    assert!(err(r#"["drive scsi0"]"#).starts_with("invalid job id 'drive scsi0'"));
    assert_eq!(
        jobs_status("/x.qmp", &[], 1000).unwrap_err().message,
        "no block jobs given"
    );
    assert_eq!(Finish::parse(None).unwrap(), Finish::Cancel);
    assert_eq!(Finish::parse(Some("complete")).unwrap(), Finish::Complete);
    assert!(
        Finish::parse(Some("pivot"))
            .unwrap_err()
            .message
            .starts_with("invalid finish mode 'pivot'")
    );
}

// ------------------------------------------------------------------ blockdev-mirror

use std::sync::{Arc, Mutex};

/// One block node of [`Vm`]: its children by role, and whether the monitor owns it (added
/// with `-blockdev` or `blockdev-add` at the top level: only those can be `blockdev-del`eted;
/// an inline child goes with its parent).
#[derive(Debug, Clone)]
struct Node {
    name: String,
    drv: String,
    children: Vec<(String, String)>,
    owned: bool,
}

/// A block job of [`Vm`] and the nodes it holds.
#[derive(Debug, Clone)]
struct Job {
    info: Value,
    source: String,
    target: Option<String>,
    replaces: Option<String>,
}

/// The block layer of a VM with one disk, `ide0`, as QEMU keeps it, enough to follow what the
/// library does to it: `-drive` (a BlockBackend `drive-ide0`) or `-blockdev` as qemu-server 9
/// attaches it (throttle `drive-ide0` → raw `f…` → file `e…`, both inline). Its block graph
/// is shown by `x-debug-query-block-graph` (QEMU 10.0 upstream), or with `children_field` by
/// the `children` of `query-named-block-nodes` (Proxmox VE's QEMU 10.0), the command missing.
#[derive(Debug)]
struct Vm {
    drive: bool,
    children_field: bool,
    nodes: Vec<Node>,
    jobs: Vec<Job>,
    /// command → QMP error description it is refused with
    refuse: Vec<(String, String)>,
    next_block: u32,
}

const FMT: &str = "f0123456789abcdef0123456789abc";
const FILE: &str = "e0123456789abcdef0123456789abc";

impl Vm {
    fn blockdev() -> Vm {
        let node = |name: &str, drv: &str, child: Option<&str>, owned| Node {
            name: name.into(),
            drv: drv.into(),
            children: child
                .map(|c| ("file".to_string(), c.to_string()))
                .into_iter()
                .collect(),
            owned,
        };
        Vm {
            drive: false,
            children_field: false,
            nodes: vec![
                node("drive-ide0", "throttle", Some(FMT), true),
                node(FMT, "raw", Some(FILE), false),
                node(FILE, "file", None, false),
            ],
            jobs: Vec::new(),
            refuse: Vec::new(),
            next_block: 100,
        }
    }

    fn drive() -> Vm {
        Vm {
            drive: true,
            nodes: vec![
                Node {
                    name: "#block123".into(),
                    drv: "raw".into(),
                    children: vec![("file".into(), "#block045".into())],
                    owned: false,
                },
                Node {
                    name: "#block045".into(),
                    drv: "file".into(),
                    children: Vec::new(),
                    owned: false,
                },
            ],
            ..Vm::blockdev()
        }
    }

    /// The node the disk's BlockBackend has as its root.
    fn root(&self) -> &'static str {
        if self.drive {
            "#block123"
        } else {
            "drive-ide0"
        }
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn has(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name == name)
    }

    fn in_use(&self, name: &str) -> bool {
        name == self.root()
            || self
                .nodes
                .iter()
                .any(|n| n.children.iter().any(|(_, c)| c == name))
            || self
                .jobs
                .iter()
                .any(|j| j.target.as_deref() == Some(name) || j.source == name)
    }

    /// Drops `name` and the inline children that nobody else uses.
    fn remove(&mut self, name: &str) {
        let Some(i) = self.nodes.iter().position(|n| n.name == name) else {
            return;
        };
        let node = self.nodes.remove(i);
        for (_, child) in node.children {
            let inline = self.nodes.iter().any(|n| n.name == child && !n.owned);
            if inline && !self.in_use(&child) {
                self.remove(&child);
            }
        }
    }

    /// Adds the node `args` describes, its inline `file` child first.
    fn add(&mut self, args: &Value, owned: bool) -> String {
        let name = match args["node-name"].as_str() {
            Some(n) => n.to_string(),
            None => {
                self.next_block += 1;
                format!("#block{}", self.next_block)
            }
        };
        let mut children = Vec::new();
        if args["file"].is_object() {
            children.push(("file".to_string(), self.add(&args["file"], false)));
        }
        self.nodes.push(Node {
            name: name.clone(),
            drv: args["driver"].as_str().unwrap_or("").into(),
            children,
            owned,
        });
        name
    }

    fn job(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.info["device"] == id)
    }

    fn graph(&self) -> Value {
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        let id = |name: &str| 1 + self.nodes.iter().position(|n| n.name == name).unwrap();
        for (i, n) in self.nodes.iter().enumerate() {
            nodes.push(json!({"id": i + 1, "type": "block-driver", "name": n.name}));
            for (role, child) in &n.children {
                edges.push(json!({"parent": i + 1, "child": id(child), "name": role}));
            }
        }
        let backend = 1000;
        let name = if self.drive { "drive-ide0" } else { "ide0" };
        nodes.push(json!({"id": backend, "type": "block-backend", "name": name}));
        edges.push(json!({"parent": backend, "child": id(self.root()), "name": "root"}));
        for (k, j) in self.jobs.iter().enumerate() {
            let job = 2000 + k;
            nodes.push(json!({"id": job, "type": "block-job", "name": j.info["device"]}));
            edges.push(json!({"parent": job, "child": id(&j.source), "name": "source"}));
            if let Some(t) = &j.target {
                edges.push(json!({"parent": job, "child": id(t), "name": "target"}));
            }
        }
        json!({"nodes": nodes, "edges": edges})
    }

    fn start_job(
        &mut self,
        id: &str,
        source: &str,
        target: Option<String>,
        replaces: Option<String>,
    ) {
        self.jobs.push(Job {
            info: job(id, "ready", MIB16, MIB16),
            source: source.into(),
            target,
            replaces,
        });
    }

    fn respond(&mut self, command: &str, args: &Value) -> Reply {
        if let Some((_, desc)) = self.refuse.iter().find(|(c, _)| c == command) {
            return Err(("GenericError", desc.clone()));
        }
        let arg = |key: &str| args[key].as_str().unwrap_or("").to_string();
        match command {
            "query-block" => {
                let inserted = json!({"node-name": self.root(), "drv": if self.drive { "raw" } else { "throttle" }});
                let device = if self.drive { "drive-ide0" } else { "" };
                Ok(json!([{"device": device, "qdev": "ide0", "inserted": inserted}]))
            }
            "query-named-block-nodes" => Ok(self
                .nodes
                .iter()
                .map(|n| {
                    let mut v = json!({"node-name": n.name, "drv": n.drv});
                    if self.children_field {
                        v["children"] = n
                            .children
                            .iter()
                            .map(|(role, c)| json!({"child": role, "node-name": c}))
                            .collect();
                    }
                    v
                })
                .collect()),
            "x-debug-query-block-graph" if self.children_field => Err((
                "CommandNotFound",
                "The command x-debug-query-block-graph has not been found".into(),
            )),
            "x-debug-query-block-graph" => Ok(self.graph()),
            "query-block-jobs" => Ok(self.jobs.iter().map(|j| j.info.clone()).collect()),
            "blockdev-add" => {
                if self.has(&arg("node-name")) {
                    return Err((
                        "GenericError",
                        format!("Duplicate nodes with node-name='{}'", arg("node-name")),
                    ));
                }
                self.add(args, true);
                Ok(json!({}))
            }
            "blockdev-mirror" => {
                let replaces = args["replaces"].as_str().map(String::from);
                self.start_job(
                    &arg("job-id"),
                    &arg("device"),
                    Some(arg("target")),
                    replaces,
                );
                Ok(json!({}))
            }
            "drive-mirror" => {
                let root = self.root();
                self.start_job(&arg("device"), root, None, None);
                Ok(json!({}))
            }
            "block-job-cancel" => match self.job(&arg("device")) {
                None => Err((
                    "DeviceNotActive",
                    format!("Block job '{}' not found", arg("device")),
                )),
                Some(j) => {
                    j.info["status"] = json!("concluded");
                    if args["force"] == true {
                        j.info["error"] = json!("Operation canceled");
                    }
                    Ok(json!({}))
                }
            },
            "job-complete" => {
                let j = self.job(&arg("id")).unwrap();
                j.info["status"] = json!("concluded");
                let (old, new) = (j.replaces.clone().unwrap(), j.target.clone().unwrap());
                let source = j.source.clone();
                let top = self.nodes.iter_mut().find(|n| n.name == source).unwrap();
                for (_, c) in top.children.iter_mut().filter(|(_, c)| *c == old) {
                    c.clone_from(&new);
                }
                let owned = self.nodes.iter().any(|n| n.name == old && n.owned);
                if !owned && !self.in_use(&old) {
                    self.remove(&old);
                }
                Ok(json!({}))
            }
            "job-dismiss" => {
                self.jobs.retain(|j| j.info["device"] != args["id"]);
                Ok(json!({}))
            }
            "blockdev-del" => {
                let name = arg("node-name");
                match self.nodes.iter().find(|n| n.name == name) {
                    None => Err((
                        "GenericError",
                        format!("Failed to find node with node-name='{name}'"),
                    )),
                    Some(n) if !n.owned => Err((
                        "GenericError",
                        format!("Node {name} is not owned by the monitor"),
                    )),
                    Some(_) if self.in_use(&name) => {
                        Err(("GenericError", format!("Node {name} is in use")))
                    }
                    Some(_) => {
                        self.remove(&name);
                        Ok(json!({}))
                    }
                }
            }
            _ => Ok(json!({})),
        }
    }
}

/// A monitor in front of `vm`; the test keeps a handle on the VM to look at it afterwards.
fn vm_monitor(tag: &str, vm: Vm) -> (FakeQmp, Arc<Mutex<Vm>>) {
    let vm = Arc::new(Mutex::new(vm));
    let shared = vm.clone();
    let m = monitor(tag, move |command, args| {
        shared.lock().unwrap().respond(command, args)
    });
    (m, vm)
}

fn call(name: &str, args: Value) -> (String, Value) {
    (name.to_string(), args)
}

/// Every command but the looks at the jobs.
fn sent(m: &FakeQmp) -> Vec<(String, Value)> {
    seen(m)
        .into_iter()
        .filter(|(c, _)| c != "query-block-jobs")
        .collect()
}

/// Names of the commands sent, looks at the jobs left out.
fn sent_names(m: &FakeQmp) -> Vec<String> {
    sent(m).into_iter().map(|(c, _)| c).collect()
}

fn mt_nodes(vm: &Arc<Mutex<Vm>>) -> Vec<String> {
    vm.lock()
        .unwrap()
        .names()
        .into_iter()
        .filter(|n| n.starts_with("mt"))
        .collect()
}

const NBD_IDE0: &str = "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-ide0";

#[test]
fn the_method_follows_what_qemu_attached_drive_or_block_node() {
    let (m, _) = vm_monitor("method-drive", Vm::drive());
    assert_eq!(
        mirror_method(&m.path, "drive-ide0", 5000).unwrap(),
        Method::DriveMirror
    );
    assert_eq!(
        sent_names(&m),
        ["query-block"],
        "a drive is found by query-block alone"
    );

    let (m, _) = vm_monitor("method-blockdev", Vm::blockdev());
    let method = mirror_method(&m.path, "drive-ide0", 5000).unwrap();
    assert_eq!(method, Method::BlockdevMirror);
    assert_eq!(method.as_str(), "blockdev-mirror");
    assert_eq!(Method::DriveMirror.as_str(), "drive-mirror");
    assert_eq!(
        sent(&m),
        [
            call("query-block", Value::Null),
            call("query-named-block-nodes", json!({"flat": true})),
        ]
    );
}

#[test]
fn an_unknown_device_is_neither_a_drive_nor_a_block_node_and_nothing_is_added() {
    let (m, vm) = vm_monitor("unknown", Vm::blockdev());
    let e = mirror_method(&m.path, "drive-scsi7", 5000).unwrap_err();
    assert_eq!(e.kind, Kind::InvalidArgument);
    assert_eq!(
        e.message,
        "'drive-scsi7' is neither a drive (no device of that name in query-block) nor a block node (no node of that name in query-named-block-nodes)"
    );
    let e = mirror_start(&m.path, "drive-scsi7", NBD_IDE0, &MirrorOptions::default()).unwrap_err();
    assert_eq!(e.kind, Kind::InvalidArgument);
    assert!(
        e.message.starts_with("'drive-scsi7' is neither a drive"),
        "{}",
        e.message
    );
    assert!(
        !sent_names(&m)
            .iter()
            .any(|c| c.starts_with("blockdev") || c.ends_with("mirror")),
        "{:?}",
        sent_names(&m)
    );
    assert_eq!(vm.lock().unwrap().names().len(), 3);
    let (m, _) = vm_monitor("unknown-drive", Vm::drive());
    let e = mirror_method(&m.path, "drive-ide1", 5000).unwrap_err();
    assert!(
        e.message.starts_with("'drive-ide1' is neither a drive"),
        "{}",
        e.message
    );
}

#[test]
fn a_drive_vm_still_gets_drive_mirror_with_the_device_as_job_id() {
    let (m, vm) = vm_monitor("drive-start", Vm::drive());
    let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    assert_eq!(job, "drive-ide0");
    assert_eq!(
        sent(&m),
        [
            call("query-block", Value::Null),
            call(
                "drive-mirror",
                json!({"device": "drive-ide0", "target": NBD_IDE0, "format": "nbd", "mode": "existing",
                       "sync": "full", "auto-dismiss": false})
            ),
        ]
    );
    let r = finish(&m.path, &ids(&["drive-ide0"]), Finish::Cancel, 5000).unwrap();
    assert_eq!(
        r,
        json!({"jobs": [{"id": "drive-ide0", "offset": MIB16, "len": MIB16}]})
    );
    assert!(
        !sent_names(&m).contains(&"blockdev-del".to_string()),
        "nothing to delete for drive-mirror: {:?}",
        sent_names(&m)
    );
    assert!(vm.lock().unwrap().jobs.is_empty());
}

#[test]
fn blockdev_start_adds_an_nbd_unix_node_and_mirrors_the_top_node_replacing_the_one_below() {
    let (m, vm) = vm_monitor("bd-start", Vm::blockdev());
    let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    assert_eq!(job, "mirror-ide0", "upstream's job id");
    assert_eq!(
        sent(&m),
        [
            call("query-block", Value::Null),
            call("query-named-block-nodes", json!({"flat": true})),
            call("query-named-block-nodes", json!({"flat": true})),
            call("x-debug-query-block-graph", Value::Null),
            call(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "mt-mirror-ide0", "read-only": false, "detect-zeroes": "on", "discard": "ignore",
                       "server": {"type": "unix", "path": "/run/qemu-server/100_nbd.migrate"},
                       "export": "drive-ide0"})
            ),
            call(
                "blockdev-mirror",
                json!({"job-id": "mirror-ide0", "device": "drive-ide0", "target": "mt-mirror-ide0",
                       "replaces": FMT, "sync": "full", "auto-dismiss": false})
            ),
        ]
    );
    assert_eq!(looks(&m), 1, "the job id is checked to be free first");
    assert_eq!(mt_nodes(&vm), ["mt-mirror-ide0"]);
}

#[test]
fn blockdev_start_over_tcp_and_ipv6_with_speed_job_id_and_format() {
    let (m, _) = vm_monitor("bd-inet", Vm::blockdev());
    let opts =
        MirrorOptions::from_json(&json!({"speed": 10240 * 1024, "job_id": "disk-a"})).unwrap();
    let job = mirror_start(
        &m.path,
        "drive-ide0",
        "nbd:198.18.0.2:60001:exportname=drive-ide0",
        &opts,
    )
    .unwrap();
    assert_eq!(job, "disk-a", "an explicit job id wins");
    let c = sent(&m);
    assert_eq!(
        c[c.len() - 2..],
        [
            call(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "mt-disk-a", "read-only": false, "detect-zeroes": "on", "discard": "ignore",
                       "server": {"type": "inet", "host": "198.18.0.2", "port": "60001"},
                       "export": "drive-ide0"})
            ),
            call(
                "blockdev-mirror",
                json!({"job-id": "disk-a", "device": "drive-ide0", "target": "mt-disk-a",
                       "replaces": FMT, "sync": "full", "auto-dismiss": false, "speed": 10485760})
            ),
        ]
    );
    assert_eq!(
        blockdev::target_arguments("mt-x", "nbd:[fd00::2]:60001:exportname=drive-scsi0", None)
            .unwrap(),
        json!({"driver": "nbd", "node-name": "mt-x", "read-only": false, "detect-zeroes": "on", "discard": "ignore", "export": "drive-scsi0",
               "server": {"type": "inet", "host": "fd00::2", "port": "60001"}}),
        "an IPv6 host goes without brackets, the port as a string"
    );
    assert_eq!(
        blockdev::target_arguments("mt-x", NBD_IDE0, Some("raw")).unwrap(),
        json!({"driver": "raw", "node-name": "mt-x", "read-only": false, "detect-zeroes": "on", "discard": "ignore",
               "file": {"driver": "nbd", "export": "drive-ide0",
                        "server": {"type": "unix", "path": "/run/qemu-server/100_nbd.migrate"}}}),
        "a format other than nbd sits on top of the nbd node"
    );
    assert_eq!(
        blockdev::target_arguments("mt-x", "/var/lib/vz/images/100/new.qcow2", Some("qcow2"))
            .unwrap(),
        json!({"driver": "qcow2", "node-name": "mt-x", "read-only": false, "detect-zeroes": "on", "discard": "ignore",
               "file": {"driver": "file", "filename": "/var/lib/vz/images/100/new.qcow2"}})
    );
    assert_eq!(
        blockdev::target_arguments("mt-x", "/dev/null", Some("raw")).unwrap()["file"]["driver"],
        "host_device",
        "a device file gets host_device"
    );
    let e = blockdev::target_arguments("mt-x", "/var/lib/vz/x.raw", None).unwrap_err();
    assert!(
        e.message.starts_with("option 'format' is required"),
        "{}",
        e.message
    );
}

#[test]
fn blockdev_start_reads_children_where_qemu_has_no_block_graph_command() {
    let mut vm = Vm::blockdev();
    vm.children_field = true;
    let (m, _) = vm_monitor("bd-children", vm);
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let c = sent(&m);
    let names: Vec<&str> = c.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "query-block",
            "query-named-block-nodes",
            "query-named-block-nodes",
            "x-debug-query-block-graph",
            "query-block",
            "blockdev-add",
            "blockdev-mirror"
        ]
    );
    assert_eq!(
        c.last().unwrap().1["replaces"],
        FMT,
        "found in the throttle node's children"
    );
}

#[test]
fn blockdev_cancel_finish_deletes_the_target_node_once_the_job_is_gone() {
    let (m, vm) = vm_monitor("bd-finish", Vm::blockdev());
    let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let before = seen(&m).len();
    let r = finish(&m.path, &[job], Finish::Cancel, 5000).unwrap();
    assert_eq!(
        r,
        json!({"jobs": [{"id": "mirror-ide0", "offset": MIB16, "len": MIB16}],
               "detached": ["mt-mirror-ide0"]})
    );
    let after: Vec<(String, Value)> = seen(&m)[before..]
        .iter()
        .filter(|(c, _)| c != "query-block-jobs")
        .cloned()
        .collect();
    assert_eq!(
        after,
        [
            call("block-job-cancel", json!({"device": "mirror-ide0"})),
            call("job-dismiss", json!({"id": "mirror-ide0"})),
            call("query-named-block-nodes", json!({"flat": true})),
            call("x-debug-query-block-graph", Value::Null),
            call("blockdev-del", json!({"node-name": "mt-mirror-ide0"})),
        ],
        "no force, dismissed, then the target deleted"
    );
    assert_eq!(mt_nodes(&vm), Vec::<String>::new());
    assert_eq!(
        vm.lock().unwrap().names(),
        ["drive-ide0", FMT, FILE],
        "the VM keeps its disk"
    );
}

#[test]
fn blockdev_abort_deletes_the_target_node_also_of_a_job_already_gone() {
    let (m, vm) = vm_monitor("bd-abort", Vm::blockdev());
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let r = cancel(&m.path, &ids(&["mirror-ide0"]), 5000).unwrap();
    assert_eq!(
        r,
        json!({"cancelled": ["mirror-ide0"], "already_gone": [], "detached": ["mt-mirror-ide0"]})
    );
    assert_eq!(mt_nodes(&vm), Vec::<String>::new());

    // a job that is gone, its target left (a process that died before its cleanup)
    let (m, vm) = vm_monitor("bd-abort-gone", Vm::blockdev());
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    vm.lock().unwrap().jobs.clear();
    let r = cancel(&m.path, &ids(&["mirror-ide0"]), 5000).unwrap();
    assert_eq!(r["already_gone"], json!(["mirror-ide0"]));
    assert_eq!(r["detached"], json!(["mt-mirror-ide0"]));
    assert_eq!(mt_nodes(&vm), Vec::<String>::new());
}

#[test]
fn a_failed_blockdev_mirror_deletes_the_target_node_it_added() {
    let mut vm = Vm::blockdev();
    vm.refuse.push((
        "blockdev-mirror".into(),
        "Cannot find device='drive-ide0' nor node-name='drive-ide0'".into(),
    ));
    let (m, vm) = vm_monitor("bd-mirror-fails", vm);
    let e = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert_eq!(
        e.message,
        format!(
            "drive-ide0: starting the mirror to '{NBD_IDE0}': QMP command 'blockdev-mirror' failed: GenericError: Cannot find device='drive-ide0' nor node-name='drive-ide0'"
        )
    );
    let c = sent(&m);
    assert_eq!(
        c.last().unwrap(),
        &call("blockdev-del", json!({"node-name": "mt-mirror-ide0"}))
    );
    assert_eq!(mt_nodes(&vm), Vec::<String>::new());

    // the node cannot be deleted either: both failures are told
    let mut vm = Vm::blockdev();
    vm.refuse.push(("blockdev-mirror".into(), "no".into()));
    vm.refuse.push((
        "blockdev-del".into(),
        "Node mt-mirror-ide0 is in use".into(),
    ));
    let (m, _) = vm_monitor("bd-mirror-fails-del", vm);
    let e = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap_err();
    assert!(
        e.message.ends_with("QMP command 'blockdev-mirror' failed: GenericError: no; deleting the target node 'mt-mirror-ide0' failed too: QMP command 'blockdev-del' failed: GenericError: Node mt-mirror-ide0 is in use"),
        "{}",
        e.message
    );
}

#[test]
fn a_blockdev_job_that_failed_is_dismissed_and_its_target_deleted() {
    let (m, vm) = vm_monitor("bd-failed", Vm::blockdev());
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    {
        let mut vm = vm.lock().unwrap();
        let j = vm.job("mirror-ide0").unwrap();
        j.info["status"] = json!("concluded");
        j.info["error"] = json!("Input/output error");
        j.info["io-status"] = json!("failed");
    }
    let e = wait_ready(&m.path, &ids(&["mirror-ide0"]), 5000, 10).unwrap_err();
    assert_eq!(
        e.message,
        "mirror-ide0: mirror failed: Input/output error (io-status: failed)"
    );
    assert!(vm.lock().unwrap().jobs.is_empty(), "dismissed");
    assert_eq!(
        mt_nodes(&vm),
        Vec::<String>::new(),
        "the target was deleted"
    );
}

#[test]
fn a_target_node_that_cannot_be_deleted_is_reported_not_swallowed() {
    let (m, vm) = vm_monitor("bd-del-fails", Vm::blockdev());
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    vm.lock()
        .unwrap()
        .refuse
        .push(("blockdev-del".into(), "Permission denied".into()));
    let r = finish(&m.path, &ids(&["mirror-ide0"]), Finish::Cancel, 5000).unwrap();
    assert_eq!(r.get("detached"), None, "nothing was deleted");
    assert_eq!(
        r["detach_errors"],
        json!([
            "mt-mirror-ide0: deleting the block node: QMP command 'blockdev-del' failed: GenericError: Permission denied"
        ]),
        "the data is on the target: finish succeeds, and names the node left"
    );
    assert_eq!(r["jobs"][0]["id"], "mirror-ide0");
    // a later cancel (the abort path) deletes it
    vm.lock().unwrap().refuse.clear();
    let r = cancel(&m.path, &ids(&["mirror-ide0"]), 5000).unwrap();
    assert_eq!(r["detached"], json!(["mt-mirror-ide0"]));
}

#[test]
fn complete_switches_the_disk_and_a_second_move_uses_the_other_name_and_drops_the_first() {
    let (m, vm) = vm_monitor("bd-complete", Vm::blockdev());
    let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let r = finish(&m.path, std::slice::from_ref(&job), Finish::Complete, 5000).unwrap();
    assert_eq!(
        r.get("detached"),
        None,
        "the old node was inline: QEMU dropped it, nothing to delete"
    );
    assert_eq!(vm.lock().unwrap().names(), ["drive-ide0", "mt-mirror-ide0"]);
    assert!(
        sent(&m).contains(&call("job-complete", json!({"id": "mirror-ide0"}))),
        "{:?}",
        sent_names(&m)
    );

    // the disk is mt-mirror-ide0 now: the next mirror with this job id takes mt2-
    let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let c = sent(&m);
    assert_eq!(
        c[c.len() - 1],
        call(
            "blockdev-mirror",
            json!({"job-id": "mirror-ide0", "device": "drive-ide0", "target": "mt2-mirror-ide0",
                   "replaces": "mt-mirror-ide0", "sync": "full", "auto-dismiss": false})
        )
    );
    let r = finish(&m.path, &[job], Finish::Complete, 5000).unwrap();
    assert_eq!(
        r["detached"],
        json!(["mt-mirror-ide0"]),
        "the node the disk left was added by blockdev-add: deleted, as upstream does"
    );
    assert_eq!(
        vm.lock().unwrap().names(),
        ["drive-ide0", "mt2-mirror-ide0"]
    );
}

#[test]
fn complete_finds_the_replaced_node_without_the_block_graph_command_too() {
    let mut vm = Vm::blockdev();
    vm.children_field = true;
    let (m, vm) = vm_monitor("bd-complete-children", vm);
    for _ in 0..2 {
        let job = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
        finish(&m.path, &[job], Finish::Complete, 5000).unwrap();
    }
    assert_eq!(
        vm.lock().unwrap().names(),
        ["drive-ide0", "mt2-mirror-ide0"]
    );
}

#[test]
fn a_leftover_target_is_deleted_first_and_a_busy_job_id_is_refused() {
    let (m, vm) = vm_monitor("bd-leftover", Vm::blockdev());
    vm.lock().unwrap().add(
        &json!({"driver": "nbd", "node-name": "mt-mirror-ide0"}),
        true,
    );
    mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap();
    let names = sent_names(&m);
    let del = names.iter().position(|c| c == "blockdev-del").unwrap();
    let add = names.iter().position(|c| c == "blockdev-add").unwrap();
    assert!(del < add, "{names:?}");
    assert_eq!(mt_nodes(&vm), ["mt-mirror-ide0"]);

    let before = sent(&m).len();
    let e = mirror_start(&m.path, "drive-ide0", NBD_IDE0, &MirrorOptions::default()).unwrap_err();
    assert_eq!(e.kind, Kind::Qmp);
    assert_eq!(
        e.message,
        format!(
            "drive-ide0: starting the mirror to '{NBD_IDE0}': a block job 'mirror-ide0' exists already (a mirror of this disk is running?)"
        )
    );
    assert!(
        !sent_names(&m)[before..]
            .iter()
            .any(|c| c.starts_with("blockdev")),
        "the running job's node is left alone: {:?}",
        &sent_names(&m)[before..]
    );
    let e = mirror_start(
        &m.path,
        "drive-ide0",
        NBD_IDE0,
        &MirrorOptions::from_json(&json!({"mode": "absolute-paths"})).unwrap(),
    )
    .unwrap_err();
    assert_eq!(e.kind, Kind::InvalidArgument);
    assert!(
        e.message.contains("option 'mode' must be 'existing'"),
        "{}",
        e.message
    );
}
