//! kubeadm configuration per host, in the API version the Kubernetes version needs
//! (`kubeadm.k8s.io/v1beta3` before 1.31, `v1beta4` from 1.31), with the Clusterfile's extra
//! documents merged over fleetadm's defaults.
use std::net::IpAddr;

use serde_json::json;
use serde_yaml::Value;
use thiserror::Error;

use super::clusterfile::Clusterfile;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("Kubernetes version {0:?} is not of the form v1.MINOR.PATCH")]
    BadVersion(String),
    #[error("Kubernetes {0} is not supported (fleetadm supports v1.26 and later)")]
    TooOld(String),
    #[error("override {kind}: {msg}")]
    Override { kind: String, msg: String },
}

/// (major, minor, patch) of "v1.29.9" (semver after the `v`; pre-release and build parts allowed).
pub fn parse_version(v: &str) -> Result<(u32, u32, u32), RenderError> {
    let bad = || RenderError::BadVersion(v.to_string());
    let parsed = semver::Version::parse(v.strip_prefix('v').ok_or_else(bad)?).map_err(|_| bad())?;
    let small = |n: u64| u32::try_from(n).map_err(|_| bad());
    let (maj, min, pat) = (small(parsed.major)?, small(parsed.minor)?, small(parsed.patch)?);
    if maj != 1 {
        return Err(bad());
    }
    if min < 26 {
        return Err(RenderError::TooOld(v.to_string()));
    }
    Ok((maj, min, pat))
}

/// `kubeadm.k8s.io/v1beta3` before 1.31, `v1beta4` after.
pub fn kubeadm_api(version: &str) -> Result<&'static str, RenderError> {
    let (_, minor, _) = parse_version(version)?;
    Ok(if minor >= 31 { "kubeadm.k8s.io/v1beta4" } else { "kubeadm.k8s.io/v1beta3" })
}

/// Cluster-wide inputs.
#[derive(Debug, Clone)]
pub struct ClusterInputs {
    pub cluster_name: String,
    pub version: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub dns_domain: String,
    pub vip: IpAddr,
    pub cert_sans: Vec<String>,
    /// Known to the controller in advance, so joins need no round trip to master0.
    pub bootstrap_token: String,
    pub ca_cert_hash: String,
    pub cgroup_driver: String,
    pub cri_socket: String,
    pub image_repository: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// Runs `kubeadm init`.
    FirstMaster,
    /// Joins the control plane.
    Master,
    Worker,
}

#[derive(Debug, Clone)]
pub struct HostInputs {
    pub name: String,
    pub ip: IpAddr,
    pub role: HostRole,
}

pub const ENDPOINT: &str = "apiserver.cluster.local:6443";

/// `extraArgs`: a map in v1beta3, a list of {name, value} in v1beta4.
fn args(v4: bool, pairs: &[(&str, &str)]) -> serde_json::Value {
    if v4 {
        json!(pairs.iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>())
    } else {
        json!(pairs.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>())
    }
}

fn node_registration(c: &ClusterInputs, h: &HostInputs, v4: bool) -> serde_json::Value {
    let ip = h.ip.to_string();
    json!({
        "name": h.name,
        "criSocket": c.cri_socket,
        "kubeletExtraArgs": args(v4, &[("node-ip", &ip)]),
    })
}

fn to_yaml(v: serde_json::Value) -> Value {
    serde_yaml::to_value(v).unwrap_or(Value::Null)
}

/// `--shutdown-delay-duration` for kube-apiserver: ten guard probe intervals.
pub const APISERVER_SHUTDOWN_DELAY: &str = "5s";

/// Deep merge: mappings merge key by key, anything else is replaced by `over`.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The kubeadm documents for one host, as multi-document YAML.
pub fn render(c: &ClusterInputs, h: &HostInputs, cf: Option<&Clusterfile>) -> Result<String, RenderError> {
    let api = kubeadm_api(&c.version)?;
    let v4 = api.ends_with("v1beta4");
    let mut docs: Vec<(&str, serde_json::Value)> = Vec::new();
    let endpoint = json!({"advertiseAddress": h.ip.to_string(), "bindPort": 6443});
    match h.role {
        HostRole::FirstMaster => {
            // kubeadm finds the controller-generated PKI in certificatesDir and keeps it.
            let token = json!({
                "token": c.bootstrap_token,
                "groups": ["system:bootstrappers:kubeadm:default-node-token"],
                "usages": ["signing", "authentication"],
                "ttl": crate::rollout::token::JOIN_TOKEN_TTL_TEXT,
            });
            docs.push((
                "InitConfiguration",
                json!({
                    "apiVersion": api, "kind": "InitConfiguration",
                    "bootstrapTokens": [token],
                    "localAPIEndpoint": endpoint,
                    "nodeRegistration": node_registration(c, h, v4),
                }),
            ));
            let mut sans = vec![ENDPOINT.split(':').next().unwrap_or_default().to_string(), c.vip.to_string()];
            sans.extend(c.cert_sans.iter().cloned());
            docs.push((
                "ClusterConfiguration",
                json!({
                    "apiVersion": api, "kind": "ClusterConfiguration",
                    "clusterName": c.cluster_name,
                    "kubernetesVersion": c.version,
                    "controlPlaneEndpoint": ENDPOINT,
                    "certificatesDir": "/etc/kubernetes/pki",
                    "imageRepository": c.image_repository,
                    "networking": {"dnsDomain": c.dns_domain, "podSubnet": c.pod_cidr, "serviceSubnet": c.service_cidr},
                    // On SIGTERM the apiserver fails /readyz and keeps serving this long, so the
                    // workers' guards (probing /readyz every 500 ms) take it out of rotation first.
                    "apiServer": {"certSANs": sans, "extraArgs": args(v4, &[
                        ("audit-log-maxage", "7"),
                        ("shutdown-delay-duration", APISERVER_SHUTDOWN_DELAY),
                    ])},
                    "controllerManager": {"extraArgs": args(v4, &[("bind-address", "0.0.0.0")])},
                    "scheduler": {"extraArgs": args(v4, &[("bind-address", "0.0.0.0")])},
                    "etcd": {"local": {"dataDir": "/var/lib/etcd"}},
                }),
            ));
            docs.push((
                "KubeProxyConfiguration",
                json!({
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
                    "mode": "ipvs",
                    // Keep kube-proxy's hands off the agent's VIP.
                    "ipvs": {"excludeCIDRs": [format!("{}/{}", c.vip, if c.vip.is_ipv4() { 32 } else { 128 })]},
                }),
            ));
            docs.push((
                "KubeletConfiguration",
                json!({
                    "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
                    "cgroupDriver": c.cgroup_driver,
                }),
            ));
        }
        HostRole::Master | HostRole::Worker => {
            let mut join = json!({
                "apiVersion": api, "kind": "JoinConfiguration",
                "discovery": {"bootstrapToken": {
                    "apiServerEndpoint": ENDPOINT,
                    "token": c.bootstrap_token,
                    "caCertHashes": [c.ca_cert_hash],
                }},
                "nodeRegistration": node_registration(c, h, v4),
            });
            if v4 {
                join["timeouts"] = json!({"discovery": "5m0s", "tlsBootstrap": "5m0s"});
            } else {
                join["discovery"]["timeout"] = json!("5m0s");
            }
            if h.role == HostRole::Master {
                join["controlPlane"] = json!({"localAPIEndpoint": endpoint});
            }
            docs.push(("JoinConfiguration", join));
        }
    }
    let mut out = String::new();
    for (kind, doc) in docs {
        let mut value = to_yaml(doc);
        if let Some(cf) = cf {
            for (k, over) in &cf.overrides {
                if k == kind {
                    let mut over = over.clone();
                    // The override's apiVersion must not downgrade ours.
                    if let Value::Mapping(m) = &mut over {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    merge(&mut value, &over);
                }
            }
        }
        let text = serde_yaml::to_string(&value)
            .map_err(|e| RenderError::Override { kind: kind.into(), msg: e.to_string() })?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(version: &str) -> ClusterInputs {
        ClusterInputs {
            cluster_name: "lab".into(),
            version: version.into(),
            pod_cidr: "100.64.0.0/10".into(),
            service_cidr: "10.96.0.0/22".into(),
            dns_domain: "cluster.local".into(),
            vip: "10.103.97.2".parse().unwrap(),
            cert_sans: vec!["k8s.example.com".into()],
            bootstrap_token: "abcdef.0123456789abcdef".into(),
            ca_cert_hash: format!("sha256:{}", "ab".repeat(32)),
            cgroup_driver: "systemd".into(),
            cri_socket: "unix:///run/containerd/containerd.sock".into(),
            image_repository: "registry.k8s.io".into(),
        }
    }

    fn host(name: &str, ip: &str, role: HostRole) -> HostInputs {
        HostInputs { name: name.into(), ip: ip.parse().unwrap(), role }
    }

    /// Compare with a golden file; `UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/plan/golden").join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
        assert_eq!(actual, expected, "golden file {name} differs (UPDATE_GOLDEN=1 to accept)");
    }

    #[test]
    fn versions_pick_the_api() {
        assert_eq!(kubeadm_api("v1.29.9").unwrap(), "kubeadm.k8s.io/v1beta3");
        assert_eq!(kubeadm_api("v1.30.0").unwrap(), "kubeadm.k8s.io/v1beta3");
        assert_eq!(kubeadm_api("v1.31.1").unwrap(), "kubeadm.k8s.io/v1beta4");
        assert_eq!(kubeadm_api("v1.32.0-rc.1").unwrap(), "kubeadm.k8s.io/v1beta4");
        assert!(matches!(kubeadm_api("1.29.9"), Err(RenderError::BadVersion(_))));
        assert!(matches!(kubeadm_api("v1.20.0"), Err(RenderError::TooOld(_))));
        assert!(matches!(kubeadm_api("v2.0.0"), Err(RenderError::BadVersion(_))));
    }

    #[test]
    fn golden_v1beta3() {
        let c = inputs("v1.29.9");
        golden("v1beta3-init.yaml", &render(&c, &host("m1", "10.77.0.11", HostRole::FirstMaster), None).unwrap());
        golden("v1beta3-join-master.yaml", &render(&c, &host("m2", "10.77.0.12", HostRole::Master), None).unwrap());
        golden("v1beta3-join-worker.yaml", &render(&c, &host("w1", "10.77.0.21", HostRole::Worker), None).unwrap());
    }

    #[test]
    fn golden_v1beta4() {
        let c = inputs("v1.31.1");
        golden("v1beta4-init.yaml", &render(&c, &host("m1", "10.77.0.11", HostRole::FirstMaster), None).unwrap());
        golden("v1beta4-join-master.yaml", &render(&c, &host("m2", "10.77.0.12", HostRole::Master), None).unwrap());
        golden("v1beta4-join-worker.yaml", &render(&c, &host("w1", "10.77.0.21", HostRole::Worker), None).unwrap());
    }

    #[test]
    fn clusterfile_overrides_merge_over_defaults() {
        let cf = super::super::clusterfile::parse(
            "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: lab}\nspec:\n  hosts: [{ips: [10.77.0.11], roles: [master]}]\n---\napiVersion: kubeadm.k8s.io/v1beta2\nkind: ClusterConfiguration\nnetworking:\n  podSubnet: 10.244.0.0/16\n---\napiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nmaxPods: 200\n",
        )
        .unwrap();
        let out = render(&inputs("v1.29.9"), &host("m1", "10.77.0.11", HostRole::FirstMaster), Some(&cf)).unwrap();
        assert!(out.contains("podSubnet: 10.244.0.0/16"), "{out}");
        assert!(out.contains("serviceSubnet: 10.96.0.0/22"), "other networking keys kept: {out}");
        assert!(out.contains("maxPods: 200") && out.contains("cgroupDriver: systemd"));
        assert!(!out.contains("v1beta2"), "override apiVersion must not leak: {out}");
    }
}
