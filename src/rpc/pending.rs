//! The RPC agent's requests awaiting their responses, socket-free: each
//! by id, with the connection it went out on and its deadline, expired
//! with `now` passed in. The agent keeps one table under a lock, shared
//! by the threads that send and the I/O thread; whoever takes a request
//! out completes its promise, after letting go of the lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::message::WorkerId;
use crate::error::Error;
use crate::work::Promise;

/// A request awaiting its response.
pub(crate) struct PendingRequest {
    /// Completes the caller's work.
    pub(crate) promise: Promise,
    /// The connection it went out on (the event loop's token).
    pub(crate) conn: usize,
    /// The worker it went to.
    pub(crate) to: WorkerId,
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

/// The requests awaiting their responses, and when the I/O thread will
/// next wake up to expire them.
#[derive(Default)]
pub(crate) struct Pending {
    requests: HashMap<u64, PendingRequest>,
    /// (deadline, request id), soonest first; answered requests are
    /// skipped when their deadline comes up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The I/O thread's next timed wake-up (`None`: none).
    armed: Option<Instant>,
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

    /// Takes out every request that went out on connection `conn`.
    pub(crate) fn take_on(&mut self, conn: usize) -> Vec<PendingRequest> {
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        ids.iter()
            .filter_map(|id| self.requests.remove(id))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(conn: usize, timeout_ms: u64) -> (PendingRequest, crate::work::Work) {
        let (promise, work) = Promise::new();
        let pending = PendingRequest {
            promise,
            conn,
            to: 1,
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

    #[test]
    fn a_closed_connection_takes_its_requests_and_only_them() {
        let t0 = Instant::now();
        let mut pending = Pending::default();
        for (id, conn) in [(1, 5), (2, 6), (3, 5)] {
            pending.insert(id, request(conn, 0).0, t0);
        }
        let mut taken: Vec<usize> = pending.take_on(5).iter().map(|p| p.conn).collect();
        taken.sort();
        assert_eq!(taken, [5, 5]);
        assert!(pending.take(2).is_some() && pending.take(1).is_none());
        assert!(pending.drain().is_empty());
    }
}
