//! Guest threads run at the process's own priority.
//!
//! castor raises the threads that work inside the pause (`castor-epoch`,
//! `castor-copy-N`) above the rest of the process (see
//! `engine::copy::raise_priority`). A thread inherits its creator's nice
//! value, and the epoch thread is what first resumes a domain: without
//! this, the sim's workload threads and the kvm vCPU thread ran boosted
//! too, above the encoders and the transmit thread that must keep up with
//! them. Under `nice -n -15` that made the 1/4 workload's seed 1.8 s
//! instead of 1.1 s (stop 13), the guest out-competing the pipeline that
//! copies it.

/// How many nice steps above the process the pause's threads run (see
/// `engine::copy::raise_priority`), and a guest thread asked to stop.
pub const PAUSE_BOOST: libc::c_int = 10;

/// The calling thread's kernel id (for [`boost`] from another thread).
pub fn current_tid() -> libc::pid_t {
    // SAFETY: a plain syscall with no pointers.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Raises thread `tid` [`PAUSE_BOOST`] steps above the process: a guest
/// thread asked to stop for the pause then gets a core ahead of the
/// encoders instead of waiting behind them while the pause waits for it.
/// The thread puts itself back with [`at_process_priority`] once it
/// resumes. Needs privilege (root or CAP_SYS_NICE), else a no-op.
pub fn boost(tid: libc::pid_t) {
    let nice = (process_nice() - PAUSE_BOOST).max(-20);
    // SAFETY: a plain syscall; a tid that is gone only fails it.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// The process's nice value: the thread group leader's (`getpriority` with
/// the pid names the leader thread on Linux).
pub fn process_nice() -> libc::c_int {
    // SAFETY: a plain syscall with no pointers.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t) }
}

/// Whether this process may raise a thread above its own nice value
/// (root, CAP_SYS_NICE or RLIMIT_NICE): else [`boost`] is a no-op.
pub fn raising_allowed() -> bool {
    let tid = current_tid();
    let base = process_nice();
    // SAFETY: plain syscalls on this thread; it is put back at once.
    unsafe {
        let ok = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, base - 1) == 0;
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, base);
        ok && base > -20
    }
}

/// Puts the calling thread at the process's nice value (lowering a boost
/// it inherited; a raise needs privilege and is then a no-op, which is
/// harmless: it is only ever asked when the creator was lowered).
pub fn at_process_priority() {
    let nice = process_nice();
    // SAFETY: plain syscalls on the calling thread; failure is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread spawned by a lowered thread (a boost needs privilege; a
    /// lowering works anywhere, and is the same inheritance) goes back to
    /// the process's value.
    #[test]
    fn a_thread_sheds_the_nice_value_it_inherited() {
        let base = process_nice();
        let got = std::thread::spawn(move || {
            // SAFETY: plain syscalls on this thread.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (base + 5).min(19)) };
            std::thread::spawn(|| {
                // SAFETY: as above.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
                let inherited = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
                at_process_priority();
                (inherited, unsafe {
                    libc::getpriority(libc::PRIO_PROCESS, tid)
                })
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, ((base + 5).min(19), base));
    }
}
