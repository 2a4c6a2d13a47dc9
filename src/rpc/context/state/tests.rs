//! The RRef protocol between workers' state machines, driven directly with
//! no lock, agent or thread: the test is the network. Control messages are lost (before delivery or their
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

use parking_lot::Mutex;

use super::*;

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

/// The UserRRefs a worker's application let go of, until the simulation
/// tells that worker's state (the shared context tells it at once).
#[derive(Default)]
struct DeletedUsers(Mutex<Vec<(WorkerId, RRefId, ForkId)>>);

impl DelUser for DeletedUsers {
    fn del_user(&self, owner: WorkerId, rref_id: RRefId, fork_id: ForkId) {
        self.0.lock().push((owner, rref_id, fork_id));
    }
}

struct Sim {
    states: Vec<RRefState>,
    /// Where each worker's UserRRefs report their deletion.
    deleted: Vec<Arc<DeletedUsers>>,
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
            states: (0..WORKERS)
                .map(|i| RRefState::new(i as WorkerId, ACK_TIMEOUT))
                .collect(),
            deleted: (0..WORKERS).map(|_| Arc::default()).collect(),
            held: vec![Vec::new(); WORKERS],
            wire: Vec::new(),
            seq: 0,
            now: Instant::now(),
            rng: fastrand::Rng::with_seed(seed),
            faults,
        }
    }

    /// Steps worker `w`'s state, then carries out the actions it decided,
    /// as the shared context does once it has released its lock.
    fn at<R>(&mut self, w: usize, step: impl FnOnce(&mut RRefState) -> R) -> R {
        let result = step(&mut self.states[w]);
        for action in self.states[w].take_effects().actions {
            action.run();
        }
        result
    }

    /// Where worker `w`'s UserRRefs report their deletion.
    fn context(&self, w: usize) -> Weak<dyn DelUser> {
        let deleted: Weak<DeletedUsers> = Arc::downgrade(&self.deleted[w]);
        deleted
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

    /// Tells each state the UserRRefs its application let go of, then takes
    /// every attempt the states want to send and puts it on the wire.
    fn collect(&mut self) {
        for w in 0..WORKERS {
            let deleted = std::mem::take(&mut *self.deleted[w].0.lock());
            for (owner, rref_id, fork_id) in deleted {
                self.at(w, |s| s.del_user(owner, rref_id, fork_id));
            }
        }
        for from in 0..WORKERS {
            while let Some(t) = self.states[from].poll_transmit(self.now) {
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
            let retry = self.states.iter().filter_map(|s| s.next_timeout()).min();
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
                self.at(t.to as usize, |s| s.handle_control(&t.request));
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
                let now = self.now;
                self.at(to as usize, |s| {
                    s.on_transmit_result(id, attempt, outcome, now)
                });
            }
            Msg::Remote {
                from,
                to,
                rref_id,
                fork_id,
            } => {
                let owner = self.at(to as usize, |s| {
                    let owner = s.get_or_create_owner_rref(rref_id);
                    s.add_fork_of_owner_if_not_present(rref_id, fork_id);
                    owner
                });
                owner.set(Ok(vec![to as u8]));
                let d = self.delay();
                self.post(d, Msg::RemoteDone { to: from, fork_id });
            }
            Msg::RemoteDone { to, fork_id } => {
                self.at(to as usize, |s| s.finish_remote(fork_id, Ok(None)));
            }
            Msg::Call { to, fork } => {
                let context = self.context(to as usize);
                let rref = self.at(to as usize, |s| {
                    let rref = s.get_or_create_rref(&fork, context);
                    s.notify_owner_and_parent_of_fork(fork.fork_id, fork.parent, &rref);
                    rref
                });
                self.held[to as usize].push(rref);
            }
        }
    }

    /// Worker `user` calls remote() on `owner` (PyTorch's user side).
    fn remote(&mut self, user: usize, owner: usize) {
        let context = self.context(user);
        let state = &mut self.states[user];
        let rref_id = state.gen_globally_unique_id();
        let fork_id = state.gen_globally_unique_id();
        let rref = UserRRef::new(owner as WorkerId, rref_id, fork_id, context);
        state.add_pending_user(fork_id, rref.clone());
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
        let rref = self.held[from][i].clone();
        let Ok(fork) = self.at(from, |s| s.prepare_child_fork(&rref)) else {
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
        self.states.iter().map(|s| s.debug_info()).collect()
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
    let mut state = RRefState::new(0, ACK_TIMEOUT);
    let (rref_id, fork_id) = (
        state.gen_globally_unique_id(),
        state.gen_globally_unique_id(),
    );
    // The application let go of its UserRRef of worker 1's RRef.
    state.del_user(1, rref_id, fork_id);
    assert!(state.take_effects().wake_driver, "the driver is told");
    let start = Instant::now();
    let mut now = start;
    let mut gaps = Vec::new();
    let mut last_sent = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let t = state.poll_transmit(now).expect("an attempt is due");
        assert_eq!((t.attempt, t.to), (attempt, 1));
        assert_eq!(t.request, Request::UserDelete { rref_id, fork_id });
        assert!(state.poll_transmit(now).is_none(), "one attempt at a time");
        if let Some(last) = last_sent {
            gaps.push(now - last);
        }
        last_sent = Some(now);
        assert_eq!(state.debug_info().num_pending_futures, 1);
        // A stale outcome changes nothing.
        state.on_transmit_result(t.id, attempt + 7, Ok(()), now);
        state.on_transmit_result(t.id, attempt, Err(Error::network("lost")), now);
        match state.next_timeout() {
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
        state.debug_info(),
        DebugInfo::default(),
        "given up after the last attempt"
    );
    assert!(state
        .poll_transmit(now + Duration::from_secs(3600))
        .is_none());
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
    assert_eq!(sim.states[2].debug_info().num_pending_users, 0);
    assert_eq!(sim.states[2].debug_info().num_pending_futures, 0);
}

#[test]
fn a_lost_worker_fails_the_users_waiting_on_it_and_what_else_waits_for_it_at_once() {
    let mut state = RRefState::new(0, ACK_TIMEOUT);
    let nobody: Weak<dyn DelUser> = Weak::<DeletedUsers>::new();
    let mut user_of = |owner: WorkerId| {
        let (rref_id, fork_id) = (
            state.gen_globally_unique_id(),
            state.gen_globally_unique_id(),
        );
        UserRRef::new(owner, rref_id, fork_id, nobody.clone())
    };
    // Worker 1's RRefs: one being created by remote(), one received from
    // worker 2 (a ForkRequest to 1, lost once and awaiting its retry), one
    // forked on to a child; and worker 2's, being created.
    let (created, received, forked) = (user_of(1), user_of(1), user_of(1));
    let elsewhere = user_of(2);
    let now = Instant::now();
    state.add_pending_user(created.fork_id(), created.clone());
    state.add_pending_user(elsewhere.fork_id(), elsewhere.clone());
    let received_rref = RRef::User(received.clone());
    state.notify_owner_and_parent_of_fork(received.fork_id(), 2, &received_rref);
    let t = state.poll_transmit(now).expect("the ForkRequest");
    state.on_transmit_result(t.id, t.attempt, Err(Error::network("reset")), now);
    assert!(state.next_timeout().is_some(), "a retry waits");
    state
        .prepare_child_fork(&RRef::User(forked.clone()))
        .unwrap();
    state.del_user(2, elsewhere.rref_id(), elsewhere.fork_id());
    let _ = state.take_effects();
    assert_eq!(state.debug_info().num_pending_users, 3);

    let error = Error::new(Status::PeerFailed, "RPC worker 'w1' (id 1) failed");
    state.worker_lost(1, &error);
    let effects = state.take_effects();
    assert!(effects.wake_waiters);
    for action in effects.actions {
        action.run();
    }
    for user in [&created, &received] {
        assert_eq!(user.error(), Some(error.clone()));
        let confirmation = user.confirmation();
        assert!(confirmation.is_completed());
        assert_eq!(confirmation.wait(Some(Duration::ZERO)).unwrap_err(), error);
    }
    assert_eq!(Arc::strong_count(&forked), 1, "its pending child let go");
    assert!(forked.error().is_none(), "which is no error of the user");
    // Worker 2's user and its UserDelete go on; nothing waits for 1.
    assert!(elsewhere.error().is_none() && !elsewhere.confirmed_by_owner());
    assert!(!state.users_settled(), "worker 2's user still waits");
    let info = state.debug_info();
    assert_eq!((info.num_pending_users, info.num_pending_futures), (1, 1));
    let t = state.poll_transmit(now).expect("the UserDelete to 2");
    assert_eq!(t.to, 2);
    assert!(state
        .poll_transmit(now + Duration::from_secs(3600))
        .is_none());
}
