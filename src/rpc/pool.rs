//! A fixed pool of threads that run user functions and RRef handlers, so a
//! slow function never stalls the network thread. Idle threads sleep on
//! std's condvar: parking_lot's process-wide table of sleepers would point
//! a forked child at threads it does not have (see `crate::runtime::timer`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Queue {
    /// The jobs, and whether the pool stopped (jobs run outside the lock,
    /// so a panic poisons nothing).
    fn lock(&self) -> MutexGuard<'_, (VecDeque<Job>, bool)> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Threads taking jobs from one queue, in order.
pub(crate) struct Pool {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `size` threads named `name-N`.
    pub(crate) fn new(name: &str, size: usize) -> std::io::Result<Pool> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let threads = (0..size.max(1))
            .map(|i| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || run(&queue))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pool { queue, threads })
    }

    /// Queues `job`; it is dropped unrun if the pool has stopped.
    pub(crate) fn execute(&self, job: impl FnOnce() + Send + 'static) {
        let mut jobs = self.queue.lock();
        if !jobs.1 {
            jobs.0.push_back(Box::new(job));
            self.queue.ready.notify_one();
        }
    }
}

fn run(queue: &Queue) {
    loop {
        let job = {
            let mut jobs = queue.lock();
            loop {
                if let Some(job) = jobs.0.pop_front() {
                    break job;
                }
                if jobs.1 {
                    return;
                }
                jobs = queue
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            log::error!("an RPC job panicked; the panic was contained");
        }
    }
}

impl Drop for Pool {
    /// Runs the queued jobs, then stops the threads.
    fn drop(&mut self) {
        self.queue.lock().1 = true;
        self.queue.ready.notify_all();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A pool thread dropping the pool cannot join itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
