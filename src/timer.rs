//! One process-wide thread that runs jobs at their deadlines: the timeouts
//! of async calls on in-process stores, which have no event loop of their
//! own. A job runs once, on that thread, at its time or soon after; it
//! must be short (complete a work, drop an entry).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::fork::PerProcess;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

struct Entry {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Jobs {
    heap: BinaryHeap<Reverse<Entry>>,
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

/// Runs `job` on the timer thread at `at` (or soon after).
pub(crate) fn at(at: Instant, job: Job) -> Result<()> {
    let timer = TIMER
        .get_or_try_init(start)
        .map_err(|e| Error::internal(format!("starting the timer thread: {e}")))?;
    let mut jobs = timer.jobs.lock();
    jobs.seq += 1;
    let seq = jobs.seq;
    jobs.heap.push(Reverse(Entry { at, seq, job }));
    timer.changed.notify_one();
    Ok(())
}

impl Timer {
    fn run(&self) {
        let mut jobs = self.jobs.lock();
        loop {
            let next = jobs.heap.peek().map(|Reverse(e)| e.at);
            match next {
                None => self.changed.wait(&mut jobs),
                Some(at) if at > Instant::now() => {
                    self.changed.wait_until(&mut jobs, at);
                }
                Some(_) => {
                    if let Some(Reverse(entry)) = jobs.heap.pop() {
                        drop(jobs);
                        (entry.job)();
                        jobs = self.jobs.lock();
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
}
