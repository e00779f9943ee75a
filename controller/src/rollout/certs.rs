//! What a certificate operation (`cluster certs --renew/--add-san`) reissues and restarts: the
//! cluster's PKI inputs rebuilt from its record, the operator's names checked and expanded, and
//! the static pods each certificate is used by.
use std::time::Duration;

use super::record::ClusterRecord;
use crate::pki::kube::{self, MasterIdentity, PkiSpec, RENEWABLE};

/// The PKI inputs of a cluster as it stands (its masters, SANs, validity and version).
pub fn pki_spec(rec: &ClusterRecord, extra_sans: &[String]) -> PkiSpec {
    PkiSpec {
        cluster_name: rec.name.clone(),
        masters: rec.shape.masters.iter().map(|m| MasterIdentity { hostname: m.node.clone(), ip: m.ip }).collect(),
        vip: rec.shape.vip,
        service_cidr: rec.spec.service_cidr.clone(),
        dns_domain: rec.spec.dns_domain.clone(),
        extra_sans: extra_sans.to_vec(),
        validity: validity(rec),
        kubernetes_version: rec.spec.version.clone(),
    }
}

/// The validity the cluster's certificates were issued with: as recorded, or (for clusters
/// recorded before it was) the cluster CA's own lifetime, never a default a renewal would shrink
/// them to.
pub fn validity(rec: &ClusterRecord) -> Duration {
    if rec.spec.cert_validity_secs > 0 {
        return Duration::from_secs(rec.spec.cert_validity_secs);
    }
    fleetadm_common::certs::describe("ca", "pki/ca.crt", rec.secrets.pki.ca_cert_pem.as_bytes())
        .ok()
        .map(|c| Duration::from_secs(c.not_after_unix.saturating_sub(c.not_before_unix)))
        .filter(|d| !d.is_zero())
        .unwrap_or(kube::DEFAULT_VALIDITY)
}

/// The operator's `--renew` names, checked: `all` is every renewable certificate the cluster's
/// layout has. Sorted, without repeats.
pub fn expand(rec: &ClusterRecord, names: &[String]) -> Result<Vec<String>, String> {
    let layout = kube::Layout::for_version(&rec.spec.version);
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if n == "all" {
            out.extend(
                RENEWABLE.iter().filter(|r| layout.super_admin || **r != "super-admin.conf").map(|r| r.to_string()),
            );
        } else if RENEWABLE.contains(&n.as_str()) {
            if n == "super-admin.conf" && !layout.super_admin {
                return Err(format!("{} has no super-admin.conf (kubeadm has it from v1.29 on)", rec.spec.version));
            }
            out.push(n.clone());
        } else {
            return Err(format!(
                "{n:?} is not a certificate that can be renewed; use all or one of: {} (CAs are not renewed)",
                RENEWABLE.join(", ")
            ));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A SAN the operator asked for: an IP address or a DNS name (RFC 1123 labels, `*.` allowed
/// first), lower-cased.
pub fn check_san(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(s);
    }
    let body = s.strip_prefix("*.").unwrap_or(&s);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.len() > 253 || body.is_empty() || !body.split('.').all(label_ok) {
        return Err(format!("--add-san {s:?} is neither an IP address nor a DNS name"));
    }
    Ok(s)
}

/// The static pods using `certs`, in the order they are restarted, with where each answers on a
/// master at `ip`: etcd first (the apiserver needs it), then the apiserver, then its clients.
pub fn pods(certs: &[String], ip: std::net::IpAddr) -> Vec<(&'static str, String)> {
    let uses = |names: &[&str]| certs.iter().any(|c| names.contains(&c.as_str()));
    let mut out = Vec::new();
    if uses(&["etcd-server", "etcd-peer"]) {
        out.push(("etcd", "127.0.0.1:2379".to_string()));
    }
    if uses(&["apiserver", "apiserver-etcd-client", "apiserver-kubelet-client", "front-proxy-client"]) {
        out.push(("kube-apiserver", std::net::SocketAddr::new(ip, 6443).to_string()));
    }
    if uses(&["controller-manager.conf"]) {
        out.push(("kube-controller-manager", "127.0.0.1:10257".to_string()));
    }
    if uses(&["scheduler.conf"]) {
        out.push(("kube-scheduler", "127.0.0.1:10259".to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_and_pods() {
        assert_eq!(check_san("API.Example.org").unwrap(), "api.example.org");
        assert_eq!(check_san("192.0.2.7").unwrap(), "192.0.2.7");
        assert!(check_san("*.apps.example.org").is_ok());
        for bad in ["", "a b", "-x.org", "x..org", "*.", "host_name"] {
            assert!(check_san(bad).is_err(), "{bad:?}");
        }
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let names = |p: Vec<(&'static str, String)>| p.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(pods(&["apiserver".into()], ip)), ["kube-apiserver"]);
        assert_eq!(pods(&["apiserver".into()], ip)[0].1, "10.0.0.1:6443");
        assert!(pods(&["admin.conf".into(), "super-admin.conf".into()], ip).is_empty());
        let all: Vec<String> = RENEWABLE.iter().map(|s| s.to_string()).collect();
        assert_eq!(names(pods(&all, ip)), ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]);
    }
}
