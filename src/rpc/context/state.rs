//! One worker's RRef bookkeeping as a state machine: PyTorch's
//! `RRefContext` (rref_context.cpp) — who owns what, which forks exist,
//! which users and children are still pending, and the control messages
//! that keep the distributed count right.
//!
//! It takes `&mut self` and knows no socket, lock, thread or clock: control
//! messages go out through [`RRefState::poll_transmit`], each attempt's
//! outcome comes back through [`RRefState::on_transmit_result`], retries
//! wait for [`RRefState::next_timeout`] and incoming control messages
//! arrive through [`RRefState::handle_control`], with time passed in.
//! It never runs a callback or drops a reference someone else may hold the
//! last of: what must happen outside — confirming or failing users, running
//! requests that waited for an owner, letting go of references, waking the
//! driver or the blocked waiters — is queued as [`Effects`], which its owner
//! takes ([`RRefState::take_effects`]) and carries out once it has released
//! its lock. That owner is the shared context (`context.rs`); the tests
//! drive this core directly over a network of their own that loses,
//! duplicates and reorders, deterministically.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::super::message::{ForkData, ForkId, GloballyUniqueId, RRefId, Request, WorkerId};
use super::super::rref::{DelUser, OwnerRRef, RRef, UserRRef, REMOTE_TIMED_OUT};
use crate::error::{Error, Result, Status};

/// A request waiting for an OwnerRRef that does not exist yet.
pub(crate) type OwnerCallback = Box<dyn FnOnce(Arc<OwnerRRef>) + Send>;

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

/// What the core decided must happen outside it, once its owner has
/// released its lock: user callbacks run there, and a UserRRef's last
/// handle, when dropped, calls back into the context.
#[derive(Default)]
#[must_use]
pub(crate) struct Effects {
    /// To carry out in this order.
    pub(crate) actions: Vec<Action>,
    /// A control message is ready, or a retry was scheduled: the driver
    /// calls [`RRefState::poll_transmit`] and [`RRefState::next_timeout`].
    pub(crate) wake_driver: bool,
    /// Pending users or children, owners or control messages went away:
    /// blocked waits look again.
    pub(crate) wake_waiters: bool,
}

/// One thing to do outside the lock.
pub(crate) enum Action {
    /// The owner knows this user: complete its confirmation.
    Confirm(Arc<UserRRef>),
    /// This user is unusable: record why, failing its confirmation if it
    /// is still pending.
    SetError(Arc<UserRRef>, Error),
    /// Run a request that waited for this OwnerRRef.
    RunWithOwner(OwnerCallback, Arc<OwnerRRef>),
    /// Drop a reference the core let go of.
    Release(RRef),
}

impl Action {
    /// Carries the action out; never under the context's lock.
    pub(crate) fn run(self) {
        match self {
            Action::Confirm(user) => user.confirm(),
            Action::SetError(user, error) => user.set_error(error),
            Action::RunWithOwner(then, owner) => then(owner),
            Action::Release(rref) => drop(rref),
        }
    }
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

/// One worker's RRef bookkeeping (see the module's documentation).
pub(crate) struct RRefState {
    me: WorkerId,
    next_local_id: u64,
    /// How long an attempt of a control message waits for its acknowledgement.
    timeout: Duration,
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
    /// Decided, not yet taken by the owner.
    effects: Effects,
}

impl RRefState {
    /// The state of worker `me`; control messages wait `timeout` for each
    /// acknowledgement.
    pub(crate) fn new(me: WorkerId, timeout: Duration) -> RRefState {
        RRefState {
            me,
            next_local_id: 0,
            timeout,
            owners: HashMap::new(),
            pending_owners: HashMap::new(),
            forks: HashMap::new(),
            pending_users: HashMap::new(),
            confirmed_users: HashMap::new(),
            pending_children: HashMap::new(),
            controls: HashMap::new(),
            next_control: 0,
            effects: Effects::default(),
        }
    }

    /// What must happen outside, decided since the last call: the owner
    /// carries it out once it has released its lock.
    pub(crate) fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// A new id, unique across the group.
    pub(crate) fn gen_globally_unique_id(&mut self) -> GloballyUniqueId {
        let local_id = self.next_local_id;
        self.next_local_id += 1;
        GloballyUniqueId {
            created_on: self.me,
            local_id,
        }
    }

    /// A new OwnerRRef on this worker, holding a local value (`rpc.RRef(v)`).
    pub(crate) fn create_owner_rref(&mut self) -> Arc<OwnerRRef> {
        OwnerRRef::new(self.gen_globally_unique_id())
    }

    /// The OwnerRRef `rref_id`, created if it does not exist yet; requests
    /// that were waiting for it are queued to run.
    pub(crate) fn get_or_create_owner_rref(&mut self, rref_id: RRefId) -> Arc<OwnerRRef> {
        if let Some(owner) = self.owners.get(&rref_id) {
            return owner.clone();
        }
        let owner = OwnerRRef::new(rref_id);
        self.owners.insert(rref_id, owner.clone());
        for then in self.pending_owners.remove(&rref_id).unwrap_or_default() {
            self.effects
                .actions
                .push(Action::RunWithOwner(then, owner.clone()));
        }
        owner
    }

    /// Queues `then` to run with the OwnerRRef `rref_id` now, or once it is
    /// created (PyTorch's `getOwnerRRef` and its pending-owner future).
    pub(crate) fn get_owner_rref(&mut self, rref_id: RRefId, then: OwnerCallback) {
        match self.owners.get(&rref_id) {
            Some(owner) => self
                .effects
                .actions
                .push(Action::RunWithOwner(then, owner.clone())),
            None => self.pending_owners.entry(rref_id).or_default().push(then),
        }
    }

    /// The RRef a received fork describes: the OwnerRRef when it comes home,
    /// else a new UserRRef that reports its deletion to `context` (PyTorch's
    /// `getOrCreateRRef`).
    pub(crate) fn get_or_create_rref(
        &mut self,
        data: &ForkData,
        context: Weak<dyn DelUser>,
    ) -> RRef {
        if data.owner == self.me {
            RRef::Owner(self.get_or_create_owner_rref(data.rref_id))
        } else {
            RRef::User(UserRRef::new(
                data.owner,
                data.rref_id,
                data.fork_id,
                context,
            ))
        }
    }

    /// Prepares to send `rref` to another worker: a new fork id, registered
    /// at once on the owner (early fork registration) or kept alive as a
    /// pending child on a user (PyTorch's `prepareChildFork`).
    pub(crate) fn prepare_child_fork(&mut self, rref: &RRef) -> Result<ForkData> {
        let fork_id = self.gen_globally_unique_id();
        match rref {
            RRef::Owner(owner) => {
                self.forks
                    .entry(owner.rref_id())
                    .or_default()
                    .insert(fork_id);
                self.owners.insert(owner.rref_id(), owner.clone());
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
                self.pending_children.insert(fork_id, user.clone());
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
        &mut self,
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
                self.del_fork_releasing_owner(rref.rref_id(), fork_id);
            } else if let RRef::User(user) = rref {
                // The owner registered this fork before sending it.
                self.effects.actions.push(Action::Confirm(user.clone()));
                self.confirmed_users.insert(fork_id, Arc::downgrade(user));
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

    /// Queues a control message; it is sent, and retried, until it is
    /// acknowledged or given up on, and counts in the pending futures
    /// meanwhile.
    fn send_control(&mut self, to: WorkerId, request: Request, followup: Followup) {
        let id = self.next_control;
        self.next_control += 1;
        self.controls.insert(
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
        self.effects.wake_driver = true;
    }

    /// The next attempt of a control message that is due at `now`, if any;
    /// the driver sends it and reports its outcome with
    /// [`RRefState::on_transmit_result`].
    pub(crate) fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let (&id, control) = self
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
        self.controls
            .values()
            .filter(|c| !c.in_flight)
            .filter_map(|c| c.due)
            .min()
    }

    /// The outcome of attempt `attempt` of control message `id`: an
    /// acknowledgement ends it, and so does a failed worker
    /// ([`Status::PeerFailed`]); a lost message or acknowledgement (a network
    /// error or a timeout) schedules a retry with exponential backoff, up to
    /// [`MAX_ATTEMPTS`]. Outcomes of stale attempts, and duplicates, are
    /// ignored: receivers are idempotent.
    pub(crate) fn on_transmit_result(
        &mut self,
        id: ControlId,
        attempt: u32,
        outcome: Result<()>,
        now: Instant,
    ) {
        let Entry::Occupied(mut entry) = self.controls.entry(id) else {
            return;
        };
        let control = entry.get_mut();
        if !control.in_flight || control.attempts != attempt {
            return;
        }
        control.in_flight = false;
        let retry = matches!(&outcome, Err(e) if matches!(e.status(), Status::Network | Status::Timeout))
            && control.attempts < MAX_ATTEMPTS;
        if retry {
            control.due = Some(now + FIRST_RETRY_DELAY * 2u32.pow((control.attempts - 1).min(6)));
            self.effects.wake_driver = true;
            return;
        }
        let control = entry.remove();
        self.end_control(control, outcome);
    }

    /// Control message `control` is acknowledged, or given up on.
    fn end_control(&mut self, control: Control, outcome: Result<()>) {
        match &outcome {
            // The worker's loss itself was logged, once.
            Err(e) if e.status() == Status::PeerFailed => {
                log::debug!("RRef control message {:?} failed: {e}", control.request)
            }
            Err(e) => log::warn!("RRef control message {:?} failed: {e}", control.request),
            Ok(()) => {}
        }
        if let Followup::ForkRequest { fork_id, parent } = control.followup {
            match outcome {
                // The owner knows the user: it is confirmed, and the parent
                // may let go of its pending child.
                Ok(()) => {
                    self.del_pending_user(fork_id);
                    self.send_control(parent, Request::ChildAccept { fork_id }, Followup::Nothing);
                }
                Err(e) => self.fail_pending_user(fork_id, e),
            }
        }
        self.effects.wake_waiters = true;
    }

    /// Worker `lost` is gone: every request to it fails with `error` (see
    /// the agent's pending table). What waits on it here fails or is let
    /// go at once rather than at a timeout: the users of its RRefs awaiting
    /// its confirmation fail with `error` (and so do their `to_here` and
    /// forks after), the children forked from its RRefs are let go (their
    /// acceptance would follow its confirmation), and the control messages
    /// to it awaiting a retry are given up (one in flight fails with the
    /// request carrying it).
    pub(crate) fn worker_lost(&mut self, lost: WorkerId, error: &Error) {
        for fork_id in keys_where(&self.pending_users, |user| user.owner() == lost) {
            self.fail_pending_user(fork_id, error.clone());
        }
        for fork_id in keys_where(&self.pending_children, |child| child.owner() == lost) {
            self.del_pending_child(fork_id);
        }
        for id in keys_where(&self.controls, |c| c.to == lost && !c.in_flight) {
            if let Some(control) = self.controls.remove(&id) {
                self.end_control(control, Err(error.clone()));
            }
        }
        self.effects.wake_waiters = true;
    }

    /// An incoming control message from another worker; idempotent, so a
    /// retried or duplicated one changes nothing more. The sender is
    /// acknowledged once this returns.
    pub(crate) fn handle_control(&mut self, request: &Request) {
        match *request {
            Request::UserDelete { rref_id, fork_id } => {
                self.del_fork_releasing_owner(rref_id, fork_id);
            }
            Request::ForkRequest { rref_id, fork_id } => {
                self.add_fork_of_owner_if_not_present(rref_id, fork_id);
            }
            Request::ChildAccept { fork_id } => self.del_pending_child(fork_id),
            _ => {}
        }
    }

    /// Keeps `user` alive until its owner confirms fork `fork_id`.
    pub(crate) fn add_pending_user(&mut self, fork_id: ForkId, user: Arc<UserRRef>) {
        self.pending_users.insert(fork_id, user);
    }

    /// The owner confirmed `fork_id` (PyTorch's `delPendingUser`).
    fn del_pending_user(&mut self, fork_id: ForkId) {
        if let Some(user) = self.pending_users.remove(&fork_id) {
            self.confirmed_users.insert(fork_id, Arc::downgrade(&user));
            self.effects.actions.push(Action::Confirm(user));
        }
        self.effects.wake_waiters = true;
    }

    /// The user `fork_id` can never be confirmed (its creation failed).
    fn fail_pending_user(&mut self, fork_id: ForkId, error: Error) {
        if let Some(user) = self.pending_users.remove(&fork_id) {
            self.effects.actions.push(Action::SetError(user, error));
        }
        self.effects.wake_waiters = true;
    }

    /// The child holding `fork_id` is known to the owner (PyTorch's
    /// `delPendingChild`).
    fn del_pending_child(&mut self, fork_id: ForkId) {
        if let Some(child) = self.pending_children.remove(&fork_id) {
            self.effects
                .actions
                .push(Action::Release(RRef::User(child)));
        }
        self.effects.wake_waiters = true;
    }

    /// Registers fork `fork_id` of an owned RRef; a retried message may
    /// register it again (PyTorch's `addForkOfOwnerIfNotPresent`).
    pub(crate) fn add_fork_of_owner_if_not_present(&mut self, rref_id: RRefId, fork_id: ForkId) {
        self.forks.entry(rref_id).or_default().insert(fork_id);
    }

    /// Removes fork `fork_id`; the last fork's removal drops the OwnerRRef,
    /// which is returned (for the caller to drop outside the lock).
    /// Idempotent: a retried delete finds nothing (PyTorch's
    /// `delForkOfOwner`).
    pub(crate) fn del_fork_of_owner(
        &mut self,
        rref_id: RRefId,
        fork_id: ForkId,
    ) -> Option<Arc<OwnerRRef>> {
        let forks = self.forks.get_mut(&rref_id)?;
        if !forks.remove(&fork_id) || !forks.is_empty() {
            return None;
        }
        self.forks.remove(&rref_id);
        let owner = self.owners.remove(&rref_id);
        self.effects.wake_waiters = true;
        owner
    }

    /// [`RRefState::del_fork_of_owner`], the OwnerRRef it drops released
    /// outside the lock.
    fn del_fork_releasing_owner(&mut self, rref_id: RRefId, fork_id: ForkId) {
        if let Some(owner) = self.del_fork_of_owner(rref_id, fork_id) {
            self.effects
                .actions
                .push(Action::Release(RRef::Owner(owner)));
        }
    }

    /// Sends the delete of a user's fork to its owner (PyTorch's `delUser`).
    pub(crate) fn del_user(&mut self, owner: WorkerId, rref_id: RRefId, fork_id: ForkId) {
        self.send_control(
            owner,
            Request::UserDelete { rref_id, fork_id },
            Followup::Nothing,
        );
        self.confirmed_users.remove(&fork_id);
    }

    /// The result of a remote() this user started: confirmed (and marked
    /// with the function's error if it failed on the owner), or failed
    /// (RRef creation timed out or never reached the owner).
    pub(crate) fn finish_remote(&mut self, fork_id: ForkId, outcome: Result<Option<Error>>) {
        match outcome {
            Ok(function_error) => {
                let user = self.pending_users.get(&fork_id).cloned();
                self.del_pending_user(fork_id);
                if let (Some(user), Some(error)) = (user, function_error) {
                    self.effects.actions.push(Action::SetError(user, error));
                }
            }
            Err(e) if e.status() == Status::Timeout => {
                self.fail_pending_user(fork_id, Error::timeout(REMOTE_TIMED_OUT))
            }
            Err(e) => self.fail_pending_user(fork_id, e),
        }
    }

    /// No user waits for its owner's confirmation, and no child for its
    /// owner to know it: the first wait of a graceful shutdown.
    pub(crate) fn users_settled(&self) -> bool {
        self.pending_users.is_empty() && self.pending_children.is_empty()
    }

    /// The confirmed users, forgotten: a graceful shutdown deletes those
    /// still alive.
    pub(crate) fn take_confirmed_users(&mut self) -> Vec<Weak<UserRRef>> {
        self.confirmed_users.drain().map(|(_, user)| user).collect()
    }

    /// Lets go of the owners never forked: no user will delete them.
    pub(crate) fn release_unforked_owners(&mut self) {
        let unforked: Vec<RRefId> = self
            .owners
            .keys()
            .filter(|id| !self.forks.contains_key(id))
            .copied()
            .collect();
        for id in unforked {
            if let Some(owner) = self.owners.remove(&id) {
                self.effects
                    .actions
                    .push(Action::Release(RRef::Owner(owner)));
            }
        }
    }

    /// Every OwnerRRef was released: the last wait of a graceful shutdown.
    pub(crate) fn owners_released(&self) -> bool {
        self.owners.is_empty()
    }

    /// No control message is in flight.
    pub(crate) fn no_pending_futures(&self) -> bool {
        self.controls.is_empty()
    }

    /// Reports forks still alive at shutdown: a warning, or (unless leaks
    /// are ignored) an error listing them (PyTorch's `checkRRefLeaks`).
    pub(crate) fn check_rref_leaks(&self, ignore_rref_leak: bool) -> Result<()> {
        if self.forks.is_empty() {
            return Ok(());
        }
        let mut leaks = String::new();
        for (rref_id, forks) in &self.forks {
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
    pub(crate) fn debug_info(&self) -> DebugInfo {
        DebugInfo {
            num_owner_rrefs: self.owners.len(),
            num_pending_futures: self.controls.len(),
            num_pending_users: self.pending_users.len(),
            num_forks: self.forks.values().map(HashSet::len).sum(),
        }
    }
}

/// The keys of the entries of `map` that `keep` says.
fn keys_where<K: Copy, V>(map: &HashMap<K, V>, keep: impl Fn(&V) -> bool) -> Vec<K> {
    map.iter()
        .filter(|(_, v)| keep(v))
        .map(|(k, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests;
