//! The RRef context of one worker, shared by its threads: the state machine
//! (`context/state.rs`, PyTorch's `RRefContext` bookkeeping) under a lock,
//! a condvar for the blocking waits of a graceful shutdown, and the hook
//! that wakes the driver sending control messages (`rpc/control.rs`).
//!
//! Every call locks, steps the state machine, unlocks, then carries out the
//! effects it decided — user callbacks, confirmations, references that may
//! be the last, wake-ups — so none of them runs under the lock.

mod state;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;
use parking_lot::{Condvar, Mutex};

pub use self::state::DebugInfo;
use self::state::{ControlId, RRefState, Transmit};
use super::message::{ForkData, ForkId, GloballyUniqueId, RRefId, Request, WorkerId};
use super::rref::{DelUser, OwnerRRef, RRef, UserRRef};
use crate::error::{Error, Result};
use crate::runtime::timeout::{deadline_after, wait_until};
use crate::work::Work;

/// One worker's RRef context: its RRef state machine, shared by the
/// worker's threads.
pub struct Context {
    me: WorkerId,
    /// Given to the UserRRefs this context creates, which tell it when
    /// they go.
    me_weak: Weak<Context>,
    state: Mutex<RRefState>,
    /// Signalled whenever users, children, owners or control messages go away.
    changed: Condvar,
    /// Tells the driver there is a control message to send (set once).
    wake: OnceCell<Box<dyn Fn() + Send + Sync>>,
}

impl Context {
    /// The context of worker `me`; control messages wait `timeout` for
    /// each acknowledgement.
    pub(crate) fn new(me: WorkerId, timeout: Duration) -> Arc<Context> {
        Arc::new_cyclic(|me_weak| Context {
            me,
            me_weak: me_weak.clone(),
            state: Mutex::new(RRefState::new(me, timeout)),
            changed: Condvar::new(),
            wake: OnceCell::new(),
        })
    }

    /// Sets what runs (never under the context's lock) when a control
    /// message is ready to send: the driver then calls
    /// [`Context::poll_transmit`].
    pub(crate) fn set_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake.set(wake);
    }

    /// Steps the state machine under the lock, then, with the lock
    /// released, carries out what it decided.
    fn step<R>(&self, change: impl FnOnce(&mut RRefState) -> R) -> R {
        let (result, effects) = {
            let mut state = self.state.lock();
            let result = change(&mut state);
            (result, state.take_effects())
        };
        for action in effects.actions {
            action.run();
        }
        if effects.wake_driver {
            if let Some(wake) = self.wake.get() {
                wake();
            }
        }
        if effects.wake_waiters {
            self.changed.notify_all();
        }
        result
    }

    /// Blocks until `done` holds of the state or `deadline` passes; returns
    /// whether it holds.
    fn wait(&self, deadline: Option<Instant>, done: impl Fn(&RRefState) -> bool) -> bool {
        let mut state = self.state.lock();
        wait_until(&self.changed, &mut state, deadline, |s| done(s))
    }

    /// This worker's id.
    pub fn worker_id(&self) -> WorkerId {
        self.me
    }

    /// A new id, unique across the group.
    pub(crate) fn gen_globally_unique_id(&self) -> GloballyUniqueId {
        self.step(RRefState::gen_globally_unique_id)
    }

    /// A new UserRRef of `owner`'s RRef `rref_id`, fork `fork_id`, that
    /// tells this context when it goes.
    pub(crate) fn create_user_rref(
        &self,
        owner: WorkerId,
        rref_id: RRefId,
        fork_id: ForkId,
    ) -> Arc<UserRRef> {
        UserRRef::new(owner, rref_id, fork_id, self.me_weak.clone())
    }

    /// See [`RRefState::create_owner_rref`].
    pub(crate) fn create_owner_rref(&self) -> Arc<OwnerRRef> {
        self.step(RRefState::create_owner_rref)
    }

    /// See [`RRefState::get_or_create_owner_rref`].
    pub(crate) fn get_or_create_owner_rref(&self, rref_id: RRefId) -> Arc<OwnerRRef> {
        self.step(|s| s.get_or_create_owner_rref(rref_id))
    }

    /// Runs `then` with the OwnerRRef `rref_id` now, or once it is created
    /// (PyTorch's `getOwnerRRef` and its pending-owner future).
    pub(crate) fn get_owner_rref(
        &self,
        rref_id: RRefId,
        then: impl FnOnce(Arc<OwnerRRef>) + Send + 'static,
    ) {
        self.step(|s| s.get_owner_rref(rref_id, Box::new(then)));
    }

    /// See [`RRefState::get_or_create_rref`].
    pub(crate) fn get_or_create_rref(&self, data: &ForkData) -> RRef {
        let context = self.me_weak.clone();
        self.step(|s| s.get_or_create_rref(data, context))
    }

    /// See [`RRefState::prepare_child_fork`].
    pub(crate) fn prepare_child_fork(&self, rref: &RRef) -> Result<ForkData> {
        self.step(|s| s.prepare_child_fork(rref))
    }

    /// See [`RRefState::notify_owner_and_parent_of_fork`].
    pub(crate) fn notify_owner_and_parent_of_fork(
        &self,
        fork_id: ForkId,
        parent: WorkerId,
        rref: &RRef,
    ) {
        self.step(|s| s.notify_owner_and_parent_of_fork(fork_id, parent, rref));
    }

    /// See [`RRefState::poll_transmit`].
    pub(crate) fn poll_transmit(&self, now: Instant) -> Option<Transmit> {
        self.step(|s| s.poll_transmit(now))
    }

    /// See [`RRefState::next_timeout`].
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.state.lock().next_timeout()
    }

    /// See [`RRefState::on_transmit_result`].
    pub(crate) fn on_transmit_result(
        &self,
        id: ControlId,
        attempt: u32,
        outcome: Result<()>,
        now: Instant,
    ) {
        self.step(|s| s.on_transmit_result(id, attempt, outcome, now));
    }

    /// See [`RRefState::worker_lost`].
    pub(crate) fn worker_lost(&self, worker: WorkerId, error: &Error) {
        self.step(|s| s.worker_lost(worker, error));
    }

    /// See [`RRefState::handle_control`].
    pub(crate) fn handle_control(&self, request: &Request) {
        self.step(|s| s.handle_control(request));
    }

    /// See [`RRefState::add_pending_user`].
    pub(crate) fn add_pending_user(&self, fork_id: ForkId, user: Arc<UserRRef>) {
        self.step(|s| s.add_pending_user(fork_id, user));
    }

    /// See [`RRefState::add_fork_of_owner_if_not_present`].
    pub(crate) fn add_fork_of_owner_if_not_present(&self, rref_id: RRefId, fork_id: ForkId) {
        self.step(|s| s.add_fork_of_owner_if_not_present(rref_id, fork_id));
    }

    /// See [`RRefState::del_fork_of_owner`]; the OwnerRRef returned is the
    /// caller's to drop.
    #[cfg(test)]
    pub(crate) fn del_fork_of_owner(
        &self,
        rref_id: RRefId,
        fork_id: ForkId,
    ) -> Option<Arc<OwnerRRef>> {
        self.step(|s| s.del_fork_of_owner(rref_id, fork_id))
    }

    /// See [`RRefState::finish_remote`].
    pub(crate) fn finish_remote(&self, fork_id: ForkId, outcome: Result<Option<Error>>) {
        self.step(|s| s.finish_remote(fork_id, outcome));
    }

    /// A future completing when every RRef argument among `rrefs` is
    /// confirmed (or failing with the first that cannot be): what PyTorch
    /// records thread-locally while unpickling arguments.
    pub(crate) fn wait_for_pending_users(&self, rrefs: &[RRef]) -> Work {
        let all = Work::from_future();
        let pending: Vec<Work> = rrefs
            .iter()
            .filter_map(|r| match r {
                // A confirmation that failed (its owner is lost) fails the
                // wait at once.
                RRef::User(u) if !u.confirmation().is_success() => Some(u.confirmation().clone()),
                _ => None,
            })
            .collect();
        if pending.is_empty() {
            let _ = all.finish(None);
            return all;
        }
        let remaining = Arc::new(AtomicI64::new(pending.len() as i64));
        for confirmation in pending {
            let (all, remaining) = (all.clone(), remaining.clone());
            confirmation.add_done_callback(Box::new(move |done| {
                match done.wait(Some(Duration::ZERO)) {
                    Err(e) => {
                        let _ = all.finish(Some(e));
                    }
                    Ok(()) if remaining.fetch_sub(1, Ordering::SeqCst) == 1 => {
                        let _ = all.finish(None);
                    }
                    Ok(()) => {}
                }
            }));
        }
        all
    }

    /// Graceful shutdown, part one (PyTorch's
    /// `delAllUsersAndUnforkedOwners`): wait for pending users and children,
    /// delete every confirmed user still alive, drop owners never forked,
    /// then wait for the owners to be released by their users.
    pub(crate) fn del_all_users_and_unforked_owners(&self, timeout: Duration) {
        let deadline = deadline_after(timeout);
        if !self.wait(deadline, RRefState::users_settled) {
            log::error!(
                "Timed out waiting for pending UserRRefs to be confirmed by owner and parent."
            );
        }
        let confirmed = self.step(RRefState::take_confirmed_users);
        for user in confirmed.iter().filter_map(Weak::upgrade) {
            user.try_del();
        }
        self.step(RRefState::release_unforked_owners);
        if !self.wait(deadline, RRefState::owners_released) {
            log::error!("Timed out waiting for pending OwnerRRefs to be deleted.");
        }
    }

    /// Waits until no control message is in flight.
    pub(crate) fn wait_for_pending_futures(&self, timeout: Duration) -> bool {
        self.wait(deadline_after(timeout), RRefState::no_pending_futures)
    }

    /// See [`RRefState::check_rref_leaks`].
    pub(crate) fn check_rref_leaks(&self, ignore_rref_leak: bool) -> Result<()> {
        self.state.lock().check_rref_leaks(ignore_rref_leak)
    }

    /// PyTorch's `getDebugInfo`.
    pub fn debug_info(&self) -> DebugInfo {
        self.state.lock().debug_info()
    }
}

impl DelUser for Context {
    fn del_user(&self, owner: WorkerId, rref_id: RRefId, fork_id: ForkId) {
        self.step(|s| s.del_user(owner, rref_id, fork_id));
    }
}

#[cfg(test)]
mod tests;
