//! The fleet CA (ECDSA P-256): created on first start under `DATA_DIR/pki`, reused afterwards.
//! It signs the controller's serving certificate and every node's client certificate.
use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetadm_common::fsutil::{ensure_dir, write_atomic, write_private};
use fleetadm_common::pin::CaPin;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of the controller's serving certificate (`serve --server-cert-validity`).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Tolerate this much clock skew between controller and nodes.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{what} at {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("fleet CA files are inconsistent: {0} exists but {1} does not; restore both or remove both")]
    HalfCa(PathBuf, PathBuf),
    #[error("cannot parse certificate {0}")]
    Parse(String),
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io { what, path: path.to_path_buf(), source }
}

/// A certificate the controller issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial: String,
    pub not_after_unix: u64,
}

/// The controller's TLS serving identity: leaf + CA chain, and key.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub chain_pem: String,
    pub key_pem: String,
    /// Serial (hex) of the leaf.
    pub serial: String,
    pub not_after: std::time::SystemTime,
}

impl ServerCert {
    /// Reissue once less than a third of `validity` is left.
    pub fn due(&self, validity: Duration) -> bool {
        self.not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default() < validity / 3
    }
}

/// Parse `server.pem` (private key, then the leaf certificate): the pair must belong together.
fn parse_server_pem(pem: &str, ca_pem: &str) -> Option<(ServerCert, BTreeSet<String>)> {
    let end = "-----END PRIVATE KEY-----";
    let split = pem.find(end)? + end.len();
    let (key_pem, cert_pem) = (pem[..split].trim().to_string() + "\n", pem[split..].trim().to_string() + "\n");
    let key = KeyPair::from_pem(&key_pem).ok()?;
    let der = pem_to_der(&cert_pem).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    if cert.tbs_certificate.subject_pki.raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return None;
    }
    let not_after = std::time::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let sans = cert_sans(&cert);
    let serial = hex::encode(cert.raw_serial());
    Some((ServerCert { chain_pem: format!("{cert_pem}{ca_pem}"), key_pem, serial, not_after }, sans))
}

pub struct FleetCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    pin: CaPin,
    dir: PathBuf,
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte, so the hex form is stable
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn offset(d: Duration, forward: bool) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    if forward {
        now + d
    } else {
        now - d
    }
}

impl FleetCa {
    /// Load the CA from `DIR/pki`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = data_dir.join("pki");
        ensure_dir(&dir, 0o700).map_err(io("cannot create PKI directory", &dir))?;
        let crt = dir.join("ca.crt");
        let key = dir.join("ca.key");
        let (cert_pem, key_pem) = match (crt.exists(), key.exists()) {
            (true, true) => (
                fs::read_to_string(&crt).map_err(io("cannot read fleet CA certificate", &crt))?,
                fs::read_to_string(&key).map_err(io("cannot read fleet CA key", &key))?,
            ),
            (false, false) => {
                let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("generate CA key"))?;
                let mut params = CertificateParams::default();
                params.distinguished_name = rcgen::DistinguishedName::new();
                params.distinguished_name.push(DnType::CommonName, "fleetadm fleet CA");
                params.distinguished_name.push(DnType::OrganizationName, "fleetadm");
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages =
                    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
                params.not_before = offset(BACKDATE, false);
                params.not_after = offset(CA_VALIDITY, true);
                params.serial_number = Some(random_serial().0);
                let cert = params.self_signed(&kp).map_err(rc("self-sign fleet CA"))?;
                // Key first: a crash between the two writes leaves a key without a cert, which
                // the next start reports instead of silently minting a second CA.
                write_private(&key, kp.serialize_pem().as_bytes()).map_err(io("cannot write fleet CA key", &key))?;
                write_atomic(&crt, cert.pem().as_bytes(), 0o644)
                    .map_err(io("cannot write fleet CA certificate", &crt))?;
                tracing::info!(path = %crt.display(), "created fleet CA");
                (cert.pem(), kp.serialize_pem())
            }
            (true, false) => return Err(PkiError::HalfCa(crt, key)),
            (false, true) => return Err(PkiError::HalfCa(key, crt)),
        };
        let kp = KeyPair::from_pem(&key_pem).map_err(rc("parse fleet CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, kp).map_err(rc("load fleet CA certificate"))?;
        let cert_der = pem_to_der(&cert_pem)?;
        let pin = CaPin::of_cert_der(&cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(Self { cert_pem, cert_der, issuer, pin, dir })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo: what agents pin.
    pub fn pin(&self) -> &CaPin {
        &self.pin
    }

    /// The serving certificate for `names` (DNS names or IP addresses). Reused if it covers
    /// exactly these names and is not close to expiry; otherwise reissued.
    pub fn server_cert(&self, names: &[String], validity: Duration) -> Result<ServerCert, PkiError> {
        // One file, key then certificate, replaced atomically: the two never diverge.
        let path = self.dir.join("server.pem");
        let wanted: BTreeSet<String> = names.iter().cloned().collect();
        if let Ok(text) = fs::read_to_string(&path) {
            match parse_server_pem(&text, &self.cert_pem) {
                Some((sc, have)) if have == wanted && !sc.due(validity) => return Ok(sc),
                Some(_) => {}
                None => {
                    tracing::warn!(path = %path.display(), "serving certificate and key do not parse or do not match; reissuing")
                }
            }
        }
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rc("generate server key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "fleetadm controller");
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(BACKDATE.min(validity / 4), false);
        params.not_after = offset(validity, true);
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&kp, &self.issuer).map_err(rc("sign server certificate"))?;
        let text = format!("{}{}", kp.serialize_pem(), cert.pem());
        write_private(&path, text.as_bytes()).map_err(io("cannot write serving certificate", &path))?;
        // The two-file layout of older controllers.
        for old in ["server.crt", "server.key"] {
            let _ = fs::remove_file(self.dir.join(old));
        }
        let not_after =
            std::time::UNIX_EPOCH + Duration::from_secs(offset(validity, true).unix_timestamp().max(0) as u64);
        tracing::info!(names = ?names, serial = %serial_hex, "issued controller serving certificate");
        Ok(ServerCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: kp.serialize_pem(),
            serial: serial_hex,
            not_after,
        })
    }

    /// Sign a vetted CSR as a node client certificate. Everything but the public key comes from
    /// the controller: subject, SAN, CA=false, key usage, client-auth EKU, validity, serial.
    pub fn sign_node(
        &self,
        mut csr: CertificateSigningRequestParams,
        node_name: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let (serial, serial_hex) = random_serial();
        let not_after = offset(validity, true);
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_name);
        params.distinguished_name.push(DnType::OrganizationName, "fleetadm:nodes");
        params.subject_alt_names = vec![SanType::DnsName(node_name.try_into().map_err(rc("node name as DNS SAN"))?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = offset(BACKDATE.min(validity / 4), false);
        params.not_after = not_after;
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(rc("sign node certificate"))?;
        Ok(IssuedCert { pem: cert.pem(), serial: serial_hex, not_after_unix: not_after.unix_timestamp().max(0) as u64 })
    }
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    Ok(SanType::DnsName(name.to_string().try_into().map_err(rc("DNS name for server certificate"))?))
}

fn cert_sans(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    out.insert(d.to_string());
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// First certificate in a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec()).map_err(|e| PkiError::Parse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(name: &str) -> (KeyPair, CertificateSigningRequestParams) {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec![name.to_string()]).unwrap();
        let csr = params.serialize_request(&kp).unwrap();
        (kp, CertificateSigningRequestParams::from_der(csr.der()).unwrap())
    }

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = FleetCa::load_or_create(dir.path()).unwrap();
        let b = FleetCa::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert_eq!(a.pin(), b.pin());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("pki/ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn half_a_ca_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join("pki/ca.key")).unwrap();
        assert!(matches!(FleetCa::load_or_create(dir.path()), Err(PkiError::HalfCa(..))));
    }

    #[test]
    fn node_certs_carry_only_what_the_controller_decides() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let (_kp, mut csr) = csr_for("node-1");
        csr.params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = ca.sign_node(csr, "node-1", Duration::from_secs(3600)).unwrap();
        let der = pem_to_der(&issued.pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(cert_sans(&cert), BTreeSet::from(["node-1".to_string()]));
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap();
        assert_eq!(cn, "node-1");
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
        let left = cert.validity().time_to_expiration().unwrap().whole_seconds();
        assert!(left > 3500 && left <= 3600, "{left}");
    }

    #[test]
    fn server_cert_is_reissued_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let v = SERVER_VALIDITY;
        let a = ca.server_cert(&["127.0.0.1".into(), "localhost".into()], v).unwrap();
        let b = ca.server_cert(&["127.0.0.1".into(), "localhost".into()], v).unwrap();
        assert_eq!(a.chain_pem, b.chain_pem);
        let c = ca.server_cert(&["127.0.0.1".into(), "10.1.2.3".into()], v).unwrap();
        assert_ne!(a.chain_pem, c.chain_pem);
        assert!(c.chain_pem.ends_with(ca.cert_pem()));
    }

    #[test]
    fn server_key_and_certificate_never_diverge() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let names = vec!["127.0.0.1".to_string()];
        let a = ca.server_cert(&names, SERVER_VALIDITY).unwrap();
        let pem = dir.path().join("pki/server.pem");
        assert_eq!(fs::metadata(&pem).unwrap().permissions().mode() & 0o777, 0o600);
        // A key that is not the certificate's (what a crash between two writes used to leave):
        // never served, a fresh pair is issued instead.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        let leaf = &a.chain_pem[..a.chain_pem.len() - ca.cert_pem().len()];
        fs::write(&pem, format!("{other}{leaf}")).unwrap();
        let b = ca.server_cert(&names, SERVER_VALIDITY).unwrap();
        assert_ne!(a.serial, b.serial);
        assert!(parse_server_pem(&fs::read_to_string(&pem).unwrap(), ca.cert_pem()).is_some());
        // Due once a third of its lifetime is left.
        let now = std::time::SystemTime::now();
        let at = |left: u64| ServerCert { not_after: now + Duration::from_secs(left), ..b.clone() };
        assert!(!at(25).due(Duration::from_secs(30)));
        assert!(at(9).due(Duration::from_secs(30)));
        assert!(ServerCert { not_after: now - Duration::from_secs(1), ..b.clone() }.due(Duration::from_secs(30)));
    }
}
