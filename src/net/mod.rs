//! The transport layer: moving bytes over non-blocking sockets, shared by
//! the TCPStore server and client and the RPC agent. The event loops'
//! connection table and acceptor ([`reactor`]), listening sockets
//! ([`listen`]), the queue of unsent replies and its flushing
//! ([`outbox`]), vectored sends ([`sendv`]), large buffers received in
//! place ([`bigbuf`]), and the wire that reads and writes in clear or
//! through TLS ([`wire`]).
//!
//! It knows nothing of keys, requests or RPCs; the protocol layers above
//! it know nothing of sockets.

pub(crate) mod bigbuf;
pub(crate) mod listen;
pub(crate) mod outbox;
pub(crate) mod reactor;
pub(crate) mod sendv;
pub(crate) mod wire;
