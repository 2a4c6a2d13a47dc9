//! The RPC agent's requests awaiting their responses, socket-free: each
//! by id, with the connection it went out on and its deadline, expired
//! with `now` passed in; and the workers lost, whose connection failed.
//! The agent keeps one table under a lock, shared by the threads that
//! send and the I/O thread; whoever takes a request out completes its
//! promise, after letting go of the lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::agent::WorkerInfo;
use super::handshake::Failure;
use super::message::WorkerId;
use crate::error::{Error, Status};
use crate::work::Promise;

/// A request awaiting its response.
pub(crate) struct PendingRequest {
    /// Completes the caller's work.
    pub(crate) promise: Promise,
    /// The connection it went out on (the event loop's token).
    pub(crate) conn: usize,
    /// How long it may wait (zero: forever).
    pub(crate) timeout: Duration,
}

impl PendingRequest {
    /// The error of a request that ran out of time (PyTorch's wording).
    pub(crate) fn timed_out(&self) -> Error {
        Error::timeout(format!(
            "RPC ran for more than set timeout ({} ms) and will now be marked with an error",
            self.timeout.as_millis()
        ))
    }
}

/// What a closed connection takes with it.
pub(crate) struct Closed {
    /// The requests that went out on it.
    pub(crate) requests: Vec<PendingRequest>,
    /// What they fail with.
    pub(crate) error: Error,
    /// The worker at the other end is lost: `error` is also what every
    /// later request to it fails with.
    pub(crate) lost: bool,
}

/// The requests awaiting their responses, when the I/O thread will next
/// wake up to expire them, and the workers lost.
#[derive(Default)]
pub(crate) struct Pending {
    requests: HashMap<u64, PendingRequest>,
    /// (deadline, request id), soonest first; answered requests are
    /// skipped when their deadline comes up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The I/O thread's next timed wake-up (`None`: none).
    armed: Option<Instant>,
    /// The workers whose connection failed, with the error every request
    /// to them fails with. A worker lost stays lost: the group's addresses
    /// are fixed when it forms, so nothing new could answer there.
    lost: HashMap<WorkerId, Error>,
}

impl Pending {
    /// Records request `id`, sent at `now`. True when its deadline comes
    /// before the I/O thread's next wake-up: it must be woken to re-arm.
    pub(crate) fn insert(&mut self, id: u64, request: PendingRequest, now: Instant) -> bool {
        let timeout = request.timeout;
        self.requests.insert(id, request);
        if timeout.is_zero() {
            return false;
        }
        let at = now + timeout;
        self.deadlines.push(Reverse((at, id)));
        if self.armed.is_none_or(|armed| at < armed) {
            self.armed = Some(at);
            return true;
        }
        false
    }

    /// Takes request `id` out (answered, or taken back); `None` if it is
    /// gone already (timed out, or failed with its connection).
    pub(crate) fn take(&mut self, id: u64) -> Option<PendingRequest> {
        self.requests.remove(&id)
    }

    /// Takes out every request whose deadline has come by `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<PendingRequest> {
        let mut expired = Vec::new();
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            expired.extend(self.requests.remove(&id));
        }
        expired
    }

    /// Connection `conn` to worker `to`, last heard from at `last_heard`,
    /// closed at `now` because of `failure`: takes out the requests that
    /// went out on it (and no other), with what they fail with. A network
    /// failure — the peer closed or reset the connection, or could not be
    /// reached — means the worker is lost: the requests fail with
    /// [`Status::PeerFailed`] naming it, and so does every later request
    /// to it ([`Pending::lost`]). Any other failure (a refused or timed-out
    /// handshake, a protocol error) is the connection's alone.
    pub(crate) fn close(
        &mut self,
        conn: usize,
        to: &WorkerInfo,
        (status, why): Failure,
        last_heard: Option<Instant>,
        now: Instant,
    ) -> Closed {
        let lost = status == Status::Network;
        let error = if lost {
            let silent = last_heard.map(|at| now.saturating_duration_since(at));
            let failed = peer_failed(to, &why, silent);
            self.lost.entry(to.id).or_insert(failed).clone()
        } else {
            Error::new(
                status,
                format!("connection to worker '{}' lost: {why}", to.name),
            )
        };
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        let requests = ids
            .iter()
            .filter_map(|id| self.requests.remove(id))
            .collect();
        Closed {
            requests,
            error,
            lost,
        }
    }

    /// What a request to worker `to` fails with at once, if it is lost.
    pub(crate) fn lost(&self, to: WorkerId) -> Option<Error> {
        self.lost.get(&to).cloned()
    }

    /// Takes out every request.
    pub(crate) fn drain(&mut self) -> Vec<PendingRequest> {
        self.deadlines.clear();
        self.requests.drain().map(|(_, p)| p).collect()
    }

    /// The soonest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Records when the I/O thread next wakes up, so that a sender wakes
    /// it only for an earlier deadline.
    pub(crate) fn arm(&mut self, at: Option<Instant>) {
        self.armed = at;
    }

    /// Requests awaiting their response.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.requests.len()
    }
}

/// The error of worker `worker`, lost because of `why`, last heard from
/// `silent` before (`None`: never, on that connection).
fn peer_failed(worker: &WorkerInfo, why: &str, silent: Option<Duration>) -> Error {
    let heard = silent.map_or_else(String::new, |d| {
        format!("; last heard {} ms before", d.as_millis())
    });
    Error::new(
        Status::PeerFailed,
        format!(
            "RPC worker '{}' (id {}, address {}) failed: connection lost: {why}{heard}",
            worker.name, worker.id, worker.addr
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(conn: usize, timeout_ms: u64) -> (PendingRequest, crate::work::Work) {
        let (promise, work) = Promise::new();
        let pending = PendingRequest {
            promise,
            conn,
            timeout: Duration::from_millis(timeout_ms),
        };
        (pending, work)
    }

    #[test]
    fn requests_expire_at_their_deadline_and_only_then() {
        let t0 = Instant::now();
        let mut pending = Pending::default();
        let (a, _) = request(1, 100);
        let (b, _) = request(1, 50);
        let (forever, _) = request(2, 0);
        assert!(
            pending.insert(1, a, t0),
            "the first deadline wakes the loop"
        );
        assert!(pending.insert(2, b, t0), "an earlier one too");
        assert!(!pending.insert(3, forever, t0), "no deadline, no wake-up");
        pending.arm(pending.next_deadline());
        assert_eq!(
            pending.next_deadline(),
            Some(t0 + Duration::from_millis(50))
        );
        assert!(pending.expire(t0 + Duration::from_millis(49)).is_empty());
        let expired = pending.expire(t0 + Duration::from_millis(50));
        assert_eq!(expired.len(), 1);
        assert!(expired[0].timed_out().message().contains("(50 ms)"));
        // Answered before its deadline: nothing expires then.
        assert!(pending.take(1).is_some());
        assert!(pending.expire(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(pending.len(), 1, "the one without a deadline waits");
    }

    fn worker(id: WorkerId) -> WorkerInfo {
        WorkerInfo {
            id,
            name: format!("w{id}"),
            addr: ([127, 0, 0, 1], 4000 + id).into(),
        }
    }

    /// Every request of worker 1 is on connection 5, of worker 2 on 6.
    fn two_workers(t0: Instant) -> (Pending, Vec<crate::work::Work>) {
        let mut pending = Pending::default();
        let mut works = Vec::new();
        for (id, conn) in [(1, 5), (2, 6), (3, 5), (4, 6)] {
            let (request, work) = request(conn, 60_000);
            pending.insert(id, request, t0);
            works.push(work);
        }
        (pending, works)
    }

    #[test]
    fn a_lost_worker_fails_every_request_to_it_and_nothing_else() {
        let t0 = Instant::now();
        let (mut pending, _works) = two_workers(t0);
        let closed = pending.close(
            5,
            &worker(1),
            (Status::Network, "the peer closed the connection".into()),
            Some(t0 + Duration::from_millis(5)),
            t0 + Duration::from_millis(17),
        );
        assert!(closed.lost);
        let mut conns: Vec<usize> = closed.requests.iter().map(|p| p.conn).collect();
        conns.sort();
        assert_eq!(conns, [5, 5], "worker 1's two requests");
        assert_eq!(closed.error.status(), Status::PeerFailed);
        assert_eq!(
            closed.error.message(),
            "RPC worker 'w1' (id 1, address 127.0.0.1:4001) failed: connection lost: \
             the peer closed the connection; last heard 12 ms before"
        );
        // Later requests to it fail the same way; worker 2 is untouched.
        assert_eq!(pending.lost(1), Some(closed.error));
        assert_eq!(pending.lost(2), None);
        assert_eq!(pending.len(), 2);
        assert!(pending.take(2).is_some() && pending.take(4).is_some());
        assert!(pending.expire(t0 + Duration::from_secs(3600)).is_empty());
    }

    #[test]
    fn a_connection_refused_or_broken_in_its_handshake_loses_nobody() {
        let t0 = Instant::now();
        let (mut pending, _works) = two_workers(t0);
        let refused = (
            Status::PermissionDenied,
            "TLS failed: bad certificate".into(),
        );
        let closed = pending.close(6, &worker(2), refused, None, t0);
        assert!(!closed.lost);
        assert_eq!(closed.requests.len(), 2);
        assert_eq!(closed.error.status(), Status::PermissionDenied);
        assert_eq!(
            closed.error.message(),
            "connection to worker 'w2' lost: TLS failed: bad certificate"
        );
        assert_eq!(pending.lost(2), None, "a new connection may be tried");
        // A worker never heard from before its connect failed.
        let unreachable = (Status::Network, "connect failed: refused".into());
        let closed = pending.close(5, &worker(1), unreachable, None, t0);
        assert!(closed
            .error
            .message()
            .ends_with("connection lost: connect failed: refused"));
        assert!(pending.drain().is_empty());
    }
}
