//! Carries the RRef context's control messages over the agent: sends each
//! attempt the context hands out, reports its outcome back, and wakes the
//! context when its next retry is due. The protocol itself (what to send,
//! when to retry, what an acknowledgement means) is the context's.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::agent::Agent;
use super::context::Context;

/// The link between one worker's context and its agent.
struct ControlDriver {
    agent: Weak<Agent>,
    ctx: Weak<Context>,
    /// The soonest retry timer set on the agent, if any.
    armed: Mutex<Option<Instant>>,
}

/// Makes `agent` carry `ctx`'s control messages.
pub(crate) fn attach(ctx: &Arc<Context>, agent: &Arc<Agent>) {
    let driver = Arc::new(ControlDriver {
        agent: Arc::downgrade(agent),
        ctx: Arc::downgrade(ctx),
        armed: Mutex::new(None),
    });
    ctx.set_wake(Box::new(move || driver.pump()));
}

impl ControlDriver {
    /// Sends every attempt that is due, then sets a timer for the next retry.
    fn pump(self: &Arc<Self>) {
        let (Some(ctx), Some(agent)) = (self.ctx.upgrade(), self.agent.upgrade()) else {
            return;
        };
        while let Some(transmit) = ctx.poll_transmit(Instant::now()) {
            let sent = agent.send(transmit.to, &transmit.request, transmit.timeout);
            let ctx = Arc::downgrade(&ctx);
            sent.add_done_callback(Box::new(move |done| {
                let outcome = done.wait(Some(Duration::ZERO));
                if let Some(ctx) = ctx.upgrade() {
                    ctx.on_transmit_result(transmit.id, transmit.attempt, outcome, Instant::now());
                }
            }));
        }
        if let Some(at) = ctx.next_timeout() {
            self.arm(&agent, at);
        }
    }

    fn arm(self: &Arc<Self>, agent: &Agent, at: Instant) {
        {
            let mut armed = self.armed.lock();
            if armed.is_some_and(|soonest| soonest <= at) {
                return;
            }
            *armed = Some(at);
        }
        let driver = Arc::downgrade(self);
        agent.schedule(
            at,
            Box::new(move || {
                if let Some(driver) = driver.upgrade() {
                    *driver.armed.lock() = None;
                    driver.pump();
                }
            }),
        );
    }
}
