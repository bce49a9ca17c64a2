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
//!
//! For the pause itself the epoch thread enters the real-time class
//! ([`PauseRealtime`]) and a guest thread asked to stop is put there too
//! ([`boost`]) until it has stopped and resumed: at HZ=250 a runnable
//! thread whose nice value is raised still waits for the next tick (up to
//! 4 ms) before it gets a core, and that wait was the tail of the pause
//! (stop 15: `stop_us` and `resume_us` of the worst epochs 3-5 ms, with
//! harvest, copy and state under 1 ms).

/// How many nice steps above the process the pause's threads run (see
/// `engine::copy::raise_priority`), and a guest thread asked to stop.
pub const PAUSE_BOOST: libc::c_int = 10;

/// The calling thread's kernel id (for [`boost`] from another thread).
pub fn current_tid() -> libc::pid_t {
    // SAFETY: a plain syscall with no pointers.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Raises thread `tid` for a pause that waits for it: into the real-time
/// class ([`PAUSE_RT_PRIORITY`], SCHED_FIFO) when the process may, else
/// [`PAUSE_BOOST`] nice steps above the process. A guest thread asked to
/// stop then gets a core at once instead of waiting behind the encoders
/// (or the transmit thread, or the backup) until the next scheduler tick
/// (4 ms at HZ=250): a nice value changed on a runnable thread does not
/// preempt what runs, a real-time class does. The thread puts itself back
/// with [`at_process_priority`] once it resumes, so it never runs the
/// guest's work raised. Needs privilege (root or CAP_SYS_NICE), else a
/// no-op.
pub fn boost(tid: libc::pid_t) {
    if !set_realtime(tid) {
        let nice = (process_nice() - PAUSE_BOOST).max(-20);
        // SAFETY: a plain syscall; a tid that is gone only fails it.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
        }
    }
}

/// The real-time priority (SCHED_FIFO, the class's lowest) of the threads
/// working inside a pause and of guest threads asked to stop for one. A
/// pause is short and bounded (harvest + copy + state), and every such
/// thread leaves the class when the pause ends.
pub const PAUSE_RT_PRIORITY: libc::c_int = 1;

/// Puts `tid` in SCHED_FIFO at [`PAUSE_RT_PRIORITY`], with
/// SCHED_RESET_ON_FORK (a thread it spawns starts in the normal class);
/// false when not permitted.
fn set_realtime(tid: libc::pid_t) -> bool {
    let param = libc::sched_param {
        sched_priority: PAUSE_RT_PRIORITY,
    };
    // SAFETY: `param` is a valid sched_param for the duration of the call.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO | SCHED_RESET_ON_FORK, &param) == 0 }
}

/// Linux's flag for `sched_setscheduler` (not in every libc version).
const SCHED_RESET_ON_FORK: libc::c_int = 0x4000_0000;

/// Puts `tid` back in the normal class (SCHED_OTHER) at `nice`.
fn set_timeshare(tid: libc::pid_t, nice: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for the call; plain syscalls, failure (a
    // thread that is gone) is harmless.
    unsafe {
        libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// The calling thread and the given helper threads in the real-time class
/// while alive (when the process may: else nothing changes), each back in
/// the normal class at the nice value it had when dropped. The epoch
/// thread holds one across the pause, with the copy helpers whose harvest
/// stripes it waits for, so nothing of the process's own (encoders,
/// transmit) nor the backup preempts the pause between the guest's stop
/// and its resume.
pub struct PauseRealtime {
    /// Threads raised, with their nice value before.
    raised: Vec<(libc::pid_t, libc::c_int)>,
}

impl PauseRealtime {
    /// All or nothing: when one thread cannot be raised, none stays
    /// raised. (The epoch thread spins, then yields, while a helper
    /// finishes a chunk it claimed; a real-time spinner over a helper left
    /// in the normal class on the same core would starve it.)
    pub fn enter(helpers: &[libc::pid_t]) -> PauseRealtime {
        let mut rt = PauseRealtime {
            raised: Vec::with_capacity(helpers.len() + 1),
        };
        for tid in std::iter::once(current_tid()).chain(helpers.iter().copied()) {
            let (_, nice) = scheduling(tid);
            if !set_realtime(tid) {
                drop(rt);
                return PauseRealtime { raised: Vec::new() };
            }
            rt.raised.push((tid, nice));
        }
        rt
    }
}

impl Drop for PauseRealtime {
    fn drop(&mut self) {
        for &(tid, nice) in self.raised.iter().rev() {
            set_timeshare(tid, nice);
        }
    }
}

/// Thread `tid`'s scheduling policy (`SCHED_*`, without the reset flag)
/// and nice value.
pub fn scheduling(tid: libc::pid_t) -> (libc::c_int, libc::c_int) {
    // SAFETY: plain syscalls with no pointers.
    unsafe {
        let policy = libc::sched_getscheduler(tid) & !SCHED_RESET_ON_FORK;
        (
            policy,
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
        )
    }
}

/// Whether this process may put a thread in the real-time class (root,
/// CAP_SYS_NICE or RLIMIT_RTPRIO, and a cgroup that grants real-time
/// time): else [`boost`] falls back to a nice value.
pub fn realtime_allowed() -> bool {
    let tid = current_tid();
    let (_, nice) = scheduling(tid);
    let ok = set_realtime(tid);
    if ok {
        set_timeshare(tid, nice);
    }
    ok
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

/// Puts the calling thread in the normal class at the process's nice value
/// (leaving a pause's boost, or lowering a boost it inherited; a raise
/// needs privilege and is then a no-op, which is harmless: it is only ever
/// asked when the creator was lowered).
pub fn at_process_priority() {
    set_timeshare(current_tid(), process_nice());
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

    /// The pause's guard puts the thread in the real-time class (where the
    /// process may) and back in the normal class at the nice value it had.
    #[test]
    fn the_pause_runs_real_time_and_leaves_the_class_after() {
        std::thread::spawn(|| {
            let tid = current_tid();
            let before = scheduling(tid);
            assert_eq!(before.0, libc::SCHED_OTHER);
            let allowed = realtime_allowed();
            assert_eq!(scheduling(tid), before, "the probe put it back");
            {
                let _rt = PauseRealtime::enter(&[]);
                let inside = scheduling(tid).0;
                if allowed {
                    assert_eq!(inside, libc::SCHED_FIFO);
                } else {
                    eprintln!(
                        "this process may not use the real-time class: checked only the way back"
                    );
                    assert_eq!(inside, libc::SCHED_OTHER);
                }
            }
            assert_eq!(scheduling(tid), before);
            // A helper that cannot be raised (gone): nobody is.
            {
                let _rt = PauseRealtime::enter(&[libc::pid_t::MAX]);
                assert_eq!(scheduling(tid), before, "all or nothing");
            }
            assert_eq!(scheduling(tid), before);
        })
        .join()
        .unwrap();
    }
}
