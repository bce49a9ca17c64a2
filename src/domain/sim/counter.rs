//! The sim guest's counter service (`counter=ADDR`): a UDP service inside
//! the guest that answers each request with the next value of a counter,
//! so a client can watch a failover the way a user of a real guest would.
//!
//! Protocol (the kvm `counter` guest's, guests/README.md): a request is a
//! datagram whose first 8 bytes are a request id (u64 LE); the reply is 16
//! bytes, the id and the counter value (u64 LE). A request repeating the
//! id of the last one answered gets the same value again (a client retry
//! after a lost reply), any other id increments the counter first.
//!
//! Invariants:
//! - All service state (counter, last id, last value) lives in guest
//!   memory, in the last 64 bytes of the control page ([`STATE_OFFSET`],
//!   the slot a 63rd workload thread would use), so a checkpoint carries it
//!   and an activated copy continues from it.
//! - The service is part of the guest: it handles a request (memory write
//!   and reply) only while the domain runs. [`Counter::pause`] returns once
//!   no request is being handled and none will be until [`Counter::resume`];
//!   a request read from the socket while paused waits in the service, like
//!   a frame in a NIC's queue (lost with the host, retried by the client).
//! - Replies leave through the output queue when one is attached (held
//!   until the checkpoint that produced them is acknowledged), else straight
//!   from the socket.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::domain::{DomainError, GuestMemory};
use crate::outq::{Egress, OutputHandle, OutputQueue};
use crate::PAGE_SIZE;

/// Offset of the service state in page 0: counter, last id, last value.
pub const STATE_OFFSET: usize = PAGE_SIZE - 64;
/// How long one wait for a request lasts before the stop flag is checked.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    busy: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where replies go: the output queue, or the socket directly.
enum Reply {
    Queue(OutputHandle),
    Direct(UdpSocket),
}

/// Sends released replies from the service's socket. A queued frame is
/// the destination's text form, a NUL, then the datagram.
struct UdpEgress(UdpSocket);

impl Egress for UdpEgress {
    fn release(&mut self, frame: &[u8]) {
        if let Some((to, data)) = split_frame(frame) {
            let _ = self.0.send_to(data, to);
        }
    }
}

fn frame(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut f = to.to_string().into_bytes();
    f.push(0);
    f.extend_from_slice(data);
    f
}

fn split_frame(f: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let nul = f.iter().position(|&b| b == 0)?;
    let to = std::str::from_utf8(&f[..nul]).ok()?.parse().ok()?;
    Some((to, &f[nul + 1..]))
}

/// The running service of one domain.
pub struct Counter {
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

/// Raw pointer to the service state in guest page 0.
#[derive(Clone, Copy)]
struct StatePtr(*mut u64);
// SAFETY: the pointer targets guest memory that outlives the service thread
// (the domain joins the thread before its memory drops), and only that
// thread writes it while the domain runs.
unsafe impl Send for StatePtr {}

impl StatePtr {
    fn of(mem: &GuestMemory) -> StatePtr {
        // SAFETY: STATE_OFFSET + 24 bytes lie inside page 0, which is
        // inside the mapping; the offset is 8-byte aligned.
        StatePtr(unsafe { mem.page_ptr(0).add(STATE_OFFSET) } as *mut u64)
    }
    fn get(self, i: usize) -> u64 {
        // SAFETY: i < 3, inside the state (see `of`).
        u64::from_le(unsafe { self.0.add(i).read_volatile() })
    }
    fn set(self, i: usize, v: u64) {
        // SAFETY: as in `get`; the service thread is the only writer.
        unsafe { self.0.add(i).write_volatile(v.to_le()) }
    }
}

/// The counter value stored in `mem` (read while the domain is paused).
pub fn value(mem: &GuestMemory) -> u64 {
    StatePtr::of(mem).get(0)
}

/// A bound service socket with its reply path, not yet serving (the
/// guest's NIC before the guest starts).
pub struct Prepared {
    sock: UdpSocket,
    reply: Reply,
}

impl Prepared {
    /// Binds `addr`; replies go through `outq` when given.
    pub fn bind(addr: SocketAddr, outq: Option<&OutputQueue>) -> Result<Prepared, DomainError> {
        let sys = |op| move |source| DomainError::Sys { op, source };
        let sock = UdpSocket::bind(addr).map_err(|source| DomainError::Spec {
            spec: format!("counter={addr}"),
            reason: format!("binding the counter service's UDP socket: {source}"),
        })?;
        sock.set_read_timeout(Some(POLL))
            .map_err(sys("setting the counter socket's timeout"))?;
        let tx = sock
            .try_clone()
            .map_err(sys("cloning the counter socket"))?;
        let reply = match outq {
            Some(q) => Reply::Queue(q.handle(Box::new(UdpEgress(tx)))),
            None => Reply::Direct(tx),
        };
        Ok(Prepared { sock, reply })
    }

    /// Starts serving, the guest running. `mem` is kept alive by the
    /// service thread.
    pub fn start(self, mem: &Arc<GuestMemory>) -> Result<Counter, DomainError> {
        let gate = Arc::new(Gate::default());
        let (g, state, keep) = (gate.clone(), StatePtr::of(mem), mem.clone());
        let Prepared { sock, reply } = self;
        let thread = std::thread::Builder::new()
            .name("castor-sim-counter".into())
            .spawn(move || {
                crate::domain::priority::at_process_priority();
                let _mem = keep; // guest memory outlives this thread
                serve(&sock, &g, state, &reply)
            })
            .map_err(|source| DomainError::Sys {
                op: "spawning the counter service thread",
                source,
            })?;
        Ok(Counter {
            gate,
            thread: Some(thread),
        })
    }
}

impl Counter {
    /// Binds `addr` and starts serving at once.
    pub fn start(
        addr: SocketAddr,
        mem: &Arc<GuestMemory>,
        outq: Option<&OutputQueue>,
    ) -> Result<Counter, DomainError> {
        Prepared::bind(addr, outq)?.start(mem)
    }

    /// Returns once no request is handled until `resume`.
    pub fn pause(&self) {
        let mut st = self.gate.lock();
        st.paused = true;
        while st.busy {
            st = self.gate.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        self.gate.lock().paused = false;
        self.gate.cv.notify_all();
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.gate.lock().stop = true;
        self.gate.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(sock: &UdpSocket, gate: &Gate, state: StatePtr, reply: &Reply) {
    let mut buf = [0u8; 64];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => {
                if gate.lock().stop {
                    return;
                }
                continue;
            }
        };
        // Enter the guest: wait out a pause, then hold it off while the
        // request is handled.
        {
            let mut st = gate.lock();
            while st.paused && !st.stop {
                st = gate.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            st.busy = true;
        }
        if n >= 8 {
            let id = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            let v = if id == state.get(1) && state.get(2) != 0 {
                state.get(2)
            } else {
                let v = state.get(0) + 1;
                state.set(0, v);
                state.set(1, id);
                state.set(2, v);
                v
            };
            let mut out = [0u8; 16];
            out[..8].copy_from_slice(&id.to_le_bytes());
            out[8..].copy_from_slice(&v.to_le_bytes());
            match reply {
                Reply::Queue(h) => h.emit_now(&frame(from, &out)),
                Reply::Direct(s) => {
                    let _ = s.send_to(&out, from);
                }
            }
        }
        gate.lock().busy = false;
        gate.cv.notify_all();
    }
}

/// A client of the counter service: `ask` sends request `id` and retries
/// every `retry` until a reply for it arrives or `patience` ran out.
pub fn ask(sock: &UdpSocket, id: u64, retry: Duration, patience: Duration) -> Option<u64> {
    let t0 = std::time::Instant::now();
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&id.to_le_bytes());
    let _ = sock.set_read_timeout(Some(retry));
    let mut buf = [0u8; 64];
    while t0.elapsed() < patience {
        if sock.send(&msg).is_err() {
            std::thread::sleep(retry.min(patience.saturating_sub(t0.elapsed())));
            continue;
        }
        let sent = std::time::Instant::now();
        while sent.elapsed() < retry {
            match sock.recv(&mut buf) {
                Ok(16) if buf[..8] == id.to_le_bytes() => {
                    return Some(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")))
                }
                Ok(_) => {} // a late reply to an earlier request
                Err(_) => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outq::Mode;

    fn client(to: SocketAddr) -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.connect(to).unwrap();
        c
    }

    fn free_addr() -> SocketAddr {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn counts_in_guest_memory_and_repeats_a_retried_id() {
        let mem = Arc::new(GuestMemory::new(16 * PAGE_SIZE).unwrap());
        let addr = free_addr();
        let svc = Counter::start(addr, &mem, None).unwrap();
        let c = client(addr);
        let (r, p) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(ask(&c, 1, r, p), Some(1));
        assert_eq!(ask(&c, 2, r, p), Some(2));
        assert_eq!(ask(&c, 2, r, p), Some(2), "a retry gets the same value");
        assert_eq!(ask(&c, 3, r, p), Some(3));
        svc.pause();
        assert_eq!(value(&mem), 3);
        drop(svc);
    }

    #[test]
    fn paused_service_answers_nothing_until_resumed() {
        let mem = Arc::new(GuestMemory::new(16 * PAGE_SIZE).unwrap());
        let addr = free_addr();
        let svc = Counter::start(addr, &mem, None).unwrap();
        svc.pause();
        let c = client(addr);
        let short = Duration::from_millis(150);
        assert_eq!(ask(&c, 7, short, short), None);
        assert_eq!(value(&mem), 0, "no guest write while paused");
        svc.resume();
        assert_eq!(
            ask(&c, 7, Duration::from_millis(100), Duration::from_secs(5)),
            Some(1)
        );
    }

    #[test]
    fn replies_wait_for_the_commit_of_their_epoch() {
        let mem = Arc::new(GuestMemory::new(16 * PAGE_SIZE).unwrap());
        let addr = free_addr();
        let q = OutputQueue::start(Mode::Commit).unwrap();
        let svc = Counter::start(addr, &mem, Some(&q)).unwrap();
        let c = client(addr);
        let short = Duration::from_millis(300);
        // Handled (the counter moved) but held: epoch 1 is not committed.
        assert_eq!(ask(&c, 1, short, short), None);
        svc.pause();
        assert_eq!(value(&mem), 1);
        q.open_epoch(2);
        svc.resume();
        q.commit(1);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(c.recv(&mut buf).unwrap(), 16);
        assert_eq!(u64::from_le_bytes(buf[8..].try_into().unwrap()), 1);
    }
}
