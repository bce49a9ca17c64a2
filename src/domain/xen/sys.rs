//! A thin safe layer over the generated Xen bindings ([`super::ffi`]).
//!
//! Every call checks its return code and turns a failure into a
//! [`XenError`] naming the library call and the domain. Handles close on
//! drop. Nothing here knows about checkpoints: the domain logic lives in the
//! sibling modules and calls only these wrappers.
//!
//! Invariants:
//! - An [`Xc`] handle outlives every object that needs it for cleanup
//!   (hypercall buffers, suspend channels hold an `Arc<Xc>`).
//! - Hypercall buffers are allocated with libxenctrl's own allocator
//!   (`xc__hypercall_buffer_alloc_pages`: locked, hypervisor-safe memory)
//!   and passed to the hypervisor only through their
//!   `xc_hypercall_buffer_t`, as `DECLARE_HYPERCALL_BUFFER` users do.

use std::ffi::{CStr, CString};
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use super::ffi;

/// Errors of the Xen library calls, each naming the call and the domain.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    #[error("{call} failed: {source} (is this a Xen dom0 with the privcmd, evtchn and xenfs modules loaded, run as root?)")]
    Open {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{call} (domid {domid}) failed: {source}")]
    Call {
        call: &'static str,
        domid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{call} (domid {domid}) returned {got}, expected {want}")]
    Unexpected {
        call: &'static str,
        domid: u32,
        got: i64,
        want: i64,
    },
    #[error("Xen domain {0} does not exist")]
    NoSuchDomain(u32),
    #[error("no Xen domain is named {0:?} (see `xl list`)")]
    NoSuchName(String),
    #[error("xenstore {op} {path:?} failed: {source}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("domain {domid}: {what} did not happen within {waited:?}")]
    Timeout {
        domid: u32,
        what: &'static str,
        waited: Duration,
    },
    #[error("domain {domid}: {reason}")]
    State { domid: u32, reason: String },
}

pub type Result<T> = std::result::Result<T, XenError>;

fn call_err(call: &'static str, domid: u32) -> XenError {
    XenError::Call {
        call,
        domid,
        source: io::Error::last_os_error(),
    }
}

/// Checks a libxenctrl `int` return (0 success, -1 with errno).
fn check(rc: i32, call: &'static str, domid: u32) -> Result<()> {
    if rc < 0 {
        Err(call_err(call, domid))
    } else {
        Ok(())
    }
}

/// What `xc_domain_getinfolist` says about one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomInfo {
    pub domid: u32,
    pub flags: u32,
    pub tot_pages: u64,
    pub max_pages: u64,
    pub shared_info_frame: u64,
    pub max_vcpu_id: u32,
    pub handle: [u8; 16],
}

impl DomInfo {
    pub fn hvm(&self) -> bool {
        self.flags & ffi::XEN_DOMINF_hvm_guest != 0
    }
    pub fn paused(&self) -> bool {
        self.flags & ffi::XEN_DOMINF_paused != 0
    }
    pub fn dying(&self) -> bool {
        self.flags & ffi::XEN_DOMINF_dying != 0
    }
    /// The shutdown reason if the domain has shut down (suspend is one).
    pub fn shutdown_reason(&self) -> Option<u32> {
        (self.flags & ffi::XEN_DOMINF_shutdown != 0)
            .then_some((self.flags >> ffi::XEN_DOMINF_shutdownshift) & ffi::XEN_DOMINF_shutdownmask)
    }
    pub fn suspended(&self) -> bool {
        self.shutdown_reason() == Some(ffi::SHUTDOWN_suspend)
    }
}

/// An open libxenctrl interface (`xc_interface_open`).
pub struct Xc {
    h: NonNull<ffi::xc_interface>,
}

// SAFETY: an xc_interface may be used from any thread; castor serialises
// calls on one handle through `&self` users that never call concurrently
// into the same hypercall buffer.
unsafe impl Send for Xc {}
// SAFETY: libxenctrl's handle is thread-safe for independent calls
// (each call builds its own hypercall arguments).
unsafe impl Sync for Xc {}

impl Xc {
    pub fn open() -> Result<Arc<Xc>> {
        // SAFETY: null loggers select libxenctrl's stderr logger; flags 0.
        let h = unsafe { ffi::xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        NonNull::new(h)
            .map(|h| Arc::new(Xc { h }))
            .ok_or_else(|| XenError::Open {
                call: "xc_interface_open",
                source: io::Error::last_os_error(),
            })
    }

    pub(super) fn raw(&self) -> *mut ffi::xc_interface {
        self.h.as_ptr()
    }

    /// Up to `max` domains with domid >= `first`.
    pub fn list(&self, first: u32, max: u32) -> Result<Vec<DomInfo>> {
        let mut raw = vec![ffi::xc_domaininfo_t::default(); max as usize];
        // SAFETY: `raw` holds `max` writable entries.
        let n = unsafe { ffi::xc_domain_getinfolist(self.raw(), first, max, raw.as_mut_ptr()) };
        if n < 0 {
            return Err(call_err("xc_domain_getinfolist", first));
        }
        Ok(raw[..n as usize].iter().map(dominfo).collect())
    }

    pub fn info(&self, domid: u32) -> Result<DomInfo> {
        match self.list(domid, 1)?.first() {
            Some(d) if d.domid == domid => Ok(*d),
            _ => Err(XenError::NoSuchDomain(domid)),
        }
    }

    pub fn pause(&self, domid: u32) -> Result<()> {
        // SAFETY: plain domctl on a domid.
        check(
            unsafe { ffi::xc_domain_pause(self.raw(), domid) },
            "xc_domain_pause",
            domid,
        )
    }

    pub fn unpause(&self, domid: u32) -> Result<()> {
        // SAFETY: plain domctl on a domid.
        let rc = unsafe { ffi::xc_domain_unpause(self.raw(), domid) };
        check(rc, "xc_domain_unpause", domid)
    }

    /// `xc_domain_shutdown(SHUTDOWN_suspend)`: suspends an HVM guest without
    /// asking it (no PV drivers needed).
    pub fn shutdown_suspend(&self, domid: u32) -> Result<()> {
        // SAFETY: plain domctl on a domid.
        let rc =
            unsafe { ffi::xc_domain_shutdown(self.raw(), domid, ffi::SHUTDOWN_suspend as i32) };
        check(rc, "xc_domain_shutdown(SHUTDOWN_suspend)", domid)
    }

    /// `xc_domain_resume(fast)`: with `fast`, the guest's suspend hypercall
    /// returns "cancelled" and it carries on without reconnecting devices.
    pub fn resume(&self, domid: u32, fast: bool) -> Result<()> {
        // SAFETY: plain libxenguest call on a domid.
        let rc = unsafe { ffi::xc_domain_resume(self.raw(), domid, fast as i32) };
        check(rc, "xc_domain_resume", domid)
    }

    pub fn destroy(&self, domid: u32) -> Result<()> {
        // SAFETY: plain domctl on a domid.
        check(
            unsafe { ffi::xc_domain_destroy(self.raw(), domid) },
            "xc_domain_destroy",
            domid,
        )
    }

    fn shadow_op(&self, domid: u32, op: u32, call: &'static str) -> Result<()> {
        // SAFETY: ops without a bitmap take no buffer; mb may be null.
        let rc = unsafe { ffi::xc_shadow_control(self.raw(), domid, op, std::ptr::null_mut(), 0) };
        check(rc, call, domid)
    }

    /// Turns on log-dirty mode. If shadow mode is already on (log-dirty for
    /// VRAM tracking, say), turns it off and retries, as Xen's save does.
    /// A failure reports all three steps' errors, like Xen's own message.
    pub fn enable_logdirty(&self, domid: u32) -> Result<()> {
        const ON: u32 = ffi::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY;
        let first = match self.shadow_op(domid, ON, "xc_shadow_control(ENABLE_LOGDIRTY)") {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let off = self.shadow_op(
            domid,
            ffi::XEN_DOMCTL_SHADOW_OP_OFF,
            "xc_shadow_control(OFF)",
        );
        let second = match off {
            Ok(()) => match self.shadow_op(domid, ON, "xc_shadow_control(ENABLE_LOGDIRTY)") {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => format!("not retried: {e}"),
        };
        Err(XenError::State {
            domid,
            reason: format!("log-dirty could not be enabled: {first}; after shadow OFF: {second}"),
        })
    }

    pub fn disable_logdirty(&self, domid: u32) -> Result<()> {
        self.shadow_op(
            domid,
            ffi::XEN_DOMCTL_SHADOW_OP_OFF,
            "xc_shadow_control(OFF)",
        )
    }

    /// `xc_logdirty_control(CLEAN)`: copies the dirty bitmap into `bitmap`
    /// and clears it in the hypervisor. `last` adds LOGDIRTY_FINAL (the
    /// domain is paused: no further dirtying can race the read). Returns
    /// the hypervisor's count of dirty pages.
    pub fn logdirty_clean(&self, domid: u32, bitmap: &mut Bitmap, last: bool) -> Result<u32> {
        let mut stats = ffi::xc_shadow_op_stats_t::default();
        let mode = if last {
            ffi::XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL
        } else {
            0
        };
        // SAFETY: `bitmap.buf` is a live hypercall buffer of at least
        // `bitmap.bits` bits allocated from this interface.
        let rc = unsafe {
            ffi::xc_logdirty_control(
                self.raw(),
                domid,
                ffi::XEN_DOMCTL_SHADOW_OP_CLEAN,
                &mut *bitmap.buf,
                bitmap.bits as std::os::raw::c_ulong,
                mode,
                &mut stats,
            )
        };
        if rc < 0 {
            return Err(call_err("xc_logdirty_control(CLEAN)", domid));
        }
        if rc as u64 != bitmap.bits {
            return Err(XenError::Unexpected {
                call: "xc_logdirty_control(CLEAN)",
                domid,
                got: rc,
                want: bitmap.bits as i64,
            });
        }
        Ok(stats.dirty_count)
    }

    /// One vCPU's context (`vcpu_guest_context_any_t`, raw bytes).
    pub fn vcpu_context(&self, domid: u32, vcpu: u32) -> Result<Vec<u8>> {
        let mut ctx = ffi::vcpu_guest_context_any_t::default();
        // SAFETY: `ctx` is a whole writable vcpu_guest_context_any_t.
        let rc = unsafe { ffi::xc_vcpu_getcontext(self.raw(), domid, vcpu, &mut ctx) };
        check(rc, "xc_vcpu_getcontext", domid)?;
        // SAFETY: ctx is plain old data of exactly this size.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ctx as *const ffi::vcpu_guest_context_any_t).cast::<u8>(),
                std::mem::size_of::<ffi::vcpu_guest_context_any_t>(),
            )
        };
        Ok(bytes.to_vec())
    }

    /// Writes one vCPU's context back (`xc_vcpu_setcontext`).
    pub fn set_vcpu_context(&self, domid: u32, vcpu: u32, bytes: &[u8]) -> Result<()> {
        let mut ctx = ffi::vcpu_guest_context_any_t::default();
        let n = bytes.len().min(std::mem::size_of_val(&ctx));
        // SAFETY: copies at most size_of(ctx) bytes into the plain-data ctx.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut ctx as *mut _ as *mut u8, n) };
        // SAFETY: ctx is a whole vcpu_guest_context_any_t.
        let rc = unsafe { ffi::xc_vcpu_setcontext(self.raw(), domid, vcpu, &mut ctx) };
        check(rc, "xc_vcpu_setcontext", domid)
    }

    /// The HVM context blob (`xc_domain_hvm_getcontext`, sized by a first
    /// call with no buffer).
    pub fn hvm_context(&self, domid: u32) -> Result<Vec<u8>> {
        // SAFETY: a null buffer of size 0 asks for the size only.
        let size =
            unsafe { ffi::xc_domain_hvm_getcontext(self.raw(), domid, std::ptr::null_mut(), 0) };
        if size <= 0 {
            return Err(call_err("xc_domain_hvm_getcontext(size)", domid));
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf holds `size` writable bytes.
        let n = unsafe {
            ffi::xc_domain_hvm_getcontext(self.raw(), domid, buf.as_mut_ptr(), size as u32)
        };
        if n < 0 {
            return Err(call_err("xc_domain_hvm_getcontext", domid));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    pub fn set_hvm_context(&self, domid: u32, blob: &mut [u8]) -> Result<()> {
        // SAFETY: blob is a readable buffer of the given length.
        let rc = unsafe {
            ffi::xc_domain_hvm_setcontext(self.raw(), domid, blob.as_mut_ptr(), blob.len() as u32)
        };
        check(rc, "xc_domain_hvm_setcontext", domid)
    }

    pub fn hvm_param(&self, domid: u32, param: u32) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: v is a writable u64.
        let rc = unsafe { ffi::xc_hvm_param_get(self.raw(), domid, param, &mut v) };
        check(rc, "xc_hvm_param_get", domid)?;
        Ok(v)
    }

    pub fn set_hvm_param(&self, domid: u32, param: u32, value: u64) -> Result<()> {
        // SAFETY: plain hypercall with scalar arguments.
        let rc = unsafe { ffi::xc_hvm_param_set(self.raw(), domid, param, value) };
        check(rc, "xc_hvm_param_set", domid)
    }

    /// Page types of a PV guest's machine frames
    /// (`xc_get_pfn_type_batch`): `arr` holds frames on entry and
    /// `XEN_DOMCTL_PFINFO_*` words on return, in place.
    pub fn pfn_types(&self, domid: u32, arr: &mut [u64]) -> Result<()> {
        let n = u32::try_from(arr.len()).map_err(|_| XenError::State {
            domid,
            reason: format!("{} frames in one page-type batch", arr.len()),
        })?;
        // SAFETY: arr holds n writable xen_pfn_t (u64) entries; the call
        // bounces them through hypercall-safe memory.
        let rc = unsafe { ffi::xc_get_pfn_type_batch(self.raw(), domid, n, arr.as_mut_ptr()) };
        check(rc, "xc_get_pfn_type_batch", domid)
    }

    /// Guest word width in bytes (8 for a 64-bit PV guest).
    pub fn guest_width(&self, domid: u32) -> Result<u32> {
        let mut w = 0u32;
        // SAFETY: w is a writable unsigned int.
        let rc = unsafe { ffi::xc_domain_get_guest_width(self.raw(), domid, &mut w) };
        check(rc, "xc_domain_get_guest_width", domid)?;
        Ok(w)
    }

    /// Highest guest frame number in the domain's physmap.
    pub fn max_gpfn(&self, domid: u32) -> Result<u64> {
        let mut g: ffi::xen_pfn_t = 0;
        // SAFETY: g is a writable xen_pfn_t.
        let rc = unsafe { ffi::xc_domain_maximum_gpfn(self.raw(), domid, &mut g) };
        check(rc, "xc_domain_maximum_gpfn", domid)?;
        Ok(g as u64)
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: the handle came from xc_interface_open and is closed once.
        unsafe { ffi::xc_interface_close(self.h.as_ptr()) };
    }
}

fn dominfo(d: &ffi::xc_domaininfo_t) -> DomInfo {
    DomInfo {
        domid: d.domain as u32,
        flags: d.flags,
        tot_pages: d.tot_pages,
        max_pages: d.max_pages,
        shared_info_frame: d.shared_info_frame,
        max_vcpu_id: d.max_vcpu_id,
        handle: d.handle,
    }
}

/// A dirty bitmap in hypercall-safe memory (one bit per guest frame).
pub struct Bitmap {
    xc: Arc<Xc>,
    /// Boxed so its address stays put: libxenctrl links shadows to it.
    buf: Box<ffi::xc_hypercall_buffer_t>,
    bits: u64,
    nr_pages: i32,
}

// SAFETY: the buffer is owned memory used by one thread at a time (`&mut`
// for the hypercall, `&` for the scanners while nothing writes it).
unsafe impl Send for Bitmap {}
// SAFETY: shared access only reads the words.
unsafe impl Sync for Bitmap {}

impl Bitmap {
    /// Allocates a bitmap of `bits` bits, zeroed.
    pub fn new(xc: &Arc<Xc>, domid: u32, bits: u64) -> Result<Bitmap> {
        let bytes = bits.div_ceil(64) * 8;
        let nr_pages = bytes.div_ceil(crate::PAGE_SIZE as u64).max(1) as i32;
        // The fields DECLARE_HYPERCALL_BUFFER sets: no bounce buffer.
        let mut buf = Box::new(ffi::xc_hypercall_buffer_t {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            ubuf: usize::MAX as *mut std::ffi::c_void,
            sz: 0,
        });
        // SAFETY: buf is a fresh, unshadowed hypercall buffer descriptor.
        let p = unsafe { ffi::xc__hypercall_buffer_alloc_pages(xc.raw(), &mut *buf, nr_pages) };
        if p.is_null() {
            return Err(call_err("xc_hypercall_buffer_alloc_pages", domid));
        }
        // SAFETY: p points to nr_pages freshly allocated pages.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, nr_pages as usize * crate::PAGE_SIZE) };
        Ok(Bitmap {
            xc: xc.clone(),
            buf,
            bits,
            nr_pages,
        })
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The bitmap as 64-bit words (bit `g % 64` of word `g / 64` is frame g).
    pub fn words(&self) -> &[u64] {
        // SAFETY: hbuf holds nr_pages pages, at least bits/64 rounded up
        // words, page-aligned; the hypervisor writes it only inside
        // logdirty_clean, which takes `&mut self`.
        unsafe {
            std::slice::from_raw_parts(self.buf.hbuf.cast::<u64>(), self.bits.div_ceil(64) as usize)
        }
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        // SAFETY: the buffer was allocated with this handle and page count.
        unsafe {
            ffi::xc__hypercall_buffer_free_pages(self.xc.raw(), &mut *self.buf, self.nr_pages)
        };
    }
}

/// An open libxenforeignmemory handle.
pub struct Foreign {
    h: NonNull<ffi::xenforeignmemory_handle>,
}

// SAFETY: the handle is an fd on /dev/xen/privcmd; mapping calls are
// independent ioctls.
unsafe impl Send for Foreign {}
// SAFETY: as above.
unsafe impl Sync for Foreign {}

impl Foreign {
    pub fn open() -> Result<Foreign> {
        // SAFETY: null logger, no flags.
        let h = unsafe { ffi::xenforeignmemory_open(std::ptr::null_mut(), 0) };
        NonNull::new(h)
            .map(|h| Foreign { h })
            .ok_or_else(|| XenError::Open {
                call: "xenforeignmemory_open",
                source: io::Error::last_os_error(),
            })
    }

    /// Maps `frames` of `domid` at exactly `addr` (MAP_FIXED), replacing
    /// what was there. Per-frame errors (a hole in the physmap) land in
    /// `errs` as errno values; those pages are left unmapped.
    ///
    /// # Safety
    /// `addr .. addr + frames.len() pages` must be a range this process
    /// reserved and owns, with no Rust reference into it.
    pub unsafe fn map_fixed(
        &self,
        domid: u32,
        addr: *mut u8,
        prot: i32,
        frames: &[ffi::xen_pfn_t],
        errs: &mut [i32],
    ) -> Result<()> {
        assert_eq!(frames.len(), errs.len(), "one error slot per frame");
        // SAFETY: the caller owns the target range; frames/errs are sized.
        let p = unsafe {
            ffi::xenforeignmemory_map2(
                self.h.as_ptr(),
                domid,
                addr.cast(),
                prot,
                libc::MAP_FIXED,
                frames.len() as u64,
                frames.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        if p.is_null() {
            return Err(call_err("xenforeignmemory_map2", domid));
        }
        if p.cast::<u8>() != addr {
            return Err(XenError::State {
                domid,
                reason: format!("xenforeignmemory_map2 placed the mapping at {p:p}, not {addr:p}"),
            });
        }
        Ok(())
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once. Existing mappings stay valid.
        unsafe { ffi::xenforeignmemory_close(self.h.as_ptr()) };
    }
}

/// An event channel bound to a guest's suspend channel
/// (`xc_suspend_evtchn_init_exclusive`), released on drop.
pub struct SuspendChannel {
    xc: Arc<Xc>,
    xce: NonNull<ffi::xenevtchn_handle>,
    domid: u32,
    /// Our local port, bound to the guest's suspend port.
    port: i32,
    lockfd: i32,
}

// SAFETY: the evtchn handle is an fd used by one thread at a time (&mut).
unsafe impl Send for SuspendChannel {}

impl SuspendChannel {
    /// Binds the guest's suspend event channel `guest_port`. This claims
    /// the channel exclusively (a lock file), so `xl` cannot suspend the
    /// guest behind our back.
    pub fn bind(xc: &Arc<Xc>, domid: u32, guest_port: i32) -> Result<SuspendChannel> {
        // SAFETY: null logger, no flags.
        let xce = unsafe { ffi::xenevtchn_open(std::ptr::null_mut(), 0) };
        let xce = NonNull::new(xce).ok_or_else(|| XenError::Open {
            call: "xenevtchn_open",
            source: io::Error::last_os_error(),
        })?;
        let mut lockfd = -1;
        // SAFETY: xce is open; lockfd is a writable int.
        let port = unsafe {
            ffi::xc_suspend_evtchn_init_exclusive(
                xc.raw(),
                xce.as_ptr(),
                domid,
                guest_port,
                &mut lockfd,
            )
        };
        if port < 0 {
            let e = call_err("xc_suspend_evtchn_init_exclusive", domid);
            // SAFETY: xce was opened above and is closed once here.
            unsafe { ffi::xenevtchn_close(xce.as_ptr()) };
            return Err(e);
        }
        Ok(SuspendChannel {
            xc: xc.clone(),
            xce,
            domid,
            port,
            lockfd,
        })
    }

    /// Asks the guest to suspend.
    pub fn notify(&mut self) -> Result<()> {
        // SAFETY: port is bound on this handle.
        let rc = unsafe { ffi::xenevtchn_notify(self.xce.as_ptr(), self.port as u32) };
        check(rc, "xenevtchn_notify(suspend channel)", self.domid)
    }

    /// Waits up to `timeout` for the channel to fire (the guest has
    /// suspended), consuming and unmasking the event. Unlike
    /// `xc_await_suspend`, which blocks without limit, this is bounded.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        // SAFETY: the handle is open.
        let fd = unsafe { ffi::xenevtchn_fd(self.xce.as_ptr()) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(XenError::Call {
                    call: "poll(evtchn fd)",
                    domid: self.domid,
                    source: e,
                });
            }
            if n == 0 {
                return Ok(false);
            }
            // SAFETY: the handle is open.
            let p = unsafe { ffi::xenevtchn_pending(self.xce.as_ptr()) };
            if p < 0 {
                return Err(call_err("xenevtchn_pending", self.domid));
            }
            // SAFETY: p is a port this handle reported pending.
            let rc = unsafe { ffi::xenevtchn_unmask(self.xce.as_ptr(), p as u32) };
            check(rc, "xenevtchn_unmask", self.domid)?;
            if p == self.port {
                return Ok(true);
            }
        }
    }
}

impl Drop for SuspendChannel {
    fn drop(&mut self) {
        // SAFETY: releases the binding and lock made in `bind`, then closes
        // the handle; each exactly once.
        unsafe {
            ffi::xc_suspend_evtchn_release(
                self.xc.raw(),
                self.xce.as_ptr(),
                self.domid,
                self.port,
                &mut self.lockfd,
            );
            ffi::xenevtchn_close(self.xce.as_ptr());
        }
    }
}

/// An open xenstore connection.
pub struct Store {
    h: NonNull<ffi::xs_handle>,
}

// SAFETY: a xenstore handle serialises requests internally (libxenstore
// takes its own lock around each request).
unsafe impl Send for Store {}

impl Store {
    pub fn open() -> Result<Store> {
        // SAFETY: flags 0: a read-write connection to xenstored.
        let h = unsafe { ffi::xs_open(0) };
        NonNull::new(h)
            .map(|h| Store { h })
            .ok_or_else(|| XenError::Open {
                call: "xs_open",
                source: io::Error::last_os_error(),
            })
    }

    fn cpath(path: &str) -> Result<CString> {
        CString::new(path).map_err(|_| XenError::Store {
            op: "path",
            path: path.to_string(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
    }

    /// Reads `path`; `None` if it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>> {
        let c = Self::cpath(path)?;
        let mut len = 0u32;
        // SAFETY: c is NUL-terminated; len is writable.
        let p = unsafe { ffi::xs_read(self.h.as_ptr(), ffi::XBT_NULL, c.as_ptr(), &mut len) };
        if p.is_null() {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(None);
            }
            return Err(XenError::Store {
                op: "read",
                path: path.into(),
                source: e,
            });
        }
        // SAFETY: xs_read returned a malloc'd buffer of len bytes.
        let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) };
        let s = String::from_utf8_lossy(v).into_owned();
        // SAFETY: the buffer is ours to free, once.
        unsafe { libc::free(p) };
        Ok(Some(s))
    }

    pub fn write(&self, path: &str, value: &str) -> Result<()> {
        let c = Self::cpath(path)?;
        // SAFETY: c is NUL-terminated; value is len bytes.
        let ok = unsafe {
            ffi::xs_write(
                self.h.as_ptr(),
                ffi::XBT_NULL,
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len() as u32,
            )
        };
        if !ok {
            return Err(XenError::Store {
                op: "write",
                path: path.into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `xs_resume_domain`: tells xenstored a suspended domain runs again.
    pub fn resume_domain(&self, domid: u32) -> Result<()> {
        // SAFETY: plain request on an open handle.
        if !unsafe { ffi::xs_resume_domain(self.h.as_ptr(), domid) } {
            return Err(XenError::Store {
                op: "resume_domain",
                path: format!("domid {domid}"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `/local/domain/<domid>`.
    pub fn domain_path(&self, domid: u32) -> Result<String> {
        // SAFETY: plain request; returns a malloc'd string or null.
        let p = unsafe { ffi::xs_get_domain_path(self.h.as_ptr(), domid) };
        if p.is_null() {
            return Err(XenError::Store {
                op: "get_domain_path",
                path: format!("domid {domid}"),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: p is a NUL-terminated malloc'd string, freed once after copying.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once.
        unsafe { ffi::xs_close(self.h.as_ptr()) };
    }
}

/// The guest's suspend event channel port, if it advertises one
/// (`device/suspend/event-channel` in its xenstore directory).
pub fn suspend_evtchn_port(domid: u32) -> Option<i32> {
    // SAFETY: plain libxenstore helper; opens its own connection.
    let p = unsafe { ffi::xs_suspend_evtchn_port(domid as i32) };
    (p >= 0).then_some(p)
}
