//! Closing an open tunnel on free (`tunnel_free`, Perl's `DESTROY`) is bounded: a remote
//! cleanup that hangs is given up after `cleanup_timeout_ms` (5 s by default), not 30 s, and
//! its failure is a warning (in `tunnel_status`), not an error of `close`.
//! A fake ssh answers the tunnel protocol, ends without having run the socket cleanup that
//! follows the remote command (exit 1, as a killed `qm mtunnel`), and hangs when asked to
//! remove the remote sockets through a connection of their own.

use mtunnel::ffi::tunnel::{
    mtunnel_tunnel, tunnel_close, tunnel_command, tunnel_free, tunnel_open, tunnel_status,
};
use mtunnel::ffi::{MTUNNEL_OK, mtunnel_string_free};
use std::ffi::{CString, c_char};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The tests' one fake ssh (see its header): greets and answers `OK` on the tunnel; the
/// fixture's directory is its state (`hang-commands`: the remote cleanup records that it ran
/// and hangs).
const FAKE_SSH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake-ssh");

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("mt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hang-commands"), "").unwrap();
        Fixture { dir }
    }

    /// Opens a tunnel through the fake and has it greeted (a command needs the greeting).
    fn open(&self) -> *mut mtunnel_tunnel {
        let dir = self.dir.to_str().unwrap();
        let opts = serde_json::json!({
            "ssh": [FAKE_SSH, "-o", format!("FakeState={dir}"), "root@node"],
            "forwards": [format!("{dir}/100.migrate")],
            "socket_dir": dir,
            "handshake_slots": 0,
            "ciphers": "",
        })
        .to_string();
        let opts = CString::new(opts).unwrap();
        let mut t: *mut mtunnel_tunnel = std::ptr::null_mut();
        // SAFETY: a valid NUL-terminated options string, no callback, a writable out-pointer.
        let rc = unsafe { tunnel_open(opts.as_ptr(), None, std::ptr::null_mut(), &mut t) };
        assert_eq!(rc, MTUNNEL_OK, "{}", last_error());
        let cmd = CString::new("resume 100").unwrap();
        let mut reply: *mut c_char = std::ptr::null_mut();
        // SAFETY: `t` is the live handle just opened; `cmd` is NUL-terminated; `reply` is writable.
        let rc = unsafe { tunnel_command(t, cmd.as_ptr(), 10_000, &mut reply) };
        assert_eq!(rc, MTUNNEL_OK, "{}", last_error());
        // SAFETY: `reply` was allocated by the library and is freed once.
        unsafe { mtunnel_string_free(reply) };
        t
    }

    fn cleanup_ran(&self) -> bool {
        self.dir.join("commands-ran").exists()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn last_error() -> String {
    // SAFETY: mtunnel_last_error returns a NUL-terminated string valid until the next call.
    unsafe { std::ffi::CStr::from_ptr(mtunnel::ffi::mtunnel_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn tunnel_free_does_not_wait_long_for_a_hanging_remote_cleanup() {
    let f = Fixture::new("free-bound");
    let t = f.open();
    let start = Instant::now();
    // SAFETY: `t` is a live handle from tunnel_open, freed once and not used afterwards.
    unsafe { tunnel_free(t) };
    let took = start.elapsed();
    assert!(f.cleanup_ran(), "the remote cleanup was attempted");
    assert!(
        took < Duration::from_secs(15),
        "tunnel_free took {took:?} with a hanging remote cleanup"
    );
}

#[test]
fn tunnel_free_takes_at_most_cleanup_timeout_ms_when_every_step_hangs() {
    let f = Fixture::new("free-total");
    // quit is never answered (10 s of quit_timeout_ms), ssh ignores SIGTERM (5 s of
    // exit_timeout_ms, then 2 s), the remote cleanup hangs (5 s): 22 s unbounded.
    std::fs::write(f.dir.join("hang-quit"), "").unwrap();
    let t = f.open();
    let socket = f.dir.join("100.migrate");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let start = Instant::now();
    // SAFETY: `t` is a live handle from tunnel_open, freed once and not used afterwards.
    unsafe { tunnel_free(t) };
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "tunnel_free took {took:?}: more than cleanup_timeout_ms (5 s) and the kill"
    );
    assert!(!socket.exists(), "the local socket file was left");
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let children =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "children left after tunnel_free: {children}"
    );
}

#[test]
fn cleanup_timeout_ms_bounds_the_remote_cleanup_of_close() {
    let f = Fixture::new("close-bound");
    let t = f.open();
    let opts = CString::new(r#"{"cleanup_timeout_ms": 300}"#).unwrap();
    let start = Instant::now();
    // SAFETY: `t` is a live handle; `opts` is a NUL-terminated string.
    let rc = unsafe { tunnel_close(t, opts.as_ptr()) };
    let took = start.elapsed();
    let err = last_error();
    let mut status: *mut c_char = std::ptr::null_mut();
    // SAFETY: `t` is a live (closed) handle; `status` is writable.
    assert_eq!(unsafe { tunnel_status(t, &mut status) }, MTUNNEL_OK);
    // SAFETY: the library returned a NUL-terminated string, freed once after the copy.
    let warning = unsafe { std::ffi::CStr::from_ptr(status) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: `status` was allocated by the library and is freed once.
    unsafe { mtunnel_string_free(status) };
    // SAFETY: `t` is a live (closed) handle, freed once.
    unsafe { tunnel_free(t) };
    assert!(f.cleanup_ran(), "the remote cleanup was attempted");
    assert_eq!(
        rc, MTUNNEL_OK,
        "a failed remote cleanup made close fail: {err}"
    );
    assert!(
        warning.contains("removing remote sockets") && warning.contains("100.migrate"),
        "tunnel_status has no cleanup warning naming the sockets: {warning}"
    );
    assert!(took < Duration::from_secs(5), "close took {took:?}");
}

#[test]
fn a_remote_command_that_ended_normally_needs_no_cleanup_connection() {
    let f = Fixture::new("close-normal");
    // exit 0: the remote command ran to its end, and the socket cleanup after it
    std::fs::write(f.dir.join("quit-exit"), "0").unwrap();
    let t = f.open();
    // SAFETY: `t` is a live handle; NULL options are allowed.
    let rc = unsafe { tunnel_close(t, std::ptr::null()) };
    let err = last_error();
    // SAFETY: `t` is a live (closed) handle, freed once.
    unsafe { tunnel_free(t) };
    assert_eq!(rc, MTUNNEL_OK, "{err}");
    assert!(
        !f.cleanup_ran(),
        "close opened a second connection to remove the remote sockets"
    );
}
