//! The proxy's socket-free core: one local connection speaking PyTorch's
//! protocol, relayed over one upstream connection that has been through
//! distcore's handshake (version 2: TLS, the secret, status-prefixed
//! replies). Bytes in, bytes out; no sockets, no clock.
//!
//! Requests go upstream byte for byte as they arrive, framed by the
//! server's own parser in its framing mode (so a large value is never
//! held, and a request over the server's limits closes the local
//! connection as the server would). VALIDATE and PING are answered here:
//! the upstream connection made its own. Replies come back byte for byte
//! with their status byte dropped, framed by the client's reply decoder
//! in its framing mode; a reply that is an error (an ADD on a value that
//! is not a number, a write over a quota) or a write that failed after it
//! was sent (DEFERRED ERROR) ends the relay, and the local client sees
//! its connection closed, as PyTorch's server closes a connection whose
//! request failed: it is never told a write succeeded that did not.

use std::collections::VecDeque;

use super::super::client::{Decoder, Shape};
use super::super::parser::RequestParser;
use super::super::protocol::{Command, Limits, Request, REPLY_OK, VALIDATE_MAGIC, WAIT_CANCELED};
use crate::error::{Error, Result, Status};
use crate::net::outbox::Outbox;

/// A reply the local client is owed, in the order of its requests.
#[derive(Debug)]
enum Owed {
    /// The upstream server's reply of this shape.
    Upstream { shape: Shape, cancel: bool },
    /// An answer of the proxy's own (PING's echo), sent once every reply
    /// owed before it has been.
    Local([u8; 4]),
}

/// What becomes of a request.
enum Route {
    /// Answered here (VALIDATE, PING): the upstream connection made its own.
    Local,
    /// Relayed upstream; the client is owed this reply (`None`: none).
    Upstream(Option<Owed>),
}

/// The route of a request with `command` and, for one relayed, the reply
/// PyTorch's protocol gives it (on a version 2 connection, after its
/// status byte); `keys` is the request's key count. distcore's extensions
/// are refused, known from the command byte before any byte of them goes
/// upstream. The one table of it for the relay.
fn route(command: Command, keys: usize) -> Result<Route> {
    use Command::*;
    let shape = match command {
        Validate | Ping => return Ok(Route::Local),
        Set | MultiSet | QueuePush => return Ok(Route::Upstream(None)),
        Append => Shape::Ack,
        Get | CompareSet => Shape::Values(1),
        MultiGet => Shape::Values(keys),
        Add | GetNumKeys | DeleteKey | QueueLen => Shape::I64,
        Check => Shape::U8,
        Wait | Barrier => Shape::Stop(0),
        CancelWait => {
            return Ok(Route::Upstream(Some(Owed::Upstream {
                shape: Shape::U8,
                cancel: true,
            })))
        }
        QueuePop => Shape::QueuePop,
        ListKeys => Shape::Counted,
        WaitGet | Auth | Stats | SessionOpen | SessionAttach | SessionKeepAlive | SessionClose
        | SessionReport | SessionLease | DeletePrefix | ListPrefix | SessionList => {
            return Err(Error::new(
                Status::Protocol,
                format!(
                    "the proxy relays PyTorch's protocol: distcore's extension 0x{:02x} is refused",
                    command as u8
                ),
            ))
        }
    };
    Ok(Route::Upstream(Some(Owed::Upstream {
        shape,
        cancel: false,
    })))
}

/// One local connection relayed over one upstream connection.
pub(crate) struct Relay {
    /// The upstream server's limits, which requests are checked against.
    limits: Limits,
    requests: RequestParser,
    /// The request being read goes upstream.
    relaying: bool,
    /// Replies owed to the local client, oldest first.
    owed: VecDeque<Owed>,
    /// The upstream reply being relayed, and whether its status said OK.
    reply: Option<(Decoder, bool)>,
}

impl Relay {
    /// A relay to a server with these `limits` (from its handshake).
    pub(crate) fn new(limits: Limits) -> Relay {
        Relay {
            limits,
            requests: RequestParser::framing(),
            relaying: false,
            owed: VecDeque::new(),
            reply: None,
        }
    }

    /// Requests sent upstream whose replies have not all come back.
    pub(crate) fn owed(&self) -> usize {
        self.owed.len()
    }

    /// Takes bytes from the local client: what goes upstream is appended to
    /// `upstream`, answers of the proxy's own to `local`. An error ends
    /// the relay (a malformed request, a command PyTorch's protocol does
    /// not have, a request over the server's limits).
    pub(crate) fn on_local(
        &mut self,
        mut input: &[u8],
        upstream: &mut Outbox,
        local: &mut Outbox,
    ) -> Result<()> {
        while let Some(&first) = input.first() {
            if self.requests.is_idle() {
                let command = Command::from_byte(first).ok_or_else(|| {
                    Error::new(
                        Status::Protocol,
                        format!("unknown command byte 0x{first:02x}"),
                    )
                })?;
                self.relaying = matches!(route(command, 0)?, Route::Upstream(_));
            }
            let (used, request) = self
                .requests
                .parse(input, &self.limits)
                .map_err(|e| Error::new(Status::Protocol, e.to_string()))?;
            if self.relaying {
                upstream.put(&input[..used]);
            }
            input = &input[used..];
            if let Some(request) = request {
                self.requested(&request)?;
                self.answer_local(local);
            }
        }
        Ok(())
    }

    /// A request has been read in full: records the reply it is owed.
    fn requested(&mut self, request: &Request) -> Result<()> {
        let owed = match request {
            Request::Validate { magic } if *magic == VALIDATE_MAGIC => None,
            Request::Validate { magic } => {
                return Err(Error::new(
                    Status::Protocol,
                    format!("VALIDATE with a wrong magic number 0x{magic:08x}"),
                ))
            }
            Request::Ping { nonce } => Some(Owed::Local(nonce.to_le_bytes())),
            other => {
                let keys = match other {
                    Request::MultiGet { keys } => keys.len(),
                    _ => 0,
                };
                match route(other.command(), keys)? {
                    Route::Upstream(owed) => owed,
                    // VALIDATE and PING, matched above.
                    Route::Local => None,
                }
            }
        };
        self.owed.extend(owed);
        Ok(())
    }

    /// Sends the proxy's own answers at the front of what is owed.
    fn answer_local(&mut self, local: &mut Outbox) {
        while let Some(Owed::Local(bytes)) = self.owed.front() {
            local.put(bytes);
            self.owed.pop_front();
        }
    }

    /// Takes bytes from the upstream server: the replies, without their
    /// status bytes, are appended to `local`. An error ends the relay: the
    /// server refused a request or failed a write, or sent what no request
    /// asked for.
    pub(crate) fn on_upstream(&mut self, mut input: &[u8], local: &mut Outbox) -> Result<()> {
        while let Some(&first) = input.first() {
            let (decoder, ok) = match &mut self.reply {
                Some(reply) => reply,
                None => {
                    let shape = match self.owed.front() {
                        Some(Owed::Upstream { shape, .. }) => *shape,
                        // Only a failed write's report comes unasked.
                        _ => Shape::Ack,
                    };
                    let decoder = Decoder::framing(shape, self.limits.max_value_len);
                    self.reply.insert((decoder, first == REPLY_OK))
                }
            };
            let started = decoder.started();
            let used = decoder.feed(input)?;
            if let Some((failure, count)) = decoder.take_deferred() {
                return Err(Error::new(
                    failure.status(),
                    format!(
                        "{count} write(s) relayed without a reply failed on the server: {}",
                        failure.message()
                    ),
                ));
            }
            if *ok {
                let skip = usize::from(!started);
                local.put(&input[skip.min(used)..used]);
            }
            input = &input[used..];
            let Some(reply) = decoder.take() else {
                continue;
            };
            self.reply = None;
            let reply = reply?;
            match self.owed.pop_front() {
                Some(Owed::Upstream { shape, .. }) => {
                    // A wait cancelled before it ended gets one WAIT_CANCELED:
                    // its cancel's reply too.
                    let cancelled = matches!(shape, Shape::Stop(_))
                        && reply.u8(0)? == WAIT_CANCELED
                        && matches!(self.owed.front(), Some(Owed::Upstream { cancel: true, .. }));
                    if cancelled {
                        self.owed.pop_front();
                    }
                }
                _ => {
                    return Err(Error::new(
                        Status::Protocol,
                        "the server sent a reply no request asked for",
                    ))
                }
            }
            self.answer_local(local);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
