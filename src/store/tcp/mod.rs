//! TCPStore: PyTorch's network store, client and server, byte-compatible
//! with `torch.distributed.TCPStore` (both its libuv and legacy servers).

mod client;
pub(crate) mod failure;
mod handshake;
pub mod listing;
pub mod parser;
pub mod protocol;
pub mod proxy;
pub mod server;

pub use client::{OpCounter, SessionOptions, TcpStore, TcpStoreOptions};
pub use listing::{GroupFailure, GroupMembers, Member, SessionInfo, SessionListing};
pub use proxy::{Proxy, ProxyOptions};
pub use server::{Quotas, Server, ServerBackend, ServerOptions, ServerStats};
