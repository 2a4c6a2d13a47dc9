//! The challenge-response every distcore connection with a shared secret
//! runs, socket-free: one module, a server side and a client side, used by
//! the TCPStore's server core and client (`store/tcp/handshake.rs` frames
//! it in the TCPStore's protocol) and by the RPC agent
//! (`rpc/handshake.rs` frames it in the agent's).
//!
//! 1. The server sends a fresh random challenge ([`Challenged`]).
//! 2. The client answers with its own nonce and its proof of both
//!    ([`Answered::answer`], an [`Answer`] of [`ANSWER_LEN`] bytes).
//! 3. The server checks the proof ([`Challenged::admit`]) and, if it holds,
//!    sends its own proof, which the client checks
//!    ([`Answered::server_proved`]) before it sends anything else.
//!
//! Nonces are passed in (the drivers draw them from
//! [`super::auth::nonce`]), so both sides are deterministic under test;
//! what each message looks like on the wire is its protocol's.

use super::auth::{as_nonce, Nonce, Secret, NONCE_LEN, PROOF_LEN};

/// Bytes of an answer to a challenge: the client's nonce and its proof.
pub(crate) const ANSWER_LEN: usize = NONCE_LEN + PROOF_LEN;

/// A client's answer to a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The client's own nonce.
    pub(crate) nonce: Nonce,
    /// Its proof that it holds the secret, for both nonces.
    pub(crate) proof: Vec<u8>,
}

impl Answer {
    /// The nonce then the proof, as one byte string.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ANSWER_LEN);
        bytes.extend_from_slice(&self.nonce);
        bytes.extend_from_slice(&self.proof);
        bytes
    }
}

/// The server side: a connection that was sent `challenge` and has not
/// answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Challenged {
    challenge: Nonce,
}

impl Challenged {
    /// A connection sent `challenge` (fresh and random for each).
    pub(crate) fn new(challenge: Nonce) -> Challenged {
        Challenged { challenge }
    }

    /// The challenge to send.
    pub(crate) fn challenge(&self) -> &Nonce {
        &self.challenge
    }

    /// Checks the client's answer (its nonce and proof, as received): the
    /// server's own proof to send back if the client holds `secret`,
    /// `None` if it does not (a wrong secret, a malformed nonce, or a proof
    /// made for another challenge).
    pub(crate) fn admit(&self, secret: &Secret, nonce: &[u8], proof: &[u8]) -> Option<Vec<u8>> {
        let nonce = as_nonce(nonce).filter(|n| secret.check_client(&self.challenge, n, proof))?;
        Some(secret.server_proof(&self.challenge, &nonce))
    }
}

/// The client side: a connection that answered a challenge and waits for
/// the server's proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    challenge: Nonce,
    nonce: Nonce,
}

impl Answered {
    /// Answers `challenge` with the client's fresh `nonce`.
    pub(crate) fn answer(secret: &Secret, challenge: &Nonce, nonce: Nonce) -> (Answered, Answer) {
        let proof = secret.client_proof(challenge, &nonce);
        let answered = Answered {
            challenge: *challenge,
            nonce,
        };
        (answered, Answer { nonce, proof })
    }

    /// Whether `proof` shows that the server holds `secret` too.
    pub(crate) fn server_proved(&self, secret: &Secret, proof: &[u8]) -> bool {
        secret.check_server(&self.challenge, &self.nonce, proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(bytes: &[u8]) -> Secret {
        Secret::new(bytes.to_vec()).unwrap()
    }

    #[test]
    fn both_sides_prove_the_same_secret_to_each_other() {
        let shared = secret(b"correct horse");
        let server = Challenged::new([7; NONCE_LEN]);
        let (client, answer) = Answered::answer(&shared, server.challenge(), [9; NONCE_LEN]);
        assert_eq!(answer.to_bytes().len(), ANSWER_LEN);
        let proof = server.admit(&shared, &answer.nonce, &answer.proof).unwrap();
        assert!(client.server_proved(&shared, &proof));
        // The client's proof is no server's proof (roles are signed).
        assert!(!client.server_proved(&shared, &answer.proof));
    }

    #[test]
    fn a_wrong_secret_a_replay_or_a_cut_message_fails_either_side() {
        let (shared, wrong) = (secret(b"correct horse"), secret(b"battery staple"));
        let server = Challenged::new([7; NONCE_LEN]);
        let (_, answer) = Answered::answer(&wrong, server.challenge(), [9; NONCE_LEN]);
        assert_eq!(server.admit(&shared, &answer.nonce, &answer.proof), None);
        // An answer to another connection's challenge.
        let (_, replayed) = Answered::answer(&shared, &[8; NONCE_LEN], [9; NONCE_LEN]);
        assert_eq!(
            server.admit(&shared, &replayed.nonce, &replayed.proof),
            None
        );
        let (client, answer) = Answered::answer(&shared, server.challenge(), [9; NONCE_LEN]);
        assert_eq!(
            server.admit(&shared, &answer.nonce[..31], &answer.proof),
            None
        );
        assert_eq!(
            server.admit(&shared, &answer.nonce, &answer.proof[..31]),
            None
        );
        // A server with another secret cannot prove itself to the client.
        let (_, impostors) = Answered::answer(&wrong, server.challenge(), [9; NONCE_LEN]);
        let proof = server
            .admit(&wrong, &impostors.nonce, &impostors.proof)
            .unwrap();
        assert!(!client.server_proved(&shared, &proof));
    }
}
