//! Block jobs against a scripted QMP monitor. Like QEMU's, it serves one client at a time
//! but any number of them in turn, since every look at the jobs is a new connection.

use super::*;
use crate::fake_qmp::{FakeQmp, Reply};

/// A monitor answering every command but `qmp_capabilities` with `respond(command, args)`.
fn monitor(tag: &str, respond: impl FnMut(&str, &Value) -> Reply + Send + 'static) -> FakeQmp {
    FakeQmp::answering(&format!("blockjob-{tag}"), respond)
}

/// A monitor whose `query-block-jobs` answers are `looks`, one per call (the last one
/// repeats), and that answers every other command with `other(command, arguments)`.
fn jobs_monitor(
    tag: &str,
    looks: Vec<Value>,
    mut other: impl FnMut(&str, &Value) -> Reply + Send + 'static,
) -> FakeQmp {
    let mut n = 0;
    monitor(tag, move |command, args| {
        if command == "query-block-jobs" {
            n += 1;
            Ok(looks[(n - 1).min(looks.len() - 1)].clone())
        } else {
            other(command, args)
        }
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

/// The commands it was sent, `query-block-jobs` left out.
fn commands(m: &FakeQmp) -> Vec<(String, Value)> {
    seen(m)
        .into_iter()
        .filter(|(c, _)| c != "query-block-jobs")
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
    let m = monitor("start", ok);
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
    let m = monitor("refused", |_, _| {
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
                        {"id": "drive-scsi1", "offset": 1, "len": 1}]})
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
