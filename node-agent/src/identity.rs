//! The node's identity on disk: its private key (0600, generated here, never sent anywhere), the
//! certificate the controller signed, the fleet CA, and which controller it belongs to.
//!
//! Layout of the state directory (default `/var/lib/node-agent`, mode 0700): `identity` is a
//! symlink to `identity.<random>/`, a directory holding `agent.json`, `node.key`, `node.crt` and
//! `ca.crt`. A new identity (enrollment, renewal) is written to a fresh directory, fsynced, and
//! made current by renaming a new symlink over `identity`: the key, its certificate and the CA
//! change together or not at all. Start-up removes whatever an interrupted change left behind.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetadm_common::fsutil::{ensure_dir, write_atomic};
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
    /// The HTTP CONNECT proxy given at enrollment (`--proxy`), used by `run` unless the config
    /// file names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

const LINK: &str = "identity";
const STAGE_PREFIX: &str = "identity.";
const LINK_TMP_PREFIX: &str = ".identity.link.";
/// Files of the flat layout used by node-agent 0.1 before the staged identity directory.
const LEGACY: [&str; 4] = ["agent.json", "node.key", "node.crt", "ca.crt"];

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The current identity directory (through the `identity` symlink).
    pub fn identity(&self) -> PathBuf {
        self.root.join(LINK)
    }
    pub fn config(&self) -> PathBuf {
        self.identity().join("agent.json")
    }
    pub fn key(&self) -> PathBuf {
        self.identity().join("node.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.identity().join("node.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.identity().join("ca.crt")
    }
    pub fn session(&self) -> PathBuf {
        self.root.join("session.json")
    }
    pub fn machine_id(&self) -> PathBuf {
        self.root.join("machine-id")
    }
    fn legacy(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub fn is_enrolled(&self) -> bool {
        self.config().exists() || self.legacy("agent.json").exists()
    }
    pub fn ensure(&self) -> Result<(), IdentityError> {
        ensure_dir(&self.root, 0o700).map_err(|source| IdentityError::Io {
            what: "cannot create state directory",
            path: self.root.clone(),
            source,
        })
    }

    /// Put the directory in a consistent state after a crash: keep the identity the symlink
    /// names, delete staged directories and temporary links, migrate the flat layout of older
    /// agents. Idempotent; run before every load and save.
    pub fn recover(&self) -> Result<(), IdentityError> {
        if self.tidy()? && self.legacy("agent.json").exists() {
            self.migrate_legacy()?;
        }
        Ok(())
    }

    /// Delete what an interrupted change left behind; true when there is no current identity.
    fn tidy(&self) -> Result<bool, IdentityError> {
        let io = |what: &'static str, path: PathBuf| move |source| IdentityError::Io { what, path, source };
        let current = match fs::read_link(self.identity()) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(IdentityError::Corrupt(self.identity(), "is not a symlink".into()))
            }
            Err(e) => return Err(io("cannot read", self.identity())(e)),
        };
        let entries = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io("cannot list", self.root.clone())(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(LINK_TMP_PREFIX) {
                fs::remove_file(&path).map_err(io("cannot remove", path.clone()))?;
            } else if name.starts_with(STAGE_PREFIX) && current.as_deref() != Some(Path::new(&name)) {
                fs::remove_dir_all(&path).map_err(io("cannot remove", path.clone()))?;
            }
        }
        if current.is_some() {
            // A migration that stopped after the switch: the flat files are stale copies.
            for f in LEGACY {
                let _ = fs::remove_file(self.legacy(f));
            }
        }
        Ok(current.is_none())
    }

    fn migrate_legacy(&self) -> Result<(), IdentityError> {
        let config: AgentConfig = serde_json::from_str(&read(&self.legacy("agent.json"), "cannot read")?)
            .map_err(|e| IdentityError::Corrupt(self.legacy("agent.json"), e.to_string()))?;
        let key_pem = read(&self.legacy("node.key"), "cannot read private key")?;
        let cert_pem = read(&self.legacy("node.crt"), "cannot read certificate")?;
        let ca_pem = read(&self.legacy("ca.crt"), "cannot read fleet CA")?;
        // An older agent wrote the key before the certificate: a crash in between left a pair that
        // does not belong together, which no restart can repair.
        Identity::save(self, &config, &key_pem, &cert_pem, &ca_pem)?;
        for f in LEGACY {
            let _ = fs::remove_file(self.legacy(f));
        }
        fleetadm_common::fsutil::sync_dir(&self.root);
        tracing::info!(dir = %self.root.display(), "identity moved to the staged-directory layout");
        Ok(())
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

/// The certificate must carry the public key of the private key it is stored with.
fn check_pair(key_pem: &str, cert_pem: &str, what: &Path) -> Result<(), IdentityError> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| IdentityError::Corrupt(what.to_path_buf(), format!("the private key does not parse: {e}")))?;
    if !cert_matches_key(cert_pem, &key) {
        return Err(IdentityError::Corrupt(
            what.to_path_buf(),
            "the certificate is not for this node's private key (an interrupted renewal by an older node-agent?); re-enroll with `node-agent enroll --force` and a new token".into(),
        ));
    }
    Ok(())
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
        dir.recover()?;
        if !dir.config().exists() {
            return Err(IdentityError::NotEnrolled(dir.config()));
        }
        let config: AgentConfig = serde_json::from_str(&read(&dir.config(), "cannot read")?)
            .map_err(|e| IdentityError::Corrupt(dir.config(), e.to_string()))?;
        let key_pem = read(&dir.key(), "cannot read private key")?;
        let cert_pem = read(&dir.cert(), "cannot read certificate")?;
        let ca_pem = read(&dir.ca(), "cannot read fleet CA")?;
        check_pair(&key_pem, &cert_pem, &dir.cert())?;
        let (not_before, not_after) =
            validity(&cert_pem).map_err(|e| IdentityError::Corrupt(dir.cert(), e.to_string()))?;
        Ok(Self { config, key_pem, cert_pem, ca_pem, not_before, not_after })
    }

    /// Make (config, key, certificate, CA) the current identity, all four at once: written to a
    /// fresh directory, fsynced, then switched to by one rename. A crash at any point leaves
    /// either the old identity or the new one, never a mix.
    pub fn save(
        dir: &StateDir,
        config: &AgentConfig,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<(), IdentityError> {
        check_pair(key_pem, cert_pem, Path::new("the new certificate"))?;
        dir.ensure()?;
        dir.tidy()?;
        let io = |what: &'static str, path: PathBuf| move |source| IdentityError::Io { what, path, source };
        let (stage_name, stage) = loop {
            let name = format!("{STAGE_PREFIX}{:016x}", rand::random::<u64>());
            let path = dir.root.join(&name);
            match fs::create_dir(&path) {
                Ok(()) => break (name, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("cannot create", path)(e)),
            }
        };
        ensure_dir(&stage, 0o700).map_err(io("cannot create", stage.clone()))?;
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| IdentityError::Corrupt(dir.config(), e.to_string()))?;
        let files: [(&str, &[u8], u32); 4] = [
            ("node.key", key_pem.as_bytes(), 0o600),
            ("node.crt", cert_pem.as_bytes(), 0o644),
            ("ca.crt", ca_pem.as_bytes(), 0o644),
            ("agent.json", &json, 0o600),
        ];
        for (name, data, mode) in files {
            let p = stage.join(name);
            write_atomic(&p, data, mode).map_err(io("cannot write", p.clone()))?;
        }
        fleetadm_common::fsutil::sync_dir(&stage);
        let old = fs::read_link(dir.identity()).ok();
        let tmp = dir.root.join(format!("{LINK_TMP_PREFIX}{:016x}", rand::random::<u64>()));
        std::os::unix::fs::symlink(&stage_name, &tmp).map_err(io("cannot create", tmp.clone()))?;
        fs::rename(&tmp, dir.identity()).map_err(io("cannot switch to the new identity", dir.identity()))?;
        fleetadm_common::fsutil::sync_dir(&dir.root);
        if let Some(old) = old.filter(|o| o != Path::new(&stage_name)) {
            let _ = fs::remove_dir_all(dir.root.join(old));
        }
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
    use std::os::unix::fs::PermissionsExt;

    /// A key and a self-signed stand-in certificate for it (enough to test persistence).
    fn pair(name: &str) -> (String, String) {
        let kc = new_key_and_csr(name).unwrap();
        let cert = CertificateParams::new(vec![name.into()]).unwrap().self_signed(&kc.key).unwrap();
        (kc.key.serialize_pem(), cert.pem())
    }

    fn cfg(name: &str) -> AgentConfig {
        AgentConfig { controller: "127.0.0.1:1".into(), node_name: name.into(), enrolled_at: 1, proxy: None }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn csr_names_the_node_and_key_file_is_private() {
        let kc = new_key_and_csr("n1").unwrap();
        let params = rcgen::CertificateSigningRequestParams::from_der(&kc.csr_der.as_slice().into()).unwrap();
        assert_eq!(params.params.subject_alt_names.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("state"));
        let cert = CertificateParams::new(vec!["n1".into()]).unwrap().self_signed(&kc.key).unwrap();
        Identity::save(&sd, &cfg("n1"), &kc.key.serialize_pem(), &cert.pem(), &cert.pem()).unwrap();
        assert_eq!(fs::metadata(sd.key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&sd.root).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(sd.identity()).unwrap().permissions().mode() & 0o777, 0o700);
        let id = Identity::load(&sd).unwrap();
        assert_eq!(id.config, cfg("n1"));
        assert!(cert_matches_key(&id.cert_pem, &kc.key));
        assert!(id.renew_at() > id.not_before && id.renew_at() < id.not_after);
    }

    #[test]
    fn not_enrolled_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(&StateDir::new(dir.path())).unwrap_err();
        assert!(err.to_string().contains("node-agent enroll"), "{err}");
    }

    #[test]
    fn a_key_never_lands_without_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("s"));
        let (k1, c1) = pair("n1");
        Identity::save(&sd, &cfg("n1"), &k1, &c1, &c1).unwrap();
        // A renewal whose certificate is not for its key changes nothing.
        let (k2, _) = pair("n1");
        let err = Identity::save(&sd, &cfg("n1"), &k2, &c1, &c1).unwrap_err();
        assert!(err.to_string().contains("not for this node's private key"), "{err}");
        let id = Identity::load(&sd).unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), (k1.as_str(), c1.as_str()));
        // A proper renewal replaces both, and leaves exactly one identity directory.
        let (k3, c3) = pair("n1");
        Identity::save(&sd, &cfg("n1"), &k3, &c3, &c1).unwrap();
        let id = Identity::load(&sd).unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), (k3.as_str(), c3.as_str()));
        assert_eq!(names(&sd.root).iter().filter(|n| n.starts_with(STAGE_PREFIX)).count(), 1);
    }

    #[test]
    fn every_interrupted_change_recovers_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("s"));
        // 1. A first enrollment that stopped before the switch: not enrolled, and the staged
        //    directory (with a key in it) is removed.
        sd.ensure().unwrap();
        let (k0, c0) = pair("n1");
        fs::create_dir(sd.root.join("identity.00000000deadbeef")).unwrap();
        fs::write(sd.root.join("identity.00000000deadbeef/node.key"), &k0).unwrap();
        assert!(matches!(Identity::load(&sd), Err(IdentityError::NotEnrolled(_))));
        assert!(names(&sd.root).is_empty(), "{:?}", names(&sd.root));

        let (k1, c1) = pair("n1");
        Identity::save(&sd, &cfg("n1"), &k1, &c1, &c1).unwrap();
        let current = fs::read_link(sd.identity()).unwrap();
        // 2. A renewal that stopped while writing its directory (key written, no certificate).
        fs::create_dir(sd.root.join("identity.0000000000000002")).unwrap();
        fs::write(sd.root.join("identity.0000000000000002/node.key"), &k0).unwrap();
        // 3. ... or after making its symlink, before renaming it into place.
        fs::create_dir(sd.root.join("identity.0000000000000003")).unwrap();
        fs::write(sd.root.join("identity.0000000000000003/node.crt"), &c0).unwrap();
        std::os::unix::fs::symlink("identity.0000000000000003", sd.root.join(".identity.link.0000000000000003"))
            .unwrap();
        let id = Identity::load(&sd).unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), (k1.as_str(), c1.as_str()));
        assert_eq!(names(&sd.root), vec!["identity".to_string(), current.to_string_lossy().into_owned()]);

        // 4. A renewal that switched but did not remove the old directory: the new one is used.
        let old = sd.root.join(&current);
        let keep = dir.path().join("old-copy");
        fs::rename(&old, &keep).unwrap();
        let (k2, c2) = pair("n1");
        Identity::save(&sd, &cfg("n1"), &k2, &c2, &c1).unwrap();
        fs::rename(&keep, &old).unwrap();
        let id = Identity::load(&sd).unwrap();
        assert_eq!(id.key_pem, k2);
        assert!(!old.exists());
    }

    #[test]
    fn the_flat_layout_of_older_agents_is_migrated_or_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("s"));
        sd.ensure().unwrap();
        let (k1, c1) = pair("n1");
        let write_flat = |key: &str, cert: &str| {
            fs::write(sd.root.join("node.key"), key).unwrap();
            fs::write(sd.root.join("node.crt"), cert).unwrap();
            fs::write(sd.root.join("ca.crt"), &c1).unwrap();
            fs::write(sd.root.join("agent.json"), serde_json::to_vec(&cfg("n1")).unwrap()).unwrap();
        };
        // The state an old agent's crash between its two writes left: refused, with the way out.
        let (k2, _) = pair("n1");
        write_flat(&k2, &c1);
        assert!(sd.is_enrolled());
        let err = Identity::load(&sd).unwrap_err();
        assert!(err.to_string().contains("node-agent enroll --force"), "{err}");
        // A consistent flat identity moves into the staged layout, and the flat files go.
        write_flat(&k1, &c1);
        let id = Identity::load(&sd).unwrap();
        assert_eq!(id.key_pem, k1);
        assert!(!sd.root.join("node.key").exists() && !sd.root.join("agent.json").exists());
        assert!(sd.is_enrolled());
    }
}
