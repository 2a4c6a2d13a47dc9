//! One process-wide thread that runs jobs at their deadlines: the timeouts
//! of async calls on in-process stores, which have no event loop of their
//! own. A job runs once, on that thread, at its time or soon after; it
//! must be short (complete a work, drop an entry).
//!
//! It sleeps on std's condvar, not parking_lot's: parking_lot keeps its
//! sleepers in one process-wide table, and a process forked while this
//! thread sleeps there would find the table pointing at a thread it does
//! not have (a crash on its next wait or wake that hashes to the same
//! place). std's condvar keeps its sleepers in its own memory.

use std::collections::BTreeMap;
use std::time::Instant;

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::runtime::fork::PerProcess;

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// A job's place in the queue, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerId {
    at: Instant,
    seq: u64,
}

#[derive(Default)]
struct Jobs {
    /// By deadline, then submission.
    queue: BTreeMap<TimerId, Job>,
    seq: u64,
}

struct Timer {
    jobs: Mutex<Jobs>,
    changed: Condvar,
}

static TIMER: PerProcess<&'static Timer> = PerProcess::new();

fn start() -> std::result::Result<&'static Timer, String> {
    let timer: &'static Timer = Box::leak(Box::new(Timer {
        jobs: Mutex::new(Jobs::default()),
        changed: Condvar::new(),
    }));
    std::thread::Builder::new()
        .name("dc-timer".into())
        .spawn(move || timer.run())
        .map(|_| timer)
        .map_err(|e| e.to_string())
}

/// Runs `job` on the timer thread at `at` (or soon after), unless
/// cancelled first.
pub(crate) fn at(at: Instant, job: Job) -> Result<TimerId> {
    let timer = TIMER
        .get_or_try_init(start)
        .map_err(|e| Error::internal(format!("starting the timer thread: {e}")))?;
    let mut jobs = timer.lock();
    jobs.seq += 1;
    let id = TimerId { at, seq: jobs.seq };
    jobs.queue.insert(id, job);
    timer.changed.notify_one();
    Ok(id)
}

/// Drops the job `id` if it has not run (what it holds is freed now, not
/// at its deadline).
pub(crate) fn cancel(id: TimerId) {
    if let Ok(timer) = TIMER.get_or_try_init(start) {
        drop(timer.lock().queue.remove(&id));
    }
}

impl Timer {
    /// The jobs (a job panicking on this thread poisons nothing it needs).
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut jobs = self.lock();
        loop {
            let now = Instant::now();
            match jobs.queue.first_key_value().map(|(id, _)| id.at) {
                None => {
                    jobs = self
                        .changed
                        .wait(jobs)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Some(at) if at > now => {
                    jobs = self
                        .changed
                        .wait_timeout(jobs, at - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                Some(_) => {
                    if let Some((_, job)) = jobs.queue.pop_first() {
                        drop(jobs);
                        job();
                        jobs = self.lock();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_deadline_order_not_submission_order() {
        let (tx, rx) = mpsc::channel();
        let now = Instant::now();
        for (name, ms) in [("late", 60), ("early", 20), ("middle", 40)] {
            let tx = tx.clone();
            at(
                now + Duration::from_millis(ms),
                Box::new(move || tx.send(name).unwrap()),
            )
            .unwrap();
        }
        let order: Vec<&str> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        assert_eq!(order, ["early", "middle", "late"]);
        assert!(now.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn a_cancelled_job_never_runs_and_is_freed_at_once() {
        let (tx, rx) = mpsc::channel::<()>();
        let held = std::sync::Arc::new(());
        let inside = held.clone();
        let id = at(
            Instant::now() + Duration::from_millis(50),
            Box::new(move || {
                drop(inside);
                tx.send(()).unwrap();
            }),
        )
        .unwrap();
        cancel(id);
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            1,
            "freed by the cancel"
        );
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }
}
