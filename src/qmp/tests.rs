//! QMP against a scripted socket server (a thread in the test; the library has none).

use super::*;
use crate::fake_qmp::{FakeQmp, GREETING, event, ok};

/// The commands a fake monitor received, in order.
fn executed(reqs: &[Value]) -> Vec<&str> {
    reqs.iter()
        .map(|r| r["execute"].as_str().unwrap())
        .collect()
}

#[test]
fn decode_tells_greeting_event_return_and_error_apart() {
    assert!(matches!(
        decode(br#"{"QMP": {}}"#).unwrap(),
        Message::Greeting(_)
    ));
    assert_eq!(
        decode(br#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
        Message::Event("STOP".into(), Value::Null)
    );
    assert_eq!(
        decode(br#"{"event": "MIGRATION", "data": {"status": "completed"}}"#).unwrap(),
        Message::Event("MIGRATION".into(), json!({"status": "completed"}))
    );
    assert_eq!(
        decode(br#"{"return": {}, "id": 1}"#).unwrap(),
        Message::Return(Some(json!(1)), json!({}))
    );
    assert_eq!(
        decode(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
        Message::Error(None, "GenericError".into(), "no".into())
    );
    for bad in [&b"garbage"[..], b"[]", b"{}", b"{\"event\": 5}"] {
        assert_eq!(decode(bad).unwrap_err().kind, Kind::Protocol);
    }
}

/// A monitor that knows three capabilities and 1 GiB of RAM, answering everything else `{}`.
fn migration_monitor(tag: &str) -> FakeQmp {
    FakeQmp::lines(tag, Some(GREETING), |req| {
        let ret = match req["execute"].as_str().unwrap() {
            "query-migrate-capabilities" => json!([
                {"capability": "xbzrle", "state": false},
                {"capability": "auto-converge", "state": false},
                {"capability": "postcopy-ram", "state": true},
            ]),
            "query-memory-size-summary" => json!({"base-memory": 1 << 30}),
            _ => json!({}),
        };
        // Events before and between replies must be skipped.
        vec![
            "{\"event\": \"RESUME\", \"timestamp\": {}}\r\n".to_string(),
            ok(req, ret),
        ]
    })
}

#[test]
fn migrate_turns_wanted_capabilities_on_and_every_other_off_then_sets_parameters_then_migrates() {
    let server = migration_monitor("migrate");
    let opts = MigrateOptions::from_json(&json!({"capabilities": {"xbzrle": true, "auto-converge": true}, "parameters": {"downtime-limit": 100}})).unwrap();
    let applied = migrate(&server.path, "unix:/run/qemu-server/100.migrate", &opts).unwrap();
    let reqs = server.finish();
    let names = executed(&reqs);
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-capabilities",
            "query-memory-size-summary",
            "migrate-set-parameters",
            "migrate"
        ]
    );
    assert_eq!(
        reqs[2]["arguments"],
        json!({"capabilities": [
            {"capability": "auto-converge", "state": true},
            {"capability": "postcopy-ram", "state": false},
            {"capability": "xbzrle", "state": true},
        ]}),
        "postcopy-ram, left on before, must be turned off"
    );
    // A tenth of 1 GiB is 102.4 MiB: rounded up to 128 MiB, as PVE's round_powerof2.
    let params = json!({"downtime-limit": 100, "max-bandwidth": 16u64 << 30, "xbzrle-cache-size": 128u64 << 20});
    assert_eq!(reqs[4]["arguments"], params);
    assert_eq!(
        reqs[5]["arguments"],
        json!({"uri": "unix:/run/qemu-server/100.migrate"})
    );
    assert_eq!(applied["parameters"], params);
    assert_eq!(
        applied["capabilities"],
        json!({"auto-converge": true, "postcopy-ram": false, "xbzrle": true})
    );
}

#[test]
fn migrate_without_capabilities_leaves_them_and_without_setup_only_migrates() {
    let server = migration_monitor("nocaps");
    migrate(
        &server.path,
        "unix:/run/qemu-server/100.migrate",
        &MigrateOptions {
            timeout_ms: 5000,
            ..Default::default()
        },
    )
    .unwrap();
    let names = server.commands();
    assert_eq!(
        names,
        ["qmp_capabilities", "migrate-set-parameters", "migrate"]
    );

    let server = migration_monitor("nosetup");
    let opts =
        MigrateOptions::from_json(&json!({"capabilities": {"xbzrle": true}, "setup": false}))
            .unwrap();
    assert_eq!(
        migrate(&server.path, "unix:/run/qemu-server/100.migrate", &opts).unwrap(),
        json!({})
    );
    let names = server.commands();
    assert_eq!(names, ["qmp_capabilities", "migrate"]);
}

#[test]
fn a_wanted_capability_qemu_lacks_is_refused_before_anything_is_set() {
    let server = migration_monitor("unknowncap");
    let opts = MigrateOptions::from_json(
        &json!({"capabilities": {"dirty-bitmaps": true, "x-colo": false}}),
    )
    .unwrap();
    let err = setup(
        &server.path,
        &MigrateOptions {
            timeout_ms: 5000,
            ..opts
        },
    )
    .unwrap_err();
    assert_eq!(err.kind, Kind::InvalidArgument);
    assert!(err.message.starts_with("migration capability 'dirty-bitmaps' is not supported by this QEMU (supported: xbzrle, auto-converge, postcopy-ram)"), "{}", err.message);
    let names = server.commands();
    assert_eq!(names, ["qmp_capabilities", "query-migrate-capabilities"]);
}

/// A monitor offering xbzrle and auto-converge, 1 GiB of RAM, that refuses
/// `migrate-set-capabilities` and/or `migrate-set-parameters` as told.
fn refusing_monitor(tag: &str, refuse_caps: bool, refuse_params: bool) -> FakeQmp {
    FakeQmp::answering(tag, move |command, _| match command {
        "query-migrate-capabilities" => Ok(json!([
            {"capability": "xbzrle", "state": false},
            {"capability": "auto-converge", "state": false},
        ])),
        "query-memory-size-summary" => Ok(json!({"base-memory": 1u64 << 30})),
        "migrate-set-capabilities" if refuse_caps => Err((
            "GenericError",
            "There's a migration process in progress".into(),
        )),
        "migrate-set-parameters" if refuse_params => Err((
            "GenericError",
            "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"
                .into(),
        )),
        _ => Ok(json!({})),
    })
}

fn setup_json(server: &FakeQmp, opts: Value) -> Result<Value> {
    setup(&server.path, &MigrateOptions::from_json(&opts).unwrap())
}

#[test]
fn setup_with_only_capabilities_sets_only_capabilities() {
    let server = migration_monitor("caps-only");
    let applied = setup_json(&server, json!({"capabilities": {"xbzrle": true}})).unwrap();
    assert_eq!(
        server.commands(),
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-capabilities"
        ],
        "no migrate-set-parameters, not even the default bandwidth"
    );
    assert_eq!(
        applied,
        json!({"capabilities": {"auto-converge": false, "postcopy-ram": false, "xbzrle": true}})
    );
}

#[test]
fn setup_with_only_parameters_sets_only_parameters_with_the_default_bandwidth() {
    let server = migration_monitor("params-only");
    let applied = setup_json(&server, json!({"parameters": {"downtime-limit": 100}})).unwrap();
    let reqs = server.finish();
    let names = executed(&reqs);
    assert_eq!(names, ["qmp_capabilities", "migrate-set-parameters"]);
    let params = json!({"downtime-limit": 100, "max-bandwidth": 16u64 << 30});
    assert_eq!(reqs[1]["arguments"], params);
    assert_eq!(applied, json!({ "parameters": params }));

    // neither: the default parameters, as a bare qmp_migrate always had them
    let server = migration_monitor("neither");
    let applied = setup_json(&server, json!({})).unwrap();
    assert_eq!(
        server.commands(),
        ["qmp_capabilities", "migrate-set-parameters"]
    );
    assert_eq!(
        applied,
        json!({"parameters": {"max-bandwidth": 16u64 << 30}})
    );
}

#[test]
fn setup_with_both_still_sets_the_parameters_when_the_capabilities_fail_and_names_the_step() {
    let server = refusing_monitor("caps-fail", true, false);
    let err = setup_json(
        &server,
        json!({"capabilities": {"xbzrle": true}, "parameters": {"max-bandwidth": 52428800}}),
    )
    .unwrap_err();
    let reqs = server.finish();
    let names = executed(&reqs);
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-capabilities",
            "query-memory-size-summary",
            "migrate-set-parameters"
        ],
        "the parameters must be set after the capabilities failed"
    );
    assert_eq!(
        reqs[4]["arguments"]["max-bandwidth"],
        json!(52428800),
        "the caller's limit, not the default, reached QEMU"
    );
    assert_eq!(
        err.message,
        "migrate-set-capabilities failed - There's a migration process in progress"
    );
    assert_eq!(err.kind, Kind::Qmp);
    assert_eq!(err.qmp_class(), Some("GenericError"));
}

#[test]
fn setup_with_both_names_a_failed_parameters_step_and_both_when_both_fail() {
    let server = refusing_monitor("params-fail", false, true);
    let err = setup_json(
        &server,
        json!({"capabilities": {"auto-converge": true}, "parameters": {"downtime-limit": 100}}),
    )
    .unwrap_err();
    assert_eq!(
        server.commands(),
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-capabilities",
            "migrate-set-parameters"
        ]
    );
    assert_eq!(
        err.message,
        "migrate-set-parameters failed - Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"
    );
    assert_eq!(err.kind, Kind::Qmp);

    let server = refusing_monitor("both-fail", true, true);
    let err = setup_json(
        &server,
        json!({"capabilities": {"auto-converge": true}, "parameters": {}}),
    )
    .unwrap_err();
    assert_eq!(
        err.message,
        "migrate-set-capabilities failed - There's a migration process in progress; migrate-set-parameters failed - Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds"
    );
}

#[test]
fn a_capabilities_query_qemu_refuses_is_the_capabilities_step_failing_naming_the_query() {
    let server = FakeQmp::answering("query-fail", |command, _| match command {
        "query-migrate-capabilities" => Err(("CommandNotFound", "not here".into())),
        _ => Ok(json!({})),
    });
    let err = setup_json(
        &server,
        json!({"capabilities": {"xbzrle": true}, "parameters": {}}),
    )
    .unwrap_err();
    assert_eq!(
        server.commands(),
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-parameters"
        ]
    );
    assert_eq!(
        err.message,
        "migrate-set-capabilities failed - query-migrate-capabilities: not here"
    );
}

#[test]
fn a_bad_downtime_limit_is_refused_before_the_capabilities_are_set() {
    let server = migration_monitor("bad-downtime");
    let err = setup_json(
        &server,
        json!({"capabilities": {"xbzrle": true}, "parameters": {"downtime-limit": "100"}}),
    )
    .unwrap_err();
    assert_eq!(err.kind, Kind::InvalidArgument);
    assert!(
        err.message
            .starts_with("parameter 'downtime-limit' must be"),
        "{}",
        err.message
    );
    assert_eq!(server.commands(), ["qmp_capabilities"]);
}

#[test]
fn parameters_follow_pve_bandwidth_downtime_cap_and_cache_rounding() {
    let given = |v: Value| v.as_object().unwrap().clone();
    let p = parameters(&given(json!({})), false, false, None).unwrap();
    assert_eq!(Value::Object(p), json!({"max-bandwidth": 17179869184u64}));
    let p = parameters(
        &given(json!({"max-bandwidth": 1000, "downtime-limit": 5_000_000})),
        false,
        true,
        Some(64 << 20),
    )
    .unwrap();
    assert_eq!(
        p["max-bandwidth"],
        json!(1000),
        "the caller's bandwidth limit wins"
    );
    assert_eq!(
        p["downtime-limit"],
        json!(2_000_000),
        "capped at QEMU's 2000 s"
    );
    assert_eq!(
        p["xbzrle-cache-size"],
        json!(8u64 << 20),
        "6.4 MiB rounds up to 8 MiB"
    );
    let p = parameters(
        &given(json!({"xbzrle-cache-size": 4096})),
        false,
        true,
        Some(1 << 30),
    )
    .unwrap();
    assert_eq!(
        p["xbzrle-cache-size"],
        json!(4096),
        "the caller's cache size wins"
    );
    assert!(parameters(&given(json!({"downtime-limit": "100"})), false, false, None).is_err());
    assert_eq!(round_up_power_of_two(0), 1);
    assert_eq!(round_up_power_of_two(1 << 20), 1 << 20);
    assert_eq!(round_up_power_of_two((1 << 20) + 1), 2 << 20);
}

#[test]
fn qmp_error_carries_class_and_desc() {
    let server = FakeQmp::lines("error", Some(GREETING), |req| {
        if req["execute"] == "migrate" {
            vec![format!(
                "{}\r\n",
                json!({"error": {"class": "GenericError", "desc": "There's a migration process in progress"}, "id": req["id"]})
            )]
        } else {
            vec![ok(req, json!({}))]
        }
    });
    let err = migrate(
        &server.path,
        "unix:/run/qemu-server/100.migrate",
        &MigrateOptions {
            timeout_ms: 5000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind, Kind::Qmp);
    assert_eq!(
        err.message,
        "QMP command 'migrate' failed: GenericError: There's a migration process in progress"
    );
}

#[test]
fn query_migrate_returns_qemus_answer() {
    let server = FakeQmp::lines("query", Some(GREETING), |req| {
        if req["execute"] == "query-migrate" {
            vec![ok(
                req,
                json!({"status": "active", "ram": {"transferred": 123}}),
            )]
        } else {
            vec![ok(req, json!({}))]
        }
    });
    let reply = query_migrate(&server.path, 5000).unwrap();
    assert_eq!(status(&reply), "active");
    assert_eq!(reply["ram"]["transferred"], 123);
}

#[test]
fn silent_monitor_times_out_naming_the_greeting() {
    let server = FakeQmp::lines("silent", None, |_| vec![]);
    let err = query_migrate(&server.path, 200).unwrap_err();
    assert_eq!(err.kind, Kind::Timeout);
    assert!(err.message.contains("no QMP greeting"), "{}", err.message);
}

#[test]
fn garbage_from_the_monitor_is_a_protocol_error() {
    let server = FakeQmp::lines("garbage", Some("this is not json\r\n"), |_| vec![]);
    let err = query_migrate(&server.path, 2000).unwrap_err();
    assert_eq!(err.kind, Kind::Protocol);
    assert!(
        err.message
            .contains("unexpected QMP message 'this is not json'"),
        "{}",
        err.message
    );
}

#[test]
fn missing_socket_is_named() {
    let err = query_migrate("/nonexistent-mtunnel/100.qmp", 1000).unwrap_err();
    assert!(
        err.message
            .contains("'/nonexistent-mtunnel/100.qmp' does not exist"),
        "{}",
        err.message
    );
}

#[test]
fn cancel_waits_for_cancelled() {
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let server = FakeQmp::lines("cancel", Some(GREETING), move |req| {
        if req["execute"] == "query-migrate" {
            let n = polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let status = if n < 2 { "cancelling" } else { "cancelled" };
            vec![ok(req, json!({"status": status}))]
        } else {
            vec![ok(req, json!({}))]
        }
    });
    let reply = migrate_cancel(&server.path, 5000).unwrap();
    assert_eq!(status(&reply), "cancelled");
    let names = server.commands();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "migrate_cancel",
            "query-migrate",
            "query-migrate",
            "query-migrate"
        ]
    );
}

#[test]
fn unknown_statuses_count_as_running() {
    assert!(!is_finished("pre-switchover"));
    assert!(!is_finished("some-future-status"));
    assert!(is_finished("completed") && is_finished("failed") && is_finished("cancelled"));
}

#[test]
fn uri_must_be_unix_or_tcp() {
    assert!(check_uri("unix:/run/qemu-server/100.migrate").is_ok());
    assert!(check_uri("tcp:198.18.0.2:60000").is_ok());
    assert!(check_uri("exec:rm -rf /").is_err());
    assert!(check_uri("unix:/x\n").is_err());
}

#[test]
fn wait_returns_at_the_final_migration_event_skipping_other_and_queued_events() {
    let server = FakeQmp::script("wait-queued", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "active"})));
        // queued right behind the reply: events of no interest, a non-final status change
        s.send(&event("RESUME", Value::Null));
        s.send(&event("MIGRATION", json!({"status": "device"})));
        s.send(&event("STOP", Value::Null));
        s.send(&event("MIGRATION", json!({"status": "completed"})));
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "completed", "total-time": 900, "downtime": 7}),
        ));
        seen
    });
    let hold = WaitOptions {
        hold_ms: 60_000,
        ..WaitOptions::default()
    };
    let started = std::time::Instant::now();
    let reply = wait_migration(&server.path, &hold).unwrap();
    assert_eq!(
        reply,
        json!({"status": "completed", "total-time": 900, "downtime": 7})
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the completed event did not end the wait: it returned after {:?}",
        started.elapsed()
    );
    assert_eq!(
        server.commands(),
        ["qmp_capabilities", "query-migrate", "query-migrate"]
    );
}

#[test]
fn wait_wakes_on_a_failure_event_that_comes_later() {
    let server = FakeQmp::script("wait-late", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "active"})));
        std::thread::sleep(Duration::from_millis(200));
        s.send(&event("MIGRATION", json!({"status": "failed"})));
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "failed", "error-desc": "Unable to write to socket"}),
        ));
        seen
    });
    let hold = WaitOptions {
        hold_ms: 60_000,
        ..WaitOptions::default()
    };
    let reply = wait_migration(&server.path, &hold).unwrap();
    assert_eq!(status(&reply), "failed");
    assert_eq!(reply["error-desc"], "Unable to write to socket");
    assert_eq!(server.commands().len(), 3);
}

#[test]
fn wait_without_events_asks_again_when_the_hold_ends() {
    let server = FakeQmp::script("wait-hold", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "active"})));
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "active", "ram": {"remaining": 5}}),
        ));
        seen
    });
    let hold = WaitOptions {
        hold_ms: 50,
        ..WaitOptions::default()
    };
    let reply = wait_migration(&server.path, &hold).unwrap();
    assert_eq!(
        reply["ram"]["remaining"], 5,
        "not the second answer: {reply}"
    );
    assert_eq!(server.commands().len(), 3);
}

#[test]
fn wait_on_a_finished_migration_asks_once() {
    let server = FakeQmp::script("wait-done", |s| {
        vec![
            s.answer("qmp_capabilities", json!({})),
            s.answer(
                "query-migrate",
                json!({"status": "completed", "total-time": 5}),
            ),
        ]
    });
    let reply = wait_migration(&server.path, &WaitOptions::default()).unwrap();
    assert_eq!(status(&reply), "completed");
    assert_eq!(server.commands(), ["qmp_capabilities", "query-migrate"]);
}

#[test]
fn a_monitor_that_closes_while_held_is_an_error_at_once() {
    let server = FakeQmp::script("wait-gone", |s| {
        let seen = vec![
            s.answer("qmp_capabilities", json!({})),
            s.answer("query-migrate", json!({"status": "active"})),
        ];
        // QEMU died: its end of the monitor closes
        s.close();
        seen
    });
    let hold = WaitOptions {
        hold_ms: 60_000,
        ..WaitOptions::default()
    };
    let started = std::time::Instant::now();
    let err = wait_migration(&server.path, &hold).unwrap_err();
    assert_eq!(err.kind, Kind::Io, "{}", err.message);
    assert!(err.message.contains("closed QMP socket"), "{}", err.message);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited out the hold ({:?}) instead of seeing the monitor close",
        started.elapsed()
    );
    drop(server);
}

#[test]
fn wait_with_pass_wakes_when_a_new_pass_begins_and_only_then() {
    let server = FakeQmp::script("wait-pass", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "active", "ram": {"dirty-sync-count": 2}}),
        ));
        s.send(&event("MIGRATION_PASS", json!({"pass": 3})));
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "active", "ram": {"dirty-sync-count": 3}}),
        ));
        seen
    });
    let opts = WaitOptions {
        hold_ms: 60_000,
        pass: true,
        ..WaitOptions::default()
    };
    let started = std::time::Instant::now();
    let reply = wait_migration(&server.path, &opts).unwrap();
    assert_eq!(reply["ram"]["dirty-sync-count"], 3);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the pass event did not end the wait: it returned after {:?}",
        started.elapsed()
    );
    assert!(
        WaitOptions::from_json(&json!({"pass": true})).unwrap().pass,
        "\"pass\" is read from the options"
    );
    assert!(
        !is_wake_migration_event("MIGRATION_PASS", &json!({"pass": 3}), "active"),
        "without the option a pass does not wake the wait"
    );
}

#[test]
fn wait_options_refuse_a_negative_hold_and_unknown_keys() {
    let err = WaitOptions::from_json(&json!({"hold_ms": -1})).unwrap_err();
    assert!(err.message.contains("hold_ms"), "{}", err.message);
    assert!(WaitOptions::from_json(&json!({"hold": 5})).is_err());
    let o = WaitOptions::from_json(&json!({})).unwrap();
    assert_eq!(
        (o.hold_ms, o.timeout_ms),
        (DEFAULT_HOLD_MS, DEFAULT_TIMEOUT_MS)
    );
}

#[test]
fn a_completed_migration_without_its_figures_yet_is_asked_again() {
    let server = FakeQmp::script("wait-figures", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "active"})));
        s.send(&event("MIGRATION", json!({"status": "completed"})));
        // the state is set a moment before QEMU computes total-time and downtime
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "completed", "total-time": 0}),
        ));
        seen.push(s.answer("query-migrate", json!({"status": "completed"})));
        seen.push(s.answer(
            "query-migrate",
            json!({"status": "completed", "total-time": 1160, "downtime": 40}),
        ));
        seen
    });
    let reply = wait_migration(&server.path, &WaitOptions::default()).unwrap();
    assert_eq!(
        reply["total-time"], 1160,
        "returned before QEMU's figures: {reply}"
    );
    assert_eq!(reply["downtime"], 40);
    assert_eq!(server.commands().len(), 5);
}

/// A monitor offering post-copy (with preempt when `preempt`), answering everything else `{}`.
fn postcopy_monitor(tag: &str, offered: &'static [&'static str]) -> FakeQmp {
    FakeQmp::answering(tag, move |command, _| {
        Ok(match command {
            "query-migrate-capabilities" => Value::Array(
                offered
                    .iter()
                    .map(|c| json!({"capability": c, "state": false}))
                    .collect(),
            ),
            _ => json!({}),
        })
    })
}

#[test]
fn postcopy_turns_on_postcopy_ram_and_preempt_where_offered_and_keeps_the_bandwidth_limit() {
    let server = postcopy_monitor(
        "pc-preempt",
        &["xbzrle", "events", "postcopy-ram", "postcopy-preempt"],
    );
    let opts = MigrateOptions::from_json(&json!({"capabilities": {"events": true}, "parameters": {"max-bandwidth": 33554432}, "postcopy": true})).unwrap();
    let applied = setup(&server.path, &opts).unwrap();
    assert_eq!(
        applied["capabilities"],
        json!({"events": true, "postcopy-preempt": true, "postcopy-ram": true, "xbzrle": false})
    );
    assert_eq!(
        applied["parameters"],
        json!({"max-bandwidth": 33554432, "max-postcopy-bandwidth": 33554432}),
        "after the switch the migration must keep the caller's limit, not QEMU's unlimited 0"
    );
    let reqs = server.finish();
    assert_eq!(reqs[2]["execute"], "migrate-set-capabilities");

    // No preempt offered (older QEMU): post-copy alone; no capabilities given: the rest off.
    let server = postcopy_monitor("pc-plain", &["xbzrle", "postcopy-ram"]);
    let opts = MigrateOptions::from_json(&json!({"postcopy": true})).unwrap();
    let applied = setup(&server.path, &opts).unwrap();
    assert_eq!(
        applied["capabilities"],
        json!({"postcopy-ram": true, "xbzrle": false})
    );
    assert_eq!(
        applied.get("parameters"),
        None,
        "post-copy without parameters sets capabilities only"
    );
    assert_eq!(
        server.commands(),
        [
            "qmp_capabilities",
            "query-migrate-capabilities",
            "migrate-set-capabilities"
        ]
    );
}

#[test]
fn postcopy_goes_on_without_preempt_when_a_listening_target_refuses_it() {
    // QEMU 8.1 and later, on a target started with -incoming unix:
    let server = FakeQmp::answering("pc-refuse", |command, args| match command {
        "query-migrate-capabilities" => Ok(json!([
            {"capability": "postcopy-ram", "state": false},
            {"capability": "postcopy-preempt", "state": false}
        ])),
        "migrate-set-capabilities"
            if args["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!({"capability": "postcopy-preempt", "state": true})) =>
        {
            Err((
                "GenericError",
                "Postcopy preempt must be set before incoming starts".into(),
            ))
        }
        _ => Ok(json!({})),
    });
    let opts = MigrateOptions::from_json(&json!({"postcopy": true})).unwrap();
    let applied = setup(&server.path, &opts).unwrap();
    assert_eq!(
        applied["capabilities"],
        json!({"postcopy-preempt": false, "postcopy-ram": true}),
        "post-copy must go on without preempt: {applied}"
    );
    assert!(
        applied["postcopy-preempt-refused"]
            .as_str()
            .unwrap_or_default()
            .contains("Postcopy preempt must be set before incoming starts"),
        "the refusal must be returned: {applied}"
    );
    drop(server);

    // asked for by the caller: QEMU's refusal is the caller's error
    let server = FakeQmp::answering("pc-refuse2", |command, _| match command {
        "query-migrate-capabilities" => Ok(json!([
            {"capability": "postcopy-ram", "state": false},
            {"capability": "postcopy-preempt", "state": false}
        ])),
        "migrate-set-capabilities" => Err(("GenericError", "refused".into())),
        _ => Ok(json!({})),
    });
    let opts = MigrateOptions::from_json(
        &json!({"postcopy": true, "capabilities": {"postcopy-preempt": true}}),
    )
    .unwrap();
    let err = setup(&server.path, &opts).unwrap_err();
    assert_eq!(err.kind, Kind::Qmp, "{err:?}");
}

#[test]
fn postcopy_on_a_qemu_without_it_is_refused_before_anything_is_set() {
    let server = postcopy_monitor("pc-none", &["xbzrle", "events"]);
    let opts = MigrateOptions::from_json(&json!({"postcopy": true})).unwrap();
    let err = migrate(&server.path, "unix:/run/qemu-server/100.migrate", &opts).unwrap_err();
    assert_eq!(err.kind, Kind::InvalidArgument);
    assert_eq!(
        err.message,
        "post-copy needs the migration capability 'postcopy-ram', which this QEMU does not offer (supported: xbzrle, events)"
    );
    assert_eq!(
        server.commands(),
        ["qmp_capabilities", "query-migrate-capabilities"]
    );
}

#[test]
fn postcopy_calls_send_qemus_commands() {
    let server = postcopy_monitor("pc-calls", &[]);
    migrate_start_postcopy(&server.path, 5000).unwrap();
    migrate_pause(&server.path, 5000).unwrap();
    migrate_recover(
        &server.path,
        "unix:/run/qemu-server/100.migrate-recover",
        5000,
    )
    .unwrap();
    migrate_resume(&server.path, "unix:/run/qemu-server/100.migrate-1", 5000).unwrap();
    let reqs: Vec<Value> = server
        .finish()
        .into_iter()
        .filter(|r| r["execute"] != "qmp_capabilities")
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("id");
            r
        })
        .collect();
    assert_eq!(
        reqs,
        [
            json!({"execute": "migrate-start-postcopy"}),
            json!({"execute": "migrate-pause"}),
            json!({"execute": "migrate-recover", "arguments": {"uri": "unix:/run/qemu-server/100.migrate-recover"}}),
            json!({"execute": "migrate", "arguments": {"uri": "unix:/run/qemu-server/100.migrate-1", "resume": true}}),
        ]
    );
}

#[test]
fn resume_and_recover_refuse_a_bad_uri_before_connecting() {
    for err in [
        migrate_resume("/nonexistent/100.qmp", "exec:cat", 5000).unwrap_err(),
        migrate_recover("/nonexistent/100.qmp", "unix:/x\n", 5000).unwrap_err(),
    ] {
        assert_eq!(err.kind, Kind::InvalidArgument, "{}", err.message);
        assert!(
            err.message.starts_with("invalid migration URI"),
            "{}",
            err.message
        );
    }
}

#[test]
fn a_switch_to_postcopy_qemu_refuses_carries_qemus_error() {
    let server = FakeQmp::answering("pc-refused", |command, _| match command {
        "migrate-start-postcopy" => Err((
            "GenericError",
            "Enable postcopy with migrate_set_capability before the start of migration".into(),
        )),
        _ => Ok(json!({})),
    });
    let err = migrate_start_postcopy(&server.path, 5000).unwrap_err();
    assert_eq!(err.kind, Kind::Qmp);
    assert!(
        err.message
            .contains("Enable postcopy with migrate_set_capability"),
        "{}",
        err.message
    );
}

#[test]
fn wait_wakes_on_each_postcopy_status_change_but_not_on_the_status_it_started_in() {
    // pre-copy → post-copy: the switch wakes the wait
    let server = FakeQmp::script("wait-pc-active", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "active"})));
        s.send(&event("MIGRATION", json!({"status": "device"})));
        s.send(&event("MIGRATION", json!({"status": "postcopy-active"})));
        seen.push(s.answer("query-migrate", json!({"status": "postcopy-active"})));
        seen
    });
    let hold = WaitOptions {
        hold_ms: 60_000,
        ..WaitOptions::default()
    };
    let started = std::time::Instant::now();
    let reply = wait_migration(&server.path, &hold).unwrap();
    assert_eq!(status(&reply), "postcopy-active");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the switch to post-copy did not wake the wait ({:?})",
        started.elapsed()
    );

    // in post-copy: a repeated postcopy-active is no news, a pause is
    let server = FakeQmp::script("wait-pc-paused", |s| {
        let mut seen = vec![s.answer("qmp_capabilities", json!({}))];
        seen.push(s.answer("query-migrate", json!({"status": "postcopy-active"})));
        s.send(&event("MIGRATION", json!({"status": "postcopy-active"})));
        std::thread::sleep(Duration::from_millis(100));
        s.send(&event("MIGRATION", json!({"status": "postcopy-paused"})));
        seen.push(s.answer("query-migrate", json!({"status": "postcopy-paused"})));
        seen
    });
    let reply = wait_migration(&server.path, &hold).unwrap();
    assert_eq!(status(&reply), "postcopy-paused");
    assert_eq!(
        server.commands(),
        ["qmp_capabilities", "query-migrate", "query-migrate"]
    );
    assert!(is_postcopy("postcopy-recover") && !is_finished("postcopy-paused"));
}
