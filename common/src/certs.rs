//! Reading a Kubernetes host's PKI the way `kubeadm certs check-expiration` lists it: which file
//! holds which kubeadm-named certificate, and what a certificate (or a kubeconfig's client
//! certificate) says about itself.
use std::path::{Path, PathBuf};

use base64::Engine;
use fleetadm_proto::CertInfo;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertReadError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoPem(String),
    #[error("{path} is not an X.509 certificate: {why}")]
    BadCert { path: String, why: String },
    #[error("{path} is not a kubeconfig with a client certificate: {why}")]
    BadKubeconfig { path: String, why: String },
}

/// Where a certificate lives, relative to the Kubernetes directory (/etc/kubernetes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A PEM file.
    Pem(&'static str),
    /// A kubeconfig's client certificate (embedded, or the file it names).
    Kubeconfig(&'static str),
}

/// kubeadm's names for the certificates of a host, and where each is (CAs last, like kubeadm).
pub const KNOWN: &[(&str, Source, bool)] = &[
    ("admin.conf", Source::Kubeconfig("admin.conf"), false),
    ("super-admin.conf", Source::Kubeconfig("super-admin.conf"), false),
    ("controller-manager.conf", Source::Kubeconfig("controller-manager.conf"), false),
    ("scheduler.conf", Source::Kubeconfig("scheduler.conf"), false),
    ("kubelet.conf", Source::Kubeconfig("kubelet.conf"), false),
    ("apiserver", Source::Pem("pki/apiserver.crt"), false),
    ("apiserver-etcd-client", Source::Pem("pki/apiserver-etcd-client.crt"), false),
    ("apiserver-kubelet-client", Source::Pem("pki/apiserver-kubelet-client.crt"), false),
    ("front-proxy-client", Source::Pem("pki/front-proxy-client.crt"), false),
    ("etcd-healthcheck-client", Source::Pem("pki/etcd/healthcheck-client.crt"), false),
    ("etcd-peer", Source::Pem("pki/etcd/peer.crt"), false),
    ("etcd-server", Source::Pem("pki/etcd/server.crt"), false),
    ("ca", Source::Pem("pki/ca.crt"), true),
    ("front-proxy-ca", Source::Pem("pki/front-proxy-ca.crt"), true),
    ("etcd-ca", Source::Pem("pki/etcd/ca.crt"), true),
];

/// What one certificate says about itself.
pub fn describe(name: &str, path: &str, pem: &[u8]) -> Result<CertInfo, CertReadError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_slice(pem).map_err(|_| CertReadError::NoPem(path.to_string()))?;
    let bad = |why: String| CertReadError::BadCert { path: path.to_string(), why };
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        sans.push(std::net::Ipv6Addr::from(a).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Ok(CertInfo {
        name: name.to_string(),
        path: path.to_string(),
        subject: cert.subject().to_string(),
        not_before_unix: secs(cert.validity().not_before),
        not_after_unix: secs(cert.validity().not_after),
        is_ca: cert.is_ca(),
        sans,
        ..Default::default()
    })
}

/// The client certificate of a kubeconfig: `client-certificate-data`, or the file named by
/// `client-certificate` (kubelet.conf points at /var/lib/kubelet/pki/kubelet-client-current.pem),
/// resolved below `root`.
pub fn kubeconfig_client_cert(root: &Path, path: &str, yaml: &str) -> Result<(String, Vec<u8>), CertReadError> {
    let bad = |why: &str| CertReadError::BadKubeconfig { path: path.to_string(), why: why.to_string() };
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| bad(&e.to_string()))?;
    let user = &doc["users"][0]["user"];
    if let Some(data) = user["client-certificate-data"].as_str() {
        let pem = base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|e| bad(&e.to_string()))?;
        return Ok((path.to_string(), pem));
    }
    if let Some(file) = user["client-certificate"].as_str() {
        let p = Path::new(file);
        let full: PathBuf = root.join(p.strip_prefix("/").unwrap_or(p));
        let pem = std::fs::read(&full).map_err(|source| CertReadError::Read { path: file.to_string(), source })?;
        return Ok((file.to_string(), pem));
    }
    Err(bad("users[0].user has neither client-certificate-data nor client-certificate"))
}

/// Every known certificate present below `kube_dir` (a host's /etc/kubernetes; `root` is where
/// absolute paths inside kubeconfigs resolve). Missing files are left out (a worker holds only
/// `ca` and `kubelet.conf`); unreadable ones are listed with their error.
pub fn scan(root: &Path, kube_dir: &Path) -> Vec<CertInfo> {
    let mut out = Vec::new();
    for (name, source, _) in KNOWN {
        let rel = match source {
            Source::Pem(p) | Source::Kubeconfig(p) => *p,
        };
        let full = kube_dir.join(rel);
        let shown = format!("/etc/kubernetes/{rel}");
        let text = match std::fs::read(&full) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                out.push(failed(name, &shown, &CertReadError::Read { path: shown.clone(), source }));
                continue;
            }
        };
        let info = match source {
            Source::Pem(_) => describe(name, &shown, &text),
            Source::Kubeconfig(_) => kubeconfig_client_cert(root, &shown, &String::from_utf8_lossy(&text))
                .and_then(|(path, pem)| describe(name, &path, &pem)),
        };
        out.push(info.unwrap_or_else(|e| failed(name, &shown, &e)));
    }
    out
}

fn failed(name: &str, path: &str, e: &CertReadError) -> CertInfo {
    CertInfo { name: name.to_string(), path: path.to_string(), error: crate::error_chain(e), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, days: i64, ca: bool) -> String {
        let mut p = rcgen::CertificateParams::new(vec!["apiserver.cluster.local".into(), "10.0.0.1".into()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn scans_pem_files_and_kubeconfigs_and_says_what_is_broken() {
        let root = tempfile::tempdir().unwrap();
        let kube = root.path().join("etc/kubernetes");
        std::fs::create_dir_all(kube.join("pki/etcd")).unwrap();
        std::fs::write(kube.join("pki/apiserver.crt"), cert("kube-apiserver", 10, false)).unwrap();
        std::fs::write(kube.join("pki/ca.crt"), cert("kubernetes", 3650, true)).unwrap();
        std::fs::write(kube.join("pki/etcd/peer.crt"), "garbage").unwrap();
        let admin = cert("kubernetes-admin", 365, false);
        let b64 = base64::engine::general_purpose::STANDARD.encode(admin.as_bytes());
        std::fs::write(
            kube.join("admin.conf"),
            format!("apiVersion: v1\nkind: Config\nusers:\n- name: a\n  user:\n    client-certificate-data: {b64}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("var/lib/kubelet/pki")).unwrap();
        std::fs::write(
            root.path().join("var/lib/kubelet/pki/kubelet-client-current.pem"),
            cert("system:node:h1", 300, false),
        )
        .unwrap();
        std::fs::write(
            kube.join("kubelet.conf"),
            "apiVersion: v1\nusers:\n- name: k\n  user:\n    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n",
        )
        .unwrap();
        let found = scan(root.path(), &kube);
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["admin.conf", "kubelet.conf", "apiserver", "etcd-peer", "ca"]);
        let api = &found[2];
        assert!(api.subject.contains("kube-apiserver") && !api.is_ca && api.error.is_empty());
        assert!(
            api.sans.contains(&"10.0.0.1".to_string()) && api.sans.contains(&"apiserver.cluster.local".to_string())
        );
        let left = api.not_after_unix as i64 - time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((9 * 86400..=10 * 86400).contains(&left), "{left}");
        assert!(found[4].is_ca);
        assert_eq!(found[1].path, "/var/lib/kubelet/pki/kubelet-client-current.pem");
        assert!(found[3].error.contains("no PEM certificate"), "{}", found[3].error);
        assert!(found[3].not_after_unix == 0);
    }
}
