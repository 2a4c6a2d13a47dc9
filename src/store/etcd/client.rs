//! A blocking client of etcd's v3 API through its JSON gateway (`/v3/...`).
//!
//! Why the gateway and a blocking HTTP client (ureq) rather than gRPC: the
//! library stays a C library with no async runtime on the caller's threads;
//! every request is one HTTP POST the calling thread makes itself, bounded
//! by its deadline; watches are a streamed response read on the calling
//! thread. Keys and values travel base64-encoded, as the gateway wants.
//!
//! Endpoints are a list: a request goes to the endpoint that answered last,
//! and on a connection failure or an "unavailable" answer (a member down, a
//! leader change) moves on to the next, with backoff, until its deadline.
//!
//! Which requests are sent again is etcd's own client's rule
//! ([`Resend`]): a read, or a write whose comparisons make any second
//! application fail, whenever its outcome is unknown; any other write only
//! when it certainly never reached a member. A member that stops (paused,
//! cut off) may still hold a request and apply it when it comes back,
//! after the caller gave up on it and wrote again: only a comparison in the
//! request itself can stop that late application.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value as Json};

use crate::error::{Error, Result, Status};

/// gRPC status codes etcd answers with that mean "try again, maybe on
/// another member": unavailable (a member down, no leader, a leader change),
/// deadline exceeded inside etcd, aborted.
const RETRIABLE_GRPC_CODES: [i64; 3] = [14, 4, 10];

/// Idle HTTP connections kept per member.
const MAX_IDLE_CONNECTIONS: usize = 64;

/// The longest pause between two attempts at one request.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Whether a request may be sent again when its outcome is unknown (no
/// answer: the member may have applied it, or may still apply it later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// A read, or a write whose comparisons fail once it, or any later
    /// write to what it compares, has been applied: sent again, to the
    /// next member, until answered or the deadline.
    Safe,
    /// A write that could be applied twice, or after a later one: sent
    /// again only when it certainly did not reach a member (the connection
    /// was refused or never made); an unknown outcome is the caller's
    /// error, saying so.
    IfUnsent,
}

/// A key-value pair as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// The answer to a range request: the pairs (or only their count) and the
/// store's revision when it was read.
#[derive(Debug, Clone)]
pub(crate) struct Range {
    pub kvs: Vec<Kv>,
    pub count: i64,
    pub revision: i64,
}

/// What a read returns: only what the caller uses travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// The pairs, values included.
    Values,
    /// The pairs without their values.
    Keys,
    /// Only how many pairs there are.
    Count,
}

/// A request inside a transaction.
#[derive(Clone)]
pub(crate) enum Op {
    /// Sets a key, attached to the lease `lease` (0: none; a key written
    /// again without one is no longer attached).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Reads a key (or the keys with the prefix `key`).
    Range {
        key: Vec<u8>,
        prefix: bool,
        read: Read,
    },
    /// Deletes a key.
    Delete { key: Vec<u8> },
    /// Deletes every key starting with `prefix`.
    DeleteUnder { prefix: Vec<u8> },
}

/// A condition of a transaction.
#[derive(Clone)]
pub(crate) enum Compare {
    /// The key was last modified at this revision (0: the key is missing).
    ModRevision { key: Vec<u8>, revision: i64 },
    /// The key was created at this revision.
    CreateRevision { key: Vec<u8>, revision: i64 },
    /// No key starts with `prefix` (etcd compares every key of the range,
    /// and an empty range as one missing key).
    NoneUnder { prefix: Vec<u8> },
}

/// How a watch ended.
#[derive(Debug)]
pub(crate) enum Watched {
    /// A pair was written in one of the ranges.
    Put(Kv),
    /// etcd canceled the watch (its start revision was compacted away):
    /// read again, and watch from the new revision.
    Canceled,
    /// The deadline passed first.
    Deadline,
}

/// Why [`Client::watch`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchEnd {
    /// The handler asked to stop.
    Stopped,
    /// etcd canceled the watch (its start revision was compacted away):
    /// writes may have been missed.
    Canceled,
    /// The deadline passed.
    Deadline,
}

/// The outcome of a transaction: whether its comparisons held, and the
/// answer of each range it ran.
pub(crate) struct TxnResult {
    pub succeeded: bool,
    pub ranges: Vec<Range>,
    /// The store's revision after the transaction (its own, if it wrote).
    pub revision: i64,
}

/// A change a watch reports.
#[derive(Debug)]
pub(crate) struct Event {
    /// The key was deleted (`kv` holds only its key and the revision).
    pub deleted: bool,
    pub kv: Kv,
}

/// A connection to an etcd cluster (any number of members).
pub(crate) struct Client {
    endpoints: Vec<String>,
    current: AtomicUsize,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the members at `endpoints` ("host:port" or full URLs).
    pub(crate) fn new(endpoints: &[String]) -> Result<Client> {
        if endpoints.is_empty() {
            return Err(Error::invalid_argument(
                "an etcd store needs at least one endpoint",
            ));
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| {
                let e = e.trim_end_matches('/');
                if e.starts_with("http://") || e.starts_with("https://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        // Connections kept for reuse: one per thread that may use this
        // client at once (a server's workers), per member.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections_per_host(MAX_IDLE_CONNECTIONS)
            .max_idle_connections(MAX_IDLE_CONNECTIONS * endpoints.len())
            .build()
            .into();
        Ok(Client {
            endpoints,
            current: AtomicUsize::new(0),
            agent,
        })
    }

    /// The members' URLs.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Reads `key` (or every key with the prefix `key`).
    pub(crate) fn range(
        &self,
        key: &[u8],
        prefix: bool,
        read: Read,
        deadline: Instant,
    ) -> Result<Range> {
        let request = read_request(key, prefix, read);
        parse_range(&self.post("/v3/kv/range", &request, Resend::Safe, deadline)?)
    }

    /// The oldest pair with the prefix `key` (by creation), if any.
    pub(crate) fn first_created(&self, prefix: &[u8], deadline: Instant) -> Result<Range> {
        let mut request = range_request(prefix, true);
        request["limit"] = json!(1);
        request["sort_order"] = json!("ASCEND");
        request["sort_target"] = json!("CREATE");
        parse_range(&self.post("/v3/kv/range", &request, Resend::Safe, deadline)?)
    }

    /// Deletes every key with the prefix `prefix`, unguarded (sent again
    /// only if it never reached a member); returns how many keys went.
    pub(crate) fn delete_prefix(&self, prefix: &[u8], deadline: Instant) -> Result<i64> {
        let request = range_request(prefix, true);
        let reply = self.post("/v3/kv/deleterange", &request, Resend::IfUnsent, deadline)?;
        Ok(int_field(&reply, "deleted"))
    }

    /// Runs `success` if every comparison holds, else `failure`, atomically;
    /// `resend`: whether an unanswered attempt may be made again (only
    /// reads, and writes whose comparisons guard them, are [`Resend::Safe`]).
    pub(crate) fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
        resend: Resend,
        deadline: Instant,
    ) -> Result<TxnResult> {
        let request = json!({
            "compare": compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let reply = self.post("/v3/kv/txn", &request, resend, deadline)?;
        let succeeded = reply["succeeded"].as_bool().unwrap_or(false);
        let ranges = reply["responses"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r.get("response_range"))
                    .map(parse_range)
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(TxnResult {
            succeeded,
            ranges,
            revision: int_field(&reply["header"], "revision"),
        })
    }

    /// Grants the lease `id` (chosen by the caller, so that granting again
    /// is harmless: sent again whenever its outcome is unknown) for `ttl`
    /// seconds (etcd raises a shorter one to its minimum); a lease `id`
    /// that exists already counts as granted.
    pub(crate) fn lease_grant(&self, id: i64, ttl: i64, deadline: Instant) -> Result<()> {
        let request = json!({"ID": id.to_string(), "TTL": ttl.to_string()});
        match self.post("/v3/lease/grant", &request, Resend::Safe, deadline) {
            Err(e) if e.message().contains("lease already exists") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Revokes the lease `id`, deleting every key attached to it; a lease
    /// that is gone already (revoked, expired) is no error. Safe to send
    /// again.
    pub(crate) fn lease_revoke(&self, id: i64, deadline: Instant) -> Result<()> {
        let request = json!({"ID": id.to_string()});
        match self.post("/v3/lease/revoke", &request, Resend::Safe, deadline) {
            Err(e) if e.message().contains("lease not found") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Renews the leases `ids` (one request for all: the gateway's
    /// keep-alive stream takes one message per lease) by `deadline`, each
    /// member given at most `per_member` (a silent one must not take a
    /// renewal's whole time); returns the ones etcd no longer has (expired
    /// or revoked). Safe to send again.
    pub(crate) fn lease_keep_alive(
        &self,
        ids: &[i64],
        deadline: Instant,
        per_member: Duration,
    ) -> Result<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let body: String = ids
            .iter()
            .map(|id| json!({"ID": id.to_string()}).to_string() + "\n")
            .collect();
        let path = "/v3/lease/keepalive";
        let reply = self.post_raw(path, &body, Resend::Safe, deadline, Some(per_member))?;
        let mut gone = Vec::new();
        let mut answered = 0;
        for line in reply.lines().filter(|l| !l.trim().is_empty()) {
            let json: Json = serde_json::from_str(line)
                .map_err(|e| protocol_error(format!("etcd lease keep-alive: {e}")))?;
            if json.get("error").is_some() {
                return Err(grpc_error(&json["error"]));
            }
            let result = &json["result"];
            answered += 1;
            if int_field(result, "TTL") <= 0 {
                gone.push(int_field(result, "ID"));
            }
        }
        if answered != ids.len() {
            return Err(protocol_error(format!(
                "etcd answered {answered} of {} lease keep-alives",
                ids.len()
            )));
        }
        Ok(gone)
    }

    /// Watches the ranges `(key, prefix)` from `start_revision` on, until
    /// a pair is written (put) in any of them, or the deadline.
    pub(crate) fn watch_first_put(
        &self,
        ranges: &[(Vec<u8>, bool)],
        start_revision: i64,
        deadline: Instant,
    ) -> Result<Watched> {
        let mut first = None;
        let end = self.watch(ranges, start_revision, false, deadline, |events| {
            first = events.into_iter().next().map(|event| event.kv);
            first.is_none()
        })?;
        Ok(match (first, end) {
            (Some(kv), _) => Watched::Put(kv),
            (None, WatchEnd::Canceled) => Watched::Canceled,
            (None, _) => Watched::Deadline,
        })
    }

    /// Watches the ranges `(key, prefix)` from `start_revision` on, handing
    /// the changes (puts, and deletes if `deletes`) to `on_events`, in
    /// revision order and a message at a time (etcd never splits one
    /// revision's changes between messages, so a transaction's writes come
    /// together), until it answers false, etcd cancels the watch, or the
    /// deadline. A stream that breaks (a member went away) is watched
    /// again, elsewhere if need be, from the revision after the last change
    /// handed over.
    pub(crate) fn watch(
        &self,
        ranges: &[(Vec<u8>, bool)],
        start_revision: i64,
        deletes: bool,
        deadline: Instant,
        mut on_events: impl FnMut(Vec<Event>) -> bool,
    ) -> Result<WatchEnd> {
        let mut next_revision = start_revision;
        let mut backoff = Duration::from_millis(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(WatchEnd::Deadline);
            }
            let body: String = ranges
                .iter()
                .map(|(key, prefix)| {
                    let mut create = range_request(key, *prefix);
                    create["start_revision"] = json!(next_revision);
                    if !deletes {
                        create["filters"] = json!(["NODELETE"]);
                    }
                    json!({ "create_request": create }).to_string() + "\n"
                })
                .collect();
            let endpoint = self.endpoint();
            let sent = self.send(
                &format!("{endpoint}/v3/watch"),
                &body,
                remaining,
                Exchange::Stream,
            );
            let response = match sent {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    self.next_endpoint(&endpoint);
                    log::debug!("etcd watch on {endpoint}: HTTP {}", r.status());
                    pause(&mut backoff, deadline);
                    continue;
                }
                // No answer to a watch (whose head etcd sends at once)
                // within the slice: the member is silent; the next slice
                // asks another.
                Err(e) if is_timeout(&e) => {
                    self.next_endpoint(&endpoint);
                    return Ok(WatchEnd::Deadline);
                }
                Err(e) => {
                    log::debug!("etcd watch on {endpoint}: {e}");
                    self.next_endpoint(&endpoint);
                    pause(&mut backoff, deadline);
                    continue;
                }
            };
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let line = match line {
                    Ok(line) => line,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Ok(WatchEnd::Deadline)
                    }
                    Err(e) => {
                        log::debug!("etcd watch stream from {endpoint}: {e}");
                        break;
                    }
                };
                let message: Json = serde_json::from_str(&line)
                    .map_err(|e| protocol_error(format!("etcd watch: {e}")))?;
                if let Some(error) = message.get("error") {
                    return Err(grpc_error(error));
                }
                let result = &message["result"];
                if result["canceled"].as_bool() == Some(true) {
                    log::debug!("etcd canceled a watch: {}", result["cancel_reason"]);
                    return Ok(WatchEnd::Canceled);
                }
                let events = result["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|event| {
                        let kv = parse_kv(&event["kv"])?;
                        next_revision = next_revision.max(kv.mod_revision + 1);
                        let deleted = event["type"].as_str() == Some("DELETE");
                        Ok(Event { deleted, kv })
                    })
                    .collect::<Result<Vec<_>>>()?;
                if !events.is_empty() && !on_events(events) {
                    return Ok(WatchEnd::Stopped);
                }
            }
            // The stream ended (the member went away): watch again,
            // elsewhere if need be.
            self.next_endpoint(&endpoint);
            pause(&mut backoff, deadline);
        }
    }

    /// One POST of a JSON `body` to `url`, bounded by `timeout`; a member
    /// that does not connect or answer within [`MEMBER_SILENCE`] fails it
    /// sooner. `Exchange::Unary`: so does one that stalls for that long
    /// while the request is written or its answer read (a watch's stream
    /// is silent for as long as nothing changes, so that is not bounded).
    fn send(
        &self,
        url: &str,
        body: &str,
        timeout: Duration,
        exchange: Exchange,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let silence = Some(timeout.min(MEMBER_SILENCE));
        let config = self
            .agent
            .post(url)
            .config()
            .timeout_global(Some(timeout))
            .timeout_connect(silence)
            .timeout_recv_response(silence);
        let config = match exchange {
            Exchange::Unary => config.timeout_per_write(silence).timeout_per_read(silence),
            Exchange::Stream => config,
        };
        config
            .build()
            .content_type("application/json")
            .send(body.as_bytes())
    }

    /// POSTs `request` to `path`, retrying on another member when one is
    /// unreachable or unavailable, as `resend` allows, until `deadline`.
    fn post(&self, path: &str, request: &Json, resend: Resend, deadline: Instant) -> Result<Json> {
        let reply = self.post_raw(path, &request.to_string(), resend, deadline, None)?;
        serde_json::from_str(&reply)
            .map_err(|e| protocol_error(format!("etcd {path}: an answer that is not JSON: {e}")))
    }

    /// POSTs `body` to `path` as [`Client::post`] does, each attempt
    /// given at most `per_attempt` (None: what remains); the answer's text.
    fn post_raw(
        &self,
        path: &str,
        body: &str,
        resend: Resend,
        deadline: Instant,
        per_attempt: Option<Duration>,
    ) -> Result<String> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = per_attempt.map_or(remaining, |cap| cap.min(remaining));
            let endpoint = self.endpoint();
            let failure = match self.post_once(&endpoint, path, body, attempt) {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => return Err(e),
                Err(Failed { error, sent }) if sent && resend == Resend::IfUnsent => {
                    self.next_endpoint(&endpoint);
                    return Err(Error::new(
                        error.status(),
                        format!(
                            "{}; the request may or may not have been applied (not sent again: \
                             it is not safe to apply twice)",
                            error.message()
                        ),
                    ));
                }
                Err(Failed { error, .. }) => error,
            };
            // The next attempt, this request's or the next one's, goes
            // elsewhere: a member that hangs is not asked again and again.
            self.next_endpoint(&endpoint);
            if Instant::now() + backoff >= deadline {
                return Err(failure);
            }
            log::debug!(
                "etcd {path} on {endpoint}: {}; trying again",
                failure.message()
            );
            pause(&mut backoff, deadline);
        }
    }

    /// One attempt: `Ok(answer)` when the member answered (with the
    /// request's outcome, an error included: the answer's text when it is
    /// no error), `Err` when another attempt may succeed.
    fn post_once(
        &self,
        endpoint: &str,
        path: &str,
        body: &str,
        remaining: Duration,
    ) -> std::result::Result<Result<String>, Failed> {
        if remaining.is_zero() {
            return Ok(Err(Error::timeout(format!(
                "etcd {path}: no member answered before the deadline"
            ))));
        }
        let sent = self.send(
            &format!("{endpoint}{path}"),
            body,
            remaining,
            Exchange::Unary,
        );
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                let message = format!("etcd {path} on {endpoint}: {e}");
                return Err(Failed {
                    sent: !never_connected(&e),
                    error: match is_timeout(&e) {
                        true => Error::timeout(message),
                        false => Error::network(message),
                    },
                });
            }
        };
        let status = response.status();
        let text = match response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_LEN)
            .read_to_string()
        {
            Ok(text) => text,
            // The member went silent mid-answer: its outcome is unknown.
            Err(e) if is_timeout(&e) => {
                return Err(Failed::sent(Error::timeout(format!(
                    "etcd {path} on {endpoint}: {e}"
                ))))
            }
            Err(e) if status.is_server_error() => {
                return Err(Failed::sent(Error::network(format!(
                    "etcd {path} on {endpoint}: HTTP {status}: {e}"
                ))))
            }
            Err(e) => {
                return Ok(Err(protocol_error(format!(
                    "etcd {path} on {endpoint}: HTTP {status}: {e}"
                ))))
            }
        };
        // An error is one JSON object with a code and a message (a
        // stream's answer is one object per line: its first tells).
        let first_line = text.lines().next().unwrap_or_default();
        let reply: Json = match serde_json::from_str(first_line) {
            Ok(reply) => reply,
            Err(_) if status.is_server_error() => {
                return Err(Failed::sent(Error::network(format!(
                    "etcd {path} on {endpoint}: HTTP {status}"
                ))))
            }
            Err(e) => {
                return Ok(Err(protocol_error(format!(
                    "etcd {path} on {endpoint}: HTTP {status}: {e}"
                ))))
            }
        };
        if reply.get("code").is_some() && reply.get("error").is_some() || !status.is_success() {
            let code = reply["code"].as_i64().unwrap_or(-1);
            if RETRIABLE_GRPC_CODES.contains(&code) || status.is_server_error() && code < 0 {
                return Err(Failed::sent(Error::network(format!(
                    "etcd {path} on {endpoint}: {}",
                    reply["message"].as_str().unwrap_or("unavailable")
                ))));
            }
            return Ok(Err(grpc_error(&reply)));
        }
        Ok(Ok(text))
    }

    /// The member the next request goes to.
    pub(super) fn endpoint(&self) -> String {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        self.endpoints[i].clone()
    }

    /// Moves on from `failed` (unless another thread already did).
    fn next_endpoint(&self, failed: &str) {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        if self.endpoints[i] == failed {
            let _ = self.current.compare_exchange(
                i,
                (i + 1) % self.endpoints.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// What a request's answer is: one reply, or a watch's stream.
#[derive(Clone, Copy)]
enum Exchange {
    Unary,
    Stream,
}

/// An attempt that got no answer another attempt could not change.
struct Failed {
    error: Error,
    /// The request may have reached the member (its outcome is unknown).
    sent: bool,
}

impl Failed {
    fn sent(error: Error) -> Failed {
        Failed { error, sent: true }
    }
}

/// Whether `e` says the request never left: no connection was made.
fn never_connected(e: &ureq::Error) -> bool {
    use ureq::Timeout;
    match e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed | ureq::Error::BadUri(_) => true,
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
        ),
        _ => false,
    }
}

/// The largest reply read (a range of many keys): 256 MiB.
const MAX_REPLY_LEN: u64 = 256 << 20;

fn pause(backoff: &mut Duration, deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep((*backoff).min(remaining));
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

/// How long a member may take to accept a connection, and then to answer
/// a request's headers, before another member is tried: a member that is
/// frozen or cut off (no reset comes back) is left within this time.
const MEMBER_SILENCE: Duration = Duration::from_secs(5);

fn is_timeout(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Timeout(_))
        || matches!(e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// The end of the range of every key starting with `prefix` (etcd's
/// `range_end` for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn range_request(key: &[u8], prefix: bool) -> Json {
    let mut request = json!({"key": BASE64.encode(key)});
    if prefix {
        request["range_end"] = json!(BASE64.encode(prefix_end(key)));
    }
    request
}

fn read_request(key: &[u8], prefix: bool, read: Read) -> Json {
    let mut request = range_request(key, prefix);
    match read {
        Read::Values => {}
        Read::Keys => request["keys_only"] = json!(true),
        Read::Count => request["count_only"] = json!(true),
    }
    request
}

fn op_json(op: &Op) -> Json {
    match op {
        Op::Put { key, value, lease } => {
            let mut put = json!({"key": BASE64.encode(key), "value": BASE64.encode(value)});
            if *lease != 0 {
                put["lease"] = json!(lease.to_string());
            }
            json!({ "request_put": put })
        }
        Op::Range { key, prefix, read } => {
            json!({ "request_range": read_request(key, *prefix, *read) })
        }
        Op::Delete { key } => json!({"request_delete_range": {"key": BASE64.encode(key)}}),
        Op::DeleteUnder { prefix } => {
            json!({ "request_delete_range": range_request(prefix, true) })
        }
    }
}

fn compare_json(compare: &Compare) -> Json {
    match compare {
        Compare::ModRevision { key, revision } => json!({
            "key": BASE64.encode(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": revision.to_string(),
        }),
        Compare::CreateRevision { key, revision } => json!({
            "key": BASE64.encode(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision.to_string(),
        }),
        Compare::NoneUnder { prefix } => json!({
            "key": BASE64.encode(prefix), "range_end": BASE64.encode(prefix_end(prefix)),
            "target": "CREATE", "result": "EQUAL", "create_revision": "0",
        }),
    }
}

/// An int64 field, which the gateway writes as a string (absent when 0).
fn int_field(json: &Json, name: &str) -> i64 {
    match &json[name] {
        Json::String(s) => s.parse().unwrap_or(0),
        Json::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes_field(json: &Json, name: &str) -> Result<Vec<u8>> {
    match json[name].as_str() {
        None => Ok(Vec::new()),
        Some(s) => BASE64
            .decode(s)
            .map_err(|e| protocol_error(format!("etcd sent {name} that is not base64: {e}"))),
    }
}

fn parse_kv(json: &Json) -> Result<Kv> {
    Ok(Kv {
        key: bytes_field(json, "key")?,
        value: bytes_field(json, "value")?,
        create_revision: int_field(json, "create_revision"),
        mod_revision: int_field(json, "mod_revision"),
    })
}

fn parse_range(json: &Json) -> Result<Range> {
    let kvs = json["kvs"]
        .as_array()
        .map(|kvs| kvs.iter().map(parse_kv).collect::<Result<Vec<_>>>())
        .transpose()?
        .unwrap_or_default();
    Ok(Range {
        count: int_field(json, "count"),
        revision: int_field(&json["header"], "revision"),
        kvs,
    })
}

/// An error etcd answered with, as a distcore error.
fn grpc_error(json: &Json) -> Error {
    let message = json["message"]
        .as_str()
        .or_else(|| json["error"].as_str())
        .unwrap_or("unknown error");
    match json["code"].as_i64() {
        // invalid argument, out of range, failed precondition, resource
        // exhausted (e.g. "request is too large")
        Some(3 | 11 | 9 | 8) => Error::invalid_argument(format!("etcd: {message}")),
        Some(4) => Error::timeout(format!("etcd: {message}")),
        _ => Error::new(Status::Remote, format!("etcd: {message}")),
    }
}

fn protocol_error(message: String) -> Error {
    Error::new(Status::Protocol, message)
}
