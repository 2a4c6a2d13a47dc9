//! Remote references: the OwnerRRef that holds a value on its owner, and the
//! UserRRefs (forks) that refer to it from other workers (PyTorch's
//! `OwnerRRef` and `UserRRef`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::message::{ForkId, RRefId, WorkerId};
use crate::error::{Error, Result};
use crate::work::Work;

/// The message of an RRef whose creation timed out (PyTorch's).
pub const REMOTE_TIMED_OUT: &str =
    "RRef creation via rpc.remote() timed out, and it is possible that the RRef on the owner node does not exist.";

/// Where a UserRRef reports that it is gone, for the owner to forget its
/// fork (PyTorch's `RRefContext::delUser`): its worker's context, or a test
/// driving the context's state machine directly.
pub(crate) trait DelUser: Send + Sync {
    /// Fork `fork_id` of `owner`'s RRef `rref_id` is deleted.
    fn del_user(&self, owner: WorkerId, rref_id: RRefId, fork_id: ForkId);
}

/// The owner's RRef: the value (or the error that produced it), completed
/// once the function that creates it has run.
pub struct OwnerRRef {
    rref_id: RRefId,
    value: Work,
}

impl OwnerRRef {
    pub(crate) fn new(rref_id: RRefId) -> Arc<OwnerRRef> {
        Arc::new(OwnerRRef {
            rref_id,
            value: Work::from_future(),
        })
    }

    /// The RRef's id.
    pub fn rref_id(&self) -> RRefId {
        self.rref_id
    }

    /// The future of the value.
    pub(crate) fn value(&self) -> &Work {
        &self.value
    }

    /// Sets the value or the error (once; later calls are ignored).
    pub(crate) fn set(&self, outcome: Result<Vec<u8>>) {
        let _ = self.value.finish_with(outcome);
    }
}

/// A user's reference: which RRef, whose, and which fork it is.
pub struct UserRRef {
    owner: WorkerId,
    rref_id: RRefId,
    fork_id: ForkId,
    /// Completes when the owner knows this fork (PyTorch's confirmedByOwner).
    confirmed: Work,
    /// Why the RRef is unusable: its creation failed or timed out.
    error: Mutex<Option<Error>>,
    deleted_on_owner: AtomicBool,
    ctx: Weak<dyn DelUser>,
}

impl UserRRef {
    pub(crate) fn new(
        owner: WorkerId,
        rref_id: RRefId,
        fork_id: ForkId,
        ctx: Weak<dyn DelUser>,
    ) -> Arc<UserRRef> {
        Arc::new(UserRRef {
            owner,
            rref_id,
            fork_id,
            confirmed: Work::from_future(),
            error: Mutex::new(None),
            deleted_on_owner: AtomicBool::new(false),
            ctx,
        })
    }

    /// The owner's worker id.
    pub fn owner(&self) -> WorkerId {
        self.owner
    }

    /// The RRef's id.
    pub fn rref_id(&self) -> RRefId {
        self.rref_id
    }

    /// This fork's id.
    pub fn fork_id(&self) -> ForkId {
        self.fork_id
    }

    /// Whether the owner has confirmed this fork.
    pub fn confirmed_by_owner(&self) -> bool {
        self.confirmed.is_completed()
    }

    /// The future of the owner's confirmation.
    pub(crate) fn confirmation(&self) -> &Work {
        &self.confirmed
    }

    pub(crate) fn confirm(&self) {
        let _ = self.confirmed.finish(None);
    }

    /// Marks the RRef unusable (its creation failed or timed out); waiters
    /// on its confirmation see the error.
    pub(crate) fn set_error(&self, error: Error) {
        self.error.lock().get_or_insert(error.clone());
        let _ = self.confirmed.finish(Some(error));
    }

    /// The error that made the RRef unusable, if any.
    pub fn error(&self) -> Option<Error> {
        self.error.lock().clone()
    }

    /// Tells the owner this fork is gone, once (PyTorch's `tryDel`).
    pub(crate) fn try_del(&self) {
        if self.deleted_on_owner.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(ctx) = self.ctx.upgrade() {
            ctx.del_user(self.owner, self.rref_id, self.fork_id);
        }
    }
}

impl Drop for UserRRef {
    fn drop(&mut self) {
        self.try_del();
    }
}

/// A handle on a remote reference: the owner's, or a user's.
#[derive(Clone)]
pub enum RRef {
    /// On the owner: the value is here.
    Owner(Arc<OwnerRRef>),
    /// Elsewhere: a fork of the owner's.
    User(Arc<UserRRef>),
}

impl RRef {
    /// The RRef's id.
    pub fn rref_id(&self) -> RRefId {
        match self {
            RRef::Owner(o) => o.rref_id(),
            RRef::User(u) => u.rref_id(),
        }
    }

    /// Whether this handle is on the owner.
    pub fn is_owner(&self) -> bool {
        matches!(self, RRef::Owner(_))
    }

    /// Whether the owner confirmed this reference (always, on the owner).
    pub fn confirmed_by_owner(&self) -> bool {
        match self {
            RRef::Owner(_) => true,
            RRef::User(u) => u.confirmed_by_owner(),
        }
    }

    /// The value, on the owner only (PyTorch's `local_value`), waiting for
    /// the creating function to finish.
    pub fn local_value(&self) -> Result<Vec<u8>> {
        match self {
            RRef::Owner(o) => {
                o.value().wait(Some(std::time::Duration::ZERO))?;
                Ok(o.value().result()?.to_vec())
            }
            RRef::User(_) => Err(Error::invalid_state(
                "Cannot call localValue() on a non-local reference. Call it on the owner of the RRef.",
            )),
        }
    }
}
