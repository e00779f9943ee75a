//! The relay's signing key: Ed25519, generated on the bastion on first use and kept there (PKCS#8
//! DER, mode 0600). The controller only ever sees the public half, as `ed25519:BASE64`.
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use super::header::SIG_LEN;
use super::RelayError;

const PREFIX: &str = "ed25519:";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.public()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Load the key at `path`, or create it there (0600, parent directory 0700) when missing.
    /// Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), RelayError> {
        let io = |source| RelayError::KeyFile { path: PathBuf::from(path), source };
        match std::fs::read(path) {
            Ok(der) => {
                let pair = Ed25519KeyPair::from_pkcs8(&der)
                    .map_err(|e| RelayError::BadKey { path: path.to_path_buf(), why: e.to_string() })?;
                Ok((Self { pair }, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| RelayError::Random)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.exists() {
                        fleetadm_common::fsutil::ensure_dir(dir, 0o700).map_err(io)?;
                    }
                }
                fleetadm_common::fsutil::write_private(path, doc.as_ref()).map_err(io)?;
                let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
                    .map_err(|e| RelayError::BadKey { path: path.to_path_buf(), why: e.to_string() })?;
                Ok((Self { pair }, true))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public key as operators paste it into `controller relays add`.
    pub fn public(&self) -> String {
        format!("{PREFIX}{}", B64.encode(self.pair.public_key().as_ref()))
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; SIG_LEN] {
        let mut out = [0u8; SIG_LEN];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// A parsed `ed25519:BASE64` public key (32 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, RelayError> {
        let bad = |why: &str| {
            RelayError::BadPublicKey(format!(
                "{why}: expected ed25519:BASE64 as printed by `controller relay --print-public-key`"
            ))
        };
        let b = text.trim().strip_prefix(PREFIX).ok_or_else(|| bad("no ed25519: prefix"))?;
        let raw = B64.decode(b).map_err(|_| bad("not base64"))?;
        let key: [u8; 32] = raw.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(Self(key))
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(msg, sig).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", B64.encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_0600_then_reloaded_and_signatures_verify_only_with_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relay.key");
        let (k, created) = SigningKey::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        let (again, created) = SigningKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k.public(), again.public());
        let pk = PublicKey::parse(&k.public()).unwrap();
        assert_eq!(pk.to_string(), k.public());
        let sig = k.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        let (other, _) = SigningKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(!PublicKey::parse(&other.public()).unwrap().verify(b"hello", &sig));
    }

    #[test]
    fn refuses_garbage_keys() {
        for bad in ["", "ed25519:", "ed25519:!!!", "rsa:AAAA", "ed25519:AAAA"] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.key");
        std::fs::write(&path, b"not a key").unwrap();
        let err = SigningKey::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("relay.key"), "{err}");
    }
}
