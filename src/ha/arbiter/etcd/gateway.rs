//! The etcd v3 JSON gateway (`/v3/...`) as the etcd arbiter uses it: a
//! small synchronous client failing over between endpoints, and the five
//! calls (lease grant, revoke, keepalive; range; the campaign transaction;
//! the heir record's conditional put and read).
//! Every request has a timeout; every field read from an answer is checked,
//! and a missing or malformed one is an error naming the call and value.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::EtcdError;

/// A small JSON-over-HTTP client for the gateway, failing over between
/// endpoints on transport errors.
#[derive(Clone)]
pub(super) struct Client {
    agent: ureq::Agent,
    endpoints: Arc<Vec<String>>,
    /// Index of the endpoint that answered last: tried first, so a dead
    /// member costs one timeout once, not on every renewal.
    preferred: Arc<std::sync::atomic::AtomicUsize>,
    timeout: Duration,
}

impl Client {
    pub(super) fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .build();
        Client {
            agent,
            endpoints: Arc::new(endpoints),
            preferred: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            timeout,
        }
    }

    /// POSTs `body` to `path` on the first endpoint that answers. An HTTP
    /// error status from etcd is an answer (it is definitive); only a
    /// transport failure moves on to the next endpoint.
    pub(super) fn call(
        &self,
        call: &'static str,
        path: &str,
        body: &Value,
    ) -> Result<Value, EtcdError> {
        let mut tried = Vec::new();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        for i in (0..n).map(|k| (first + k) % n) {
            let ep = &self.endpoints[i];
            let url = format!("{ep}{path}");
            let r = self
                .agent
                .post(&url)
                .timeout(self.timeout)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string());
            let (status, resp) = match r {
                Ok(resp) => (200, resp),
                Err(ureq::Error::Status(code, resp)) => (code, resp),
                Err(ureq::Error::Transport(t)) => {
                    tried.push(format!("{ep}: {t}"));
                    continue;
                }
            };
            let text = resp.into_string().map_err(|e| EtcdError::Json {
                call,
                endpoint: ep.clone(),
                why: format!("reading the body: {e}"),
                body: String::new(),
            })?;
            // Streaming calls (keepalive) answer one JSON object per line.
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let v: Value = serde_json::from_str(first).map_err(|e| EtcdError::Json {
                call,
                endpoint: ep.clone(),
                why: e.to_string(),
                body: text.chars().take(200).collect(),
            })?;
            // Errors come as {"error": "...", "code": N} (unary) or
            // {"error": {"grpc_code": N, "message": "..."}} (streams).
            if let Some(e) = v.get("error") {
                let (code, message) = match e {
                    Value::String(s) => (
                        v.get("code").map_or(String::new(), |c| c.to_string()),
                        s.clone(),
                    ),
                    other => (
                        other
                            .get("grpc_code")
                            .map_or(String::new(), |c| c.to_string()),
                        other
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    ),
                };
                // gRPC UNAVAILABLE (14): this member cannot serve now (no
                // leader, shutting down); another member may.
                if code == "14" {
                    tried.push(format!("{ep}: unavailable: {message}"));
                    continue;
                }
                return Err(EtcdError::Status {
                    call,
                    endpoint: ep.clone(),
                    code: format!("HTTP {status}, grpc code {code}"),
                    message,
                });
            }
            if status == 503 {
                tried.push(format!("{ep}: HTTP 503"));
                continue;
            }
            if status != 200 {
                return Err(EtcdError::Status {
                    call,
                    endpoint: ep.clone(),
                    code: format!("HTTP {status}"),
                    message: text.chars().take(200).collect(),
                });
            }
            self.preferred.store(i, Ordering::Relaxed);
            return Ok(v);
        }
        Err(EtcdError::Unreachable {
            call,
            tried: tried.join("; "),
        })
    }
}

/// An int64 field as the gateway writes it: a decimal string (proto3 JSON),
/// absent when zero.
pub(super) fn int(call: &'static str, v: &Value, field: &'static str) -> Result<i64, EtcdError> {
    let bad = |value: String| EtcdError::Field {
        call,
        field,
        value,
        expected: "an int64 (decimal string)",
    };
    match v.get(field) {
        None => Ok(0),
        Some(Value::String(s)) => s.parse::<i64>().map_err(|_| bad(format!("{s:?}"))),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| bad(n.to_string())),
        Some(other) => Err(bad(other.to_string())),
    }
}

/// Every answer carries a header with the store's revision (≥ 1: the
/// empty store is at revision 1).
pub(super) fn header_revision(call: &'static str, v: &Value) -> Result<i64, EtcdError> {
    let h = v.get("header").ok_or_else(|| EtcdError::Field {
        call,
        field: "header",
        value: "missing".into(),
        expected: "an object",
    })?;
    let rev = int(call, h, "revision")?;
    if rev < 1 {
        return Err(EtcdError::Field {
            call,
            field: "header.revision",
            value: rev.to_string(),
            expected: "≥ 1",
        });
    }
    Ok(rev)
}

pub(super) fn positive(call: &'static str, field: &'static str, n: i64) -> Result<i64, EtcdError> {
    if n > 0 {
        Ok(n)
    } else {
        Err(EtcdError::Field {
            call,
            field,
            value: n.to_string(),
            expected: "> 0",
        })
    }
}

/// The key's holder as read back: create revision and lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holder {
    pub(super) create_revision: i64,
    pub(super) lease: i64,
}

/// The one kv of a single-key range answer, if any.
pub(super) fn holder(call: &'static str, range: &Value) -> Result<Option<Holder>, EtcdError> {
    let kvs = match range.get("kvs") {
        None => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(EtcdError::Field {
                call,
                field: "kvs",
                value: other.to_string(),
                expected: "an array",
            })
        }
    };
    match kvs.as_slice() {
        [] => Ok(None),
        [kv] => Ok(Some(Holder {
            create_revision: positive(
                call,
                "kvs[0].create_revision",
                int(call, kv, "create_revision")?,
            )?,
            lease: int(call, kv, "lease")?,
        })),
        more => Err(EtcdError::Field {
            call,
            field: "kvs",
            value: format!("{} entries", more.len()),
            expected: "at most one (a single-key range)",
        }),
    }
}

pub(super) fn grant(c: &Client, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
    const CALL: &str = "lease/grant";
    let v = c.call(
        CALL,
        "/v3/lease/grant",
        &json!({ "TTL": ttl.as_secs().to_string() }),
    )?;
    header_revision(CALL, &v)?;
    let id = positive(CALL, "ID", int(CALL, &v, "ID")?)?;
    let granted = positive(CALL, "TTL", int(CALL, &v, "TTL")?)?;
    Ok((id, Duration::from_secs(granted as u64)))
}

pub(super) fn revoke(c: &Client, id: i64) -> Result<(), EtcdError> {
    const CALL: &str = "lease/revoke";
    let v = c.call(CALL, "/v3/lease/revoke", &json!({ "ID": id.to_string() }))?;
    header_revision(CALL, &v)?;
    Ok(())
}

/// Renews lease `id`; the TTL it now has, or None when etcd no longer
/// knows it (expired or revoked).
pub(super) fn keepalive(c: &Client, id: i64) -> Result<Option<Duration>, EtcdError> {
    const CALL: &str = "lease/keepalive";
    let v = c.call(
        CALL,
        "/v3/lease/keepalive",
        &json!({ "ID": id.to_string() }),
    )?;
    let r = v.get("result").ok_or_else(|| EtcdError::Field {
        call: CALL,
        field: "result",
        value: "missing".into(),
        expected: "an object",
    })?;
    header_revision(CALL, r)?;
    let got = int(CALL, r, "ID")?;
    if got != id {
        return Err(EtcdError::Field {
            call: CALL,
            field: "result.ID",
            value: got.to_string(),
            expected: "the lease renewed",
        });
    }
    match int(CALL, r, "TTL")? {
        t if t > 0 => Ok(Some(Duration::from_secs(t as u64))),
        // Absent (0): etcd does not know the lease any more.
        _ => Ok(None),
    }
}

pub(super) fn range(c: &Client, key: &str) -> Result<Option<Holder>, EtcdError> {
    const CALL: &str = "kv/range";
    let v = c.call(CALL, "/v3/kv/range", &json!({ "key": B64.encode(key) }))?;
    header_revision(CALL, &v)?;
    holder(CALL, &v)
}

/// The campaign transaction. Ok(Ok(token)): created KEY bound to `lease`;
/// Ok(Err(holder)): KEY exists, held by `holder`.
pub(super) fn campaign(
    c: &Client,
    key: &str,
    lease: i64,
    value: &str,
) -> Result<Result<i64, Option<Holder>>, EtcdError> {
    const CALL: &str = "kv/txn";
    let k = B64.encode(key);
    let body = json!({
        "compare": [{ "key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
        "success": [{ "request_put": { "key": k, "value": B64.encode(value), "lease": lease.to_string() } }],
        "failure": [{ "request_range": { "key": k } }],
    });
    let v = c.call(CALL, "/v3/kv/txn", &body)?;
    let rev = header_revision(CALL, &v)?;
    let succeeded = match v.get("succeeded") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(EtcdError::Field {
                call: CALL,
                field: "succeeded",
                value: other.to_string(),
                expected: "a boolean",
            })
        }
    };
    let first = v
        .get("responses")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .ok_or_else(|| EtcdError::Field {
            call: CALL,
            field: "responses",
            value: v
                .get("responses")
                .map_or("missing".into(), |r| r.to_string()),
            expected: "one response",
        })?;
    if succeeded {
        let put = first.get("response_put").ok_or_else(|| EtcdError::Field {
            call: CALL,
            field: "responses[0].response_put",
            value: first.to_string(),
            expected: "the put's answer",
        })?;
        let put_rev = header_revision(CALL, put)?;
        if put_rev != rev {
            return Err(EtcdError::Field {
                call: CALL,
                field: "responses[0].response_put.header.revision",
                value: put_rev.to_string(),
                expected: "the transaction's revision",
            });
        }
        // The put created the key (create_revision was 0), so the txn's
        // revision is the key's create revision.
        Ok(Ok(rev))
    } else {
        let r = first
            .get("response_range")
            .ok_or_else(|| EtcdError::Field {
                call: CALL,
                field: "responses[0].response_range",
                value: first.to_string(),
                expected: "the range's answer",
            })?;
        Ok(Err(holder(CALL, r)?))
    }
}

/// Puts `key = value` if `leader` still has create revision `created`
/// (this copy still holds the arbiter). Ok(false): it does not.
pub(super) fn put_if_leader(
    c: &Client,
    leader: &str,
    created: i64,
    key: &str,
    value: &str,
) -> Result<bool, EtcdError> {
    const CALL: &str = "kv/txn (heir)";
    let l = B64.encode(leader);
    let body = json!({
        "compare": [{ "key": l, "result": "EQUAL", "target": "CREATE", "create_revision": created.to_string() }],
        "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value) } }],
    });
    let v = c.call(CALL, "/v3/kv/txn", &body)?;
    header_revision(CALL, &v)?;
    match v.get("succeeded") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(EtcdError::Field {
            call: CALL,
            field: "succeeded",
            value: other.to_string(),
            expected: "a boolean",
        }),
    }
}

/// The value of `key` as UTF-8 text, if the key exists.
pub(super) fn get_text(c: &Client, key: &str) -> Result<Option<String>, EtcdError> {
    const CALL: &str = "kv/range (heir)";
    let v = c.call(CALL, "/v3/kv/range", &json!({ "key": B64.encode(key) }))?;
    header_revision(CALL, &v)?;
    let Some(kv) = v
        .get("kvs")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    else {
        return Ok(None);
    };
    let field = |value: String| EtcdError::Field {
        call: CALL,
        field: "kvs[0].value",
        value,
        expected: "base64 of UTF-8 text",
    };
    // An empty value is omitted from the JSON answer.
    let b64 = match kv.get("value") {
        None => return Ok(Some(String::new())),
        Some(Value::String(s)) => s,
        Some(other) => return Err(field(other.to_string())),
    };
    let bytes = B64.decode(b64).map_err(|_| field(b64.clone()))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| field(b64.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked() {
        let v = json!({"a": "12", "b": 7, "c": "x", "d": true});
        assert_eq!(int("t", &v, "a").unwrap(), 12);
        assert_eq!(int("t", &v, "b").unwrap(), 7);
        assert_eq!(int("t", &v, "missing").unwrap(), 0, "proto3 omits zeros");
        let e = int("t", &v, "c").unwrap_err().to_string();
        assert!(e.contains("field c is \"x\""), "{e}");
        assert!(int("t", &v, "d").is_err());
        assert!(header_revision("t", &json!({})).is_err());
        assert!(header_revision("t", &json!({"header": {"revision": "0"}})).is_err());
        assert_eq!(
            header_revision("t", &json!({"header": {"revision": "5"}})).unwrap(),
            5
        );
        let two = json!({"kvs": [{"create_revision": "2"}, {"create_revision": "3"}]});
        assert!(holder("t", &two).is_err());
        let zero = json!({"kvs": [{"create_revision": "0"}]});
        assert!(holder("t", &zero).is_err());
        let one = json!({"kvs": [{"create_revision": "4", "lease": "9"}]});
        assert_eq!(
            holder("t", &one).unwrap(),
            Some(Holder {
                create_revision: 4,
                lease: 9
            })
        );
    }

    #[test]
    fn unreachable_endpoints_are_named() {
        // Port 9 (discard) on loopback: nothing listens, connect fails fast.
        let c = Client::new(
            vec!["http://127.0.0.1:9".into()],
            Duration::from_millis(200),
        );
        let e = grant(&c, super::super::DEFAULT_TTL)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lease/grant") && e.contains("127.0.0.1:9"),
            "{e}"
        );
    }
}
