//! A server backend on etcd, for `distcore serve --backend etcd://...`: the
//! server keeps no keys of its own, so any number of servers on one etcd
//! cluster serve the same store, and killing one loses nothing.
//!
//! Requests run on a pool of [`WORKERS`] threads making blocking etcd
//! requests (an EtcdStore shared by all); a connection has at most one
//! request in flight (the core holds back its next ones), so requests
//! queued never outnumber connections. One more thread watches every write
//! under the job's prefix and reports it, which is what ends waits and
//! barriers, whichever server the write came through. Results go back to
//! the event loop through a list it drains when woken.
//!
//! When the backend goes, the workers make the requests already received
//! (each within the operation timeout) and are joined; the watcher exits
//! on its own within [`WATCH_SLICE`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;
use parking_lot::{Condvar, Mutex};

use super::super::protocol::{Key, Request};
use super::backend::{Backend, Outcome, Peek, Present, Report, Ticket};
use super::state::ConnId;
use super::waits::WaitId;
use crate::error::{Error, Result};
use crate::store::etcd::{EtcdStore, EtcdStoreOptions, WatchEnd};

/// Threads making etcd requests.
pub(crate) const WORKERS: usize = 16;

/// How long one watch request lasts before the next takes over (from the
/// revision after the last write seen): how soon the watcher notices the
/// backend is gone.
const WATCH_SLICE: Duration = Duration::from_millis(500);

/// Attempts at a wait's look-up.
const LOOK_ATTEMPTS: u32 = 3;

/// The pause after a failed watch or look-up (the cluster unreachable)
/// before the next.
const WATCH_RETRY: Duration = Duration::from_millis(100);

/// A request for a worker.
enum Job {
    Apply {
        conn: ConnId,
        ticket: Ticket,
        request: Request,
    },
    Look {
        wait: WaitId,
        keys: Vec<Key>,
    },
}

/// What the backend, its workers and its watcher share.
struct Shared {
    store: EtcdStore,
    max_value_len: usize,
    jobs: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
    reports: Mutex<Vec<Report>>,
    waker: Arc<Waker>,
    stop: AtomicBool,
}

impl Shared {
    /// Hands `report` to the event loop, waking it if it had nothing.
    fn report(&self, report: Report) {
        let mut reports = self.reports.lock();
        reports.push(report);
        if reports.len() == 1 {
            if let Err(e) = self.waker.wake() {
                log::error!("etcd backend: waking the server: {e}");
            }
        }
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut jobs = self.jobs.lock();
                loop {
                    // Requests received before the stop are still made.
                    if let Some(job) = jobs.pop_front() {
                        break job;
                    }
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    self.job_ready.wait(&mut jobs);
                }
            };
            let report = match job {
                Job::Apply {
                    conn,
                    ticket,
                    request,
                } => Report::Completed {
                    conn,
                    ticket,
                    outcome: self.store.execute(&request, self.max_value_len),
                },
                Job::Look { wait, keys } => Report::Looked {
                    wait,
                    found: self.look(&keys),
                },
            };
            self.report(report);
        }
    }

    /// The keys of `keys` that exist, tried [`LOOK_ATTEMPTS`] times (each
    /// within the operation timeout). When every attempt fails the wait
    /// stays registered with nothing found: a write still ends it, or the
    /// client's timeout.
    fn look(&self, keys: &[Key]) -> Vec<(Key, Present)> {
        let mut attempt = 1;
        loop {
            match self.store.look(keys) {
                Ok(found) => return found,
                Err(e) if attempt < LOOK_ATTEMPTS && !self.stop.load(Ordering::SeqCst) => {
                    log::warn!(
                        "etcd backend: looking up keys for a wait: {}; trying again",
                        e.message()
                    );
                    std::thread::sleep(WATCH_RETRY);
                    attempt += 1;
                }
                Err(e) => {
                    log::error!(
                        "etcd backend: looking up keys for a wait: {}; giving up",
                        e.message()
                    );
                    return Vec::new();
                }
            }
        }
    }

    /// Reports every write under the prefix from revision `next` on.
    fn watcher(&self, mut next: i64) {
        while !self.stop.load(Ordering::SeqCst) {
            let deadline = Instant::now() + WATCH_SLICE;
            let watched = self
                .store
                .watch_writes(&mut next, deadline, |key, present| {
                    self.report(Report::Written { key, present });
                    !self.stop.load(Ordering::SeqCst)
                });
            match watched {
                Ok(WatchEnd::Stopped | WatchEnd::Deadline) => {}
                Ok(WatchEnd::Canceled) => {
                    match self.store.revision() {
                        // Compacted past what was seen: start from now, and
                        // let every wait look again.
                        Ok(revision) => {
                            log::warn!("etcd backend: the watch fell behind a compaction; waits look again");
                            next = revision + 1;
                            self.report(Report::Missed);
                        }
                        Err(e) => self.watch_failed(&e),
                    }
                }
                Err(e) => self.watch_failed(&e),
            }
        }
    }

    fn watch_failed(&self, e: &Error) {
        log::warn!("etcd backend: watching for writes: {}", e.message());
        std::thread::sleep(WATCH_RETRY);
    }
}

/// The keys of a server in an etcd cluster (see the module doc).
pub(crate) struct EtcdBackend {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl EtcdBackend {
    /// Connects to the cluster (a member must answer within the timeout),
    /// starts the workers and the watcher; reports wake `waker`.
    pub(crate) fn start(
        options: EtcdStoreOptions,
        max_value_len: usize,
        waker: Arc<Waker>,
    ) -> Result<EtcdBackend> {
        let store = EtcdStore::new(options)?;
        let first = store.revision()? + 1;
        let shared = Arc::new(Shared {
            store,
            max_value_len,
            jobs: Mutex::new(VecDeque::new()),
            job_ready: Condvar::new(),
            reports: Mutex::new(Vec::new()),
            waker,
            stop: AtomicBool::new(false),
        });
        let mut backend = EtcdBackend {
            shared: shared.clone(),
            workers: Vec::with_capacity(WORKERS),
        };
        for i in 0..WORKERS {
            let shared = shared.clone();
            let worker = spawn(format!("dc-etcd-work-{i}"), move || shared.worker())?;
            backend.workers.push(worker);
        }
        spawn("dc-etcd-watch".into(), move || shared.watcher(first))?;
        Ok(backend)
    }

    fn push(&self, job: Job) {
        self.shared.jobs.lock().push_back(job);
        self.shared.job_ready.notify_one();
    }
}

fn spawn(name: String, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(run)
        .map_err(|e| Error::internal(format!("spawning an etcd backend thread: {e}")))
}

impl Drop for EtcdBackend {
    /// Stops the threads once the requests received are made (each within
    /// the operation timeout): a request a client sent before the server
    /// stopped is not lost.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.job_ready.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Backend for EtcdBackend {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> Result<Option<Outcome>> {
        self.push(Job::Apply {
            conn,
            ticket,
            request: request.clone(),
        });
        Ok(None)
    }

    fn peek(&self, _: &[u8]) -> Peek {
        Peek::Unknown
    }

    fn look(&mut self, wait: WaitId, keys: Vec<Key>) {
        self.push(Job::Look { wait, keys });
    }

    fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut *self.shared.reports.lock())
    }

    fn num_keys(&self) -> Option<usize> {
        None
    }
}

#[cfg(test)]
mod tests;
