//! Timeouts as PyTorch models them: a zero duration means "wait forever"
//! (c10d's `kNoTimeout`), and `None` at an API means "the object's default".

use std::time::{Duration, Instant};

use parking_lot::{Condvar, MutexGuard};

/// The default timeout of a store, as PyTorch's (300 s).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(300);

/// The instant a wait of `timeout` started now must end, or `None` to wait
/// forever (`timeout` is zero).
pub fn deadline_after(timeout: Duration) -> Option<Instant> {
    if timeout.is_zero() {
        None
    } else {
        Some(Instant::now() + timeout)
    }
}

/// Blocks on `cv` until `done(&mut guarded)` holds or `deadline` passes.
/// Returns whether `done` holds on return.
pub fn wait_until<T>(
    cv: &Condvar,
    guard: &mut MutexGuard<'_, T>,
    deadline: Option<Instant>,
    mut done: impl FnMut(&mut T) -> bool,
) -> bool {
    while !done(guard) {
        match deadline {
            None => cv.wait(guard),
            Some(deadline) => {
                if cv.wait_until(guard, deadline).timed_out() {
                    return done(guard);
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[test]
    fn zero_means_forever() {
        assert!(deadline_after(Duration::ZERO).is_none());
        assert!(deadline_after(Duration::from_millis(1)).is_some());
    }

    #[test]
    fn wait_until_times_out_and_reports_the_predicate() {
        let m = Mutex::new(false);
        let cv = Condvar::new();
        let mut g = m.lock();
        let deadline = deadline_after(Duration::from_millis(20));
        assert!(!wait_until(&cv, &mut g, deadline, |v| *v));
        *g = true;
        assert!(wait_until(&cv, &mut g, deadline, |v| *v));
    }
}
