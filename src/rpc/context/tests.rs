//! The RRef protocol between contexts with no agent and no thread: the
//! test is the network. Control messages are lost (before delivery or their
//! acknowledgement after), duplicated, delayed and reordered by a seeded
//! generator, time is simulated, and remote() and calls carrying RRefs are
//! delivered in any order with them. Whatever the faults, once the
//! applications let go of their RRefs every counter returns to zero.
//!
//! The faults are those a TCP transport with retries produces: a message
//! arrives within the acknowledgement timeout or not at all, and a
//! duplicate (a retry whose first attempt did arrive) never outlives the
//! acknowledgement that ends its message. A copy arriving after the fork it
//! registers was deleted would leak that fork, in PyTorch as here.

use super::*;
use crate::error::Error;

const WORKERS: usize = 3;
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Fault rates of control messages.
#[derive(Clone, Copy)]
struct Faults {
    /// Probability that an attempt, or its acknowledgement, is lost.
    loss: f64,
    /// Probability that an attempt is delivered twice (back to back, as
    /// two sends on one connection arrive).
    duplicate: f64,
    /// Most a message is delayed (the reordering window between messages;
    /// below the acknowledgement timeout, past which a message is lost).
    max_delay: Duration,
}

#[derive(Debug)]
enum Msg {
    /// A control attempt on its way to `t.to`.
    Control { from: WorkerId, t: Transmit },
    /// The outcome of a control attempt, back at its sender.
    Outcome {
        to: WorkerId,
        id: ControlId,
        attempt: u32,
        ok: bool,
    },
    /// remote(): the user asks the owner to create the RRef.
    Remote {
        from: WorkerId,
        to: WorkerId,
        rref_id: RRefId,
        fork_id: ForkId,
    },
    /// The owner created it.
    RemoteDone { to: WorkerId, fork_id: ForkId },
    /// A call that hands an RRef to `to`.
    Call { to: WorkerId, fork: ForkData },
}

struct Sim {
    ctxs: Vec<Arc<Context>>,
    /// The RRefs each worker's application holds.
    held: Vec<Vec<RRef>>,
    wire: Vec<(Instant, u64, Msg)>,
    seq: u64,
    now: Instant,
    rng: fastrand::Rng,
    faults: Faults,
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        Sim {
            ctxs: (0..WORKERS)
                .map(|i| Context::new(i as WorkerId, ACK_TIMEOUT))
                .collect(),
            held: vec![Vec::new(); WORKERS],
            wire: Vec::new(),
            seq: 0,
            now: Instant::now(),
            rng: fastrand::Rng::with_seed(seed),
            faults,
        }
    }

    fn delay(&mut self) -> Duration {
        self.faults.max_delay.mul_f64(self.rng.f64())
    }

    /// Whether the next message or acknowledgement is lost.
    fn lost(&mut self) -> bool {
        self.rng.f64() < self.faults.loss / 2.0
    }

    /// Reports attempt `t` of `from` after `after`: acknowledged or not.
    fn answer(&mut self, after: Duration, from: WorkerId, t: &Transmit, ok: bool) {
        let (id, attempt) = (t.id, t.attempt);
        self.post(
            after,
            Msg::Outcome {
                to: from,
                id,
                attempt,
                ok,
            },
        );
    }

    /// Attempt `t` of `from` times out, unacknowledged.
    fn time_out(&mut self, from: WorkerId, t: &Transmit) {
        self.answer(ACK_TIMEOUT, from, t, false);
    }

    fn post(&mut self, after: Duration, msg: Msg) {
        self.seq += 1;
        self.wire.push((self.now + after, self.seq, msg));
    }

    /// Takes every attempt the contexts want to send and puts it on the wire.
    fn collect(&mut self) {
        for from in 0..WORKERS {
            while let Some(t) = self.ctxs[from].poll_transmit(self.now) {
                assert_eq!(t.timeout, ACK_TIMEOUT);
                let from = from as WorkerId;
                if self.lost() {
                    // Lost on the way: the sender times out.
                    self.time_out(from, &t);
                    continue;
                }
                let d = self.delay();
                if self.rng.f64() < self.faults.duplicate {
                    // Sent twice on one connection: the copy follows at once.
                    self.post(d, Msg::Control { from, t: t.clone() });
                }
                self.post(d, Msg::Control { from, t });
            }
        }
    }

    /// Delivers the next message, or advances time to the next retry;
    /// false when nothing is left to happen.
    fn step(&mut self) -> bool {
        self.collect();
        let next = self
            .wire
            .iter()
            .enumerate()
            .min_by_key(|(_, (at, seq, _))| (*at, *seq))
            .map(|(i, _)| i);
        let Some(i) = next else {
            let retry = self.ctxs.iter().filter_map(|c| c.next_timeout()).min();
            return match retry {
                Some(at) => {
                    self.now = self.now.max(at);
                    true
                }
                None => false,
            };
        };
        let (at, _, msg) = self.wire.swap_remove(i);
        self.now = self.now.max(at);
        self.deliver(msg);
        true
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Control { from, t } => {
                self.ctxs[t.to as usize].handle_control(&t.request);
                if self.lost() {
                    // The acknowledgement is lost: the sender times out.
                    self.time_out(from, &t);
                } else {
                    let d = self.delay();
                    self.answer(d, from, &t, true);
                }
            }
            Msg::Outcome {
                to,
                id,
                attempt,
                ok,
            } => {
                let outcome = if ok {
                    Ok(())
                } else {
                    Err(Error::timeout("no acknowledgement (simulated)"))
                };
                self.ctxs[to as usize].on_transmit_result(id, attempt, outcome, self.now);
            }
            Msg::Remote {
                from,
                to,
                rref_id,
                fork_id,
            } => {
                let ctx = &self.ctxs[to as usize];
                let owner = ctx.get_or_create_owner_rref(rref_id);
                ctx.add_fork_of_owner_if_not_present(rref_id, fork_id);
                owner.set(Ok(vec![to as u8]));
                let d = self.delay();
                self.post(d, Msg::RemoteDone { to: from, fork_id });
            }
            Msg::RemoteDone { to, fork_id } => {
                self.ctxs[to as usize].finish_remote(fork_id, Ok(None));
            }
            Msg::Call { to, fork } => {
                let ctx = &self.ctxs[to as usize];
                let rref = ctx.get_or_create_rref(&fork);
                ctx.notify_owner_and_parent_of_fork(fork.fork_id, fork.parent, &rref);
                self.held[to as usize].push(rref);
            }
        }
    }

    /// Worker `user` calls remote() on `owner` (PyTorch's user side).
    fn remote(&mut self, user: usize, owner: usize) {
        let ctx = &self.ctxs[user];
        let rref_id = ctx.gen_globally_unique_id();
        let fork_id = ctx.gen_globally_unique_id();
        let rref = ctx.create_user_rref(owner as WorkerId, rref_id, fork_id);
        ctx.add_pending_user(fork_id, rref.clone());
        self.held[user].push(RRef::User(rref));
        let d = self.delay();
        self.post(
            d,
            Msg::Remote {
                from: user as WorkerId,
                to: owner as WorkerId,
                rref_id,
                fork_id,
            },
        );
    }

    /// Worker `from` passes one of its RRefs to worker `to` in a call.
    fn pass(&mut self, from: usize, to: usize) {
        if self.held[from].is_empty() {
            return;
        }
        let i = self.rng.usize(..self.held[from].len());
        let Ok(fork) = self.ctxs[from].prepare_child_fork(&self.held[from][i]) else {
            return;
        };
        let d = self.delay();
        self.post(
            d,
            Msg::Call {
                to: to as WorkerId,
                fork,
            },
        );
    }

    /// Worker `w`'s application lets go of one of its RRefs.
    fn release(&mut self, w: usize) {
        if !self.held[w].is_empty() {
            let i = self.rng.usize(..self.held[w].len());
            drop(self.held[w].swap_remove(i));
        }
    }

    /// Runs until nothing is left to happen; panics past `max_steps`.
    fn settle(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if !self.step() {
                return;
            }
        }
        panic!("the protocol did not settle in {max_steps} steps");
    }

    fn counters(&self) -> Vec<DebugInfo> {
        self.ctxs.iter().map(|c| c.debug_info()).collect()
    }
}

/// A workload of remote() calls and RRefs passed around and dropped,
/// interleaved with message deliveries.
fn run_workload(seed: u64, faults: Faults, rounds: usize) -> Sim {
    let mut sim = Sim::new(seed, faults);
    for _ in 0..rounds {
        let a = sim.rng.usize(..WORKERS);
        let b = (a + 1 + sim.rng.usize(..WORKERS - 1)) % WORKERS;
        match sim.rng.u8(..4) {
            0 => sim.remote(a, b),
            1 | 2 => sim.pass(a, b),
            _ => sim.release(a),
        }
        for _ in 0..sim.rng.usize(..4) {
            sim.step();
        }
    }
    sim.settle(1_000_000);
    for w in 0..WORKERS {
        sim.held[w].clear();
    }
    sim.settle(1_000_000);
    sim
}

/// Runs the workload for each seed and checks every counter returns to zero.
fn assert_settles_for_seeds(faults: Faults, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let sim = run_workload(seed, faults, 300);
        assert!(
            sim.counters().iter().all(|c| *c == DebugInfo::default()),
            "seed {seed}: {:?}",
            sim.counters()
        );
    }
}

#[test]
fn counters_return_to_zero_when_nothing_goes_wrong() {
    let faults = Faults {
        loss: 0.0,
        duplicate: 0.0,
        max_delay: Duration::ZERO,
    };
    assert_settles_for_seeds(faults, 0..10);
}

#[test]
fn counters_return_to_zero_under_loss_duplication_and_reordering() {
    let faults = Faults {
        loss: 0.2,
        duplicate: 0.3,
        max_delay: Duration::from_millis(50),
    };
    assert_settles_for_seeds(faults, 0..40);
}

#[test]
fn a_lost_control_message_is_retried_with_backoff_then_given_up() {
    let ctx = Context::new(0, ACK_TIMEOUT);
    let user = ctx.create_user_rref(
        1,
        ctx.gen_globally_unique_id(),
        ctx.gen_globally_unique_id(),
    );
    let (rref_id, fork_id) = (user.rref_id(), user.fork_id());
    drop(user);
    let start = Instant::now();
    let mut now = start;
    let mut gaps = Vec::new();
    let mut last_sent = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let t = ctx.poll_transmit(now).expect("an attempt is due");
        assert_eq!((t.attempt, t.to), (attempt, 1));
        assert_eq!(t.request, Request::UserDelete { rref_id, fork_id });
        assert!(ctx.poll_transmit(now).is_none(), "one attempt at a time");
        if let Some(last) = last_sent {
            gaps.push(now - last);
        }
        last_sent = Some(now);
        assert_eq!(ctx.debug_info().num_pending_futures, 1);
        // A stale outcome changes nothing.
        ctx.on_transmit_result(t.id, attempt + 7, Ok(()), now);
        ctx.on_transmit_result(t.id, attempt, Err(Error::network("lost")), now);
        match ctx.next_timeout() {
            Some(at) => now = at,
            None => assert_eq!(attempt, MAX_ATTEMPTS),
        }
    }
    assert_eq!(
        gaps,
        (0..MAX_ATTEMPTS - 1)
            .map(|n| FIRST_RETRY_DELAY * 2u32.pow(n.min(6)))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ctx.debug_info(),
        DebugInfo::default(),
        "given up after the last attempt"
    );
    assert!(ctx.poll_transmit(now + Duration::from_secs(3600)).is_none());
}

#[test]
fn a_fork_request_never_acknowledged_fails_the_pending_user() {
    let mut sim = Sim::new(
        7,
        Faults {
            loss: 0.0,
            duplicate: 0.0,
            max_delay: Duration::ZERO,
        },
    );
    // Worker 1 owns; worker 0 holds a confirmed user and passes it to 2.
    sim.remote(0, 1);
    sim.settle(1000);
    sim.pass(0, 2);
    sim.faults.loss = 2.0; // every control attempt and acknowledgement lost
    sim.settle(100_000);
    let user = match &sim.held[2][0] {
        RRef::User(u) => u.clone(),
        RRef::Owner(_) => panic!("worker 2 is not the owner"),
    };
    assert!(user.error().is_some(), "the user learns its fork failed");
    assert_eq!(sim.ctxs[2].debug_info().num_pending_users, 0);
    assert_eq!(sim.ctxs[2].debug_info().num_pending_futures, 0);
}
