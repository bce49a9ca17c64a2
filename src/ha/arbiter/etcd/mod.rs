//! `etcd:` arbiter: a leader key bound to a lease, in an etcd v3 cluster.
//!
//! Spec: `etcd:http://HOST:PORT[,http://HOST:PORT...][/KEY][?ttl=DURATION]`.
//! Endpoints are tried in order until one answers; KEY defaults to
//! `castor/pair-PORT` (PORT: the backup's port, as for the `local` lock) and
//! the TTL to [`DEFAULT_TTL`].
//!
//! Winning (one campaign attempt, [`Arbiter::try_acquire`]):
//! 1. `lease/grant` TTL → lease L (etcd may grant more than asked: its
//!    minimum is 1.5 election timeouts, 2 s with default settings; the
//!    granted TTL is what counts).
//! 2. `kv/txn`: if `create_revision(KEY) == 0` (no key) then `put KEY` bound
//!    to L, else read KEY. Success: the fencing token is the revision that
//!    created the key. Every winner creates the key anew, at a revision
//!    larger than any before it, so tokens grow with every winner.
//!    Failure: another copy holds KEY; the attempt reports "held" and L is
//!    kept for the next attempt while half its TTL is left (a campaign
//!    then costs one etcd write per attempt); it is revoked when replaced
//!    or when the arbiter is dropped.
//!
//! Holding: a `castor-etcd` thread renews L (`lease/keepalive`) every
//! TTL/4 and checks that KEY still exists with our create revision and
//! lease. After each renewal it extends the [`LeaseWatch`] to
//! `sent + granted TTL - drift margin`, `sent` taken *before* the request
//! left, so the request's network delay never counts as held time: etcd
//! starts the renewed TTL when it processes the request, which is later.
//! When etcd says the lease or key is gone the watch is revoked at once.
//! When etcd cannot be reached the watch simply runs out. Dropping the
//! arbiter revokes L, which deletes KEY: a successor wins at once.
//!
//! Transport ([`gateway`]): etcd's JSON gateway (`/v3/...`, served on the client port by
//! etcd 3.4 and later) through ureq, a small synchronous HTTP client: no
//! async runtime and no protoc at build time, and the five calls used here
//! are plain request/response (even keepalive, one message per request).
//! Every request has a timeout; every field read from a response is
//! checked, and a missing or malformed one is an error naming the call and
//! the value.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod gateway;

pub use super::contract::EtcdError;
use super::contract::{Arbiter, ArbiterError, FencingToken};
use crate::ha::heir::HeirBook;
use crate::ha::lease::LeaseWatch;
use gateway::{campaign, get_text, grant, keepalive, put_if_leader, range, revoke, Client, Holder};

/// Default lease TTL. etcd's minimum TTL with its default election timeout
/// (1 s) is 1.5 s, rounded up to whole seconds: 2 s. The backup suspects a
/// silent primary after 500 ms; with a 2 s TTL renewed every 500 ms the
/// primary survives three lost renewals in a row (a busy or briefly
/// unreachable etcd) before it must self-fence, and a failover after a
/// primary's death costs at most heartbeat timeout + 2 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

/// Subtracted from every granted TTL before it is published in the watch:
/// covers the rate difference between this host's monotonic clock and the
/// etcd leader's (ppm in practice; 5 % is generous) and the lease checker's
/// own granularity on our side.
fn drift_margin(ttl: Duration) -> Duration {
    ttl / 20
}

/// A parsed `etcd:` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// `http://HOST:PORT`, without trailing slash.
    pub endpoints: Vec<String>,
    pub key: String,
    pub ttl: Duration,
}

impl EtcdSpec {
    /// Parses what follows `etcd:`. `pair_port` names the default key.
    pub fn parse(rest: &str, pair_port: Option<u16>) -> Result<EtcdSpec, EtcdError> {
        let bad = |why: &str| EtcdError::Spec {
            spec: format!("etcd:{rest}"),
            why: why.to_string(),
        };
        let (main, opts) = match rest.split_once('?') {
            Some((m, o)) => (m, Some(o)),
            None => (rest, None),
        };
        let mut ttl = DEFAULT_TTL;
        for kv in opts.into_iter().flat_map(|o| o.split('&')) {
            match kv.split_once('=') {
                Some(("ttl", v)) => {
                    ttl = crate::units::parse_duration(v).map_err(|e| bad(&format!("ttl: {e}")))?;
                    if ttl < Duration::from_secs(1) {
                        return Err(bad("ttl below 1 s (etcd counts leases in whole seconds)"));
                    }
                }
                _ => return Err(bad(&format!("unknown option {kv:?} (known: ttl=DURATION)"))),
            }
        }
        let mut endpoints = Vec::new();
        let mut key = None;
        let parts: Vec<&str> = main.split(',').collect();
        for (i, part) in parts.iter().enumerate() {
            let Some(after) = part.strip_prefix("http://") else {
                return Err(bad(&format!(
                    "endpoint {part:?} does not start with http:// (the gateway is plain HTTP here)"
                )));
            };
            let (hostport, path) = match after.split_once('/') {
                Some((h, p)) => (h, Some(p)),
                None => (after, None),
            };
            match hostport.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => return Err(bad(&format!("endpoint {part:?} is not http://HOST:PORT"))),
            }
            if let Some(p) = path.filter(|p| !p.is_empty()) {
                if i + 1 != parts.len() {
                    return Err(bad("only the last endpoint may carry /KEY"));
                }
                key = Some(p.to_string());
            }
            endpoints.push(format!("http://{hostport}"));
        }
        let key = match (key, pair_port) {
            (Some(k), _) => k,
            (None, Some(p)) if p > 0 => format!("castor/pair-{p}"),
            _ => return Err(bad("no /KEY, and no backup port to name the default key")),
        };
        Ok(EtcdSpec {
            endpoints,
            key,
            ttl,
        })
    }

    fn describe(&self) -> String {
        format!(
            "etcd:{}/{}?ttl={}s",
            self.endpoints.join(","),
            self.key,
            self.ttl.as_secs()
        )
    }
}

/// A won arbiter: the lease, its keepalive thread and its watch.
struct Held {
    lease: i64,
    token: FencingToken,
    watch: LeaseWatch,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `etcd:...`; see the module doc.
pub struct EtcdArbiter {
    spec: EtcdSpec,
    client: Client,
    held: Option<Held>,
    /// The holder seen by the last failed attempt, for messages.
    last_holder: Option<(i64, i64)>,
    /// A lease granted for campaigning and not yet used: (id, when its
    /// grant was sent, granted TTL). Reused by later attempts while at
    /// least half its TTL is left, so a campaign polling every few ms costs
    /// one etcd write (the transaction) per attempt, not three.
    candidate: Option<(i64, Instant, Duration)>,
}

impl EtcdArbiter {
    pub fn new(spec: EtcdSpec) -> Self {
        // A request must fail well within one renewal period so that the
        // next endpoint, or the next renewal, still has time.
        let timeout = (spec.ttl / 4).max(Duration::from_millis(100));
        let client = Client::new(spec.endpoints.clone(), timeout);
        EtcdArbiter {
            spec,
            client,
            held: None,
            last_holder: None,
            candidate: None,
        }
    }

    pub fn spec(&self) -> &EtcdSpec {
        &self.spec
    }

    /// Create revision and lease of the key's holder, as last seen by a
    /// failed attempt.
    pub fn last_holder(&self) -> Option<(i64, i64)> {
        self.last_holder
    }

    fn drop_candidate(&mut self) {
        if let Some((id, _, _)) = self.candidate.take() {
            if let Err(e) = revoke(&self.client, id) {
                tracing::warn!("etcd arbiter: revoking unused lease {id:x}: {e}");
            }
        }
    }

    fn release(&mut self) {
        self.drop_candidate();
        if let Some(mut h) = self.held.take() {
            h.stop.store(true, Ordering::SeqCst);
            h.watch.revoke();
            if let Some(t) = h.thread.take() {
                t.thread().unpark();
                let _ = t.join();
            }
            if let Err(e) = revoke(&self.client, h.lease) {
                tracing::warn!("etcd arbiter: revoking lease {:x} on release: {e}", h.lease);
            }
        }
    }
}

impl Drop for EtcdArbiter {
    fn drop(&mut self) {
        self.release();
    }
}

impl Arbiter for EtcdArbiter {
    fn try_acquire(&mut self) -> Result<Option<FencingToken>, ArbiterError> {
        if let Some(h) = &self.held {
            if !h.stop.load(Ordering::SeqCst) {
                return Ok(Some(h.token));
            }
            // Lost (the keepalive thread gave up): campaign anew, with a
            // new watch, so a holder of the old one never sees it valid
            // again.
            self.release();
        }
        let (lease, sent, ttl) = match self.candidate {
            Some((id, sent, ttl)) if sent.elapsed() < ttl / 2 => (id, sent, ttl),
            _ => {
                self.drop_candidate();
                let sent = Instant::now();
                let (id, ttl) = grant(&self.client, self.spec.ttl)?;
                (id, sent, ttl)
            }
        };
        // Until it wins, the lease is a candidate; won or failed, it is not.
        self.candidate = None;
        let value = format!("castor pid {}", std::process::id());
        let won = match campaign(&self.client, &self.spec.key, lease, &value) {
            Ok(w) => w,
            Err(e) => {
                // The put may have happened with the answer lost: revoking
                // the lease deletes the key again.
                let _ = revoke(&self.client, lease);
                return Err(e.into());
            }
        };
        let rev = match won {
            Ok(rev) => rev,
            Err(h) => {
                self.last_holder = h.map(|h| (h.create_revision, h.lease));
                self.candidate = Some((lease, sent, ttl));
                return Ok(None);
            }
        };
        let token = FencingToken(rev as u64);
        let watch = LeaseWatch::new();
        watch.extend_to(sent + ttl - drift_margin(ttl));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, key, watch, stop) = (
                self.client.clone(),
                self.spec.key.clone(),
                watch.clone(),
                stop.clone(),
            );
            let mine = Holder {
                create_revision: rev,
                lease,
            };
            std::thread::Builder::new()
                .name("castor-etcd".into())
                .spawn(move || keep_alive(client, key, mine, ttl, watch, stop))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = revoke(&self.client, lease);
                return Err(EtcdError::Spawn(e).into());
            }
        };
        self.held = Some(Held {
            lease,
            token,
            watch,
            stop,
            thread: Some(thread),
        });
        Ok(Some(token))
    }

    fn describe(&self) -> String {
        self.spec.describe()
    }

    fn lease(&self) -> Option<LeaseWatch> {
        self.held.as_ref().map(|h| h.watch.clone())
    }

    fn takeover_wait(&self) -> Duration {
        self.spec.ttl + drift_margin(self.spec.ttl)
    }

    fn heir_book(&self) -> HeirBook {
        match &self.held {
            Some(h) => HeirBook::Etcd(HeirKey {
                client: self.client.clone(),
                leader: self.spec.key.clone(),
                created: h.token.0 as i64,
                key: format!("{}/heir", self.spec.key),
            }),
            None => HeirBook::Nowhere,
        }
    }
}

/// The heir record of a won etcd arbiter: `KEY/heir`, written only while
/// KEY still has the create revision of our win (see [`crate::ha::heir`]).
#[derive(Clone)]
pub struct HeirKey {
    client: Client,
    leader: String,
    created: i64,
    key: String,
}

impl HeirKey {
    /// Puts the record; Ok(false) when KEY is no longer ours.
    pub fn put(&self, text: &str) -> Result<bool, EtcdError> {
        put_if_leader(&self.client, &self.leader, self.created, &self.key, text)
    }

    /// The record, if any.
    pub fn get(&self) -> Result<Option<String>, EtcdError> {
        get_text(&self.client, &self.key)
    }

    pub fn describe(&self) -> String {
        format!("etcd key {:?}", self.key)
    }
}

impl std::fmt::Debug for HeirKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HeirKey({:?} while {:?} was created at {})",
            self.key, self.leader, self.created
        )
    }
}

/// The `castor-etcd` thread: renews every TTL/4 (sooner after a failure),
/// publishing each renewal in `watch`; stops, revoking the watch, once
/// etcd says the lease or the key is no longer ours.
fn keep_alive(
    c: Client,
    key: String,
    mine: Holder,
    ttl: Duration,
    watch: LeaseWatch,
    stop: Arc<AtomicBool>,
) {
    let period = ttl / 4;
    // At once: a reused campaign lease may be up to TTL/2 old.
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        let sent = Instant::now();
        let lost = match keepalive(&c, mine.lease) {
            Ok(Some(t)) => {
                watch.extend_to(sent + t - drift_margin(t));
                // The lease alone is not the hold: the key must still be
                // ours (an operator may have deleted it).
                match range(&c, &key) {
                    Ok(Some(h)) if h == mine => None,
                    Ok(h) => Some(format!("key {key:?} is now {h:?}, not ours ({mine:?})")),
                    Err(e) => {
                        tracing::warn!("etcd arbiter: checking key {key:?}: {e}");
                        None
                    }
                }
            }
            Ok(None) => Some(format!("lease {:x} expired or revoked", mine.lease)),
            Err(e) => {
                eprintln!(
                    "castor: etcd arbiter: renewing lease {:x} failed ({e}); held for {} ms more",
                    mine.lease,
                    watch.remaining().as_millis()
                );
                next = Instant::now() + period / 2;
                continue;
            }
        };
        if let Some(why) = lost {
            eprintln!("castor: etcd arbiter: LOST: {why}");
            watch.revoke();
            stop.store(true, Ordering::SeqCst);
            return;
        }
        next = sent + period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s =
            EtcdSpec::parse("http://10.0.0.1:2379,http://h2:2379/pairs/db?ttl=3s", None).unwrap();
        assert_eq!(s.endpoints, ["http://10.0.0.1:2379", "http://h2:2379"]);
        assert_eq!(s.key, "pairs/db");
        assert_eq!(s.ttl, Duration::from_secs(3));
        let d = EtcdSpec::parse("http://h:2379", Some(7700)).unwrap();
        assert_eq!((d.key.as_str(), d.ttl), ("castor/pair-7700", DEFAULT_TTL));
        for bad in [
            "h:2379/k",
            "http://h/k",
            "http://h:0/k",
            "http://h:1/a,http://h:2/b",
            "http://h:1",
            "http://h:1/k?ttl=200ms",
            "http://h:1/k?tl=2s",
        ] {
            let e = EtcdSpec::parse(bad, None).unwrap_err();
            assert!(
                e.to_string().contains(bad.split('?').next().unwrap()),
                "{e}"
            );
        }
    }
}
