//! The system calls that neither `std` nor `nix` wraps, each behind a safe function. Every
//! other module uses `std` or `nix` for its system calls; `unsafe` outside this module is
//! only the C boundary (`ffi`) and test code.
//!
//! - [`spawn`]: `clone(CLONE_PIDFD)` and the child's side until `execve` (raw
//!   `rt_sigaction` for every signal, `close_range` or its fallback), async-signal-safe only;
//! - [`pidfd_send_signal`];
//! - [`has_handler`] and [`block_signals`]: signal dispositions and masks including the
//!   real-time signals, which `nix::sys::signal::Signal` cannot name;
//! - [`try_flock`]: an exclusive `flock` that is *not* undone on drop (nix's `Flock` unlocks
//!   when dropped, which in a forked child would release the parent's lock);
//! - [`random_u64`]: `getrandom`; [`geteuid`] (nix has it only with a feature we do not use).

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow};
use std::ffi::{CStr, CString, c_char, c_int};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// Starts a child with `clone(CLONE_PIDFD)` that runs `prog` with `args` (argv, `args[0]`
/// included) and the current environment, the three `stdio` fds as its fds 0–2. Before exec
/// the child resets every signal disposition and its mask, keeps only fds 0–2, starts a new
/// session and asks for SIGTERM when its parent dies; if exec (or a step before it) fails,
/// it writes the step ([`ChildStep`]) and its errno (4 bytes each) to `report` and exits 127. Every signal is blocked in the
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
    if pid < 0 {
        old.thread_set_mask()?;
        return Err(clone_errno);
    }
    // SAFETY: clone succeeded (pid > 0), so CLONE_PIDFD stored a fresh pidfd nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    adopt(pid as libc::pid_t, pidfd, old.thread_set_mask())
}

/// The parent's side after a successful clone, once the pidfd is owned: if restoring the
/// signal mask failed, the child is killed and reaped through the pidfd before the error is
/// returned (and the pidfd closed), so neither the fd nor the child outlives the failure.
pub(crate) fn adopt(
    pid: libc::pid_t,
    pidfd: OwnedFd,
    restored: Result<(), Errno>,
) -> Result<(libc::pid_t, OwnedFd), Errno> {
    if let Err(e) = restored {
        let _ = pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
        let _ = nix::sys::wait::waitid(
            nix::sys::wait::Id::PIDFd(pidfd.as_fd()),
            nix::sys::wait::WaitPidFlag::WEXITED,
        );
        return Err(e);
    }
    Ok((pid, pidfd))
}

/// What the child was doing when it failed before exec: the first 4 bytes on the report
/// pipe (the errno follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum ChildStep {
    /// Installing the stdio fds.
    Stdio = 1,
    /// Marking every fd above stdio close-on-exec.
    CloseFds = 2,
    /// Starting a new session.
    Setsid = 3,
    /// Asking for SIGTERM when the parent dies.
    DeathSignal = 4,
    /// `execve` itself.
    Exec = 5,
}

impl ChildStep {
    /// The step a report names, if it names one.
    pub(crate) fn from_report(code: i32) -> Option<ChildStep> {
        [
            ChildStep::Stdio,
            ChildStep::CloseFds,
            ChildStep::Setsid,
            ChildStep::DeathSignal,
            ChildStep::Exec,
        ]
        .into_iter()
        .find(|s| *s as i32 == code)
    }
}

/// Tests set this to make the child act as on a kernel without `CLOSE_RANGE_CLOEXEC` (before
/// 5.11), so that the fallback runs.
#[cfg(test)]
pub(crate) static NO_CLOSE_RANGE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`, in the child; false where the kernel refuses it.
///
/// # Safety
/// Only in the child of [`spawn`] before exec.
unsafe fn close_range_cloexec() -> bool {
    #[cfg(test)]
    if NO_CLOSE_RANGE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    // SAFETY: a plain system call on the child's own fd table; no memory is involved.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
    }
}

/// Marks every open fd above stdio close-on-exec one by one, in the child, for kernels
/// without `CLOSE_RANGE_CLOEXEC`: the fds listed in /proc/self/fd (raw `getdents64`, no
/// allocation), else every number below the fd limit. False if it could not be done.
///
/// # Safety
/// Only in the child of [`spawn`] before exec: async-signal-safe system calls only.
unsafe fn cloexec_one_by_one() -> bool {
    // SAFETY: async-signal-safe system calls on the child's own fds and a stack buffer.
    unsafe {
        let dir = libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir >= 0 {
            let mut buf = [0u8; 4096];
            loop {
                let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
                if n < 0 {
                    libc::close(dir);
                    return false;
                }
                if n == 0 {
                    break;
                }
                let mut at = 0usize;
                while at < n as usize {
                    // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name
                    let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                    let mut fd: c_int = 0;
                    let mut digits = 0;
                    for &b in &buf[at + 19..at + reclen] {
                        if !b.is_ascii_digit() {
                            break;
                        }
                        fd = fd.saturating_mul(10).saturating_add((b - b'0') as c_int);
                        digits += 1;
                    }
                    if digits > 0 && fd > 2 && fd != dir && !set_cloexec(fd) {
                        libc::close(dir);
                        return false;
                    }
                    at += reclen;
                }
            }
            libc::close(dir);
            return true;
        }
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return false;
        }
        let max = limit.rlim_cur.min(1 << 20) as c_int;
        (3..max).all(|fd| set_cloexec(fd))
    }
}

/// Sets FD_CLOEXEC on `fd` if it is open; false only if an open fd could not be marked.
///
/// # Safety
/// In the child of [`spawn`] before exec.
unsafe fn set_cloexec(fd: c_int) -> bool {
    // SAFETY: fcntl on a number of the child's own fd table; EBADF just means "not open".
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return *libc::__errno_location() == libc::EBADF;
        }
        flags & libc::FD_CLOEXEC != 0
            || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0
    }
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
                fail(report, ChildStep::Stdio);
            }
        }
        // Everything above stdio closes at exec, including the report pipe on success. A
        // child that cannot be made clean does not run: the host's fds would leak into it.
        if !close_range_cloexec() && !cloexec_one_by_one() {
            fail(report, ChildStep::CloseFds);
        }
        if libc::setsid() < 0 {
            fail(report, ChildStep::Setsid);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
            fail(report, ChildStep::DeathSignal);
        }
        if libc::getppid() != parent {
            libc::_exit(126);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(prog, argv, envp);
        fail(report, ChildStep::Exec)
    }
}

/// Reports the step and errno on `report` (8 bytes, one write) and exits 127.
///
/// # Safety
/// Only in the child of [`spawn`] before exec.
unsafe fn fail(report: RawFd, step: ChildStep) -> ! {
    // SAFETY: async-signal-safe calls in the child: write of a local array to the report
    // pipe, then _exit.
    unsafe {
        let words: [c_int; 2] = [step as c_int, *libc::__errno_location()];
        libc::write(report, words.as_ptr().cast(), std::mem::size_of_val(&words));
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
