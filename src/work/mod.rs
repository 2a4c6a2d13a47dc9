//! Work: the completion handle of an asynchronous operation (c10d's `Work`).
//!
//! A work is created pending, then finished exactly once: with success (and
//! optionally a result), with an error, or by `abort`. Waiters block on a
//! condvar; callbacks run on the finishing thread; an eventfd lets event loops
//! wait on many works without a thread each.
//!
//! One completion model serves users and internals: an operation that runs
//! elsewhere (a store's async get, an RPC) is a [`Promise`] its driver
//! completes and a [`Work`] its callers observe. When the observers give up
//! on it (abort it, or drop every handle without a callback to run), the
//! promise's release hook tells the driver to let go of what the operation
//! holds (a connection, a waiter).

pub mod profiler;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result, Status};
use crate::runtime::timeout::{deadline_after, wait_until};
use crate::work::profiler::Span;

/// The collective an operation performs: c10d's `OpType`, same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum OpType {
    Broadcast = 0,
    Allreduce = 1,
    AllreduceCoalesced = 2,
    Reduce = 3,
    Allgather = 4,
    AllgatherBase = 5,
    AllgatherCoalesced = 6,
    Gather = 7,
    Scatter = 8,
    ReduceScatter = 9,
    AlltoallBase = 10,
    Alltoall = 11,
    Send = 12,
    Recv = 13,
    RecvAnySource = 14,
    Barrier = 15,
    ReduceScatterBase = 16,
    Coalesced = 17,
    AllreduceSparse = 18,
    ReduceScatterTensorCoalesced = 19,
    AllgatherIntoTensorCoalesced = 20,
    Unknown = 100,
}

impl OpType {
    const ALL: [OpType; 22] = [
        OpType::Broadcast,
        OpType::Allreduce,
        OpType::AllreduceCoalesced,
        OpType::Reduce,
        OpType::Allgather,
        OpType::AllgatherBase,
        OpType::AllgatherCoalesced,
        OpType::Gather,
        OpType::Scatter,
        OpType::ReduceScatter,
        OpType::AlltoallBase,
        OpType::Alltoall,
        OpType::Send,
        OpType::Recv,
        OpType::RecvAnySource,
        OpType::Barrier,
        OpType::ReduceScatterBase,
        OpType::Coalesced,
        OpType::AllreduceSparse,
        OpType::ReduceScatterTensorCoalesced,
        OpType::AllgatherIntoTensorCoalesced,
        OpType::Unknown,
    ];

    /// The op type with c10d's numeric value `code`.
    pub fn from_code(code: i32) -> Option<OpType> {
        OpType::ALL.iter().copied().find(|t| *t as i32 == code)
    }

    /// c10d's name of the op type (`opTypeToString`).
    pub fn name(self) -> &'static str {
        match self {
            OpType::Broadcast => "BROADCAST",
            OpType::Allreduce => "ALLREDUCE",
            OpType::AllreduceCoalesced => "ALLREDUCE_COALESCED",
            OpType::Reduce => "REDUCE",
            OpType::Allgather => "ALLGATHER",
            OpType::AllgatherBase => "_ALLGATHER_BASE",
            OpType::AllgatherCoalesced => "ALLGATHER_COALESCED",
            OpType::Gather => "GATHER",
            OpType::Scatter => "SCATTER",
            OpType::ReduceScatter => "REDUCE_SCATTER",
            OpType::AlltoallBase => "ALLTOALL_BASE",
            OpType::Alltoall => "ALLTOALL",
            OpType::Send => "SEND",
            OpType::Recv => "RECV",
            OpType::RecvAnySource => "RECVANYSOURCE",
            OpType::Barrier => "BARRIER",
            OpType::ReduceScatterBase => "_REDUCE_SCATTER_BASE",
            OpType::Coalesced => "COALESCED",
            OpType::AllreduceSparse => "_ALLREDUCE_SPARSE",
            OpType::ReduceScatterTensorCoalesced => "REDUCE_SCATTER_TENSOR_COALESCED",
            OpType::AllgatherIntoTensorCoalesced => "ALLGATHER_INTO_TENSOR_COALESCED",
            OpType::Unknown => "UNKNOWN",
        }
    }

    fn is_recv(self) -> bool {
        matches!(self, OpType::Recv | OpType::RecvAnySource)
    }
}

/// A callback run once when a work completes.
pub type DoneCallback = Box<dyn FnOnce(&Work) + Send>;

/// How a work was made: directly, or wrapping a future (c10d's
/// `FutureWrappingWork`), which has no rank or op type of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Direct,
    Future,
}

/// The message a wait that runs out of time fails with (c10d's).
pub const WAIT_TIMEOUT_MESSAGE: &str = "Operation timed out!";

static NEXT_SEQUENCE_NUMBER: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
enum Phase {
    #[default]
    Pending,
    /// One finisher has claimed the work and is ending its profiling span.
    Finishing,
    Completed,
}

#[derive(Default)]
struct State {
    phase: Phase,
    error: Option<Error>,
    result: Option<Arc<Vec<u8>>>,
    source_rank: Option<i32>,
    finished_at: Option<Instant>,
    callbacks: Vec<DoneCallback>,
    /// Whether the promise (not an observer) completed the work.
    completed_by_promise: bool,
    /// Run when the observers give up on a pending work (see [`Promise`]).
    release: Option<ReleaseHook>,
    span: Option<Span>,
    ready_fd: Option<OwnedFd>,
}

struct Inner {
    rank: i32,
    op_type: OpType,
    origin: Origin,
    timeout: Option<Duration>,
    sequence_number: u64,
    created_at: Instant,
    /// The [`Work`] handles alive (a [`Promise`] is not one).
    observers: AtomicUsize,
    state: Mutex<State>,
    completed: Condvar,
}

/// What a [`Promise`]'s driver runs to let go of an operation nobody waits
/// for any more.
pub type ReleaseHook = Box<dyn FnOnce() + Send>;

/// The completion handle of an asynchronous operation. Cheap to clone (all
/// clones are the same work) and safe to share between threads; a thread
/// blocked in [`Work::wait`] holds its own reference, so dropping the other
/// handles meanwhile is safe.
pub struct Work {
    inner: Arc<Inner>,
}

impl Clone for Work {
    fn clone(&self) -> Self {
        self.inner.observers.fetch_add(1, Ordering::Relaxed);
        Work {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Work {
    /// The last handle of a pending work with no callback to run releases
    /// its operation: no one can observe its outcome any more.
    fn drop(&mut self) {
        if self.inner.observers.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let release = {
            let mut state = self.inner.state.lock();
            if !matches!(state.phase, Phase::Pending) || !state.callbacks.is_empty() {
                return;
            }
            state.release.take()
        };
        if let Some(release) = release {
            release();
        }
    }
}

/// The completing side of a work whose operation runs elsewhere: the driver
/// keeps the promise, callers get [`Promise::work`]. Completing through the
/// promise never runs its release hook.
pub struct Promise {
    inner: Arc<Inner>,
}

impl Promise {
    /// A pending future-wrapping work (rank -1, op type `Unknown`) and its
    /// promise.
    pub fn new() -> (Promise, Work) {
        let work = Work::from_future();
        let promise = Promise {
            inner: work.inner.clone(),
        };
        (promise, work)
    }

    /// Sets what runs when the observers give up on the pending work: it is
    /// aborted or finished by someone else, or its last handle is dropped
    /// with no callback registered. Runs at most once, on that thread, and
    /// never after the promise completed the work. If they already gave up,
    /// runs now.
    pub fn on_release(&self, hook: ReleaseHook) {
        {
            let mut state = self.inner.state.lock();
            let abandoned =
                self.inner.observers.load(Ordering::Acquire) == 0 && state.callbacks.is_empty();
            if matches!(state.phase, Phase::Pending) && !abandoned {
                state.release = Some(hook);
                return;
            }
            if !matches!(state.phase, Phase::Pending) && state.completed_by_promise {
                return;
            }
        }
        hook();
    }

    /// Whether the work is still pending (its observers have not aborted it).
    pub fn is_pending(&self) -> bool {
        matches!(self.inner.state.lock().phase, Phase::Pending)
    }

    /// Completes the work with the operation's outcome: its error, or
    /// success with its result bytes if it has any. Does nothing when the
    /// work was aborted meanwhile.
    pub fn complete(&self, outcome: Result<Option<Vec<u8>>>) {
        let (error, result) = match outcome {
            Ok(result) => (None, result.map(Arc::new)),
            Err(error) => (Some(error), None),
        };
        // Losing the race to an abort is the documented no-op.
        let _ = complete(&self.inner, error, result, true);
    }
}

impl Drop for Promise {
    /// A promise dropped unkept fails its work rather than leave waiters
    /// hanging.
    fn drop(&mut self) {
        let error = Error::new(
            Status::ShutDown,
            "the operation was dropped before it completed",
        );
        let _ = complete(&self.inner, Some(error), None, true);
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("rank", &self.inner.rank)
            .field("op_type", &self.inner.op_type)
            .field("sequence_number", &self.inner.sequence_number)
            .field("completed", &self.is_completed())
            .finish()
    }
}

impl Work {
    /// A pending work of `rank` performing `op_type`. With a
    /// `profiling_title`, the profiler hooks see a span begin now and end at
    /// finish. `timeout` is what [`Work::timeout`] reports and the default of
    /// [`Work::wait`].
    pub fn new(
        rank: i32,
        op_type: OpType,
        profiling_title: Option<&str>,
        timeout: Option<Duration>,
    ) -> Work {
        Work::build(rank, op_type, Origin::Direct, profiling_title, timeout)
    }

    /// A pending work that another component completes with a result, as
    /// c10d's `Work::create_from_future`: rank -1, op type `Unknown`.
    pub fn from_future() -> Work {
        Work::build(-1, OpType::Unknown, Origin::Future, None, None)
    }

    fn build(
        rank: i32,
        op_type: OpType,
        origin: Origin,
        profiling_title: Option<&str>,
        timeout: Option<Duration>,
    ) -> Work {
        let state = State {
            span: profiling_title.and_then(Span::begin),
            ..State::default()
        };
        Work {
            inner: Arc::new(Inner {
                rank,
                op_type,
                origin,
                timeout,
                sequence_number: NEXT_SEQUENCE_NUMBER.fetch_add(1, Ordering::Relaxed),
                created_at: Instant::now(),
                observers: AtomicUsize::new(1),
                state: Mutex::new(state),
                completed: Condvar::new(),
            }),
        }
    }

    /// The rank that created the work (-1 for a future-wrapping work).
    pub fn rank(&self) -> i32 {
        self.inner.rank
    }

    /// The op type the work performs.
    pub fn op_type(&self) -> OpType {
        self.inner.op_type
    }

    /// The timeout given at creation, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.inner.timeout
    }

    /// A process-wide, strictly increasing number given at creation.
    pub fn sequence_number(&self) -> u64 {
        self.inner.sequence_number
    }

    /// Whether the work has completed (successfully or not).
    pub fn is_completed(&self) -> bool {
        matches!(self.inner.state.lock().phase, Phase::Completed)
    }

    /// Whether the work completed without an error. A pending work is not
    /// (yet) successful.
    pub fn is_success(&self) -> bool {
        let state = self.inner.state.lock();
        matches!(state.phase, Phase::Completed) && state.error.is_none()
    }

    /// The error the work failed with, if it completed with one.
    pub fn error(&self) -> Option<Error> {
        self.inner.state.lock().error.clone()
    }

    /// Blocks until the work completes, for at most `timeout`: `None` uses the
    /// work's own timeout (or waits forever without one), `Some(ZERO)` waits
    /// forever. A failed work returns its error from every wait; a wait that
    /// runs out of time fails with [`Status::Timeout`], "Operation timed out!".
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.or(self.inner.timeout).unwrap_or(Duration::ZERO);
        let deadline = deadline_after(timeout);
        let mut state = self.inner.state.lock();
        let done = wait_until(&self.inner.completed, &mut state, deadline, |s| {
            matches!(s.phase, Phase::Completed)
        });
        if !done {
            return Err(Error::timeout(WAIT_TIMEOUT_MESSAGE));
        }
        match &state.error {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Completes the work, with `error` or successfully. Fails with
    /// [`Status::InvalidState`] when the work has already completed.
    pub fn finish(&self, error: Option<Error>) -> Result<()> {
        self.complete(error, None)
    }

    /// Completes the work successfully with `result` (the bytes
    /// [`Work::result`] returns).
    pub fn finish_with_result(&self, result: Vec<u8>) -> Result<()> {
        self.complete(None, Some(Arc::new(result)))
    }

    /// Completes the work with an outcome: its bytes or its error.
    pub fn finish_with(&self, outcome: Result<Vec<u8>>) -> Result<()> {
        match outcome {
            Ok(bytes) => self.finish_with_result(bytes),
            Err(error) => self.finish(Some(error)),
        }
    }

    /// Completes the work like [`Work::finish`], then returns `error` (c10d's
    /// `finishAndThrow`).
    pub fn finish_and_throw(&self, error: Option<Error>) -> Result<()> {
        self.finish(error.clone())?;
        match error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Fails a pending work with [`Status::Aborted`], waking its waiters and
    /// running its callbacks. Aborting a completed work does nothing.
    pub fn abort(&self) {
        // Losing the race to another finisher is the documented no-op.
        let _ = self.finish(Some(Error::new(Status::Aborted, "Work aborted")));
    }

    /// Waits for the device streams of the work. CPU works have none, so this
    /// returns at once, as c10d's base `Work::synchronize`.
    pub fn synchronize(&self) {}

    /// The rank a receive got its data from. Only receive works
    /// (`Recv`, `RecvAnySource`) have one.
    pub fn source_rank(&self) -> Result<i32> {
        if self.inner.origin == Origin::Future {
            return Err(Error::not_supported(
                "FutureWrappingWork::sourceRank() not implemented",
            ));
        }
        if !self.inner.op_type.is_recv() {
            return Err(Error::not_supported(
                "sourceRank() may only be called on work objects that correspond to a recv or recv-from-any call.",
            ));
        }
        self.inner
            .state
            .lock()
            .source_rank
            .ok_or_else(|| Error::invalid_state("the source rank is not known yet"))
    }

    /// Records the rank a receive work got its data from.
    pub fn set_source_rank(&self, rank: i32) -> Result<()> {
        if !self.inner.op_type.is_recv() {
            return Err(Error::not_supported(
                "sourceRank() may only be called on work objects that correspond to a recv or recv-from-any call.",
            ));
        }
        self.inner.state.lock().source_rank = Some(rank);
        Ok(())
    }

    /// The result bytes of a completed work. A failed work returns its
    /// error; a work completed without a result fails with c10d's
    /// "result() not implemented."; a pending one with [`Status::InvalidState`].
    pub fn result(&self) -> Result<Arc<Vec<u8>>> {
        let state = self.inner.state.lock();
        if !matches!(state.phase, Phase::Completed) {
            return Err(Error::invalid_state(
                "result() called before the work completed",
            ));
        }
        if let Some(error) = &state.error {
            return Err(error.clone());
        }
        state
            .result
            .clone()
            .ok_or_else(|| Error::not_supported("result() not implemented."))
    }

    /// Seconds from creation to completion.
    pub fn duration(&self) -> Result<f64> {
        let finished_at = self.inner.state.lock().finished_at;
        finished_at
            .map(|at| (at - self.inner.created_at).as_secs_f64())
            .ok_or_else(|| Error::invalid_state("getDuration() called before the work completed"))
    }

    /// Runs `callback` once the work completes, on the finishing thread; at
    /// once on this thread if it already has. A panicking callback is logged
    /// and does not disturb the others.
    pub fn add_done_callback(&self, callback: DoneCallback) {
        {
            let mut state = self.inner.state.lock();
            if !matches!(state.phase, Phase::Completed) {
                state.callbacks.push(callback);
                return;
            }
        }
        self.run_callback(callback);
    }

    /// A file descriptor that becomes readable (and stays readable) once the
    /// work completes, for poll/epoll. Owned by the work: do not close or read it.
    pub fn ready_fd(&self) -> Result<RawFd> {
        let mut state = self.inner.state.lock();
        if let Some(fd) = &state.ready_fd {
            return Ok(fd.as_raw_fd());
        }
        let fd =
            crate::os::eventfd().map_err(|e| Error::new(Status::Io, format!("eventfd: {e}")))?;
        if matches!(state.phase, Phase::Completed) {
            signal(&fd);
        }
        Ok(state.ready_fd.insert(fd).as_raw_fd())
    }

    fn complete(&self, error: Option<Error>, result: Option<Arc<Vec<u8>>>) -> Result<()> {
        complete(&self.inner, error, result, false)
    }

    fn run_callback(&self, callback: DoneCallback) {
        run_callback(self, callback);
    }
}

fn run_callback(work: &Work, callback: DoneCallback) {
    if catch_unwind(AssertUnwindSafe(|| callback(work))).is_err() {
        log::error!("a Work done-callback panicked; the panic was contained");
    }
}

/// Completes a pending work: ends its profiling span, wakes its waiters,
/// signals its fd and runs its callbacks; and, when someone other than its
/// promise completed it, runs the promise's release hook.
fn complete(
    inner: &Arc<Inner>,
    error: Option<Error>,
    result: Option<Arc<Vec<u8>>>,
    by_promise: bool,
) -> Result<()> {
    let span = {
        let mut state = inner.state.lock();
        if !matches!(state.phase, Phase::Pending) {
            return Err(Error::invalid_state("Work already completed"));
        }
        state.phase = Phase::Finishing;
        state.completed_by_promise = by_promise;
        state.span.take()
    };
    // The span ends before any waiter can observe completion, outside
    // the lock so a hook may call back into the work.
    drop(span);
    let (callbacks, release) = {
        let mut state = inner.state.lock();
        state.phase = Phase::Completed;
        state.error = error;
        state.result = result;
        state.finished_at = Some(Instant::now());
        if let Some(fd) = &state.ready_fd {
            signal(fd);
        }
        inner.completed.notify_all();
        (std::mem::take(&mut state.callbacks), state.release.take())
    };
    if let (Some(release), false) = (release, by_promise) {
        release();
    }
    if !callbacks.is_empty() {
        // A handle for the callbacks, counted like any other.
        inner.observers.fetch_add(1, Ordering::Relaxed);
        let work = Work {
            inner: inner.clone(),
        };
        for callback in callbacks {
            run_callback(&work, callback);
        }
    }
    Ok(())
}

/// Makes an eventfd readable (adds 1 to its counter).
fn signal(fd: &OwnedFd) {
    if let Err(e) = crate::os::eventfd_signal(fd.as_fd()) {
        log::error!("signalling a Work's ready fd failed: {e}");
    }
}

#[cfg(test)]
mod tests;
