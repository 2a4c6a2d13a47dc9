use super::*;
use crate::work::profiler::{set_profiler_hooks, ProfilerHooks};
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;
use std::thread;

fn pending() -> Work {
    Work::new(0, OpType::Allreduce, None, None)
}

#[test]
fn op_types_have_c10d_numbers_and_names() {
    assert_eq!(OpType::from_code(0), Some(OpType::Broadcast));
    assert_eq!(OpType::from_code(15), Some(OpType::Barrier));
    assert_eq!(
        OpType::from_code(20),
        Some(OpType::AllgatherIntoTensorCoalesced)
    );
    assert_eq!(OpType::from_code(100), Some(OpType::Unknown));
    assert_eq!(OpType::from_code(21), None);
    assert_eq!(OpType::AllgatherBase.name(), "_ALLGATHER_BASE");
    for t in OpType::ALL {
        assert_eq!(OpType::from_code(t as i32), Some(t));
    }
}

#[test]
fn finish_success_then_wait_and_state() {
    let w = Work::new(3, OpType::Broadcast, None, Some(Duration::from_secs(7)));
    assert_eq!(w.rank(), 3);
    assert_eq!(w.timeout(), Some(Duration::from_secs(7)));
    assert!(!w.is_completed());
    assert!(!w.is_success());
    assert_eq!(w.duration().unwrap_err().status(), Status::InvalidState);
    w.finish(None).unwrap();
    assert!(w.is_completed() && w.is_success());
    w.wait(None).unwrap();
    w.wait(Some(Duration::from_millis(1))).unwrap();
    assert!(w.duration().unwrap() >= 0.0);
    assert_eq!(
        w.result().unwrap_err().message(),
        "result() not implemented."
    );
    assert_eq!(w.finish(None).unwrap_err().status(), Status::InvalidState);
}

#[test]
fn failed_work_returns_its_error_from_every_wait() {
    let w = pending();
    w.finish(Some(Error::network("peer gone"))).unwrap();
    assert!(w.is_completed() && !w.is_success());
    for _ in 0..3 {
        let e = w.wait(None).unwrap_err();
        assert_eq!((e.status(), e.message()), (Status::Network, "peer gone"));
    }
    assert_eq!(w.result().unwrap_err().status(), Status::Network);
    assert_eq!(w.error().unwrap().message(), "peer gone");
}

#[test]
fn wait_times_out_with_pytorch_message() {
    let w = pending();
    let e = w.wait(Some(Duration::from_millis(20))).unwrap_err();
    assert_eq!(e.status(), Status::Timeout);
    assert_eq!(e.message(), "Operation timed out!");
    // The work's own timeout is the default.
    let w = Work::new(0, OpType::Send, None, Some(Duration::from_millis(10)));
    assert_eq!(w.wait(None).unwrap_err().status(), Status::Timeout);
}

#[test]
fn finish_and_throw_completes_and_returns_the_error() {
    let w = pending();
    let e = w
        .finish_and_throw(Some(Error::invalid_argument("bad")))
        .unwrap_err();
    assert_eq!(e.message(), "bad");
    assert!(w.is_completed());
    let w = pending();
    w.finish_and_throw(None).unwrap();
    assert!(w.is_success());
}

#[test]
fn abort_fails_pending_work_and_spares_completed() {
    let w = pending();
    w.abort();
    assert_eq!(w.wait(None).unwrap_err().status(), Status::Aborted);
    let w = pending();
    w.finish(None).unwrap();
    w.abort();
    assert!(w.is_success());
}

#[test]
fn source_rank_only_for_receives() {
    let w = pending();
    assert!(w
        .source_rank()
        .unwrap_err()
        .message()
        .starts_with("sourceRank() may only be called"));
    let r = Work::new(1, OpType::RecvAnySource, None, None);
    assert_eq!(r.source_rank().unwrap_err().status(), Status::InvalidState);
    r.set_source_rank(5).unwrap();
    assert_eq!(r.source_rank().unwrap(), 5);
    let f = Work::from_future();
    assert_eq!(f.source_rank().unwrap_err().status(), Status::NotSupported);
}

#[test]
fn future_work_carries_result_bytes() {
    let w = Work::from_future();
    assert_eq!((w.rank(), w.op_type()), (-1, OpType::Unknown));
    assert_eq!(w.result().unwrap_err().status(), Status::InvalidState);
    let w2 = w.clone();
    let t = thread::spawn(move || w2.finish_with_result(b"value".to_vec()).unwrap());
    w.wait(Some(Duration::ZERO)).unwrap();
    t.join().unwrap();
    assert_eq!(&*w.result().unwrap(), b"value");
}

#[test]
fn sequence_numbers_increase() {
    let a = pending();
    let b = pending();
    assert!(b.sequence_number() > a.sequence_number());
}

#[test]
fn callbacks_run_once_in_order_and_late_ones_at_once() {
    let w = pending();
    let log = Arc::new(Mutex::new(Vec::new()));
    for i in 0..3 {
        let log = log.clone();
        w.add_done_callback(Box::new(move |w| {
            assert!(w.is_completed());
            log.lock().push(i)
        }));
    }
    w.add_done_callback(Box::new(|_| panic!("contained")));
    w.finish(None).unwrap();
    let l2 = log.clone();
    w.add_done_callback(Box::new(move |_| l2.lock().push(99)));
    assert_eq!(*log.lock(), vec![0, 1, 2, 99]);
}

fn readable(fd: RawFd) -> bool {
    let mut poll = mio::Poll::new().unwrap();
    let mut source = mio::unix::SourceFd(&fd);
    poll.registry()
        .register(&mut source, mio::Token(0), mio::Interest::READABLE)
        .unwrap();
    let mut events = mio::Events::with_capacity(1);
    poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
    !events.is_empty()
}

#[test]
fn ready_fd_becomes_readable_on_completion() {
    let w = pending();
    let fd = w.ready_fd().unwrap();
    assert_eq!(w.ready_fd().unwrap(), fd);
    assert!(!readable(fd));
    w.finish(None).unwrap();
    assert!(readable(fd));
    let done = pending();
    done.abort();
    assert!(readable(done.ready_fd().unwrap()));
}

struct CountingHooks {
    begins: Mutex<HashMap<String, usize>>,
    ends: Mutex<HashMap<String, usize>>,
}

impl ProfilerHooks for CountingHooks {
    fn begin(&self, title: &str) -> u64 {
        *self.begins.lock().entry(title.into()).or_default() += 1;
        7
    }
    fn end(&self, title: &str, token: u64) {
        assert_eq!(token, 7);
        *self.ends.lock().entry(title.into()).or_default() += 1;
    }
}

#[test]
fn profiling_span_begins_at_creation_and_ends_once_before_waiters_wake() {
    let hooks = Arc::new(CountingHooks {
        begins: Mutex::new(HashMap::new()),
        ends: Mutex::new(HashMap::new()),
    });
    set_profiler_hooks(Some(hooks.clone()));
    let title = "work-test-span";
    let w = Work::new(0, OpType::Allreduce, Some(title), None);
    assert_eq!(hooks.begins.lock().get(title), Some(&1));
    assert_eq!(hooks.ends.lock().get(title), None);
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let w = w.clone();
            thread::spawn(move || {
                let _ = w.finish(None);
            })
        })
        .collect();
    w.wait(None).unwrap();
    assert_eq!(hooks.ends.lock().get(title), Some(&1));
    for r in racers {
        r.join().unwrap();
    }
    assert_eq!(hooks.ends.lock().get(title), Some(&1));
    // An unfinished work ends its span when dropped.
    drop(Work::new(
        0,
        OpType::Allreduce,
        Some("work-test-dropped"),
        None,
    ));
    assert_eq!(hooks.ends.lock().get("work-test-dropped"), Some(&1));
    set_profiler_hooks(None);
}

#[test]
fn many_waiters_all_wake() {
    for _ in 0..200 {
        let w = pending();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let w = w.clone();
                thread::spawn(move || w.wait(Some(Duration::from_secs(30))))
            })
            .collect();
        w.finish(None).unwrap();
        for t in waiters {
            t.join().unwrap().unwrap();
        }
    }
}

#[test]
fn finish_racing_timed_wait_never_loses_a_wakeup() {
    for i in 0..3000 {
        let w = pending();
        let w2 = w.clone();
        let go = Arc::new(Barrier::new(2));
        let go2 = go.clone();
        let finisher = thread::spawn(move || {
            go2.wait();
            w2.finish(None).unwrap();
        });
        go.wait();
        // Either it completed in time or it timed out while still pending;
        // never a timeout on a completed work.
        let timeout = Duration::from_micros((i % 50) as u64 + 1);
        match w.wait(Some(timeout)) {
            Ok(()) => assert!(w.is_completed()),
            Err(e) => assert_eq!(e.status(), Status::Timeout),
        }
        finisher.join().unwrap();
        w.wait(Some(Duration::from_secs(30))).unwrap();
    }
}

#[test]
fn callbacks_added_while_finishing_run_exactly_once() {
    for _ in 0..2000 {
        let w = pending();
        let count = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(Barrier::new(3));
        let adders: Vec<_> = (0..2)
            .map(|_| {
                let (w, count, go) = (w.clone(), count.clone(), go.clone());
                thread::spawn(move || {
                    go.wait();
                    for _ in 0..5 {
                        let count = count.clone();
                        w.add_done_callback(Box::new(move |_| {
                            count.fetch_add(1, Ordering::SeqCst);
                        }));
                    }
                })
            })
            .collect();
        go.wait();
        w.finish(None).unwrap();
        for a in adders {
            a.join().unwrap();
        }
        assert_eq!(count.load(Ordering::SeqCst), 10);
    }
}
