//! Holds the host's signal handlers back while a library call runs.
//!
//! A Perl host runs its `%SIG` handlers only after the current FFI call returns; until then
//! each delivery interrupts our system calls (EINTR) and is counted, and past 120 pending
//! signals Perl croaks *from inside the signal handler*, unwinding straight through our
//! frames. So for the duration of a call, this thread blocks exactly the signals that have a
//! handler installed: they stay pending and run once the call returns, which is when Perl
//! would have run them anyway. Dispositions are never changed, the mask is restored on every
//! return, signals at their default action (e.g. SIGKILL, an unhandled SIGTERM) act at once,
//! and synchronous fault signals are never blocked.

use nix::sys::signal::SigSet;

/// Restores the thread's signal mask when dropped.
pub struct Deferred {
    old: Option<SigSet>,
}

/// Signals that must never be blocked: they report faults in this very thread.
const SYNCHRONOUS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
];

impl Deferred {
    /// Blocks, in the calling thread, every signal that has a handler.
    pub fn handlers() -> Deferred {
        let handled = (1..=libc::SIGRTMAX())
            .filter(|&sig| {
                sig != libc::SIGKILL && sig != libc::SIGSTOP && !SYNCHRONOUS.contains(&sig)
            })
            .filter(|&sig| crate::sys::has_handler(sig));
        Deferred {
            old: crate::sys::block_signals(handled).ok(),
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = old.thread_set_mask();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static HITS: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn count(_: libc::c_int) {
        HITS.fetch_add(1, Ordering::SeqCst);
    }

    fn blocked(sig: libc::c_int) -> bool {
        let cur = SigSet::thread_get_mask().unwrap();
        cur.contains(nix::sys::signal::Signal::try_from(sig).unwrap())
    }

    #[test]
    fn handled_signals_wait_until_the_call_returns() {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, Signal, sigaction};
        let sa = SigAction::new(
            SigHandler::Handler(count),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: installs a plain extern "C" handler (an atomic increment, async-signal-safe)
        // for SIGUSR2 in this test process.
        unsafe { sigaction(Signal::SIGUSR2, &sa) }.unwrap();
        let before = HITS.load(Ordering::SeqCst);
        {
            let _d = Deferred::handlers();
            assert!(
                blocked(libc::SIGUSR2),
                "a signal with a handler is held back"
            );
            assert!(!blocked(libc::SIGSEGV), "fault signals are never blocked");
            assert!(
                !blocked(libc::SIGWINCH),
                "signals at their default are left alone"
            );
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR2).unwrap();
            assert_eq!(
                HITS.load(Ordering::SeqCst),
                before,
                "the handler did not run during the call"
            );
        }
        assert!(!blocked(libc::SIGUSR2), "the mask is restored");
        assert_eq!(
            HITS.load(Ordering::SeqCst),
            before + 1,
            "the handler ran once the call returned"
        );
    }
}
