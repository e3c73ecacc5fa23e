//! The system calls that neither `std` nor `nix` wraps, each behind a safe function. Every
//! other module uses `std` or `nix` for its system calls; `unsafe` outside this module is
//! only the C boundary (`ffi`) and test code.
//!
//! - [`spawn`]: `clone(CLONE_PIDFD)` and the child's side until `execve` (raw
//!   `rt_sigaction` for every signal, `close_range`), async-signal-safe only;
//! - [`pidfd_send_signal`];
//! - [`has_handler`] and [`block_signals`]: signal dispositions and masks including the
//!   real-time signals, which `nix::sys::signal::Signal` cannot name;
//! - [`try_flock`]: an exclusive `flock` that is *not* undone on drop (nix's `Flock` unlocks
//!   when dropped, which in a forked child would release the parent's lock);
//! - [`random_u64`]: `getrandom`; [`geteuid`] (nix has it only with a feature we do not use).

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow};
use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// Starts a child with `clone(CLONE_PIDFD)` that runs `prog` with `args` (argv, `args[0]`
/// included) and the current environment, the three `stdio` fds as its fds 0–2. Before exec
/// the child resets every signal disposition and its mask, keeps only fds 0–2, starts a new
/// session and asks for SIGTERM when its parent dies; if exec (or a step before it) fails,
/// it writes its errno (4 bytes) to `report` and exits 127. Every signal is blocked in the
/// calling thread across the clone, so no host handler runs in the child.
///
/// The `stdio` fds must be 3 or above (so installing one cannot overwrite another) and
/// close-on-exec, as must `report`. Returns the pid and the pidfd.
pub(crate) fn spawn(
    prog: &CStr,
    args: &[CString],
    stdio: [BorrowedFd<'_>; 3],
    report: BorrowedFd<'_>,
) -> Result<(libc::pid_t, OwnedFd), Errno> {
    // Everything the child touches is prepared here: it must not allocate.
    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let stdio = stdio.map(|fd| fd.as_raw_fd());
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: reads the process environment pointer; this library never changes the
    // environment, and the child only passes it to execve.
    let envp = unsafe { environ };

    let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK)?;
    let mut pidfd: c_int = -1;
    // SAFETY: clone without CLONE_VM: the child gets its own copy of memory and runs only
    // exec_child, which calls async-signal-safe functions on pointers into that copy.
    // CLONE_PIDFD writes the pidfd into `pidfd`, a live local.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            &mut pidfd as *mut c_int,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: in the child; prog, argv (NULL-terminated, pointing into `args`) and envp
        // stay valid in its copy of memory until exec.
        unsafe {
            exec_child(
                prog.as_ptr(),
                argv.as_ptr(),
                envp,
                stdio,
                report.as_raw_fd(),
                parent,
            )
        }
    }
    let clone_errno = Errno::last();
    old.thread_set_mask()?;
    if pid < 0 {
        return Err(clone_errno);
    }
    // SAFETY: clone succeeded (pid > 0), so CLONE_PIDFD stored a fresh pidfd nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((pid as libc::pid_t, pidfd))
}

/// The kernel's `struct sigaction` (not glibc's): handler, flags, restorer, a 64-bit mask.
/// This layout holds on the architectures that define `SA_RESTORER` and a one-word
/// `sigset_t`; elsewhere [`reset_signal`] falls back to `signal(3)`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets `sig` to its default action, in the child before exec. The raw system call also
/// resets the signals glibc reserves (32, 33), which an ignoring parent may have set and
/// `signal(3)` refuses to touch.
///
/// # Safety
/// Only in a single-threaded child between clone and exec (no other thread may rely on the
/// dispositions); async-signal-safe.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn reset_signal(sig: c_int) {
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: `dfl` is a valid kernel sigaction for this architecture (see the cfg), alive
    // during the call; no old action is asked for; 8 is the kernel's sigset size here.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &dfl as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        );
    }
}

/// Sets `sig` to its default action through libc, where the kernel's `struct sigaction`
/// layout is not known here: signals glibc reserves for itself stay as they are.
///
/// # Safety
/// As the variant above.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn reset_signal(sig: c_int) {
    // SAFETY: signal(3) is async-signal-safe; SIG_DFL installs no handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Runs in the child between clone and exec: async-signal-safe calls only, no allocation.
///
/// # Safety
/// Only in the child of [`spawn`]'s clone, with the pointers [`spawn`] prepared.
unsafe fn exec_child(
    prog: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    stdio: [RawFd; 3],
    report: RawFd,
    parent: libc::pid_t,
) -> ! {
    // SAFETY: runs in the freshly cloned child before exec: async-signal-safe syscalls only,
    // on fds and pointers the parent prepared and that stay valid in the child's memory.
    unsafe {
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                reset_signal(sig);
            }
        }
        for (target, &fd) in stdio.iter().enumerate() {
            if libc::dup2(fd, target as c_int) < 0 {
                fail(report);
            }
        }
        // Everything above stdio closes at exec, including the report pipe on success.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            libc::_exit(126);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(prog, argv, envp);
        fail(report)
    }
}

/// Reports errno on `report` and exits 127.
///
/// # Safety
/// Only in the child of [`spawn`] before exec.
unsafe fn fail(report: RawFd) -> ! {
    // SAFETY: async-signal-safe calls in the child: write of a local int to the report
    // pipe, then _exit.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(
            report,
            (&errno as *const c_int).cast(),
            std::mem::size_of::<c_int>(),
        );
        libc::_exit(127)
    }
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: c_int) -> Result<(), Errno> {
    // SAFETY: a borrowed, open pidfd; no siginfo is passed, so no memory is involved.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Whether `sig` (1 to `SIGRTMAX`) has a handler installed (neither default nor ignored).
pub(crate) fn has_handler(sig: c_int) -> bool {
    // SAFETY: sigaction is plain data (all zeroes is valid); with a NULL new action the call
    // only reads the disposition into `sa`.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut sa) == 0
            && sa.sa_sigaction != libc::SIG_DFL
            && sa.sa_sigaction != libc::SIG_IGN
    }
}

/// Adds `sigs` (real-time ones included) to the calling thread's blocked signals; returns
/// the previous mask, to be restored with `SigSet::thread_set_mask`.
pub(crate) fn block_signals(sigs: impl IntoIterator<Item = c_int>) -> Result<SigSet, Errno> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it and sigaddset only sets
    // bits in it (invalid numbers are refused with EINVAL, leaving it as it was).
    let set = unsafe {
        let mut raw: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut raw);
        for sig in sigs {
            libc::sigaddset(&mut raw, sig);
        }
        SigSet::from_sigset_t_unchecked(raw)
    };
    set.thread_swap_mask(SigmaskHow::SIG_BLOCK)
}

/// Tries to take an exclusive `flock` on `fd` without waiting. The lock goes with the open
/// file: it ends when the last fd of it closes, never by dropping something else.
pub(crate) fn try_flock(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: flock on a borrowed, open fd; no memory is involved.
    unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Eight random bytes from the kernel, if it has them at once.
pub(crate) fn random_u64() -> Option<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer it is given.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    (got == 8).then(|| u64::from_ne_bytes(buf))
}

/// The effective uid (nix has it only with its `user` feature, which nothing else needs).
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
