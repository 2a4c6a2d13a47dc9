//! Who may talk to distcore's servers and workers, and what they prove:
//! the access policy (allow-lists, who must authenticate; [`access`]),
//! the shared-secret challenge-response ([`auth`]) and the TLS
//! configuration ([`tls`]). Socket-free: the event loops ask the policy at
//! accept, and the TLS sessions it makes are moved by
//! [`crate::net::wire`].

pub mod access;
pub mod auth;
pub mod tls;
