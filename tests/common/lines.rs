//! Watching a child's output line by line: the events tests wait on.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every line a stream has produced so far, and a channel of new ones.
pub struct Lines {
    rx: Receiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    /// Drains `r` on a thread (so the child never blocks on a full pipe).
    pub fn watch(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let keep = all.clone();
        std::thread::spawn(move || {
            // Progress lines end in '\r' (redrawn in place) as well as '\n'.
            for chunk in BufReader::new(r).split(b'\n') {
                let Ok(chunk) = chunk else { break };
                for part in chunk.split(|&b| b == b'\r') {
                    let line = String::from_utf8_lossy(part).trim().to_string();
                    if line.is_empty() {
                        continue;
                    }
                    keep.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            }
        });
        Lines { rx, all }
    }

    /// Waits for the next line containing `pat`; panics with everything
    /// seen when it does not come within `within` or the stream ends.
    pub fn wait_for(&self, pat: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l.contains(pat) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line with {pat:?} within {within:?}:\n{}", self.text())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stream ended before a line with {pat:?}:\n{}", self.text())
                }
            }
        }
    }

    /// The next line containing `pat` within `within`; None when none
    /// comes (or the stream ends) in that time.
    pub fn next_within(&self, pat: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l.contains(pat) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Everything seen so far.
    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }
}
