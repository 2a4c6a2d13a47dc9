//! Who may talk to distcore's servers and workers, and what they prove:
//! the access policy (allow-lists, who must authenticate; [`access`]),
//! the shared secret and its proofs ([`auth`]), the challenge-response
//! every protocol authenticates with ([`handshake`]) and the TLS
//! configuration ([`tls`]). Socket-free: the event loops ask the policy at
//! accept, and the TLS sessions it makes are moved by
//! [`crate::net::wire`].

pub mod access;
pub mod auth;
pub(crate) mod handshake;
pub mod tls;
