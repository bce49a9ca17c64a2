//! Parallel copy of dirty pages into staging while the guest is paused.
//!
//! The epoch thread splits the dirty list into equal pieces, copies the first
//! itself and hands the rest to `castor-copy-N` helpers, then waits for all of
//! them: the borrowed memory outlives every helper's use of it because
//! [`CopyPool::copy`] does not return before the helpers report done.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::domain::GuestMemory;
use crate::engine::shadow::PageBuf;
use crate::PAGE_SIZE;

struct Task {
    src: *const u8,
    dst: *mut u8,
    gfns: *const u64,
    /// Range of indices into `gfns` (and of staging slots) to copy.
    from: usize,
    to: usize,
    guest_pages: u64,
}

// SAFETY: a Task's pointers are valid until the helper sends on `done`;
// `CopyPool::copy` blocks until then, and pieces never overlap.
unsafe impl Send for Task {}

fn run_task(t: &Task) {
    for i in t.from..t.to {
        // SAFETY: i < gfns.len() by construction of the pieces.
        let gfn = unsafe { *t.gfns.add(i) };
        assert!(gfn < t.guest_pages, "dirty gfn {gfn} outside guest memory");
        // SAFETY: gfn is inside guest memory (checked), slot i inside staging
        // (staging has at least gfns.len() slots), and the two never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                t.src.add(gfn as usize * PAGE_SIZE),
                t.dst.add(i * PAGE_SIZE),
                PAGE_SIZE,
            )
        }
    }
}

/// The pause is what the guest feels: threads working inside it run at a
/// higher priority than encoders and the backup when the process may (root
/// or CAP_SYS_NICE); otherwise this is a no-op.
pub fn raise_priority() {
    // SAFETY: plain syscalls on the calling thread; failure is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
    }
}

pub struct CopyPool {
    helpers: Vec<(Sender<Task>, JoinHandle<()>)>,
    done: Receiver<()>,
}

impl CopyPool {
    /// `threads` copiers in total, counting the calling thread. Helpers are
    /// pinned to `cores` round-robin when given.
    pub fn new(threads: usize, cores: &[core_affinity::CoreId]) -> CopyPool {
        let (done_tx, done) = channel();
        let helpers = (1..threads.max(1))
            .map(|n| {
                let (tx, rx) = channel::<Task>();
                let done_tx = done_tx.clone();
                let core = (!cores.is_empty()).then(|| cores[n % cores.len()]);
                let h = std::thread::Builder::new()
                    .name(format!("castor-copy-{n}"))
                    .spawn(move || {
                        if let Some(c) = core {
                            core_affinity::set_for_current(c);
                        }
                        raise_priority();
                        for t in rx {
                            run_task(&t);
                            if done_tx.send(()).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawning copy thread");
                (tx, h)
            })
            .collect();
        CopyPool { helpers, done }
    }

    /// Copies page `gfns[i]` of `mem` into staging slot `i` for every `i`.
    pub fn copy(&self, mem: &GuestMemory, gfns: &[u64], staging: &PageBuf) {
        assert!(staging.slots() >= gfns.len(), "staging too small");
        let n = self.helpers.len() + 1;
        let per = gfns.len().div_ceil(n);
        let task = |k: usize| Task {
            src: mem.as_ptr(),
            dst: staging.slot_ptr(0),
            gfns: gfns.as_ptr(),
            from: (k * per).min(gfns.len()),
            to: ((k + 1) * per).min(gfns.len()),
            guest_pages: mem.pages(),
        };
        let mut sent = 0;
        if per >= 64 {
            for (k, (tx, _)) in self.helpers.iter().enumerate() {
                if tx.send(task(k + 1)).is_ok() {
                    sent += 1;
                } else {
                    run_task(&task(k + 1));
                }
            }
            run_task(&task(0));
        } else {
            // Too few pages to be worth waking helpers.
            run_task(&Task {
                from: 0,
                to: gfns.len(),
                ..task(0)
            });
        }
        for _ in 0..sent {
            self.done.recv().expect("copy helper died");
        }
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        for (tx, h) in self.helpers.drain(..) {
            drop(tx);
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_exactly_the_listed_pages() {
        let mem = GuestMemory::new(512 * PAGE_SIZE).unwrap();
        for g in 0..512u64 {
            mem.write_page(g, &[g as u8; PAGE_SIZE]);
        }
        let gfns: Vec<u64> = (0..512).filter(|g| g % 3 == 1).collect();
        let st = PageBuf::new(gfns.len()).unwrap();
        CopyPool::new(3, &[]).copy(&mem, &gfns, &st);
        for (i, g) in gfns.iter().enumerate() {
            // SAFETY: copy finished; nobody writes staging now.
            assert_eq!(unsafe { st.slot(i) }, &[*g as u8; PAGE_SIZE]);
        }
    }
}
