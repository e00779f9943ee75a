//! Preflight checks that need only the controller's inventory. Each finding names the host, what
//! is wrong and how to fix it.
use std::collections::BTreeMap;
use std::net::IpAddr;

use fleetadm_proto::Inventory;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub host: String,
    pub message: String,
}

/// A `--pod-cidr` / `--service-cidr` that is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a CIDR (e.g. 10.96.0.0/22)")]
pub struct BadCidr(String);

/// Does `ip` fall inside `cidr`?
pub fn cidr_contains(cidr: &str, ip: IpAddr) -> Result<bool, BadCidr> {
    let net: ipnet::IpNet = cidr.trim().parse().map_err(|_| BadCidr(cidr.to_string()))?;
    Ok(net.contains(&ip))
}

/// Checks on (node name, facts, clock skew ms) for every host of the cluster.
pub fn check(
    hosts: &[(String, Option<Inventory>, i64)],
    masters: usize,
    vip: IpAddr,
    pod_cidr: &str,
    service_cidr: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let err = |out: &mut Vec<Finding>, host: &str, message: String| {
        out.push(Finding { severity: Severity::Error, host: host.into(), message })
    };
    for (cidr, what) in [(pod_cidr, "pod"), (service_cidr, "service")] {
        match cidr_contains(cidr, vip) {
            Ok(true) => {
                err(&mut out, "-", format!("the VIP {vip} is inside the {what} CIDR {cidr}; choose another --vip"))
            }
            Ok(false) => {}
            Err(e) => err(&mut out, "-", format!("{what} CIDR: {e}")),
        }
    }
    let mut names: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (node, facts, skew) in hosts {
        let Some(f) = facts else {
            err(&mut out, node, "no inventory reported yet; is the agent connected?".into());
            continue;
        };
        names.entry(f.hostname.clone()).or_default().push(node);
        if f.swap_enabled {
            err(&mut out, node, "swap is on; kubelet needs it off: swapoff -a and remove swap from /etc/fstab".into());
        }
        if skew.abs() > 5000 {
            err(
                &mut out,
                node,
                format!(
                    "clock is off by {:.1}s (more than 5s); enable NTP (timedatectl set-ntp true)",
                    *skew as f64 / 1000.0
                ),
            );
        }
        if f.cgroup_version == 1 {
            out.push(Finding {
                severity: Severity::Warning,
                host: node.clone(),
                message: "cgroup v1: supported but deprecated by Kubernetes; prefer a cgroup v2 host".into(),
            });
        }
    }
    for (hostname, nodes) in names {
        if nodes.len() > 1 {
            out.push(Finding {
                severity: Severity::Error,
                host: nodes.join(","),
                message: format!("hosts share the hostname {hostname:?}; Kubernetes node names must be unique (hostnamectl set-hostname)"),
            });
        }
    }
    // (0: the hosts are added to a cluster whose masters are not changing.)
    if masters > 0 && masters.is_multiple_of(2) {
        out.push(Finding {
            severity: Severity::Warning,
            host: "-".into(),
            message: format!(
                "{masters} masters: an even count tolerates no more failures than {} (etcd quorum)",
                masters - 1
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(hostname: &str, swap: bool) -> Option<Inventory> {
        Some(Inventory { hostname: hostname.into(), swap_enabled: swap, cgroup_version: 2, ..Default::default() })
    }

    #[test]
    fn cidr_membership() {
        assert!(cidr_contains("10.96.0.0/22", "10.96.3.255".parse().unwrap()).unwrap());
        assert!(!cidr_contains("10.96.0.0/22", "10.96.4.0".parse().unwrap()).unwrap());
        assert!(cidr_contains("100.64.0.0/10", "100.127.0.1".parse().unwrap()).unwrap());
        assert!(!cidr_contains("fd00::/8", "10.0.0.1".parse().unwrap()).unwrap());
        assert!(cidr_contains("10.0.0.0", "10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn findings_name_host_and_fix() {
        let hosts = vec![
            ("m1".to_string(), inv("same", false), 0),
            ("m2".to_string(), inv("same", true), 9000),
            ("w1".to_string(), None, 0),
        ];
        let f = check(&hosts, 2, "10.96.0.10".parse().unwrap(), "100.64.0.0/10", "10.96.0.0/22");
        let text = format!("{f:?}");
        assert!(text.contains("inside the service CIDR"), "{text}");
        assert!(f.iter().any(|x| x.host == "m2" && x.message.contains("swapoff")));
        assert!(f.iter().any(|x| x.host == "m2" && x.message.contains("clock is off by 9.0s")));
        assert!(f.iter().any(|x| x.host == "w1" && x.message.contains("no inventory")));
        assert!(f.iter().any(|x| x.host == "m1,m2" && x.message.contains("share the hostname")));
        assert!(f.iter().any(|x| x.severity == Severity::Warning && x.message.contains("even count")));
        let clean = check(
            &[("m1".into(), inv("a", false), 10)],
            1,
            "10.103.97.2".parse().unwrap(),
            "100.64.0.0/10",
            "10.96.0.0/22",
        );
        assert!(clean.is_empty(), "{clean:?}");
    }
}
