//! The RRef context of one worker: PyTorch's `RRefContext` (rref_context.cpp)
//! — who owns what, which forks exist, which users and children are still
//! pending, and the control messages that keep the distributed count right.
//!
//! It knows no socket and no agent: control messages go out through
//! [`Context::poll_transmit`], each attempt's outcome comes back through
//! [`Context::on_transmit_result`], retries wait for [`Context::next_timeout`]
//! and incoming control messages arrive through [`Context::handle_control`],
//! with time passed in. A driver carries them (`rpc/control.rs`); the tests
//! carry them over a network of their own that loses, duplicates and
//! reorders, deterministically.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;
use parking_lot::{Condvar, Mutex};

use super::message::{ForkData, ForkId, GloballyUniqueId, RRefId, Request, WorkerId};
use super::rref::{OwnerRRef, RRef, UserRRef, REMOTE_TIMED_OUT};
use crate::error::{Error, Result, Status};
use crate::runtime::timeout::{deadline_after, wait_until};
use crate::work::Work;

type OwnerCallback = Box<dyn FnOnce(Arc<OwnerRRef>) + Send>;

/// Attempts of a control message before giving up.
const MAX_ATTEMPTS: u32 = 8;
/// The wait before the second attempt; doubled for each further one.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Identifies a control message for the lifetime of its context.
pub(crate) type ControlId = u64;

/// What to do once a control message is acknowledged, or given up on.
#[derive(Debug, Clone, Copy)]
enum Followup {
    Nothing,
    /// A ForkRequest for `fork_id`, received from `parent`: confirm the
    /// user and release the parent's pending child (or fail the user).
    ForkRequest {
        fork_id: ForkId,
        parent: WorkerId,
    },
}

/// A control message until it is acknowledged or given up on.
#[derive(Debug)]
struct Control {
    to: WorkerId,
    request: Request,
    followup: Followup,
    /// Attempts made so far.
    attempts: u32,
    /// An attempt is out and its outcome not known yet.
    in_flight: bool,
    /// When the next attempt may go (`None`: at once).
    due: Option<Instant>,
}

/// One attempt of a control message, for the driver to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transmit {
    /// Which message.
    pub(crate) id: ControlId,
    /// Which attempt of it (outcomes of older attempts are ignored).
    pub(crate) attempt: u32,
    /// The worker to send it to.
    pub(crate) to: WorkerId,
    /// The message.
    pub(crate) request: Request,
    /// How long the attempt may wait for its acknowledgement.
    pub(crate) timeout: Duration,
}

#[derive(Default)]
struct State {
    /// OwnerRRefs this worker owns that are shared (or being created).
    owners: HashMap<RRefId, Arc<OwnerRRef>>,
    /// Requests for OwnerRRefs that do not exist yet (a fetch that overtook
    /// the remote call creating the RRef).
    pending_owners: HashMap<RRefId, Vec<OwnerCallback>>,
    /// The forks of each owned RRef.
    forks: HashMap<RRefId, HashSet<ForkId>>,
    /// UserRRefs not yet confirmed by their owner, kept alive until then.
    pending_users: HashMap<ForkId, Arc<UserRRef>>,
    /// Confirmed UserRRefs, deleted on graceful shutdown if still alive.
    confirmed_users: HashMap<ForkId, Weak<UserRRef>>,
    /// UserRRefs this worker forked to a child, kept alive until the child
    /// is known to the owner.
    pending_children: HashMap<ForkId, Arc<UserRRef>>,
    /// Control messages not yet acknowledged (PyTorch's pending futures).
    controls: HashMap<ControlId, Control>,
    next_control: ControlId,
}

/// The counters of PyTorch's `RRefContext::getDebugInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DebugInfo {
    /// OwnerRRefs held for others.
    pub num_owner_rrefs: usize,
    /// Control messages in flight.
    pub num_pending_futures: usize,
    /// UserRRefs waiting for their owner's confirmation.
    pub num_pending_users: usize,
    /// Forks known to this owner, over every RRef.
    pub num_forks: usize,
}

/// One worker's RRef bookkeeping.
pub struct Context {
    me: WorkerId,
    me_weak: Weak<Context>,
    next_local_id: AtomicU64,
    state: Mutex<State>,
    /// Signalled whenever users, children, owners or control messages go away.
    changed: Condvar,
    /// How long an attempt of a control message waits for its acknowledgement.
    timeout: Duration,
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
            next_local_id: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            timeout,
            wake: OnceCell::new(),
        })
    }

    /// Sets what runs (never under the context's lock) when a control
    /// message is ready to send: the driver then calls
    /// [`Context::poll_transmit`].
    pub(crate) fn set_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake.set(wake);
    }

    /// This worker's id.
    pub fn worker_id(&self) -> WorkerId {
        self.me
    }

    /// A new id, unique across the group.
    pub(crate) fn gen_globally_unique_id(&self) -> GloballyUniqueId {
        GloballyUniqueId {
            created_on: self.me,
            local_id: self.next_local_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub(crate) fn create_user_rref(
        &self,
        owner: WorkerId,
        rref_id: RRefId,
        fork_id: ForkId,
    ) -> Arc<UserRRef> {
        UserRRef::new(owner, rref_id, fork_id, self.me_weak.clone())
    }

    /// A new OwnerRRef on this worker, holding a local value (`rpc.RRef(v)`).
    pub(crate) fn create_owner_rref(&self) -> Arc<OwnerRRef> {
        OwnerRRef::new(self.gen_globally_unique_id())
    }

    /// The OwnerRRef `rref_id`, created if it does not exist yet; requests
    /// that were waiting for it proceed.
    pub(crate) fn get_or_create_owner_rref(&self, rref_id: RRefId) -> Arc<OwnerRRef> {
        let (owner, waiting) = {
            let mut state = self.state.lock();
            if let Some(owner) = state.owners.get(&rref_id) {
                return owner.clone();
            }
            let owner = OwnerRRef::new(rref_id);
            state.owners.insert(rref_id, owner.clone());
            (
                owner,
                state.pending_owners.remove(&rref_id).unwrap_or_default(),
            )
        };
        for callback in waiting {
            callback(owner.clone());
        }
        owner
    }

    /// Runs `then` with the OwnerRRef `rref_id` now, or once it is created
    /// (PyTorch's `getOwnerRRef` and its pending-owner future).
    pub(crate) fn get_owner_rref(
        &self,
        rref_id: RRefId,
        then: impl FnOnce(Arc<OwnerRRef>) + Send + 'static,
    ) {
        let owner = {
            let mut state = self.state.lock();
            match state.owners.get(&rref_id) {
                Some(owner) => owner.clone(),
                None => {
                    state
                        .pending_owners
                        .entry(rref_id)
                        .or_default()
                        .push(Box::new(then));
                    return;
                }
            }
        };
        then(owner);
    }

    /// The RRef a received fork describes: the OwnerRRef when it comes home,
    /// else a new UserRRef (PyTorch's `getOrCreateRRef`).
    pub(crate) fn get_or_create_rref(&self, data: &ForkData) -> RRef {
        if data.owner == self.me {
            RRef::Owner(self.get_or_create_owner_rref(data.rref_id))
        } else {
            RRef::User(self.create_user_rref(data.owner, data.rref_id, data.fork_id))
        }
    }

    /// Prepares to send `rref` to another worker: a new fork id, registered
    /// at once on the owner (early fork registration) or kept alive as a
    /// pending child on a user (PyTorch's `prepareChildFork`).
    pub(crate) fn prepare_child_fork(&self, rref: &RRef) -> Result<ForkData> {
        let fork_id = self.gen_globally_unique_id();
        match rref {
            RRef::Owner(owner) => {
                let mut state = self.state.lock();
                state
                    .forks
                    .entry(owner.rref_id())
                    .or_default()
                    .insert(fork_id);
                state.owners.insert(owner.rref_id(), owner.clone());
                Ok(ForkData {
                    owner: self.me,
                    rref_id: owner.rref_id(),
                    fork_id,
                    parent: self.me,
                })
            }
            RRef::User(user) => {
                if let Some(error) = user.error() {
                    return Err(error);
                }
                self.state
                    .lock()
                    .pending_children
                    .insert(fork_id, user.clone());
                Ok(ForkData {
                    owner: user.owner(),
                    rref_id: user.rref_id(),
                    fork_id,
                    parent: self.me,
                })
            }
        }
    }

    /// After receiving fork `fork_id` from `parent`, tells the owner and the
    /// parent whatever they need to know (PyTorch's
    /// `notifyOwnerAndParentOfFork`).
    pub(crate) fn notify_owner_and_parent_of_fork(
        &self,
        fork_id: ForkId,
        parent: WorkerId,
        rref: &RRef,
    ) {
        let owner = match rref {
            RRef::Owner(_) => self.me,
            RRef::User(u) => u.owner(),
        };
        if parent == owner {
            if parent == self.me {
                // The owner sent the RRef to itself: undo the early fork
                // registration made while preparing the fork.
                drop(self.del_fork_of_owner(rref.rref_id(), fork_id));
            } else if let RRef::User(user) = rref {
                // The owner registered this fork before sending it.
                user.confirm();
                self.add_confirmed_user(fork_id, user);
            }
            return;
        }
        match rref {
            // A user sent the RRef back to its owner: the fork id is a
            // phantom, only the parent's pending child needs releasing.
            RRef::Owner(_) => {
                self.send_control(parent, Request::ChildAccept { fork_id }, Followup::Nothing)
            }
            RRef::User(user) => {
                self.add_pending_user(fork_id, user.clone());
                let request = Request::ForkRequest {
                    rref_id: user.rref_id(),
                    fork_id,
                };
                self.send_control(owner, request, Followup::ForkRequest { fork_id, parent });
            }
        }
    }

    /// The owner acknowledged a fork request: the user is confirmed and the
    /// parent may let go of its pending child.
    fn finish_fork_request(&self, fork_id: ForkId, parent: WorkerId) {
        self.del_pending_user(fork_id);
        self.send_control(parent, Request::ChildAccept { fork_id }, Followup::Nothing);
    }

    /// Queues a control message; it is sent, and retried, until it is
    /// acknowledged or given up on, and counts in the pending futures
    /// meanwhile.
    fn send_control(&self, to: WorkerId, request: Request, followup: Followup) {
        {
            let mut state = self.state.lock();
            let id = state.next_control;
            state.next_control += 1;
            state.controls.insert(
                id,
                Control {
                    to,
                    request,
                    followup,
                    attempts: 0,
                    in_flight: false,
                    due: None,
                },
            );
        }
        if let Some(wake) = self.wake.get() {
            wake();
        }
    }

    /// The next attempt of a control message that is due at `now`, if any;
    /// the driver sends it and reports its outcome with
    /// [`Context::on_transmit_result`].
    pub(crate) fn poll_transmit(&self, now: Instant) -> Option<Transmit> {
        let mut state = self.state.lock();
        let (&id, control) = state
            .controls
            .iter_mut()
            .filter(|(_, c)| !c.in_flight && c.due.is_none_or(|due| due <= now))
            .min_by_key(|(id, _)| **id)?;
        control.in_flight = true;
        control.attempts += 1;
        Some(Transmit {
            id,
            attempt: control.attempts,
            to: control.to,
            request: control.request.clone(),
            timeout: self.timeout,
        })
    }

    /// When the next retry is due, if one waits.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let state = self.state.lock();
        state
            .controls
            .values()
            .filter(|c| !c.in_flight)
            .filter_map(|c| c.due)
            .min()
    }

    /// The outcome of attempt `attempt` of control message `id`: an
    /// acknowledgement ends it; a lost message or acknowledgement (a network
    /// error or a timeout) schedules a retry with exponential backoff, up to
    /// [`MAX_ATTEMPTS`]. Outcomes of stale attempts, and duplicates, are
    /// ignored: receivers are idempotent.
    pub(crate) fn on_transmit_result(
        &self,
        id: ControlId,
        attempt: u32,
        outcome: Result<()>,
        now: Instant,
    ) {
        let ended = {
            let mut state = self.state.lock();
            let Some(control) = state.controls.get_mut(&id) else {
                return;
            };
            if !control.in_flight || control.attempts != attempt {
                return;
            }
            control.in_flight = false;
            let retry = matches!(&outcome, Err(e) if matches!(e.status(), Status::Network | Status::Timeout))
                && control.attempts < MAX_ATTEMPTS;
            if retry {
                control.due =
                    Some(now + FIRST_RETRY_DELAY * 2u32.pow((control.attempts - 1).min(6)));
                None
            } else {
                state.controls.remove(&id)
            }
        };
        let Some(control) = ended else {
            if let Some(wake) = self.wake.get() {
                wake();
            }
            return;
        };
        if let Err(e) = &outcome {
            log::warn!("RRef control message {:?} failed: {e}", control.request);
        }
        if let Followup::ForkRequest { fork_id, parent } = control.followup {
            match outcome {
                Ok(()) => self.finish_fork_request(fork_id, parent),
                Err(e) => self.fail_pending_user(fork_id, e),
            }
        }
        let _guard = self.state.lock();
        self.changed.notify_all();
    }

    /// An incoming control message from another worker; idempotent, so a
    /// retried or duplicated one changes nothing more. The sender is
    /// acknowledged once this returns.
    pub(crate) fn handle_control(&self, request: &Request) {
        match *request {
            Request::UserDelete { rref_id, fork_id } => {
                drop(self.del_fork_of_owner(rref_id, fork_id));
            }
            Request::ForkRequest { rref_id, fork_id } => {
                self.add_fork_of_owner_if_not_present(rref_id, fork_id);
            }
            Request::ChildAccept { fork_id } => self.del_pending_child(fork_id),
            _ => {}
        }
    }

    pub(crate) fn add_pending_user(&self, fork_id: ForkId, user: Arc<UserRRef>) {
        self.state.lock().pending_users.insert(fork_id, user);
    }

    /// The owner confirmed `fork_id` (PyTorch's `delPendingUser`).
    pub(crate) fn del_pending_user(&self, fork_id: ForkId) {
        let user = {
            let mut state = self.state.lock();
            let user = state.pending_users.remove(&fork_id);
            if let Some(user) = &user {
                state.confirmed_users.insert(fork_id, Arc::downgrade(user));
            }
            self.changed.notify_all();
            user
        };
        if let Some(user) = &user {
            user.confirm();
        }
        drop(user); // outside the lock: the last reference may delete it
    }

    /// The user `fork_id` can never be confirmed (its creation failed).
    pub(crate) fn fail_pending_user(&self, fork_id: ForkId, error: Error) {
        let user = {
            let mut state = self.state.lock();
            self.changed.notify_all();
            state.pending_users.remove(&fork_id)
        };
        if let Some(user) = &user {
            user.set_error(error);
        }
        drop(user);
    }

    fn add_confirmed_user(&self, fork_id: ForkId, user: &Arc<UserRRef>) {
        self.state
            .lock()
            .confirmed_users
            .insert(fork_id, Arc::downgrade(user));
    }

    /// The child holding `fork_id` is known to the owner (PyTorch's
    /// `delPendingChild`).
    pub(crate) fn del_pending_child(&self, fork_id: ForkId) {
        let child = {
            let mut state = self.state.lock();
            self.changed.notify_all();
            state.pending_children.remove(&fork_id)
        };
        drop(child); // outside the lock
    }

    /// Registers fork `fork_id` of an owned RRef; a retried message may
    /// register it again (PyTorch's `addForkOfOwnerIfNotPresent`).
    pub(crate) fn add_fork_of_owner_if_not_present(&self, rref_id: RRefId, fork_id: ForkId) {
        self.state
            .lock()
            .forks
            .entry(rref_id)
            .or_default()
            .insert(fork_id);
    }

    /// Removes fork `fork_id`; the last fork's removal drops the OwnerRRef,
    /// which is returned (to be dropped outside the lock). Idempotent: a
    /// retried delete finds nothing (PyTorch's `delForkOfOwner`).
    pub(crate) fn del_fork_of_owner(
        &self,
        rref_id: RRefId,
        fork_id: ForkId,
    ) -> Option<Arc<OwnerRRef>> {
        let mut state = self.state.lock();
        let forks = state.forks.get_mut(&rref_id)?;
        if !forks.remove(&fork_id) || !forks.is_empty() {
            return None;
        }
        state.forks.remove(&rref_id);
        let owner = state.owners.remove(&rref_id);
        self.changed.notify_all();
        owner
    }

    /// Sends the delete of a user's fork to its owner (PyTorch's `delUser`).
    pub(crate) fn del_user(&self, owner: WorkerId, rref_id: RRefId, fork_id: ForkId) {
        self.send_control(
            owner,
            Request::UserDelete { rref_id, fork_id },
            Followup::Nothing,
        );
        self.state.lock().confirmed_users.remove(&fork_id);
    }

    /// A future completing when every RRef argument among `rrefs` is
    /// confirmed (or failing with the first that cannot be): what PyTorch
    /// records thread-locally while unpickling arguments.
    pub(crate) fn wait_for_pending_users(&self, rrefs: &[RRef]) -> Work {
        let all = Work::from_future();
        let pending: Vec<Work> = rrefs
            .iter()
            .filter_map(|r| match r {
                RRef::User(u) if !u.confirmed_by_owner() => Some(u.confirmation().clone()),
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

    /// The result of a remote() this user started: confirmed (and marked
    /// with the function's error if it failed on the owner), or failed
    /// (RRef creation timed out or never reached the owner).
    pub(crate) fn finish_remote(&self, fork_id: ForkId, outcome: Result<Option<Error>>) {
        match outcome {
            Ok(function_error) => {
                let user = self.state.lock().pending_users.get(&fork_id).cloned();
                self.del_pending_user(fork_id);
                if let (Some(user), Some(error)) = (user, function_error) {
                    user.set_error(error);
                }
            }
            Err(e) if e.status() == Status::Timeout => {
                self.fail_pending_user(fork_id, Error::timeout(REMOTE_TIMED_OUT))
            }
            Err(e) => self.fail_pending_user(fork_id, e),
        }
    }

    /// Graceful shutdown, part one (PyTorch's
    /// `delAllUsersAndUnforkedOwners`): wait for pending users and children,
    /// delete every confirmed user still alive, drop owners never forked,
    /// then wait for the owners to be released by their users.
    pub(crate) fn del_all_users_and_unforked_owners(&self, timeout: Duration) {
        let deadline = deadline_after(timeout);
        let confirmed = {
            let mut state = self.state.lock();
            let settled = wait_until(&self.changed, &mut state, deadline, |s| {
                s.pending_users.is_empty() && s.pending_children.is_empty()
            });
            if !settled {
                log::error!(
                    "Timed out waiting for pending UserRRefs to be confirmed by owner and parent."
                );
            }
            std::mem::take(&mut state.confirmed_users)
        };
        for user in confirmed.values().filter_map(Weak::upgrade) {
            user.try_del();
        }
        let unforked: Vec<Arc<OwnerRRef>> = {
            let mut state = self.state.lock();
            let ids: Vec<RRefId> = state
                .owners
                .keys()
                .filter(|id| !state.forks.contains_key(id))
                .copied()
                .collect();
            ids.iter()
                .filter_map(|id| state.owners.remove(id))
                .collect()
        };
        drop(unforked);
        let mut state = self.state.lock();
        if !wait_until(&self.changed, &mut state, deadline, |s| s.owners.is_empty()) {
            log::error!("Timed out waiting for pending OwnerRRefs to be deleted.");
        }
    }

    /// Waits until no control message is in flight.
    pub(crate) fn wait_for_pending_futures(&self, timeout: Duration) -> bool {
        let deadline = deadline_after(timeout);
        let mut state = self.state.lock();
        wait_until(&self.changed, &mut state, deadline, |s| {
            s.controls.is_empty()
        })
    }

    /// Reports forks still alive at shutdown: a warning, or (unless leaks
    /// are ignored) an error listing them (PyTorch's `checkRRefLeaks`).
    pub(crate) fn check_rref_leaks(&self, ignore_rref_leak: bool) -> Result<()> {
        let state = self.state.lock();
        if state.forks.is_empty() {
            return Ok(());
        }
        let mut leaks = String::new();
        for (rref_id, forks) in &state.forks {
            for fork_id in forks {
                leaks.push_str(&format!("Leaking RRef {rref_id} with fork Id {fork_id}\n"));
            }
        }
        log::warn!(
            "Detected RRef Leaks during shutdown. This usually occurs when the application code still \
             holds references to RRef instances when calling shutdown(). If the program has completed \
             correctly and the process is exiting, it is OK to ignore these leaks. However, if you program \
             will keep running after this, these leaks could result in memory leaks on RRef owners. Please \
             make sure all RRefs are out of scope and Python GC has deleted them before calling shutdown(): \n{leaks}"
        );
        if ignore_rref_leak {
            Ok(())
        } else {
            Err(Error::invalid_state(leaks))
        }
    }

    /// PyTorch's `getDebugInfo`.
    pub fn debug_info(&self) -> DebugInfo {
        let state = self.state.lock();
        DebugInfo {
            num_owner_rrefs: state.owners.len(),
            num_pending_futures: state.controls.len(),
            num_pending_users: state.pending_users.len(),
            num_forks: state.forks.values().map(HashSet::len).sum(),
        }
    }
}

#[cfg(test)]
mod tests;
