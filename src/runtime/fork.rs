//! fork(): what a forked child may use.
//!
//! A child process has only the thread that called fork(): the threads of
//! the parent's servers, RPC agents, timer and async waiter are not there,
//! and a lock one of them held stays locked forever. So:
//! - every handle remembers the process generation it was made in
//!   ([`Born`]); in a child, a handle made before fork() refuses every call
//!   with `DC_ERR_INVALID_STATE`, and freeing it releases nothing (its
//!   memory is the child's copy; its threads and sockets belong to the
//!   parent, which goes on using them);
//! - process-wide services (the timer thread, the store's async waiter) are
//!   [`PerProcess`] values: a child builds its own on first use;
//! - handles made in the child work normally.
//!
//! The generation changes in a `pthread_atfork` child handler, registered
//! the first time a handle is made, which only bumps an atomic counter
//! (async-signal-safe).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, Result, Status};
use crate::os::StaticRef;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

extern "C" fn on_fork_child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// The calling process's generation: 0 in the process that loaded
/// distcore, one more in a child after each fork().
pub(crate) fn generation() -> u64 {
    REGISTER.call_once(|| {
        // The handler only touches an atomic. A failure (ENOMEM) leaves
        // fork() undetected, as without the guard.
        let _ = crate::os::on_fork_child(on_fork_child);
    });
    GENERATION.load(Ordering::Acquire)
}

/// The process generation a handle was made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Born(u64);

impl Born {
    /// The calling process's generation.
    pub(crate) fn now() -> Born {
        Born(generation())
    }

    /// Whether the calling process is the one the handle was made in.
    pub(crate) fn is_current(self) -> bool {
        self.0 == generation()
    }

    /// `DC_ERR_INVALID_STATE` when called in a child forked after the
    /// handle (`what`: "store", "work", ...) was made.
    pub(crate) fn check(self, what: &str) -> Result<()> {
        if self.is_current() {
            return Ok(());
        }
        Err(Error::new(
            Status::InvalidState,
            format!(
                "this {what} handle was created before fork(): a forked child cannot use it \
                 (the threads serving it stayed in the parent); create a new one in the child"
            ),
        ))
    }
}

/// A process-wide value built on first use in each process: after fork(),
/// the child builds its own (the parent's is left as it was, unused).
pub(crate) struct PerProcess<T: 'static> {
    current: StaticRef<Slot<T>>,
    /// The generation of the thread building the value; `u64::MAX` when
    /// none is. A spin lock rather than a mutex: a lock held by a parent's
    /// thread at fork() would never be released in the child, while an
    /// owner from an older generation is simply taken over.
    building: AtomicU64,
}

/// Releases a [`PerProcess`] build lock when dropped.
struct Unlock<'a>(&'a AtomicU64);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        self.0.store(u64::MAX, Ordering::Release);
    }
}

struct Slot<T> {
    generation: u64,
    value: T,
}

impl<T: Send + Sync + 'static> PerProcess<T> {
    /// An empty cell.
    pub(crate) const fn new() -> Self {
        PerProcess {
            current: StaticRef::new(),
            building: AtomicU64::new(u64::MAX),
        }
    }

    /// This process's value, building it with `build` if this process has
    /// none yet. A failure is returned and not remembered: the next call
    /// tries again.
    pub(crate) fn get_or_try_init(
        &self,
        build: impl FnOnce() -> std::result::Result<T, String>,
    ) -> std::result::Result<&'static T, String> {
        let generation = generation();
        if let Some(value) = self.load(generation) {
            return Ok(value);
        }
        self.lock(generation);
        // Unlocked however this ends, a panicking `build` included.
        let _unlock = Unlock(&self.building);
        match self.load(generation) {
            Some(value) => Ok(value),
            None => build().map(|value| {
                let slot = self.current.store(Slot { generation, value });
                &slot.value
            }),
        }
    }

    fn load(&self, generation: u64) -> Option<&'static T> {
        let slot = self.current.load()?;
        (slot.generation == generation).then_some(&slot.value)
    }

    fn lock(&self, generation: u64) {
        loop {
            let owner = self.building.load(Ordering::Acquire);
            if (owner == u64::MAX || owner < generation)
                && self
                    .building
                    .compare_exchange(owner, generation, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_process_value_is_built_once_and_a_failure_is_retried() {
        static CELL: PerProcess<u32> = PerProcess::new();
        assert!(CELL.get_or_try_init(|| Err("no".into())).is_err());
        assert_eq!(*CELL.get_or_try_init(|| Ok(7)).unwrap(), 7);
        assert_eq!(*CELL.get_or_try_init(|| Ok(8)).unwrap(), 7);
    }

    #[test]
    fn a_handle_of_the_current_process_passes_its_check() {
        assert!(Born::now().check("store").is_ok());
        assert_eq!(
            Born(u64::MAX).check("store").unwrap_err().status(),
            Status::InvalidState
        );
    }
}
