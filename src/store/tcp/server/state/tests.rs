//! The server core driven directly: bytes in, replies out, no sockets.

use super::*;
use crate::net::bigbuf::LARGE_VALUE_LEN;
use crate::store::tcp::protocol::ServerInfo;
use crate::store::tcp::protocol::{Command, Encoder};
use crate::store::tcp::server::backend::{MemoryBackend, Usage};

const VALUE_LIMIT: usize = 1 << 20;

fn limits() -> Limits {
    Limits::with_max_value_len(VALUE_LIMIT)
}

fn core() -> ServerCore<MemoryBackend> {
    ServerCore::new(
        MemoryBackend::new(VALUE_LIMIT),
        limits(),
        true,
        Instant::now(),
    )
}

/// Opens validated connection `id`.
fn open<B: Backend>(core: &mut ServerCore<B>, id: ConnId) {
    core.connect(id);
    validate(core, id);
}

/// Sends VALIDATE on `id`.
fn validate<B: Backend>(core: &mut ServerCore<B>, id: ConnId) {
    send(
        core,
        id,
        &Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
    );
}

fn send<B: Backend>(core: &mut ServerCore<B>, id: ConnId, bytes: &[u8]) {
    core.receive(id, bytes).expect("request refused");
}

/// Everything `id` has been sent.
fn replies<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> Vec<u8> {
    core.output(id)
        .map_or_else(Vec::new, |o| o.drain(usize::MAX))
}

fn set(key: &str, value: &[u8]) -> Vec<u8> {
    Encoder::request(Command::Set)
        .bytes(key.as_bytes())
        .bytes(value)
        .finish()
}

fn get(key: &str) -> Vec<u8> {
    Encoder::request(Command::Get)
        .bytes(key.as_bytes())
        .finish()
}

fn wait(keys: &[&str]) -> Vec<u8> {
    Encoder::request(Command::Wait).keys(keys).finish()
}

fn byte_string(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// Opens validated connection `id` speaking version 2 of the extensions;
/// returns the limits the server announced.
fn open_v2<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> Limits {
    open(core, id);
    hello_v2(core, id).limits
}

/// Asks validated connection `id` for version 2: the server's info.
fn hello_v2<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> ServerInfo {
    send(
        core,
        id,
        &Encoder::request(Command::Ping).u32(HELLO_V2_NONCE).finish(),
    );
    let reply = replies(core, id);
    assert_eq!(reply[..4], HELLO_V2_ACK.to_le_bytes());
    let len = u64::from_le_bytes(reply[4..12].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 12 + len);
    ServerInfo::decode(&reply[12..]).unwrap()
}

mod guards;
mod handshake;
mod limits;
mod remote;
mod sessions;
mod version2;
mod waits;
