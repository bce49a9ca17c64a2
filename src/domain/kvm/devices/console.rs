//! Console output: what the guest wrote to its serial port, kept in a
//! bounded buffer for the VMM (tests, the CLI) and optionally copied to
//! stderr or a file.
//!
//! Invariants: the buffer holds at most [`CONSOLE_CAP`] bytes, the most
//! recent ones; `total` counts every byte ever written, so a reader can
//! tell how much was dropped. `put` runs on the vCPU thread (the serial
//! port's exit handler), so the CPU time stamped on each line is the
//! vCPU's.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::domain::kvm::error::{KvmError, Result};
use crate::domain::kvm::spec::ConsoleSink;
use crate::metrics::thread_cpu_time;

/// Bytes of console output kept in memory.
pub const CONSOLE_CAP: usize = 256 << 10;

struct Inner {
    buf: VecDeque<u8>,
    total: u64,
    /// Newlines ever written.
    lines: u64,
    /// When the last newline was written and the writing (vCPU) thread's
    /// CPU time then.
    last_line: Option<(Instant, Option<Duration>)>,
    sink: Option<Box<dyn Write + Send>>,
}

/// Shared handle to a domain's console output. Cloning shares the buffer.
#[derive(Clone)]
pub struct Console {
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

impl Console {
    pub fn new(sink: Option<&ConsoleSink>) -> Result<Self> {
        let sink: Option<Box<dyn Write + Send>> = match sink {
            None => None,
            Some(ConsoleSink::Stderr) => Some(Box::new(std::io::stderr())),
            Some(ConsoleSink::File(path)) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| KvmError::Console {
                        path: path.clone(),
                        source,
                    })?,
            )),
        };
        Ok(Console {
            inner: Arc::new((
                Mutex::new(Inner {
                    buf: VecDeque::new(),
                    total: 0,
                    lines: 0,
                    last_line: None,
                    sink,
                }),
                Condvar::new(),
            )),
        })
    }

    /// Records one byte the guest transmitted.
    pub fn put(&self, byte: u8) {
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if g.buf.len() == CONSOLE_CAP {
            g.buf.pop_front();
        }
        g.buf.push_back(byte);
        g.total += 1;
        if let Some(sink) = g.sink.as_mut() {
            // Console copies are best effort: a full disk must not stop
            // the guest.
            let _ = sink.write_all(&[byte]);
            if byte == b'\n' {
                let _ = sink.flush();
            }
        }
        if byte == b'\n' {
            g.lines += 1;
            g.last_line = Some((Instant::now(), thread_cpu_time()));
            cv.notify_all();
        }
    }

    /// The buffered output (lossy UTF-8).
    pub fn text(&self) -> String {
        let g = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = g.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Bytes the guest has written in total.
    pub fn total(&self) -> u64 {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Lines (newlines) the guest has written in total.
    pub fn lines(&self) -> u64 {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).lines
    }

    /// The line count with when the last line ended and the vCPU's CPU
    /// time then; None before the first line.
    pub fn line_mark(&self) -> Option<(u64, Instant, Option<Duration>)> {
        let g = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        g.last_line.map(|(at, cpu)| (g.lines, at, cpu))
    }

    /// Waits until `pred(text)` holds or `timeout` passes; returns the text
    /// on success.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if pred(&text) {
                return Some(text);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let (lock, cv) = &*self.inner;
            let g = lock.lock().unwrap_or_else(|e| e.into_inner());
            let wait = (deadline - now).min(Duration::from_millis(50));
            let _ = cv.wait_timeout(g, wait);
        }
    }
}
