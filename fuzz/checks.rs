//! Property checks shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly + libFuzzer)
//! and the corpus replay test (`tests/fuzz_corpus.rs`, stable `cargo test`).
//!
//! Each public function takes one raw fuzz input, feeds it to the parsers that read bytes from
//! the remote side (QMP monitor, `qm mtunnel`, `qm start` output) or that guard what we unlink
//! and run remotely, and panics when a property is violated. A panic inside the library is a
//! finding as well: these parsers run inside a C/Perl host and must never panic.
#![allow(dead_code)]

use mtunnel::Kind;
use mtunnel::io::LineDecoder;
use mtunnel::qmp::{self, Message};
use mtunnel::tunnel::protocol;
use mtunnel::{target, validate};
use serde_json::{Map, Value, json};
use std::cell::Cell;

/// The socket directory the C ABI passes to `parse_start_output`.
const DIR: &str = validate::DEFAULT_SOCKET_DIR;

/// Error texts reach logs, terminals and `mtunnel_last_error()`: bytes from the peer must be
/// escaped, never copied raw.
fn assert_printable(message: &str, what: &str) {
    assert!(
        !message.bytes().any(|b| b.is_ascii_control()),
        "{what}: error message carries a raw control character: {message:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Open findings: property violations found by fuzzing and reported, but not yet fixed in src/.
// The fuzz targets and the corpus replay tolerate exactly these (so fuzzing gets past them and
// `cargo test` stays green); for each, an input is kept as
// `fuzz/regressions/<target>/open-<name>`, which tests/fuzz_corpus.rs replays with the
// tolerance off and expects to still fail. Once src/ is fixed: delete the tolerance here and
// rename the input without the `open-` prefix, so it becomes an ordinary regression.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static STRICT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every open finding treated as the property violation it is.
pub fn strictly<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            STRICT.set(false);
        }
    }
    STRICT.set(true);
    let _reset = Reset;
    f()
}

/// Whether the open finding `name` is tolerated (always, except inside [`strictly`]).
fn tolerated(name: &str) -> bool {
    debug_assert!(OPEN_FINDINGS.contains(&name), "unknown open finding {name}");
    !STRICT.get()
}

/// The open findings, as named in `fuzz/regressions/<target>/open-<name>`.
pub const OPEN_FINDINGS: &[&str] = &[];

// ---------------------------------------------------------------------------------------------
// qmp_stream: LineDecoder framing + qmp::decode, as Qmp::read uses them.
//
// Input: byte 0 picks the line limit (8 + 4*b, i.e. 8..=1028 bytes), byte 1 seeds the chunk
// pattern (how the stream is cut into reads), the rest is the byte stream from the monitor.
// ---------------------------------------------------------------------------------------------

/// Runs the QMP stream decoder over one input.
pub fn qmp_stream(data: &[u8]) {
    let [limit, pattern, stream @ ..] = data else {
        return;
    };
    let max_line = 8 + 4 * *limit as usize;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(*pattern).wrapping_mul(0x0100_0000_01b3);
    let mut dec = LineDecoder::new(max_line);
    let mut lines = Vec::new();
    let mut refused = false;
    let mut rest = stream;
    while !rest.is_empty() {
        let r = xorshift(&mut rng);
        // Mostly short reads (1..=24 bytes), sometimes a big one, as a socket delivers them.
        let n = if r & 7 == 0 {
            1 + (r >> 8) as usize % 4096
        } else {
            1 + (r >> 8) as usize % 24
        };
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        dec.buffer().extend_from_slice(chunk);
        rest = tail;
        drain_lines(&mut dec, max_line, &mut lines, &mut refused);
    }
    // Nothing lost, nothing invented: unless an overlong line was thrown away, the lines plus
    // the pending bytes are exactly the stream.
    if !refused {
        let mut segments: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
        let last = segments.pop().unwrap_or_default();
        assert_eq!(
            lines.len(),
            segments.len(),
            "line count differs from the number of newlines"
        );
        for (line, seg) in lines.iter().zip(segments) {
            assert_eq!(
                line.as_slice(),
                seg.strip_suffix(b"\r").unwrap_or(seg),
                "line differs from the stream"
            );
        }
        assert_eq!(
            dec.pending(),
            last,
            "pending bytes differ from the unterminated tail"
        );
    }
    for line in &lines {
        // Qmp::read skips blank lines and decodes the rest.
        if !line.iter().all(|b| b.is_ascii_whitespace()) {
            check_qmp_line(line);
        }
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Calls `next_line` until it has nothing more, checking each answer against the buffer.
fn drain_lines(
    dec: &mut LineDecoder,
    max_line: usize,
    lines: &mut Vec<Vec<u8>>,
    refused: &mut bool,
) {
    loop {
        let before = dec.pending().to_vec();
        let newline = before.iter().position(|&b| b == b'\n');
        match dec.next_line() {
            Ok(Some(line)) => {
                let pos =
                    newline.expect("next_line returned a line although no newline is buffered");
                assert!(
                    pos <= max_line,
                    "line of {pos} bytes accepted with limit {max_line}"
                );
                let raw = &before[..pos];
                assert_eq!(
                    line.as_slice(),
                    raw.strip_suffix(b"\r").unwrap_or(raw),
                    "line is not the buffered bytes"
                );
                assert!(!line.contains(&b'\n'));
                assert_eq!(
                    dec.pending(),
                    &before[pos + 1..],
                    "bytes after the line were not kept"
                );
                lines.push(line);
            }
            Ok(None) => {
                assert!(newline.is_none(), "a buffered line was not returned");
                assert!(
                    before.len() <= max_line,
                    "{} bytes buffered without newline, limit {max_line}",
                    before.len()
                );
                assert_eq!(
                    dec.pending(),
                    &before[..],
                    "next_line changed the buffer without returning a line"
                );
                return;
            }
            Err(e) => {
                assert_eq!(e.kind, Kind::Protocol, "{}", e.message);
                let overlong = newline.map_or(before.len() > max_line, |pos| pos > max_line);
                assert!(
                    overlong,
                    "line refused although it fits the limit {max_line}: {}",
                    e.message
                );
                assert!(
                    dec.pending().is_empty(),
                    "an overlong line must not stay buffered"
                );
                assert_printable(&e.message, "LineDecoder");
                *refused = true;
            }
        }
    }
}

/// `qmp::decode` on one line: never panics, classifies exactly like the QMP spec says, and
/// refuses only what is not a greeting, event, return or error.
fn check_qmp_line(line: &[u8]) {
    let object: Option<Map<String, Value>> = match serde_json::from_slice(line) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    };
    match qmp::decode(line) {
        Ok(msg) => {
            let o = object.unwrap_or_else(|| {
                panic!("decode accepted a line that is no JSON object: {msg:?}")
            });
            let has = |k: &str| o.contains_key(k);
            match msg {
                Message::Greeting(g) => assert_eq!(o.get("QMP"), Some(&g)),
                Message::Event(name, data) => {
                    assert!(!has("QMP"));
                    assert_eq!(o.get("data").cloned().unwrap_or(Value::Null), data);
                    assert_eq!(o.get("event").and_then(Value::as_str), Some(name.as_str()));
                }
                Message::Return(id, value) => {
                    assert!(
                        !has("QMP") && !has("event"),
                        "return taken from a greeting/event: {o:?}"
                    );
                    assert_eq!(o.get("return"), Some(&value));
                    assert_eq!(o.get("id"), id.as_ref());
                }
                Message::Error(id, class, desc) => {
                    assert!(
                        !has("QMP") && !has("event") && !has("return"),
                        "error taken from another message: {o:?}"
                    );
                    let err = &o["error"];
                    assert_eq!(
                        class,
                        err.get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("GenericError")
                    );
                    assert_eq!(
                        desc,
                        err.get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("(no description)")
                    );
                    assert_eq!(o.get("id"), id.as_ref());
                }
            }
        }
        Err(e) => {
            assert_eq!(e.kind, Kind::Protocol, "{}", e.message);
            assert_printable(&e.message, "qmp::decode");
            assert!(
                e.message.len() < 300,
                "error message not cut: {} bytes",
                e.message.len()
            );
            if let Some(o) = object {
                let bad_event =
                    !o.contains_key("QMP") && o.get("event").is_some_and(|e| !e.is_string());
                let none = !["QMP", "event", "return", "error"]
                    .iter()
                    .any(|k| o.contains_key(*k));
                assert!(
                    bad_event || none,
                    "a valid QMP message was refused: {o:?}: {}",
                    e.message
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// query_migrate: qmp::status + qmp::is_finished on a `query-migrate` answer.
//
// Input: the `return` value as JSON (anything else still exercises is_finished on the text).
// ---------------------------------------------------------------------------------------------

/// Runs the `query-migrate` decoder over one input.
pub fn query_migrate(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_is_finished(text);
        check_is_finished(text.trim());
    }
    let Ok(reply) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let status = qmp::status(&reply);
    match reply.get("status") {
        Some(Value::String(s)) => assert_eq!(status, s.as_str()),
        _ => assert_eq!(status, "none", "status of {reply}"),
    }
    check_is_finished(status);
    // The same answer as it arrives: one QMP return line. (Skipped near serde_json's nesting
    // limit of 128, where wrapping it in a return object makes it legitimately unparsable.)
    if depth(&reply) < 120 {
        let line = json!({"return": reply, "id": "mtunnel-1-1"}).to_string();
        match qmp::decode(line.as_bytes()) {
            Ok(Message::Return(Some(id), value)) if id == "mtunnel-1-1" => {
                assert_eq!(qmp::status(&value), status)
            }
            other => panic!("query-migrate return line decoded as {other:?}"),
        }
    }
}

fn check_is_finished(status: &str) {
    let finished = qmp::is_finished(status);
    let fin = matches!(status, "completed" | "failed" | "cancelled" | "none");
    assert_eq!(finished, fin, "is_finished({status:?}) = {finished}");
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// tunnel_lines: the `qm mtunnel` greeting, version and reply lines, and command checking.
//
// Input: `LINE` or `LINE\nCOMMAND` (COMMAND defaults to `resume 100`). LINE is what the tunnel
// sent (never contains '\n', the LineDecoder split it off); COMMAND is what we would send.
// ---------------------------------------------------------------------------------------------

/// Runs the tunnel protocol line parsers over one input.
pub fn tunnel_lines(data: &[u8]) {
    let (line, cmd) = match data.iter().position(|&b| b == b'\n') {
        Some(p) => (
            &data[..p],
            String::from_utf8_lossy(&data[p + 1..]).into_owned(),
        ),
        None => (data, "resume 100".to_string()),
    };

    match protocol::online(line) {
        Ok(()) => assert_eq!(line, b"tunnel online"),
        Err(e) => {
            assert_ne!(line, b"tunnel online", "the greeting was refused");
            let want = if line == b"no quorum" {
                Kind::NoQuorum
            } else {
                Kind::Protocol
            };
            assert_eq!(e.kind, want, "{}", e.message);
            assert_printable(&e.message, "protocol::online");
        }
    }

    // `ver N`: N is 1..=9 ASCII digits and at least 1.
    let spec = std::str::from_utf8(line)
        .ok()
        .and_then(|t| t.strip_prefix("ver "))
        .filter(|n| (1..=9).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
        .map(|n| n.parse::<u32>().expect("9 digits fit u32"))
        .filter(|&n| n >= 1);
    match protocol::version(line) {
        Ok(n) => assert_eq!(Some(n), spec, "version {n} read from {line:?}"),
        Err(e) => {
            assert_eq!(spec, None, "valid version line refused: {}", e.message);
            assert_eq!(e.kind, Kind::Protocol);
            assert_printable(&e.message, "protocol::version");
        }
    }

    check_command(&cmd);
    check_command(&String::from_utf8_lossy(data));

    // reply() is only ever called for a command that passed command().
    if protocol::command(&cmd).is_ok() {
        match protocol::reply(line, &cmd) {
            Ok(s) => match line.strip_prefix(b"OK ") {
                // an answer with data: its JSON, which parses to what the line held
                Some(data) => {
                    let sent: Value = serde_json::from_slice(data)
                        .unwrap_or_else(|_| panic!("reply {line:?} taken as success"));
                    assert_eq!(serde_json::from_str::<Value>(&s).unwrap(), sent);
                }
                None => {
                    assert_eq!(line, b"OK", "reply {line:?} taken as success");
                    assert_eq!(s, "OK");
                }
            },
            Err(e) => {
                assert_ne!(line, b"OK");
                assert!(
                    line.strip_prefix(b"OK ")
                        .is_none_or(|d| serde_json::from_slice::<Value>(d).is_err()),
                    "an OK with JSON refused: {line:?}"
                );
                let want = if line.starts_with(b"ERR:") {
                    Kind::Remote
                } else {
                    Kind::Protocol
                };
                assert_eq!(e.kind, want, "{}", e.message);
                assert_printable(&e.message, "protocol::reply");
            }
        }
        // Protocol v2: what we send is one JSON object with a string "cmd"; a reply is taken
        // only as a JSON object with a true "success".
        if let Ok(request) = protocol::v2_request(&cmd) {
            let sent: Value = serde_json::from_str(&request)
                .unwrap_or_else(|e| panic!("v2 request {request:?} is not JSON: {e}"));
            assert!(
                sent.get("cmd").is_some_and(Value::is_string),
                "v2 request {request:?} without a string cmd"
            );
            assert!(
                !request.bytes().any(|b| b.is_ascii_control()),
                "v2 request {request:?} is not one line"
            );
            match protocol::v2_reply(line, &request) {
                Ok(s) => {
                    let got: Value =
                        serde_json::from_str(&s).expect("a v2 reply is returned as JSON");
                    let ok = matches!(got.get("success"), Some(Value::Bool(true)))
                        || got
                            .get("success")
                            .and_then(Value::as_f64)
                            .is_some_and(|n| n != 0.0);
                    assert!(ok, "v2 reply {line:?} taken as success");
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind, Kind::Protocol | Kind::Remote),
                        "{}",
                        e.message
                    );
                    assert_printable(&e.message, "protocol::v2_reply");
                }
            }
        }
    }
}

/// A command we send must be exactly one line: an accepted one can never smuggle a second.
fn check_command(cmd: &str) {
    let one_line = !cmd.is_empty() && !cmd.bytes().any(|b| b.is_ascii_control());
    match protocol::command(cmd) {
        Ok(()) => assert!(one_line, "command {cmd:?} accepted"),
        Err(e) => {
            assert!(!one_line, "command {cmd:?} refused: {}", e.message);
            assert_eq!(e.kind, Kind::InvalidArgument);
            assert_printable(&e.message, "protocol::command");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// listen_lines: target::parse_start_output on `qm start --migratedfrom` output.
//
// Input: `VMID\nOUTPUT` (without a newline: VMID 100, the input is the output).
// ---------------------------------------------------------------------------------------------

/// Runs the `… listens on …` parser over one input.
pub fn listen_lines(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (vmid, output) = text.split_once('\n').unwrap_or(("100", &text));
    match target::parse_start_output(output, vmid, DIR) {
        Ok(r) => check_listen_result(&r, vmid),
        Err(e) => {
            if e.kind == Kind::InvalidArgument {
                assert!(
                    validate::vmid(vmid).is_err(),
                    "valid VMID {vmid:?} refused: {}",
                    e.message
                );
            } else {
                assert_eq!(e.kind, Kind::Protocol, "{}", e.message);
            }
            assert_printable(&e.message, "parse_start_output");
        }
    }
}

fn check_listen_result(r: &Value, vmid: &str) {
    assert!(
        validate::vmid(vmid).is_ok(),
        "output accepted for invalid VMID {vmid:?}"
    );
    let uri = r
        .get("uri")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("Ok without a \"uri\": {r}"));
    if let Err(e) = qmp::check_uri(uri) {
        panic!(
            "returned uri {uri:?} is refused by qmp::check_uri (so qmp_migrate would refuse it): {}",
            e.message
        );
    }
    match r.get("socket") {
        Some(s) => {
            let s = s
                .as_str()
                .unwrap_or_else(|| panic!("\"socket\" is not a string: {r}"));
            check_returned_socket(s, vmid, false);
            let agree = uri == format!("unix:{s}");
            assert!(
                agree,
                "uri and socket disagree: uri {uri:?}, socket {s:?} (the driver forwards the socket but migrates to the uri)"
            );
        }
        None => assert!(
            !uri.starts_with("unix:"),
            "unix uri {uri:?} without \"socket\""
        ),
    }
    let nbd = r
        .get("nbd")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no \"nbd\" array: {r}"));
    for d in nbd {
        let u = d
            .get("uri")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("nbd entry without uri: {d}"));
        match d.get("socket") {
            Some(s) => {
                let s = s
                    .as_str()
                    .unwrap_or_else(|| panic!("nbd \"socket\" is not a string: {d}"));
                check_returned_socket(s, vmid, true);
                assert!(
                    u.starts_with(&format!("nbd:unix:{s}:exportname=")),
                    "nbd uri {u:?} does not use socket {s:?}"
                );
            }
            // NBD over TCP (insecure migration): never a unix URI without its socket.
            None => assert!(
                u.starts_with("nbd:") && !u.starts_with("nbd:unix:"),
                "nbd uri {u:?} without \"socket\""
            ),
        }
        for key in ["drive", "volume"] {
            assert!(
                d.get(key).and_then(Value::as_str).is_some(),
                "nbd entry without {key}: {d}"
            );
        }
    }
    if let Some(p) = r.get("spice_port") {
        assert!(
            p.as_u64().is_some_and(|p| (1..=65535).contains(&p)),
            "spice_port {p}"
        );
    }
    assert!(
        r.get("replicated").is_some_and(Value::is_array),
        "no \"replicated\" array: {r}"
    );
    // tunnel commands are words a v1 command line can start with: never a space, control
    // character or shell metacharacter
    let commands = r
        .get("commands")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no \"commands\" array: {r}"));
    for c in commands {
        let c = c
            .as_str()
            .unwrap_or_else(|| panic!("command {c} is not a string"));
        assert!(
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "tunnel command {c:?}"
        );
    }
    let messages = r
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no \"messages\" array: {r}"));
    for m in messages {
        assert_printable(
            m.as_str()
                .unwrap_or_else(|| panic!("message {m} is not a string")),
            "parse_start_output messages",
        );
    }
}

fn check_returned_socket(s: &str, vmid: &str, nbd: bool) {
    match validate::socket_path(s, DIR) {
        Ok(id) => assert_eq!(id, vmid, "socket {s:?} belongs to VMID {id}, not {vmid}"),
        Err(e) => panic!(
            "returned socket {s:?} fails validate::socket_path: {}",
            e.message
        ),
    }
    check_accepted_socket(s, DIR);
    assert_eq!(
        s.ends_with("_nbd.migrate"),
        nbd,
        "socket {s:?} returned as nbd={nbd}"
    );
}

// ---------------------------------------------------------------------------------------------
// validation: validate::{socket_path, vmid, destination, shell_quote, shell_join}.
//
// Input: text; for socket_path `PATH\nDIR` (DIR is used only if validate::socket_dir accepts
// it, as the tunnel options do; PATH is always also checked against /run/qemu-server); for
// shell_join the text split at '\t' is the word list.
// ---------------------------------------------------------------------------------------------

/// Runs the validators over one input.
pub fn validation(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (first, second) = text.split_once('\n').unwrap_or((&text, ""));

    check_socket_path(first, DIR);
    if validate::socket_dir(second).is_ok() {
        check_socket_path(first, second);
    }
    for s in [&*text, first] {
        check_vmid(s);
        check_destination(s);
        check_shell_quote(s);
    }
    let words: Vec<String> = text.split('\t').map(str::to_string).collect();
    let joined = validate::shell_join(&words);
    assert_eq!(
        sh_words(&joined).as_ref(),
        Some(&words),
        "shell_join({words:?}) = {joined:?}"
    );
}

fn check_socket_path(path: &str, dir: &str) {
    match validate::socket_path(path, dir) {
        Ok(id) => {
            check_accepted_socket(path, dir);
            assert!(
                validate::vmid(id).is_ok(),
                "socket_path returned VMID {id:?}"
            );
            assert!(
                path == format!("{dir}/{id}.migrate") || path == format!("{dir}/{id}_nbd.migrate"),
                "accepted {path:?} is not {dir}/{id}[_nbd].migrate"
            );
        }
        Err(e) => {
            assert_eq!(e.kind, Kind::InvalidArgument, "{}", e.message);
            assert_printable(&e.message, "validate::socket_path");
        }
    }
}

/// What every accepted socket path satisfies: it is removed with unlink and bound by ssh.
fn check_accepted_socket(path: &str, dir: &str) {
    assert!(
        path.len() < 108,
        "accepted socket path of {} bytes does not fit sun_path",
        path.len()
    );
    assert!(
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/')),
        "accepted {path:?} is not inside {dir:?}"
    );
    assert!(
        !path.split('/').any(|c| c == ".." || c == "."),
        "accepted {path:?} has a '.' or '..' component"
    );
    if dir == DIR {
        assert!(!path.contains(".."), "accepted {path:?} contains '..'");
    }
    assert!(
        !path.bytes().any(|b| b.is_ascii_control()),
        "accepted {path:?} has a control character"
    );
}

fn check_vmid(s: &str) {
    let spec =
        (1..=9).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    match validate::vmid(s) {
        Ok(()) => assert!(spec, "VMID {s:?} accepted"),
        Err(e) => {
            assert!(!spec, "VMID {s:?} refused");
            assert_printable(&e.message, "validate::vmid");
        }
    }
}

/// ssh splits `user@host` at the last '@' (strrchr); neither part may be taken as an option.
fn check_destination(s: &str) {
    match validate::destination(s) {
        Ok(()) => {
            assert!(!s.starts_with('-'), "destination {s:?} starts with '-'");
            let (user, host) = s.rsplit_once('@').map_or((None, s), |(u, h)| (Some(u), h));
            assert!(
                !host.is_empty() && !host.starts_with('-'),
                "destination {s:?}: host {host:?} accepted"
            );
            assert!(
                user.is_none_or(|u| !u.is_empty()),
                "destination {s:?}: empty user accepted"
            );
            assert!(
                !s.chars().any(|c| c.is_whitespace() || c.is_control()),
                "destination {s:?} has whitespace/control"
            );
        }
        Err(e) => {
            assert_eq!(e.kind, Kind::InvalidArgument);
            assert_printable(&e.message, "validate::destination");
        }
    }
}

/// The output is either the plain word itself or the word in single quotes with every `'`
/// written as `'\''`, and a POSIX shell reads it back as exactly that one word.
fn check_shell_quote(word: &str) {
    let q = validate::shell_quote(word);
    let plain = !q.is_empty()
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@,+%-".contains(&b));
    if plain {
        assert_eq!(q, word, "plain output differs from the word");
    } else {
        assert!(
            q.len() >= 2 && q.starts_with('\'') && q.ends_with('\''),
            "shell_quote({word:?}) = {q:?} is not single-quoted"
        );
        assert_eq!(
            &q[1..q.len() - 1],
            word.replace('\'', "'\\''"),
            "shell_quote({word:?}) = {q:?}"
        );
    }
    assert_eq!(
        sh_words(&q),
        Some(vec![word.to_string()]),
        "sh reads shell_quote({word:?}) = {q:?} differently"
    );
}

/// How a POSIX shell splits a command line into words, for the only syntax quoted output may
/// use: plain characters, single quotes, `\'` and single spaces between words. Anything else
/// outside quotes (a metacharacter the shell would interpret) gives `None`.
fn sh_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '\\' => match chars.next()? {
                '\'' => word.get_or_insert_with(String::new).push('\''),
                _ => return None,
            },
            c if c.is_ascii_alphanumeric() || "_./:=@,+%-".contains(c) => {
                word.get_or_insert_with(String::new).push(c)
            }
            _ => return None,
        }
    }
    words.extend(word);
    Some(words)
}
