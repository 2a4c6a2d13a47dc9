//! The RPC agent's handshake, socket-free: the challenge-response of
//! [`crate::security::handshake`] in the agent's frames, and what a
//! connection may read before it is done.
//!
//! Workers with a shared secret authenticate each connection before any
//! request: the connecting worker announces it will (HELLO, empty), the
//! accepting worker sends a CHALLENGE (a fresh 32-byte challenge) as soon
//! as it accepts, the connecting one answers AUTH (its nonce and proof),
//! and the accepting one proves itself in turn (PROOF). The connecting
//! worker sends no request before that proof checks out; the accepting one
//! closes a connection that sends anything else first, and one without a
//! secret closes on HELLO, so a mismatch fails at once either way.
//!
//! Until its handshake is done, a connection reads nothing but the
//! handshake's frames, one at a time, each of at most
//! [`MAX_HANDSHAKE_FRAME`] bytes: a longer frame or one of another kind
//! closes it as soon as its length or kind arrives, before any of its body
//! is buffered ([`Handshake::screen`]). A connection whose handshake (TLS,
//! the secret's, or both) is not done [`HANDSHAKE_TIMEOUT`] after it was
//! accepted or opened is closed by the event loop.

use std::time::Duration;

use super::frame::{frame, kind, HEADER, MAX_FRAME};
use super::message::WorkerId;
use crate::error::{Result, Status};
use crate::security::auth::{as_nonce, Nonce, Secret, NONCE_LEN};
use crate::security::handshake::{Answered, Challenged, ANSWER_LEN};

/// The longest frame of the handshake, header included: AUTH, a nonce and
/// a proof. Until its handshake is done, a connection reads no longer one.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = HEADER + ANSWER_LEN;

/// How long a connection has, from when it is accepted or opened, to finish
/// its handshake (TLS, the secret's, or both) before it is closed.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection failed: its status and what happened.
pub(crate) type Failure = (Status, String);

/// Where a connection's authentication stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Authenticated, or nothing to prove: requests and responses flow.
    Done,
    /// Accepted and challenged: the peer's HELLO comes first.
    AwaitingHello(Challenged),
    /// Accepted: the peer must answer its challenge next.
    AwaitingAnswer(Challenged),
    /// Outbound: the peer's challenge comes first.
    AwaitingChallenge,
    /// Outbound: answered the peer's challenge; its proof is due.
    AwaitingProof(Answered),
}

impl Handshake {
    /// An accepted connection of worker `me`: with a secret, challenged
    /// at once with `challenge` (fresh and random), the CHALLENGE frame to
    /// send.
    pub(crate) fn accepted(challenge: Option<Nonce>, me: WorkerId) -> (Handshake, Option<Vec<u8>>) {
        match challenge {
            None => (Handshake::Done, None),
            Some(challenge) => {
                let challenge_frame = frame(kind::CHALLENGE, 0, me, &challenge).ok();
                (
                    Handshake::AwaitingHello(Challenged::new(challenge)),
                    challenge_frame,
                )
            }
        }
    }

    /// An outbound connection of a worker with a secret (or not).
    pub(crate) fn connecting(with_secret: bool) -> Handshake {
        match with_secret {
            true => Handshake::AwaitingChallenge,
            false => Handshake::Done,
        }
    }

    /// What an outbound connection of worker `me` sends first once
    /// connected: HELLO if it authenticates.
    pub(crate) fn on_connected(&self, me: WorkerId) -> Option<Vec<u8>> {
        (*self == Handshake::AwaitingChallenge)
            .then(|| frame(kind::HELLO, 0, me, &[]).ok())
            .flatten()
    }

    /// Requests and responses flow.
    pub(crate) fn is_done(&self) -> bool {
        *self == Handshake::Done
    }

    /// A handshake frame of `kind` arrived on a connection of worker `me`,
    /// which holds `secret` (if any): the next state, and the frame to send
    /// back if any. `nonce` draws the client's fresh nonce. A failure
    /// closes the connection.
    pub(crate) fn on_frame(
        &mut self,
        secret: Option<&Secret>,
        me: WorkerId,
        frame_kind: u8,
        payload: &[u8],
        nonce: impl FnOnce() -> Result<Nonce>,
    ) -> std::result::Result<Option<Vec<u8>>, Failure> {
        let denied = |why: &str| Err((Status::PermissionDenied, why.to_owned()));
        let Some(secret) = secret else {
            return denied("the peer wants authentication, and this worker has no secret");
        };
        let (next, reply) = match (frame_kind, *self) {
            (kind::HELLO, Handshake::AwaitingHello(challenged)) => {
                (Handshake::AwaitingAnswer(challenged), None)
            }
            (kind::CHALLENGE, Handshake::AwaitingChallenge) => {
                let Some(challenge) = as_nonce(payload) else {
                    return denied("a malformed challenge");
                };
                let nonce = nonce().map_err(|e| (e.status(), e.message().to_owned()))?;
                let (answered, answer) = Answered::answer(secret, &challenge, nonce);
                let auth = frame(kind::AUTH, 0, me, &answer.to_bytes());
                (Handshake::AwaitingProof(answered), Some(auth))
            }
            (kind::AUTH, Handshake::AwaitingAnswer(challenged)) => {
                let (nonce, proof) = payload.split_at(payload.len().min(NONCE_LEN));
                let Some(proof) = challenged.admit(secret, nonce, proof) else {
                    return denied("authentication failed: wrong secret");
                };
                (Handshake::Done, Some(frame(kind::PROOF, 0, me, &proof)))
            }
            (kind::PROOF, Handshake::AwaitingProof(answered)) => {
                if !answered.server_proved(secret, payload) {
                    return denied(
                        "the peer does not hold this worker's secret (its proof is wrong)",
                    );
                }
                (Handshake::Done, None)
            }
            _ => {
                return Err((
                    Status::Protocol,
                    format!("an unexpected handshake frame ({frame_kind})"),
                ))
            }
        };
        *self = next;
        reply
            .transpose()
            .map_err(|e| (e.status(), e.message().to_owned()))
    }

    /// The most a read may take from the socket: a handshake frame's
    /// worth until the handshake is done, `otherwise` after.
    pub(crate) fn read_limit(&self, otherwise: usize) -> usize {
        match self {
            Handshake::Done => otherwise,
            _ => MAX_HANDSHAKE_FRAME,
        }
    }

    /// Checks a frame of `len` bytes after its length field, and of `kind`
    /// once that has arrived, before its body is waited for. After the
    /// handshake any frame up to [`MAX_FRAME`] of a known kind goes;
    /// before it, only frames of the handshake, up to
    /// [`MAX_HANDSHAKE_FRAME`].
    pub(crate) fn screen(
        &self,
        len: usize,
        frame_kind: Option<u8>,
    ) -> std::result::Result<(), Failure> {
        if let Some((status, when)) = self.before_done() {
            if len > MAX_HANDSHAKE_FRAME - 4 {
                let why = format!(
                    "a frame of {} bytes, longer than any of the handshake ({MAX_HANDSHAKE_FRAME}), {when}",
                    len + 4
                );
                return Err((status, why));
            }
            if let Some(kind::REQUEST | kind::RESPONSE) = frame_kind {
                return Err((status, format!("a message {when}")));
            }
        }
        if !(HEADER - 4..=MAX_FRAME - 4).contains(&len) {
            return Err((Status::Protocol, format!("bad frame length {len}")));
        }
        match frame_kind {
            Some(k) if k > kind::LAST => Err((Status::Protocol, format!("bad frame kind {k}"))),
            _ => Ok(()),
        }
    }

    /// Until the handshake is done, what a frame the connection may not
    /// read yet fails it with: the status, and when the frame came (for
    /// the message). `None` once done.
    fn before_done(&self) -> Option<(Status, &'static str)> {
        match self {
            Handshake::Done => None,
            // From a peer that has not authenticated.
            Handshake::AwaitingHello(_) | Handshake::AwaitingAnswer(_) => Some((
                Status::PermissionDenied,
                "before authenticating (this worker has a secret)",
            )),
            // From a worker that has not proved itself to this one.
            Handshake::AwaitingChallenge | Handshake::AwaitingProof(_) => {
                Some((Status::Protocol, "before the peer authenticated"))
            }
        }
    }

    /// Why a connection the peer closed is gone: before the handshake was
    /// done, most likely for a secret it does not share.
    pub(crate) fn closed_by_peer(&self) -> Failure {
        if self.is_done() {
            (
                Status::Network,
                "the peer closed the connection".to_string(),
            )
        } else {
            let why = "the peer closed the connection before authenticating: \
                       does it hold the group's secret?";
            (Status::PermissionDenied, why.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::frame::decode;

    #[test]
    fn before_the_handshake_only_its_own_short_frames_are_read() {
        assert_eq!(MAX_HANDSHAKE_FRAME, 79, "docs/security.md says so");
        let (accepted, _) = Handshake::accepted(Some([0; 32]), 0);
        let longest = MAX_HANDSHAKE_FRAME - 4;
        assert!(accepted.screen(longest, Some(kind::AUTH)).is_ok());
        assert!(accepted.screen(longest, None).is_ok(), "no kind yet");
        let (status, why) = accepted.screen(longest + 1, None).unwrap_err();
        assert_eq!(status, Status::PermissionDenied);
        assert!(why.contains("a frame of 80 bytes"), "{why}");
        let (status, _) = accepted
            .screen(HEADER - 4, Some(kind::REQUEST))
            .unwrap_err();
        assert_eq!(status, Status::PermissionDenied);
        // A worker that has not proved itself to this one.
        let outbound = Handshake::connecting(true);
        let (status, _) = outbound
            .screen(256 << 20, Some(kind::CHALLENGE))
            .unwrap_err();
        assert_eq!(status, Status::Protocol);
        assert!(Handshake::Done
            .screen(256 << 20, Some(kind::REQUEST))
            .is_ok());
        let (_, why) = Handshake::Done
            .screen(HEADER - 4, Some(kind::LAST + 1))
            .unwrap_err();
        assert!(why.contains("bad frame kind"), "{why}");
    }

    /// Runs the handshake between a connecting worker holding `theirs`
    /// and an accepting one holding `ours`: the failure, if any, and who
    /// saw it (true: the accepting side).
    fn run(ours: Option<&Secret>, theirs: Option<&Secret>) -> Option<(bool, Failure)> {
        let (mut server, challenge) = Handshake::accepted(ours.map(|_| [7; 32]), 1);
        let mut client = Handshake::connecting(theirs.is_some());
        let mut to_server: Vec<Vec<u8>> = client.on_connected(2).into_iter().collect();
        let mut to_client: Vec<Vec<u8>> = challenge.into_iter().collect();
        for _ in 0..4 {
            for f in std::mem::take(&mut to_server) {
                let f = decode(&f);
                match server.on_frame(ours, 1, f.kind, f.payload, || Ok([9; 32])) {
                    Ok(reply) => to_client.extend(reply),
                    Err(failure) => return Some((true, failure)),
                }
            }
            for f in std::mem::take(&mut to_client) {
                let f = decode(&f);
                match client.on_frame(theirs, 2, f.kind, f.payload, || Ok([9; 32])) {
                    Ok(reply) => to_server.extend(reply),
                    Err(failure) => return Some((false, failure)),
                }
            }
        }
        assert!(server.is_done() && client.is_done());
        None
    }

    #[test]
    fn workers_with_the_same_secret_meet_and_any_mismatch_is_refused() {
        let secret = Secret::new(b"group".to_vec()).unwrap();
        let other = Secret::new(b"other".to_vec()).unwrap();
        assert_eq!(run(Some(&secret), Some(&secret)), None);
        assert_eq!(run(None, None), None);
        let (server_saw, (status, why)) = run(Some(&secret), Some(&other)).unwrap();
        assert!(server_saw && status == Status::PermissionDenied, "{why}");
        assert!(why.contains("wrong secret"), "{why}");
        // A worker without a secret refuses the peer's HELLO.
        let (server_saw, (status, why)) = run(None, Some(&secret)).unwrap();
        assert!(server_saw && status == Status::PermissionDenied, "{why}");
        // A worker without a secret challenged: the challenge is refused.
        let (server_saw, (status, _)) = run(Some(&secret), None).unwrap();
        assert!(!server_saw && status == Status::PermissionDenied);
    }
}
