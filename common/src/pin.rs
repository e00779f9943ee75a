//! The CA pin: `sha256:` followed by the hex SHA-256 of the CA certificate's DER-encoded
//! SubjectPublicKeyInfo. This is the value kubeadm prints as `--discovery-token-ca-cert-hash`.
use sha2::{Digest, Sha256};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Error)]
pub enum PinError {
    #[error("CA pin {0:?} is malformed: expected sha256: followed by 64 hex digits")]
    Malformed(String),
    #[error("certificate could not be parsed")]
    BadCertificate(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// A parsed pin; compares in constant time-insensitive way (the pin is public).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPin([u8; 32]);

impl CaPin {
    pub fn parse(text: &str) -> Result<Self, PinError> {
        let hexpart = text.trim().strip_prefix("sha256:").ok_or_else(|| PinError::Malformed(text.to_string()))?;
        let bytes = hex::decode(hexpart).map_err(|_| PinError::Malformed(text.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| PinError::Malformed(text.to_string()))?;
        Ok(Self(arr))
    }

    /// The pin of a DER certificate.
    pub fn of_cert_der(der: &[u8]) -> Result<Self, PinError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(PinError::BadCertificate)?;
        let spki = cert.tbs_certificate.subject_pki.raw;
        Ok(Self(Sha256::digest(spki).into()))
    }

    pub fn matches_cert_der(&self, der: &[u8]) -> bool {
        Self::of_cert_der(der).map(|p| &p == self).unwrap_or(false)
    }
}

impl std::fmt::Display for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_round_trips_and_matches_spki_hash() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".into()]).unwrap().self_signed(&key).unwrap();
        let pin = CaPin::of_cert_der(cert.der()).unwrap();
        // Computed independently: SHA-256 over the SPKI DER that rcgen encodes for the key.
        let expected: [u8; 32] = Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)).into();
        assert_eq!(pin, CaPin(expected));
        let text = pin.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 7 + 64);
        assert_eq!(CaPin::parse(&text).unwrap(), pin);
        assert!(pin.matches_cert_der(cert.der()));
    }

    #[test]
    fn malformed_pins_are_rejected() {
        for bad in ["", "sha256:", "md5:00", "sha256:zz", &format!("sha256:{}", "0".repeat(62))] {
            assert!(matches!(CaPin::parse(bad), Err(PinError::Malformed(_))), "{bad}");
        }
    }
}
