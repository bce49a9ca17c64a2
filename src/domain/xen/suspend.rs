//! Stopping the guest at the end of an epoch and letting it go again.
//!
//! Order of preference, as libxl's suspend code chooses (learned from
//! tools/libs/light/libxl_dom_suspend.c):
//! 1. the guest's suspend event channel (`device/suspend/event-channel`),
//!    claimed exclusively at open; notify it, and Xen signals the channel
//!    back once the guest is suspended;
//! 2. an HVM guest without PV drivers: `xc_domain_shutdown(SHUTDOWN_suspend)`,
//!    which needs no guest cooperation;
//! 3. otherwise xenstore `control/shutdown = "suspend"`, which the guest's
//!    xenbus watch picks up.
//!
//! Every wait is bounded by `suspend_timeout`. When the guest does not
//! suspend in time the request is withdrawn and [`Suspender::recover`]
//! makes sure the guest runs again (it may have suspended a moment after
//! the deadline), so a slow guest costs an error, never a stopped guest.
//! Resume is `xc_domain_resume(fast = 1)`: the guest's suspend hypercall
//! returns "cancelled" and it carries on with its devices connected, which
//! is what a checkpoint (as opposed to a migration) wants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ffi;
use super::spec::SuspendMode;
use super::sys::{self, DomInfo, Result, Store, SuspendChannel, Xc, XenError};

enum Method {
    Evtchn(SuspendChannel),
    Shutdown,
    Xenstore { store: Store, path: String },
    Pause,
}

pub struct Suspender {
    xc: Arc<Xc>,
    domid: u32,
    timeout: Duration,
    method: Method,
}

impl Suspender {
    /// Picks the suspend path for `info`'s domain per `mode`.
    pub fn new(xc: &Arc<Xc>, info: &DomInfo, mode: SuspendMode, timeout: Duration) -> Result<Self> {
        let domid = info.domid;
        let method = match mode {
            SuspendMode::Pause => Method::Pause,
            SuspendMode::Shutdown => Method::Shutdown,
            SuspendMode::Xenstore => xenstore(domid)?,
            SuspendMode::Evtchn => match sys::suspend_evtchn_port(domid) {
                Some(p) => Method::Evtchn(SuspendChannel::bind(xc, domid, p)?),
                None => {
                    return Err(XenError::State {
                        domid,
                        reason: "suspend=evtchn, but the guest advertises no suspend event \
                                 channel (device/suspend/event-channel); use suspend=auto"
                            .into(),
                    })
                }
            },
            SuspendMode::Auto => auto(xc, info)?,
        };
        Ok(Suspender {
            xc: xc.clone(),
            domid,
            timeout,
            method,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.method {
            Method::Evtchn(_) => "suspend event channel",
            Method::Shutdown => "xc_domain_shutdown(SHUTDOWN_suspend)",
            Method::Xenstore { .. } => "xenstore control/shutdown",
            Method::Pause => "xc_domain_pause (no guest suspend)",
        }
    }

    /// Returns once the guest is suspended (or paused). On error the guest
    /// has been let run again.
    pub fn suspend(&mut self) -> Result<()> {
        let r = self.try_suspend();
        if r.is_err() {
            if let Err(e) = self.recover() {
                tracing::error!(
                    "domain {}: resuming after a failed suspend: {e}",
                    self.domid
                );
            }
        }
        r
    }

    fn try_suspend(&mut self) -> Result<()> {
        let domid = self.domid;
        match &mut self.method {
            Method::Pause => return self.xc.pause(domid),
            Method::Evtchn(ch) => {
                ch.notify()?;
                if !ch.wait(self.timeout)? {
                    return Err(XenError::Timeout {
                        domid,
                        what: "the suspend event channel's reply",
                        waited: self.timeout,
                    });
                }
            }
            Method::Shutdown => self.xc.shutdown_suspend(domid)?,
            Method::Xenstore { store, path } => store.write(path, "suspend")?,
        }
        self.wait_suspended()
    }

    /// Polls the domain state until it reports shutdown(suspend). There is
    /// no event for this short of a xenstore watch on @releaseDomain; the
    /// poll backs off from 20 µs to 1 ms and is bounded by the timeout.
    fn wait_suspended(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            let info = self.xc.info(self.domid)?;
            if info.suspended() {
                return Ok(());
            }
            if let Some(r) = info.shutdown_reason() {
                return Err(XenError::State {
                    domid: self.domid,
                    reason: format!("shut down with reason {r} while castor waited for a suspend"),
                });
            }
            if start.elapsed() >= self.timeout {
                self.withdraw();
                return Err(XenError::Timeout {
                    domid: self.domid,
                    what: "the guest suspending",
                    waited: self.timeout,
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    /// Withdraws a pending xenstore request the guest has not picked up.
    fn withdraw(&mut self) {
        if let Method::Xenstore { store, path } = &self.method {
            if let Ok(Some(v)) = store.read(path) {
                if v == "suspend" {
                    let _ = store.write(path, "");
                }
            }
        }
    }

    /// Lets the guest run: fast resume after a suspend, unpause after a
    /// pause.
    pub fn resume(&mut self) -> Result<()> {
        if let Method::Pause = self.method {
            return self.xc.unpause(self.domid);
        }
        self.xc.resume(self.domid, true)?;
        // Tell xenstored the domain runs again (libxl does the same after
        // xc_domain_resume), so its watches on the domain stay right.
        if let Method::Xenstore { store, .. } = &self.method {
            store.resume_domain(self.domid)?;
        }
        Ok(())
    }

    /// After a failed suspend: whatever state the guest reached, make it run.
    pub fn recover(&mut self) -> Result<()> {
        let info = self.xc.info(self.domid)?;
        if info.suspended() {
            self.xc.resume(self.domid, true)?;
        }
        if info.paused() {
            self.xc.unpause(self.domid)?;
        }
        Ok(())
    }
}

fn xenstore(domid: u32) -> Result<Method> {
    let store = Store::open()?;
    let path = format!("{}/control/shutdown", store.domain_path(domid)?);
    Ok(Method::Xenstore { store, path })
}

fn auto(xc: &Arc<Xc>, info: &DomInfo) -> Result<Method> {
    let domid = info.domid;
    if info.hvm() {
        let s_state = xc.hvm_param(domid, ffi::HVM_PARAM_ACPI_S_STATE)?;
        let pvdrv = xc.hvm_param(domid, ffi::HVM_PARAM_CALLBACK_IRQ)?;
        if let (0, Some(p)) = (s_state, sys::suspend_evtchn_port(domid)) {
            return Ok(Method::Evtchn(SuspendChannel::bind(xc, domid, p)?));
        }
        if pvdrv == 0 || s_state != 0 {
            return Ok(Method::Shutdown);
        }
        return xenstore(domid);
    }
    match sys::suspend_evtchn_port(domid) {
        Some(p) => Ok(Method::Evtchn(SuspendChannel::bind(xc, domid, p)?)),
        None => xenstore(domid),
    }
}
