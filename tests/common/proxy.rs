//! A cuttable TCP proxy for partition tests. While cut, connections stay
//! open but every byte is swallowed in both directions (and new ones are
//! accepted and left silent): what a network partition looks like to both
//! ends, with no FIN or RST to tell them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Proxy {
    /// `127.0.0.1:PORT` to connect to instead of the target.
    pub addr: String,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on loopback (of the calling thread's network namespace) and
    /// forwards to `target`.
    pub fn start(target: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let (target, c) = (target.to_string(), cut.clone());
        // Threads inherit the creating thread's network namespace.
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { return };
                let _ = client.set_nodelay(true);
                let c = c.clone();
                let target = target.clone();
                std::thread::spawn(move || {
                    if c.load(Ordering::SeqCst) {
                        // Partitioned: hold the connection, answer nothing.
                        pump(client.try_clone().unwrap(), None, c);
                        return;
                    }
                    let Ok(up) = TcpStream::connect(&target) else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let (c2, up2, cl2) = (
                        c.clone(),
                        up.try_clone().unwrap(),
                        client.try_clone().unwrap(),
                    );
                    std::thread::spawn(move || pump(up2, Some(cl2), c2));
                    pump(client, Some(up), c);
                });
            }
        });
        Proxy { addr, cut }
    }

    /// From now on nothing passes, either way.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` → `to` while not cut; swallows everything once cut.
fn pump(mut from: TcpStream, mut to: Option<TcpStream>, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(t) = to.as_mut() {
            if t.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    // Only a clean end of the stream is passed on, and only while not cut.
    if !cut.load(Ordering::SeqCst) {
        if let Some(t) = to {
            let _ = t.shutdown(std::net::Shutdown::Write);
        }
    }
}
