//! Sink and source of the `uring` transport against each other over a
//! real socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::sink::{DIRECT_OPS, MAX_IOV};
use super::*;
use crate::transport::link::{RecordSink, RecordSource};
use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};
use crate::transport::slots::{Announce, Credit, DEFAULT_SLOT_SIZE, URING_SLOTS};

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn available() -> bool {
    match probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP: {e}");
            false
        }
    }
}

fn payload(i: usize) -> Vec<u8> {
    // Sizes from empty to the 4 MiB limit, so records straddle slots
    // and the ring's end.
    let len = match i % 5 {
        0 => 0,
        1 => 17,
        2 => 300 << 10,
        3 => crate::transport::record::MAX_PAYLOAD,
        _ => 5000 + i,
    };
    (0..len).map(|k| (k * 7 + i) as u8).collect()
}

/// Sink and source over a real socket: 60 records (≈ 50 MiB, eight times
/// the ring, some of them 4 MiB, the most the ring holds behind a partly
/// read slot) arrive intact and in order: the backup lands bytes only
/// where its parser is done, and TCP's window holds the sink back
/// meanwhile.
#[test]
fn records_cross_the_ring_intact() {
    if !available() {
        return;
    }
    for mode in [
        SendMode::Auto,
        SendMode::Direct,
        SendMode::DirectCopy,
        SendMode::StagedZc,
        SendMode::StagedCopy,
    ] {
        cross_the_ring(mode);
    }
}

fn cross_the_ring(mode: SendMode) {
    let (c, s) = pair();
    let ann = Announce::new(URING_SLOTS, DEFAULT_SLOT_SIZE).unwrap();
    let n = 60;
    let backup = std::thread::spawn(move || {
        let mut src = UringSource::new(s, &ann).unwrap();
        for i in 0..n {
            let r = src.next_record().unwrap();
            assert_eq!((r.kind, r.epoch), (RecordKind::State, i as u64));
            assert!(r.payload == payload(i), "record {i} differs");
        }
        assert!(matches!(src.next_record(), Err(RecordError::Eof)));
    });
    let back = CreditFilter::passthrough(RecordReader::new(c.try_clone().unwrap()));
    let reader = std::thread::spawn(move || {
        let mut r = RecordReader::new(back);
        assert!(matches!(r.next(), Err(RecordError::Eof)));
    });
    let sink = UringSink::new(c.try_clone().unwrap()).unwrap();
    let mut sink = if sink.mode().is_direct() {
        sink.with_mode(mode)
    } else {
        eprintln!("SKIP {mode:?}: kernel {} lacks SENDMSG_ZC", kernel());
        sink
    };
    let (lent_tx, lent_rx) = std::sync::mpsc::channel();
    let mut lent = 0;
    for i in 0..n {
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::State, i as u64, &payload(i));
        if i % 5 == 2 {
            // Lent: the sink may keep it past the call.
            sink.send_lent(Box::new(Lend(v, lent_tx.clone()))).unwrap();
            lent += 1;
            continue;
        }
        if i % 5 == 4 {
            // Hundreds of small pieces: more than one SENDMSG_ZC's
            // iovecs, so sends are cut at MAX_IOV pieces.
            let pieces: Vec<&[u8]> = v.chunks(7).collect();
            assert!(pieces.len() > 2 * MAX_IOV);
            sink.send(&pieces).unwrap();
        } else {
            // Split across buffers like the primary's head/shards/tail.
            let (a, b) = v.split_at(v.len() / 3);
            sink.send(&[a, &[], b]).unwrap();
        }
        if sink.mode().is_direct() && sink.loans.held() == 0 {
            // The caller's buffers are free again: nothing in flight
            // (earlier lent sends may still be, until their notification).
            assert!(sink.stages.iter().all(|s| !s.result_due && !s.notif_due));
            assert_eq!(sink.free.len(), DIRECT_OPS);
            assert_eq!(
                sink.zc_notifs + sink.copy_sends,
                sink.ops,
                "a notification per zero-copy send"
            );
        }
        // Reusing (here: dropping) the buffers now cannot change what
        // the backup receives; it checks every record below.
        drop(v);
    }
    assert!(sink.sent > 8 * ann.ring_len() as u64);
    drop(sink);
    // Every lent buffer came back (by the drop at the latest), intact.
    let back: Vec<Vec<u8>> = lent_rx.try_iter().collect();
    assert_eq!(back.len(), lent, "{mode:?}");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    backup.join().unwrap();
    drop(c);
    reader.join().unwrap();
}

/// uring has no credits: a backup that sends one (an older castor, or a
/// hostile peer) fails the primary's return path with the record named,
/// instead of being passed on or applied.
#[test]
fn a_credit_from_the_backup_is_refused() {
    let (c, mut s) = pair();
    let back = CreditFilter::passthrough(RecordReader::new(c.try_clone().unwrap()));
    let mut v = Vec::new();
    let credit = Credit {
        first: 0,
        count: 1,
        chunks: 0,
    };
    write_record(&mut v, RecordKind::Credit, 0, &credit.encode());
    s.write_all(&v).unwrap();
    let mut r = RecordReader::new(back);
    let e = r.next().unwrap_err().to_string();
    assert!(e.contains("Credit record"), "{e}");
}

/// A backup that stops reading: the sink fails at its deadline (the
/// socket's SO_SNDTIMEO) instead of blocking for ever, reports that first,
/// and tears the connection down so that the kernel drops the bytes still
/// queued from the caller's pages: by the time `send` returns, every
/// notification came (nothing is due, no buffer is kept), so the caller
/// may free its buffers. Without the teardown the peer's closed window
/// keeps them queued, and their notifications due, for as long as the
/// connection lives.
#[test]
fn a_peer_that_stops_reading_fails_the_sink_at_its_deadline() {
    if !available() {
        return;
    }
    let (c, s) = pair();
    let deadline = std::time::Duration::from_millis(300);
    c.set_write_timeout(Some(deadline)).unwrap();
    let sink = UringSink::new(c.try_clone().unwrap()).unwrap();
    if !sink.mode().is_direct() {
        eprintln!("SKIP: kernel {} lacks SENDMSG_ZC", kernel());
        return;
    }
    // Zero copy for every chunk: the memory the kernel holds is ours.
    let mut sink = sink.with_mode(SendMode::Direct);
    let reported = Arc::new(Mutex::new(Vec::<String>::new()));
    let r = reported.clone();
    sink.on_failure(Box::new(move |why| r.lock().unwrap().push(why.to_string())));
    // Far more than the socket buffers of a peer that reads nothing.
    let big = vec![7u8; 8 << 20];
    let t0 = std::time::Instant::now();
    let err = sink.send(&[&big]).expect_err("nobody reads");
    let took = t0.elapsed();
    let msg = err.to_string();
    eprintln!("failed after {} ms: {msg}", took.as_millis());
    assert!(msg.contains("--backup-timeout"), "{msg}");
    assert!(took >= deadline, "failed before the deadline: {took:?}");
    assert!(
        took < deadline + std::time::Duration::from_secs(2),
        "failed after {took:?}"
    );
    assert_eq!(*reported.lock().unwrap(), vec![msg], "reported once, first");
    assert!(
        sink.stages.iter().all(|s| !s.result_due && !s.notif_due),
        "the kernel still reads the caller's pages"
    );
    assert!(!sink.kernel_kept_buffers());
    drop(big);
    // The connection is gone for good: the peer reads the reset.
    drop(sink);
    let mut s = s;
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    assert!(
        end.is_err(),
        "the sink reset the connection (tcp_disconnect)"
    );
}

/// A buffer lent to the sink, handed back through a channel.
struct Lend(Vec<u8>, std::sync::mpsc::Sender<Vec<u8>>);

impl crate::transport::Lent for Lend {
    fn pieces(&self) -> Vec<&[u8]> {
        vec![&self.0]
    }
    fn give_back(self: Box<Self>) {
        let _ = self.1.send(self.0);
    }
}

fn set_buf(s: &TcpStream, opt: libc::c_int, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and an int option of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// Ownership hand-off: `send_lent` returns once the sends completed (the
/// bytes are queued on the socket) while the kernel still reads the
/// buffer, which the sink then keeps; it is handed back only once the
/// notification came (here: after the peer, whose tiny receive window
/// held the bytes in the sender's queue, read them), intact.
#[test]
fn a_lent_buffer_comes_back_only_after_its_notification() {
    if !available() {
        return;
    }
    let (c, mut s) = pair();
    set_buf(&c, libc::SO_SNDBUF, 4 << 20);
    set_buf(&s, libc::SO_RCVBUF, 16 << 10);
    let sink = UringSink::new(c.try_clone().unwrap()).unwrap();
    if !sink.mode().is_direct() {
        eprintln!("SKIP: kernel {} lacks SENDMSG_ZC", kernel());
        return;
    }
    let mut sink = sink.with_mode(SendMode::Direct);
    let data: Vec<u8> = (0..256 << 10).map(|k: usize| (k * 31 + 7) as u8).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    sink.send_lent(Box::new(Lend(data.clone(), tx))).unwrap();
    // Returned with the send complete but its notification due: the
    // buffer is the sink's.
    assert!(sink.stages.iter().all(|s| !s.result_due));
    assert!(sink.stages.iter().any(|s| s.notif_due), "notification due");
    assert_eq!(sink.loans.held(), 1);
    sink.reclaim();
    assert!(
        rx.try_recv().is_err(),
        "handed back while the kernel reads it"
    );
    let want = data.len();
    let rd = std::thread::spawn(move || {
        // A wide window again, so the rest flows at once.
        set_buf(&s, libc::SO_RCVBUF, 1 << 20);
        let mut v = vec![0u8; want];
        s.read_exact(&mut v).unwrap();
        v
    });
    // The notification is the event: wait for it (bounded by the sink's
    // own deadline), then the buffer must be back.
    let back = loop {
        sink.reclaim();
        if let Ok(b) = rx.try_recv() {
            break b;
        }
        sink.wait_cqe("zero-copy notification").unwrap();
    };
    assert!(sink.stages.iter().all(|s| !s.result_due && !s.notif_due));
    assert_eq!(sink.loans.held(), 0);
    assert!(back == data, "handed back changed");
    let got = rd.join().unwrap();
    assert!(got == data, "the peer got other bytes");
}

/// A lent send that fails (a peer that stops reading, deadline 300 ms):
/// the sink tears the connection down, the kernel lets go of the pages,
/// and the buffer comes back (nothing due, nothing held, nothing kept);
/// a send on the failed sink hands its buffer straight back.
#[test]
fn a_failed_lent_send_hands_back_what_the_kernel_released() {
    if !available() {
        return;
    }
    let (c, _s) = pair();
    c.set_write_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let sink = UringSink::new(c.try_clone().unwrap()).unwrap();
    if !sink.mode().is_direct() {
        eprintln!("SKIP: kernel {} lacks SENDMSG_ZC", kernel());
        return;
    }
    let mut sink = sink.with_mode(SendMode::Direct);
    let (tx, rx) = std::sync::mpsc::channel();
    let big = vec![7u8; 8 << 20];
    let e = sink
        .send_lent(Box::new(Lend(big, tx.clone())))
        .expect_err("nobody reads");
    assert!(e.to_string().contains("--backup-timeout"), "{e}");
    assert!(sink.stages.iter().all(|s| !s.result_due && !s.notif_due));
    assert_eq!(sink.loans.held(), 0, "still held after the teardown");
    assert!(!sink.kernel_kept_buffers());
    assert_eq!(rx.try_recv().unwrap().len(), 8 << 20);
    let e2 = sink.send_lent(Box::new(Lend(vec![1; 10], tx))).unwrap_err();
    assert_eq!(e2.to_string(), e.to_string(), "the first failure repeats");
    assert_eq!(rx.try_recv().unwrap(), vec![1; 10]);
}
