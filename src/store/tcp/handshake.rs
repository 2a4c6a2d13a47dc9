//! The TCPStore's handshake, socket-free, both sides: what a distcore
//! client sends when it connects, what it makes of the answers, and what
//! the server core answers to HELLO and AUTH. The challenge-response inside
//! it is [`crate::security::handshake`]'s, which the RPC agent shares.
//!
//! A distcore client opens with VALIDATE, a PING carrying its pid (what
//! PyTorch's client sends) and the HELLO probe (a PING of
//! [`HELLO_V2_NONCE`]). A PyTorch server echoes the probe: the connection
//! speaks PyTorch's protocol. A distcore server answers [`HELLO_V2_ACK`]
//! and its [`ServerInfo`] (limits, what the connection must prove, the
//! challenge); a client with the secret then sends AUTH (its answer) and
//! checks the server's proof in the reply before any other request.

use super::protocol::{
    put_bytes, Command, Encoder, Limits, ServerInfo, HELLO_V2_ACK, HELLO_V2_NONCE, REPLY_OK,
    VALIDATE_MAGIC,
};
use crate::error::{Error, Result, Status};
use crate::security::access::Admission;
use crate::security::auth::{Nonce, Secret};
use crate::security::handshake::{Answered, Challenged};

/// The client's opening: VALIDATE, PING with `pid` (answered first, with
/// `pid`), and the HELLO probe (answered second).
pub(crate) fn opening(pid: u32) -> Vec<u8> {
    let mut opening = Encoder::request(Command::Validate)
        .u32(VALIDATE_MAGIC)
        .finish();
    opening.extend(Encoder::request(Command::Ping).u32(pid).finish());
    opening.extend(Encoder::request(Command::Ping).u32(HELLO_V2_NONCE).finish());
    opening
}

/// What the client learned from the answer to its HELLO probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Greeted {
    /// A PyTorch server (or distcore's with its extensions off).
    PyTorch,
    /// A distcore server with these limits; `Some`: authenticate against
    /// this challenge before anything else.
    Distcore {
        limits: Limits,
        challenge: Option<Nonce>,
        /// Keys may be leased to sessions.
        leases: bool,
        /// Sessions outlive the server: resumed on another of the store.
        sessions_outlive: bool,
    },
}

/// What a client that holds `secret` (or not) makes of the answer to its
/// HELLO probe from the server at `peer`: the PING's answer and, from a
/// distcore server, its info. An error when the two cannot talk: either
/// side requires what the other cannot give.
pub(crate) fn greeted(
    peer: &str,
    answer: u32,
    info: &[u8],
    secret: Option<&Secret>,
) -> Result<Greeted> {
    match answer {
        HELLO_V2_NONCE if secret.is_some() => Err(Error::permission_denied(format!(
            "the TCPStore at {peer} cannot authenticate (a PyTorch server, or distcore's with extensions off): \
             a client with a secret talks only to a server that proves it holds it"
        ))),
        HELLO_V2_NONCE => Ok(Greeted::PyTorch),
        HELLO_V2_ACK => {
            let info = ServerInfo::decode(info).ok_or_else(|| {
                Error::new(Status::Protocol, "the server's info is not one we know")
            })?;
            if info.tls_required {
                return Err(Error::permission_denied(format!(
                    "the TCPStore at {peer} serves this client's address only over TLS: \
                     give the client the CA certificate that signed the server's (tls_ca)"
                )));
            }
            let challenge = match (secret, info.challenge) {
                (Some(_), Some(challenge)) => Some(challenge),
                (Some(_), None) => {
                    return Err(Error::permission_denied(format!(
                        "the TCPStore at {peer} has no secret, so it cannot prove it is the server meant: \
                         start it with the same secret as its clients"
                    )))
                }
                (None, _) if info.auth_required => {
                    return Err(Error::permission_denied(format!(
                        "the TCPStore at {peer} requires authentication: give this client the server's secret"
                    )))
                }
                (None, _) => None,
            };
            Ok(Greeted::Distcore {
                limits: info.limits,
                challenge,
                leases: info.leases,
                sessions_outlive: info.sessions_outlive,
            })
        }
        other => Err(Error::network(format!(
            "unexpected PING answer 0x{other:08x}"
        ))),
    }
}

/// The client's AUTH request answering `challenge` with its fresh `nonce`,
/// and what checks the server's proof in the reply.
pub(crate) fn auth_request(
    secret: &Secret,
    challenge: &Nonce,
    nonce: Nonce,
) -> (Answered, Vec<u8>) {
    let (answered, answer) = Answered::answer(secret, challenge, nonce);
    let request = Encoder::request(Command::Auth)
        .bytes(&answer.nonce)
        .bytes(&answer.proof)
        .finish();
    (answered, request)
}

/// The client's verdict on AUTH's reply from `peer`: `reply` is the
/// server's proof, or the server's refusal.
pub(crate) fn authenticated(
    peer: &str,
    secret: &Secret,
    answered: &Answered,
    reply: Result<Vec<u8>>,
) -> Result<()> {
    let proof = reply.map_err(|e| match e.status() {
        Status::PermissionDenied => Error::permission_denied(format!(
            "the TCPStore at {peer} refused this client: {}",
            e.message()
        )),
        _ => e,
    })?;
    if !answered.server_proved(secret, &proof) {
        return Err(Error::permission_denied(format!(
            "the TCPStore at {peer} does not hold this client's secret (its proof is wrong)"
        )));
    }
    Ok(())
}

/// The server's info for a connection admitted as `admission`, sent
/// `challenge` (the server has a secret).
pub(crate) fn server_info(
    limits: Limits,
    admission: Admission,
    challenge: Option<&Challenged>,
    leases: bool,
    sessions_outlive: bool,
) -> ServerInfo {
    ServerInfo {
        limits,
        auth_required: admission == Admission::MustAuthenticate,
        tls_required: admission == Admission::MustUseTls,
        challenge: challenge.map(|c| *c.challenge()),
        leases,
        sessions_outlive,
    }
}

/// The server's side of AUTH on a connection sent `challenge`: its reply
/// (OK and the server's proof) if the client's `nonce` and `proof` show it
/// holds `secret`, else why not (for the client and the log; never a word
/// of the secret).
pub(crate) fn answer_auth(
    secret: Option<&Secret>,
    challenge: Option<&Challenged>,
    nonce: &[u8],
    proof: &[u8],
) -> std::result::Result<Vec<u8>, &'static str> {
    let (Some(secret), Some(challenge)) = (secret, challenge) else {
        return Err("the server has no secret to authenticate with");
    };
    let server_proof = challenge
        .admit(secret, nonce, proof)
        .ok_or("authentication failed: wrong secret")?;
    let mut reply = vec![REPLY_OK];
    put_bytes(&mut reply, &server_proof);
    Ok(reply)
}
