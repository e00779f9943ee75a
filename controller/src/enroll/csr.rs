//! The CSR policy. A CSR is attacker input: it is size-limited, its signature is checked (by
//! rcgen/x509-parser), requests for CA status or for another name are refused with a clear
//! reason, and everything but the public key is then decided by the controller.
use rcgen::{CertificateSigningRequestParams, DnType, DnValue, IsCa, SanType};
use rustls::pki_types::CertificateSigningRequestDer;
use thiserror::Error;

/// No legitimate CSR from our agent comes close to this.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum CsrError {
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR is {0} bytes, more than the {MAX_CSR_BYTES} allowed")]
    TooLarge(usize),
    #[error("the CSR is not a valid PKCS#10 request, or its signature does not verify ({0})")]
    Invalid(String),
    #[error("the CSR asks for CA status; node certificates are never CAs")]
    AsksForCa,
    #[error("the CSR asks for the name {requested:?} but this enrollment is for {node:?}")]
    OtherName { requested: String, node: String },
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("node name {0:?} is not valid: use 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit")]
pub struct BadNodeName(pub String);

/// Node names become certificate CNs, DNS SANs and Kubernetes node names: keep them DNS-safe.
pub fn validate_node_name(name: &str) -> Result<(), BadNodeName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(BadNodeName(name.to_string()))
    }
}

/// Parse and vet a CSR for `node_name`.
pub fn vet(der: &[u8], node_name: &str) -> Result<CertificateSigningRequestParams, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| CsrError::Invalid(e.to_string()))?;
    if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(CsrError::AsksForCa);
    }
    let other = |requested: String| CsrError::OtherName { requested, node: node_name.to_string() };
    if let Some(cn) = csr.params.distinguished_name.get(&DnType::CommonName) {
        let cn = match cn {
            DnValue::PrintableString(s) => s.to_string(),
            DnValue::Utf8String(s) => s.clone(),
            other_value => format!("{other_value:?}"),
        };
        if cn != node_name {
            return Err(other(cn));
        }
    }
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) if n.as_str() == node_name => {}
            SanType::DnsName(n) => return Err(other(n.to_string())),
            SanType::IpAddress(ip) => return Err(other(ip.to_string())),
            SanType::URI(u) => return Err(other(u.to_string())),
            SanType::Rfc822Name(m) => return Err(other(m.to_string())),
            _ => return Err(other("an unsupported name type".into())),
        }
    }
    Ok(csr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, KeyPair};

    fn csr(names: Vec<String>, cn: Option<&str>, ca: bool) -> Vec<u8> {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.serialize_request(&kp).unwrap().der().to_vec()
    }

    #[test]
    fn good_csr_passes() {
        vet(&csr(vec!["n1".into()], Some("n1"), false), "n1").unwrap();
        vet(&csr(vec![], None, false), "n1").unwrap();
    }

    #[test]
    fn hostile_csrs_are_refused() {
        assert!(matches!(vet(&csr(vec![], Some("n1"), true), "n1"), Err(CsrError::AsksForCa)));
        assert!(matches!(vet(&csr(vec!["n2".into()], None, false), "n1"), Err(CsrError::OtherName { .. })));
        assert!(matches!(vet(&csr(vec![], Some("n2"), false), "n1"), Err(CsrError::OtherName { .. })));
        assert!(matches!(vet(b"garbage", "n1"), Err(CsrError::Invalid(_))));
        assert!(matches!(vet(b"", "n1"), Err(CsrError::Empty)));
        assert!(matches!(vet(&vec![0u8; MAX_CSR_BYTES + 1], "n1"), Err(CsrError::TooLarge(_))));
        // a valid CSR with one flipped byte in its signature
        let mut bad = csr(vec![], Some("n1"), false);
        let last = bad.len() - 3;
        bad[last] ^= 0x55;
        assert!(matches!(vet(&bad, "n1"), Err(CsrError::Invalid(_))));
    }

    #[test]
    fn node_names() {
        for good in ["a", "node-1", "m0.lab", "1abc"] {
            validate_node_name(good).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a b", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }
}
