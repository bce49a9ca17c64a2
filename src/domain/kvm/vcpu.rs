//! The vCPU thread (`castor-vcpu-0`) and its pause protocol.
//!
//! Pausing must be prompt even while the guest spins inside KVM_RUN without
//! exits. The pauser, holding the control lock, sets `want = Pause`, sets
//! `kvm_run.immediate_exit = 1` and sends the kick signal
//! ([`KICK_SIGNAL_OFFSET`] above SIGRTMIN; its handler does nothing) to the
//! vCPU thread:
//! - inside KVM_RUN, the pending signal makes KVM return `EINTR`;
//! - about to enter KVM_RUN (signal already delivered, so lost), the
//!   `immediate_exit` flag makes KVM return `EINTR` at once;
//! - after an I/O exit, the next KVM_RUN with `immediate_exit` set first
//!   completes the pending port read (copies the data into RAX) and then
//!   returns `EINTR`, so the saved registers never hold a half-done IN.
//!
//! The thread parks only after an `EINTR`, i.e. outside KVM_RUN with no
//! pending I/O, releases the vCPU fd, sets `parked` and notifies the
//! pauser, which returns only then. It clears `immediate_exit` only under
//! the control lock and only when `want == Run`, so a clear can never
//! swallow a later pause request.
//!
//! A guest that executes HLT (memtouch does so after reporting FAIL; no
//! interrupt can wake it, there is no irqchip) parks for good: `halted`
//! is set and resume leaves it parked.
//!
//! Throttling (`Vcpu::set_throttle`, as QEMU's cpu-throttle does): a
//! `castor-vcpu-throttle` thread kicks the running vCPU out of KVM_RUN
//! once per [`THROTTLE_PERIOD`] and sets a nap of `pct` percent of it. The
//! napping thread counts as parked (outside KVM_RUN, fd released), so a
//! pause taken during a nap completes at once, and a resume during a nap
//! lets the nap finish first. At 100 the vCPU is kicked once and stays
//! parked, unpaused, until the throttle is lowered. The
//! throttle thread kicks only under the control lock and only while
//! `want == Run`, so it never signals a thread that has seen `Stop`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::devices::Devices;
use super::error::{KvmError, Result};
use super::ring::Ring;

/// The kick signal is SIGRTMIN + this (castor uses no other RT signal).
pub const KICK_SIGNAL_OFFSET: i32 = 0;

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the no-op kick handler (idempotent, process-wide).
fn register_kick() -> Result<()> {
    static ONCE: std::sync::OnceLock<std::result::Result<(), i32>> = std::sync::OnceLock::new();
    let r = ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    r.map_err(|errno| KvmError::RegisterKick {
        offset: KICK_SIGNAL_OFFSET,
        source: vmm_sys_util::errno::Error::new(errno),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    /// Percent of each [`THROTTLE_PERIOD`] the vCPU naps (0..=100).
    throttle: u8,
    /// While running: the vCPU naps outside KVM_RUN until then.
    nap_until: Option<Instant>,
    /// The thread is outside KVM_RUN and does not hold the vCPU fd.
    parked: bool,
    /// The guest executed HLT: it will not run again.
    halted: bool,
    /// KVM_RUN failed or returned an exit the VMM cannot handle.
    fault: Option<String>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    vcpu: Mutex<VcpuFd>,
    /// `&kvm_run.immediate_exit` inside the vCPU fd's mmap, which lives as
    /// long as `vcpu` (same `Arc`).
    immediate_exit: *const AtomicU8,
}

// SAFETY: `immediate_exit` points into the kvm_run mapping owned by the
// VcpuFd in the same struct; it is only accessed atomically, which is how
// KVM itself treats the field across threads.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn set_immediate_exit(&self, v: u8) {
        // SAFETY: the pointer is valid while `self` lives (see the field).
        unsafe { &*self.immediate_exit }.store(v, Ordering::SeqCst);
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Time spent in the last `pause`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseTiming {
    /// From the call to the kick signal sent.
    pub kick: Duration,
    /// From the kick to the thread parked.
    pub park: Duration,
}

/// One vCPU: its fd, and once started, its thread.
pub struct Vcpu {
    shared: Arc<Shared>,
    /// The dirty ring (dirty=ring), drained by the thread when full.
    ring: Option<Arc<Ring>>,
    thread: Option<JoinHandle<()>>,
    /// `castor-vcpu-throttle`, started with the vCPU thread.
    throttler: Option<JoinHandle<()>>,
    pub last_pause: PauseTiming,
}

impl Vcpu {
    pub fn new(mut fd: VcpuFd, ring: Option<Arc<Ring>>) -> Result<Self> {
        register_kick()?;
        let run = fd.get_kvm_run();
        let immediate_exit = std::ptr::addr_of_mut!(run.immediate_exit) as *const AtomicU8;
        Ok(Vcpu {
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl {
                    want: Want::Pause,
                    throttle: 0,
                    nap_until: None,
                    parked: true,
                    halted: false,
                    fault: None,
                }),
                cv: Condvar::new(),
                vcpu: Mutex::new(fd),
                immediate_exit,
            }),
            ring,
            thread: None,
            throttler: None,
            last_pause: PauseTiming::default(),
        })
    }

    /// The vCPU fd. Only while paused (or before start): the running
    /// thread holds the lock.
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CPU time the vCPU thread has used (zero before start); None if its
    /// clock cannot be read.
    pub fn cpu_time(&self) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let Some(thread) = &self.thread else {
            return Some(Duration::ZERO);
        };
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the pthread is alive (see `kick`: joined only in Drop);
        // both out-pointers are valid locals.
        let ok = unsafe {
            libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) == 0
                && libc::clock_gettime(clock, &mut ts) == 0
        };
        ok.then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    pub fn halted(&self) -> bool {
        self.shared.ctl().halted
    }

    /// Spawns the thread, running.
    pub fn start(&mut self, devices: Arc<Mutex<Devices>>) -> Result<()> {
        if self.thread.is_some() {
            return Err(KvmError::VcpuThread("start called twice".into()));
        }
        {
            let mut ctl = self.shared.ctl();
            ctl.want = Want::Run;
            ctl.parked = false;
        }
        self.shared.set_immediate_exit(0);
        let shared = self.shared.clone();
        let ring = self.ring.clone();
        let t = std::thread::Builder::new()
            .name("castor-vcpu-0".into())
            .spawn(move || {
                crate::domain::priority::at_process_priority();
                vcpu_thread(&shared, &devices, ring.as_deref())
            })
            .map_err(KvmError::SpawnVcpu)?;
        let vcpu = {
            use std::os::unix::thread::JoinHandleExt;
            t.as_pthread_t()
        };
        self.thread = Some(t);
        let shared = self.shared.clone();
        let throttler = std::thread::Builder::new()
            .name("castor-vcpu-throttle".into())
            .spawn(move || throttle_thread(&shared, vcpu))
            .map_err(KvmError::SpawnVcpu)?;
        self.throttler = Some(throttler);
        Ok(())
    }

    /// Takes `pct` percent (clamped to 100) of the vCPU's time from now
    /// on: it naps that share of every [`THROTTLE_PERIOD`]; 0 lets it run
    /// free, 100 holds it still (unpaused) until lowered.
    pub fn set_throttle(&self, pct: u8) {
        let mut ctl = self.shared.ctl();
        ctl.throttle = pct.min(100);
        if ctl.throttle == 0 {
            ctl.nap_until = None;
        }
        self.shared.cv.notify_all();
    }

    /// Returns once the thread is parked outside KVM_RUN.
    pub fn pause(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let Some(thread) = &self.thread else {
            return Ok(());
        };
        let mut ctl = self.shared.ctl();
        if ctl.want == Want::Pause && ctl.parked {
            return Ok(());
        }
        ctl.want = Want::Pause;
        if !ctl.parked {
            self.shared.set_immediate_exit(1);
            kick(thread);
        }
        let t1 = Instant::now();
        while !ctl.parked {
            ctl = self.shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
        self.last_pause = PauseTiming {
            kick: t1 - t0,
            park: t1.elapsed(),
        };
        match &ctl.fault {
            Some(f) => Err(KvmError::VcpuThread(f.clone())),
            None => Ok(()),
        }
    }

    pub fn resume(&mut self) -> Result<()> {
        let mut ctl = self.shared.ctl();
        if let Some(f) = &ctl.fault {
            return Err(KvmError::VcpuThread(f.clone()));
        }
        ctl.want = Want::Run;
        self.shared.cv.notify_all();
        Ok(())
    }
}

fn kick(thread: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread is alive: the JoinHandle has not been joined, and
    // the thread exits only after observing Want::Stop, which is set only
    // in Drop right before the join. The handler is installed.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), kick_signal());
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            {
                let mut ctl = self.shared.ctl();
                ctl.want = Want::Stop;
                self.shared.set_immediate_exit(1);
                kick(&t);
                self.shared.cv.notify_all();
            }
            if let Some(th) = self.throttler.take() {
                let _ = th.join();
            }
            let _ = t.join();
        }
    }
}

/// The throttle's slice: the vCPU runs `100 - pct` percent of each and
/// naps the rest (QEMU's cpu-throttle slices by 10 ms too).
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// `castor-vcpu-throttle`: while the throttle is set, once per period
/// sets a nap and kicks the vCPU thread `vcpu` out of KVM_RUN (see the
/// module's doc); sleeps while it is 0; returns on `Stop`.
fn throttle_thread(shared: &Shared, vcpu: libc::pthread_t) {
    let mut ctl = shared.ctl();
    let mut next_nap: Option<Instant> = None;
    loop {
        if ctl.want == Want::Stop {
            return;
        }
        let pct = u32::from(ctl.throttle);
        if pct == 0 || pct >= 100 {
            // 100: one kick; the vCPU thread then stays parked until the
            // throttle is lowered (and this thread is woken with it).
            if pct >= 100 && ctl.want == Want::Run && !ctl.parked {
                kick_running(shared, vcpu);
            }
            next_nap = None;
            ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let now = Instant::now();
        let due = *next_nap.get_or_insert(now + THROTTLE_PERIOD * (100 - pct) / 100);
        if now < due {
            ctl = shared
                .cv
                .wait_timeout(ctl, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        ctl.nap_until = Some(now + THROTTLE_PERIOD * pct / 100);
        next_nap = Some(now + THROTTLE_PERIOD);
        if ctl.want == Want::Run && !ctl.parked {
            kick_running(shared, vcpu);
        }
    }
}

/// Kicks the vCPU thread `vcpu` out of KVM_RUN. Call only holding the
/// control lock, with `want == Run`.
fn kick_running(shared: &Shared, vcpu: libc::pthread_t) {
    shared.set_immediate_exit(1);
    // SAFETY: the vCPU thread is alive: it exits only after seeing `Stop`,
    // and `want` (read under the control lock the caller holds) is not
    // `Stop`. The kick handler is installed (`Vcpu::new`).
    unsafe {
        libc::pthread_kill(vcpu, kick_signal());
    }
}

/// Why the inner run loop stopped.
enum Stop {
    Interrupted,
    Halted,
    Fault(String),
}

fn vcpu_thread(shared: &Shared, devices: &Mutex<Devices>, ring: Option<&Ring>) {
    loop {
        let stop = {
            let mut fd = shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
            run_until_stop(&mut fd, devices, ring)
        };
        let mut ctl = shared.ctl();
        match stop {
            Stop::Interrupted => {}
            Stop::Halted => ctl.halted = true,
            Stop::Fault(f) => ctl.fault = Some(f),
        }
        loop {
            let stuck = ctl.halted || ctl.fault.is_some();
            match ctl.want {
                Want::Stop => {
                    ctl.parked = true;
                    shared.cv.notify_all();
                    return;
                }
                Want::Run if !stuck && ctl.throttle >= 100 => {
                    // Held still: parked until the throttle is lowered.
                    ctl.parked = true;
                    shared.cv.notify_all();
                    ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
                Want::Run if !stuck => match ctl.nap_until {
                    Some(until) if until > Instant::now() => {
                        // Napping counts as parked: a pause completes now.
                        ctl.parked = true;
                        shared.cv.notify_all();
                        let left = until.saturating_duration_since(Instant::now());
                        ctl = shared
                            .cv
                            .wait_timeout(ctl, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    _ => {
                        ctl.nap_until = None;
                        break;
                    }
                },
                _ => {
                    ctl.parked = true;
                    shared.cv.notify_all();
                    ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        ctl.parked = false;
        shared.set_immediate_exit(0);
    }
}

fn run_until_stop(fd: &mut VcpuFd, devices: &Mutex<Devices>, ring: Option<&Ring>) -> Stop {
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => lock(devices).pio_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => lock(devices).pio_in(port, data),
            Ok(VcpuExit::Hlt) => return Stop::Halted,
            // KVM refuses to re-enter until the full ring is drained; the
            // drained gfns wait in the pending bitmap for the next harvest.
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => match ring {
                Some(r) => {
                    if let Err(e) = r.drain() {
                        return Stop::Fault(e.to_string());
                    }
                }
                None => return Stop::Fault("dirty ring full without a dirty ring".into()),
            },
            Ok(exit) => return Stop::Fault(format!("unhandled KVM exit {exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Stop::Interrupted
            }
            Err(e) => return Stop::Fault(KvmError::Run(e).to_string()),
        }
    }
}

fn lock(d: &Mutex<Devices>) -> MutexGuard<'_, Devices> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}
