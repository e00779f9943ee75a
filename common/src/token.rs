//! Bootstrap tokens in kubeadm's format: `[a-z0-9]{6}.[a-z0-9]{16}`. The first part is the public
//! id; only a SHA-256 of the second (secret) part is ever stored.
use rand::Rng;
use sha2::{Digest, Sha256};
use thiserror::Error;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, Error, PartialEq, Eq)]
#[error("bootstrap token is malformed: expected the form abcdef.0123456789abcdef ([a-z0-9]{{6}}.[a-z0-9]{{16}})")]
pub struct MalformedToken;

#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

impl BootstrapToken {
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut pick =
            |n: usize| -> String { (0..n).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect() };
        Self { id: pick(6), secret: pick(16) }
    }

    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let (id, secret) = text.trim().split_once('.').ok_or(MalformedToken)?;
        let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
        if !ok(id, 6) || !ok(secret, 16) {
            return Err(MalformedToken);
        }
        Ok(Self { id: id.to_string(), secret: secret.to_string() })
    }

    /// Hex SHA-256 of the secret part: what the controller stores.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// The full token text. Handle with care: this is a credential.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_kubeadm_format() {
        for _ in 0..100 {
            let t = BootstrapToken::generate();
            let text = t.expose();
            assert_eq!(text.len(), 23);
            assert_eq!(BootstrapToken::parse(&text).unwrap(), t);
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde!",
            "abcdef-0123456789abcdef",
        ] {
            assert_eq!(BootstrapToken::parse(bad), Err(MalformedToken), "{bad}");
        }
    }

    #[test]
    fn hash_depends_on_secret_only_and_debug_redacts() {
        let a = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
        let b = BootstrapToken::parse("zzzzzz.0123456789abcdef").unwrap();
        let c = BootstrapToken::parse("abcdef.0123456789abcdeg").unwrap();
        assert_eq!(a.secret_hash(), b.secret_hash());
        assert_ne!(a.secret_hash(), c.secret_hash());
        assert!(!format!("{a:?}").contains("0123456789"));
    }
}
