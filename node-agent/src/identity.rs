//! The node's identity on disk: its private key (0600, generated here, never sent anywhere), the
//! certificate the controller signed, the fleet CA, and which controller it belongs to.
//!
//! Layout of the state directory (default `/var/lib/node-agent`, mode 0700):
//! `agent.json` (written last: its presence means "enrolled"), `node.key`, `node.crt`, `ca.crt`.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetadm_common::fsutil::{ensure_dir, write_atomic, write_private};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("this host is not enrolled (no {0}); run `node-agent enroll --controller HOST:PORT --token TOKEN --ca-hash sha256:...` first")]
    NotEnrolled(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Crypto {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
}

/// What `agent.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentConfig {
    pub controller: String,
    pub node_name: String,
    pub enrolled_at: u64,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("agent.json")
    }
    pub fn key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.root.join("node.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn session(&self) -> PathBuf {
        self.root.join("session.json")
    }
    pub fn machine_id(&self) -> PathBuf {
        self.root.join("machine-id")
    }
    pub fn is_enrolled(&self) -> bool {
        self.config().exists()
    }
    pub fn ensure(&self) -> Result<(), IdentityError> {
        ensure_dir(&self.root, 0o700).map_err(|source| IdentityError::Io {
            what: "cannot create state directory",
            path: self.root.clone(),
            source,
        })
    }
}

/// A freshly generated key with a CSR for it.
pub struct KeyAndCsr {
    pub key: KeyPair,
    pub csr_der: Vec<u8>,
}

/// Generate an ECDSA P-256 key and a CSR naming `node_name`.
pub fn new_key_and_csr(node_name: &str) -> Result<KeyAndCsr, IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| IdentityError::Crypto { what: "cannot generate key", source })?;
    let mut params = CertificateParams::new(vec![node_name.to_string()])
        .map_err(|source| IdentityError::Crypto { what: "invalid node name for a certificate", source })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node_name);
    let csr =
        params.serialize_request(&key).map_err(|source| IdentityError::Crypto { what: "cannot create CSR", source })?;
    Ok(KeyAndCsr { key, csr_der: csr.der().to_vec() })
}

/// The loaded identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub config: AgentConfig,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn read(path: &Path, what: &'static str) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io { what, path: path.to_path_buf(), source })
}

/// A certificate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a certificate: {0}")]
pub struct BadCertificate(String);

/// Validity window of a PEM certificate.
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), BadCertificate> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| BadCertificate(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| BadCertificate(e.to_string()))?;
    let t = |ts: i64| UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    Ok((t(cert.validity().not_before.timestamp()), t(cert.validity().not_after.timestamp())))
}

/// Does the certificate carry this key's public key?
pub fn cert_matches_key(cert_pem: &str, key: &KeyPair) -> bool {
    let Ok(der) = CertificateDer::from_pem_slice(cert_pem.as_bytes()) else { return false };
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else { return false };
    cert.tbs_certificate.subject_pki.raw == rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
}

impl Identity {
    pub fn load(dir: &StateDir) -> Result<Self, IdentityError> {
        if !dir.is_enrolled() {
            return Err(IdentityError::NotEnrolled(dir.config()));
        }
        let config: AgentConfig = serde_json::from_str(&read(&dir.config(), "cannot read")?)
            .map_err(|e| IdentityError::Corrupt(dir.config(), e.to_string()))?;
        let key_pem = read(&dir.key(), "cannot read private key")?;
        let cert_pem = read(&dir.cert(), "cannot read certificate")?;
        let ca_pem = read(&dir.ca(), "cannot read fleet CA")?;
        let (not_before, not_after) =
            validity(&cert_pem).map_err(|e| IdentityError::Corrupt(dir.cert(), e.to_string()))?;
        Ok(Self { config, key_pem, cert_pem, ca_pem, not_before, not_after })
    }

    /// Persist key, certificate and CA; `agent.json` last so a crash never leaves a half identity
    /// that claims to be enrolled.
    pub fn save(
        dir: &StateDir,
        config: &AgentConfig,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<(), IdentityError> {
        dir.ensure()?;
        let io = |what: &'static str, path: PathBuf| move |source| IdentityError::Io { what, path, source };
        write_private(&dir.key(), key_pem.as_bytes()).map_err(io("cannot write private key", dir.key()))?;
        write_atomic(&dir.cert(), cert_pem.as_bytes(), 0o644).map_err(io("cannot write certificate", dir.cert()))?;
        write_atomic(&dir.ca(), ca_pem.as_bytes(), 0o644).map_err(io("cannot write fleet CA", dir.ca()))?;
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| IdentityError::Corrupt(dir.config(), e.to_string()))?;
        write_atomic(&dir.config(), &json, 0o600).map_err(io("cannot write", dir.config()))?;
        Ok(())
    }

    /// When to renew: at 70% of the certificate's lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life.mul_f64(0.7)
    }

    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    pub fn tls_identity(&self) -> Result<fleetadm_common::dial::ClientIdentity, IdentityError> {
        let bad = |what: &str| IdentityError::Corrupt(PathBuf::from(what), "not valid PEM".into());
        let chain = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|_| bad("node.crt"))?];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|_| bad("node.key"))?;
        Ok(fleetadm_common::dial::ClientIdentity { chain, key })
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|_| IdentityError::Corrupt(PathBuf::from("ca.crt"), "not valid PEM".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_names_the_node_and_key_file_is_private() {
        let kc = new_key_and_csr("n1").unwrap();
        let params = rcgen::CertificateSigningRequestParams::from_der(&kc.csr_der.as_slice().into()).unwrap();
        assert_eq!(params.params.subject_alt_names.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("state"));
        // a self-signed stand-in certificate is enough to test persistence
        let cert = CertificateParams::new(vec!["n1".into()]).unwrap().self_signed(&kc.key).unwrap();
        let cfg = AgentConfig { controller: "127.0.0.1:1".into(), node_name: "n1".into(), enrolled_at: 1 };
        Identity::save(&sd, &cfg, &kc.key.serialize_pem(), &cert.pem(), &cert.pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(sd.key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&sd.root).unwrap().permissions().mode() & 0o777, 0o700);
        let id = Identity::load(&sd).unwrap();
        assert_eq!(id.config, cfg);
        assert!(cert_matches_key(&id.cert_pem, &kc.key));
        assert!(id.renew_at() > id.not_before && id.renew_at() < id.not_after);
    }

    #[test]
    fn not_enrolled_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(&StateDir::new(dir.path())).unwrap_err();
        assert!(err.to_string().contains("node-agent enroll"), "{err}");
    }
}
