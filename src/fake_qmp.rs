//! The tests' one scripted QMP monitor: a socket in a scratch directory, served by a thread
//! (the library itself starts none). Like QEMU's monitor it serves one client at a time and
//! any number of them in turn. Every request it reads is kept, in order.

use crate::scratch::ScratchDir;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// QEMU's greeting (shortened).
pub(crate) const GREETING: &str = "{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n";

/// An answer: a `return` value, or an error class and description.
pub(crate) type Reply = std::result::Result<Value, (&'static str, String)>;

/// A running scripted monitor; dropping it stops the thread and removes the socket.
pub(crate) struct FakeQmp {
    /// removed after the thread ended (fields drop after `Drop::drop`)
    _dir: ScratchDir,
    /// The monitor socket.
    pub(crate) path: String,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Value>>>,
    connections: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl FakeQmp {
    /// Serves each client with `client`, which keeps each request it reads with `keep`
    /// before it answers it (so a caller that got its answer finds its request kept).
    pub(crate) fn serve(
        tag: &str,
        mut client: impl FnMut(UnixStream, &dyn Fn(Value)) + Send + 'static,
    ) -> FakeQmp {
        let dir = ScratchDir::new(&format!("qmp-{tag}"));
        let path = dir.path().join("100.qmp");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (stop2, requests2, connections2) =
            (stop.clone(), requests.clone(), connections.clone());
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                connections2.fetch_add(1, Ordering::SeqCst);
                client(conn, &|req| requests2.lock().unwrap().push(req));
            }
        });
        FakeQmp {
            path: path.to_str().unwrap().into(),
            _dir: dir,
            stop,
            requests,
            connections,
            handle: Some(handle),
        }
    }

    /// Sends `greeting` (if any) to each client, then answers each request with the lines
    /// `respond(request)` gives.
    pub(crate) fn lines(
        tag: &str,
        greeting: Option<&'static str>,
        respond: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> FakeQmp {
        FakeQmp::serve(tag, move |conn, keep| {
            let mut w = conn.try_clone().unwrap();
            if let Some(g) = greeting {
                if w.write_all(g.as_bytes()).is_err() {
                    return;
                }
            }
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).unwrap();
                let replies = respond(&req);
                keep(req);
                for reply in replies {
                    if w.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        })
    }

    /// Greets the first client and lets `script` talk to it directly (to send events at
    /// moments of its choosing); `script` returns the requests it read. Later clients are
    /// closed at once.
    pub(crate) fn script(
        tag: &str,
        script: impl FnOnce(&mut Script) -> Vec<Value> + Send + 'static,
    ) -> FakeQmp {
        let mut script = Some(script);
        FakeQmp::serve(tag, move |conn, keep| {
            let Some(script) = script.take() else {
                return;
            };
            let mut s = Script {
                w: conn.try_clone().unwrap(),
                r: BufReader::new(conn),
            };
            s.send(GREETING);
            script(&mut s).into_iter().for_each(keep);
        })
    }

    /// Greets each client, answers `qmp_capabilities` itself and every other request with
    /// `respond(command, arguments)`, each reply after an event (which the library skips).
    pub(crate) fn answering(
        tag: &str,
        mut respond: impl FnMut(&str, &Value) -> Reply + Send + 'static,
    ) -> FakeQmp {
        FakeQmp::serve(tag, move |conn, keep| {
            let mut w = conn.try_clone().unwrap();
            if w.write_all(GREETING.as_bytes()).is_err() {
                return;
            }
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).unwrap();
                let command = req["execute"].as_str().unwrap_or("").to_string();
                let args = req.get("arguments").cloned().unwrap_or(Value::Null);
                let reply = if command == "qmp_capabilities" {
                    Ok(json!({}))
                } else {
                    respond(&command, &args)
                };
                let body = match reply {
                    Ok(ret) => json!({"return": ret, "id": req["id"]}),
                    Err((class, desc)) => {
                        json!({"error": {"class": class, "desc": desc}, "id": req["id"]})
                    }
                };
                keep(req);
                let text = format!(
                    "{{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {{}}, \"timestamp\": {{}}}}\r\n{body}\r\n"
                );
                if w.write_all(text.as_bytes()).is_err() {
                    break;
                }
            }
        })
    }

    /// The requests kept so far.
    pub(crate) fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    /// How many clients connected.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops serving (once the current client is done) and returns every request.
    pub(crate) fn finish(mut self) -> Vec<Value> {
        self.stop_thread();
        self.requests()
    }

    /// The names of every command it was sent, in order (see [`FakeQmp::finish`]).
    pub(crate) fn commands(self) -> Vec<String> {
        self.finish()
            .iter()
            .map(|r| r["execute"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept, which then sees the stop.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FakeQmp {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// One scripted monitor connection.
pub(crate) struct Script {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Script {
    /// Sends raw text (a reply, an event).
    pub(crate) fn send(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).unwrap();
    }

    /// Reads the next request and checks its command name.
    pub(crate) fn expect(&mut self, command: &str) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let req: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("expected '{command}', got {line:?}"));
        assert_eq!(req["execute"], command, "unexpected request {req}");
        req
    }

    /// Reads a request for `command` and answers it with `ret`.
    pub(crate) fn answer(&mut self, command: &str, ret: Value) -> Value {
        let req = self.expect(command);
        self.send(&ok(&req, ret));
        req
    }

    /// Closes the connection, as a monitor that goes away.
    pub(crate) fn close(&mut self) {
        self.w.shutdown(std::net::Shutdown::Both).unwrap();
    }
}

/// A `return` reply to `req`.
pub(crate) fn ok(req: &Value, ret: Value) -> String {
    format!("{}\r\n", json!({"return": ret, "id": req["id"]}))
}

/// An event as QEMU sends it.
pub(crate) fn event(name: &str, data: Value) -> String {
    format!(
        "{}\r\n",
        json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}})
    )
}
