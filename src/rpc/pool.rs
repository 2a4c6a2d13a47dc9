//! A fixed pool of threads that run user functions and RRef handlers, so a
//! slow function never stalls the network thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
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
        let mut jobs = self.queue.jobs.lock();
        if !jobs.1 {
            jobs.0.push_back(Box::new(job));
            self.queue.ready.notify_one();
        }
    }
}

fn run(queue: &Queue) {
    loop {
        let job = {
            let mut jobs = queue.jobs.lock();
            loop {
                if let Some(job) = jobs.0.pop_front() {
                    break job;
                }
                if jobs.1 {
                    return;
                }
                queue.ready.wait(&mut jobs);
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
        self.queue.jobs.lock().1 = true;
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
