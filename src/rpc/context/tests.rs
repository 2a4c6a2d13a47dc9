//! The shared context: what the state machine decides runs once the lock is
//! released, and the driver and the blocked waiters are woken when it says
//! so. The protocol itself is tested on the state machine (`state/tests.rs`).

use std::sync::atomic::AtomicUsize;
use std::thread;

use super::*;

const ACK_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn callbacks_and_last_references_run_outside_the_lock() {
    let ctx = Context::new(0, ACK_TIMEOUT);
    // A request that waited for its owner looks at the context as it runs.
    let id = ctx.gen_globally_unique_id();
    let seen = Arc::new(Mutex::new(None));
    let (inner, into) = (ctx.clone(), seen.clone());
    ctx.get_owner_rref(id, move |owner| {
        *into.lock() = Some((owner.rref_id(), inner.debug_info()));
    });
    let owner = ctx.get_or_create_owner_rref(id);
    let counters = DebugInfo {
        num_owner_rrefs: 1,
        ..DebugInfo::default()
    };
    assert_eq!(*seen.lock(), Some((owner.rref_id(), counters)));
    // The child a ChildAccept releases holds the last handle of its
    // UserRRef, whose drop tells the context.
    let user = ctx.create_user_rref(
        1,
        ctx.gen_globally_unique_id(),
        ctx.gen_globally_unique_id(),
    );
    let fork = ctx.prepare_child_fork(&RRef::User(user)).unwrap();
    ctx.handle_control(&Request::ChildAccept {
        fork_id: fork.fork_id,
    });
    assert_eq!(
        ctx.debug_info().num_pending_futures,
        1,
        "the UserDelete is queued"
    );
}

#[test]
fn the_driver_and_blocked_waiters_are_woken() {
    let ctx = Context::new(0, ACK_TIMEOUT);
    let wakes = Arc::new(AtomicUsize::new(0));
    let counted = wakes.clone();
    ctx.set_wake(Box::new(move || {
        counted.fetch_add(1, Ordering::SeqCst);
    }));
    ctx.del_user(
        1,
        ctx.gen_globally_unique_id(),
        ctx.gen_globally_unique_id(),
    );
    assert_eq!(wakes.load(Ordering::SeqCst), 1);
    let t = ctx
        .poll_transmit(Instant::now())
        .expect("the UserDelete is due");
    let waiter = {
        let ctx = ctx.clone();
        thread::spawn(move || ctx.wait_for_pending_futures(Duration::from_secs(60)))
    };
    assert!(
        !ctx.wait_for_pending_futures(Duration::from_millis(10)),
        "the UserDelete is in flight"
    );
    ctx.on_transmit_result(t.id, t.attempt, Ok(()), Instant::now());
    assert!(waiter.join().unwrap());
}
