//! The operations that wait on the server (get, wait, a blocking queue pop,
//! barrier) as a sequence of requests and replies, with no sockets and no
//! clock: the blocking driver (`Connections::run`, in `mod.rs`) runs one
//! on the caller's thread, the async waiter (`waiter.rs`) runs the same
//! plan from its event loop.

use std::time::{Duration, Instant};

use super::super::protocol::{Command, Encoder};
use super::conn::{Conn, Deadline, Dialect, CANCEL_GRACE};
use super::reply::{Exchange, Outcome, Shape};
use crate::error::{Error, Result};
use crate::store::wait_timeout_error;

/// A waiting operation on wire keys (with their `/`).
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    /// Wait until every key exists.
    Wait { keys: Vec<String> },
    /// The values of every key, once they all exist: WAIT_GET with a
    /// distcore server, WAIT then MULTI_GET with PyTorch's.
    Get { keys: Vec<String>, waited: bool },
    /// Pop the front of a queue, waiting for one: WAIT, then QUEUE_POP
    /// (again if another client took the element first).
    QueuePop { key: String, popping: bool },
    /// PyTorch's BARRIER command.
    Barrier { key: String, world_size: i64 },
}

/// One request of a plan and the exchange that reads its reply.
pub(crate) struct Step {
    /// The bytes of the request.
    pub(crate) request: Vec<u8>,
    /// Its reply.
    pub(crate) exchange: Exchange,
}

/// What follows a reply.
pub(crate) enum Next {
    /// Send another request.
    Send(Step),
    /// The operation is over: the values it read (none for a wait or a
    /// barrier), or its error.
    Done(Result<Vec<Vec<u8>>>),
}

impl Plan {
    /// A blocking pop of the queue `key` (a wire key).
    pub(crate) fn queue_pop(key: String) -> Plan {
        Plan::QueuePop {
            key,
            popping: false,
        }
    }

    /// A get of `keys` (wire keys).
    pub(crate) fn get(keys: Vec<String>) -> Plan {
        Plan::Get {
            keys,
            waited: false,
        }
    }

    /// The keys the plan waits for (for limit checks and messages).
    pub(crate) fn keys(&self) -> &[String] {
        match self {
            Plan::Wait { keys } | Plan::Get { keys, .. } => keys,
            Plan::QueuePop { key, .. } | Plan::Barrier { key, .. } => std::slice::from_ref(key),
        }
    }

    /// The first request.
    pub(crate) fn first(&mut self, conn: &Conn) -> Step {
        match self {
            Plan::Get { keys, .. } if conn.dialect() == Dialect::Distcore => Step {
                request: Encoder::request(Command::WaitGet).keys(keys).finish(),
                exchange: conn.exchange(Shape::Stop(keys.len())),
            },
            Plan::Barrier { key, world_size } => Step {
                request: Encoder::request(Command::Barrier)
                    .bytes(key.as_bytes())
                    .u64(*world_size as u64)
                    .finish(),
                exchange: conn.exchange(Shape::Stop(0)),
            },
            _ => self.wait_step(conn),
        }
    }

    fn wait_step(&self, conn: &Conn) -> Step {
        Step {
            request: Encoder::request(Command::Wait).keys(self.keys()).finish(),
            exchange: conn.exchange(Shape::Stop(0)),
        }
    }

    /// What to do with the outcome of the last request.
    pub(crate) fn next(&mut self, outcome: Outcome, conn: &Conn, timeout: Duration) -> Next {
        let reply = match outcome {
            Outcome::Reply(reply) => reply,
            Outcome::Refused(error) => return Next::Done(Err(error)),
            Outcome::Canceled => return Next::Done(Err(self.timeout_error(timeout))),
        };
        match self {
            Plan::Wait { .. } | Plan::Barrier { .. } => Next::Done(Ok(Vec::new())),
            Plan::Get { keys, waited } => {
                if conn.dialect() == Dialect::Distcore || *waited {
                    let mut values = reply.into_values();
                    values.truncate(keys.len());
                    return Next::Done(Ok(values));
                }
                *waited = true;
                Next::Send(Step {
                    request: Encoder::request(Command::MultiGet).keys(keys).finish(),
                    exchange: conn.exchange(Shape::Values(keys.len())),
                })
            }
            Plan::QueuePop { key, popping } => {
                if !*popping {
                    // The queue has an element: pop it.
                    *popping = true;
                    return Next::Send(Step {
                        request: Encoder::request(Command::QueuePop)
                            .bytes(key.as_bytes())
                            .finish(),
                        exchange: conn.exchange(Shape::QueuePop),
                    });
                }
                match reply.i64(0) {
                    Ok(before) if before > 0 => Next::Done(Ok(reply.into_values())),
                    Ok(_) => {
                        // Another client took the element between our WAIT and POP.
                        *popping = false;
                        Next::Send(self.wait_step(conn))
                    }
                    Err(e) => Next::Done(Err(e)),
                }
            }
        }
    }

    /// The error of the plan running out of time, in PyTorch's words.
    pub(crate) fn timeout_error(&self, timeout: Duration) -> Error {
        match self {
            Plan::Barrier { key, .. } => Error::timeout(format!(
                "barrier timeout after {}ms, key: {}",
                timeout.as_millis(),
                key.strip_prefix('/').unwrap_or(key)
            )),
            _ => {
                let keys: Vec<&str> = self.keys().iter().map(String::as_str).collect();
                wait_timeout_error(timeout, &keys)
            }
        }
    }
}

/// The deadline of a cancelled wait's confirmation, cancelled at `now`:
/// the grace, bounded by the operation's own timeout.
pub(crate) fn grace_deadline(now: Instant, timeout: Duration) -> Deadline {
    Some(now + CANCEL_GRACE.min(timeout))
}
