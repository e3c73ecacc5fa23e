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

/// Restores the thread's signal mask when dropped.
pub struct Deferred {
    old: libc::sigset_t,
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
        // SAFETY: sigset_t and sigaction are plain data (zeroed is valid); sigaction only reads the dispositions and pthread_sigmask changes this thread's mask, saved in `old` and restored on drop.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in 1..=libc::SIGRTMAX() {
                if sig == libc::SIGKILL || sig == libc::SIGSTOP || SYNCHRONOUS.contains(&sig) {
                    continue;
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut sa) == 0
                    && sa.sa_sigaction != libc::SIG_DFL
                    && sa.sa_sigaction != libc::SIG_IGN
                {
                    libc::sigaddset(&mut set, sig);
                }
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            Deferred { old }
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by handlers() for this thread; both pointers are to valid sigset_t values.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
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
        // SAFETY: only reads this thread's mask into a zeroed sigset_t.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, sig) == 1
        }
    }

    #[test]
    fn handled_signals_wait_until_the_call_returns() {
        // SAFETY: installs a plain extern "C" handler for SIGUSR2 in this test process.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count as *const () as usize;
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
        }
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
            // SAFETY: signals the calling thread itself.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
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
