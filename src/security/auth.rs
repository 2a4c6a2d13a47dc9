//! Shared-secret authentication by challenge and response: the secret never
//! travels. The server sends a fresh random challenge; the client answers
//! with its own nonce and an HMAC-SHA256, keyed by the secret, of both
//! nonces; the server checks it (in constant time) and proves in turn that
//! it holds the secret too, so a client never talks to an impostor. Each
//! proof is bound to its role, so neither can be replayed as the other, and
//! to the connection's nonces, so none can be replayed on another.
//!
//! The exchange itself is [`super::handshake`]'s.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, Result};

/// Bytes of a challenge or of a client nonce.
pub(crate) const NONCE_LEN: usize = 32;

/// Bytes of a proof (an HMAC-SHA256 tag).
pub(crate) const PROOF_LEN: usize = ring::digest::SHA256_OUTPUT_LEN;

/// A random challenge or client nonce.
pub(crate) type Nonce = [u8; NONCE_LEN];

/// A shared secret. Its bytes never appear in `Debug` output, logs or
/// error messages.
#[derive(Clone)]
pub struct Secret {
    key: Arc<hmac::Key>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret of these bytes (not empty; 32 random bytes are plenty).
    pub fn new(bytes: Vec<u8>) -> Result<Secret> {
        if bytes.is_empty() {
            return Err(Error::invalid_argument("the secret is empty"));
        }
        Ok(Secret {
            key: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &bytes)),
        })
    }

    /// The secret in the file at `path`, without one trailing newline
    /// (`\n` or `\r\n`), so `echo "$SECRET" > file` works.
    pub fn from_file(path: &Path) -> Result<Secret> {
        let mut bytes = std::fs::read(path).map_err(|e| {
            Error::invalid_argument(format!("reading the secret file {}: {e}", path.display()))
        })?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        Secret::new(bytes).map_err(|_| {
            Error::invalid_argument(format!("the secret file {} is empty", path.display()))
        })
    }

    /// The secret in the environment variable `name`.
    pub fn from_env(name: &str) -> Result<Secret> {
        let value = std::env::var_os(name).ok_or_else(|| {
            Error::invalid_argument(format!("the environment variable {name} is not set"))
        })?;
        Secret::new(std::os::unix::ffi::OsStringExt::into_vec(value)).map_err(|_| {
            Error::invalid_argument(format!("the environment variable {name} is empty"))
        })
    }

    fn sign(&self, role: Role, challenge: &Nonce, client_nonce: &Nonce) -> hmac::Tag {
        hmac::sign(&self.key, &signed(role, challenge, client_nonce))
    }

    fn verify(&self, role: Role, challenge: &Nonce, client_nonce: &Nonce, proof: &[u8]) -> bool {
        hmac::verify(&self.key, &signed(role, challenge, client_nonce), proof).is_ok()
    }

    /// The client's proof for `challenge`, with its own `client_nonce`.
    pub(super) fn client_proof(&self, challenge: &Nonce, client_nonce: &Nonce) -> Vec<u8> {
        self.sign(Role::Client, challenge, client_nonce)
            .as_ref()
            .to_vec()
    }

    /// Whether `proof` is the client's proof for these nonces.
    pub(super) fn check_client(
        &self,
        challenge: &Nonce,
        client_nonce: &Nonce,
        proof: &[u8],
    ) -> bool {
        self.verify(Role::Client, challenge, client_nonce, proof)
    }

    /// The server's proof, sent once the client's checked out.
    pub(super) fn server_proof(&self, challenge: &Nonce, client_nonce: &Nonce) -> Vec<u8> {
        self.sign(Role::Server, challenge, client_nonce)
            .as_ref()
            .to_vec()
    }

    /// Whether `proof` is the server's proof for these nonces.
    pub(super) fn check_server(
        &self,
        challenge: &Nonce,
        client_nonce: &Nonce,
        proof: &[u8],
    ) -> bool {
        self.verify(Role::Server, challenge, client_nonce, proof)
    }
}

/// Who signs: part of what is signed, so a proof of one is never one of
/// the other.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Role {
    Client = 1,
    Server = 2,
}

/// What a proof signs: the protocol's label, the signer's role and both
/// nonces.
fn signed(role: Role, challenge: &Nonce, client_nonce: &Nonce) -> Vec<u8> {
    let mut message = Vec::with_capacity(16 + 2 * NONCE_LEN);
    message.extend_from_slice(b"distcore-auth-1");
    message.push(role as u8);
    message.extend_from_slice(challenge);
    message.extend_from_slice(client_nonce);
    message
}

/// A fresh random nonce from the operating system's generator.
pub(crate) fn nonce() -> Result<Nonce> {
    let mut nonce = [0; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::internal("the system's random generator failed"))?;
    Ok(nonce)
}

/// `bytes` as a nonce, if it is one's length.
pub(crate) fn as_nonce(bytes: &[u8]) -> Option<Nonce> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_check_out_only_with_the_same_secret_role_and_nonces() {
        let secret = Secret::new(b"correct horse".to_vec()).unwrap();
        let other = Secret::new(b"battery staple".to_vec()).unwrap();
        let (challenge, mine) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(challenge, mine);
        let proof = secret.client_proof(&challenge, &mine);
        assert_eq!(proof.len(), PROOF_LEN, "an HMAC-SHA256");
        assert!(secret.check_client(&challenge, &mine, &proof));
        assert!(
            !other.check_client(&challenge, &mine, &proof),
            "another secret"
        );
        assert!(
            !secret.check_server(&challenge, &mine, &proof),
            "another role"
        );
        assert!(
            !secret.check_client(&mine, &challenge, &proof),
            "other nonces"
        );
        assert!(
            !secret.check_client(&challenge, &mine, &proof[..31]),
            "cut short"
        );
        let answer = secret.server_proof(&challenge, &mine);
        assert!(secret.check_server(&challenge, &mine, &answer));
        assert!(!other.check_server(&challenge, &mine, &answer));
    }

    #[test]
    fn secrets_come_from_files_and_the_environment_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"hunter2\r\n").unwrap();
        let from_file = Secret::from_file(&path).unwrap();
        let plain = Secret::new(b"hunter2".to_vec()).unwrap();
        let (c, n) = (nonce().unwrap(), nonce().unwrap());
        assert!(plain.check_client(&c, &n, &from_file.client_proof(&c, &n)));
        assert_eq!(format!("{from_file:?}"), "Secret(..)");
        std::fs::write(&path, b"\n").unwrap();
        assert!(Secret::from_file(&path)
            .unwrap_err()
            .message()
            .contains("empty"));
        let missing = Secret::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.message().contains("reading the secret file"));
        assert!(Secret::from_env("DISTCORE_TEST_NO_SUCH_VARIABLE")
            .unwrap_err()
            .message()
            .contains("is not set"));
        assert!(Secret::new(Vec::new()).is_err());
    }
}
