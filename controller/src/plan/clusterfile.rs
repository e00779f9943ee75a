//! The sealos `Clusterfile`: an `apps.sealos.io/v1beta1` `Cluster` document, optionally followed
//! by kubeadm / kube-proxy / kubelet documents merged over fleetadm's defaults.
use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml::Value;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClusterfileError {
    #[error("Clusterfile document {doc}: {msg}")]
    Yaml { doc: usize, msg: String },
    #[error("Clusterfile has no `kind: Cluster` document (apiVersion apps.sealos.io/v1beta1)")]
    NoCluster,
    #[error("Clusterfile has more than one Cluster document")]
    TwoClusters,
    #[error("Clusterfile document {doc}: unsupported apiVersion/kind {api_version}/{kind}")]
    Unsupported { doc: usize, api_version: String, kind: String },
    #[error("Clusterfile: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: ClusterSpecDoc,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    labels: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSpecDoc {
    hosts: Vec<HostDoc>,
    #[serde(default)]
    image: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    command: Vec<String>,
    /// Accepted for compatibility and ignored: fleetadm never uses SSH.
    #[serde(default)]
    #[allow(dead_code)]
    ssh: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDoc {
    ips: Vec<String>,
    roles: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    ssh: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Node,
}

/// A host named in the Clusterfile (an IP address or an enrolled node's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRef {
    pub host: String,
    pub role: Role,
    pub arch: Option<String>,
    pub env: Vec<String>,
}

/// A parsed Clusterfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Clusterfile {
    pub name: String,
    pub hosts: Vec<HostRef>,
    pub images: Vec<String>,
    pub env: Vec<String>,
    pub commands: Vec<String>,
    /// Extra documents by kind (InitConfiguration, ClusterConfiguration, JoinConfiguration,
    /// KubeProxyConfiguration, KubeletConfiguration), merged over the defaults when rendering.
    pub overrides: Vec<(String, Value)>,
}

impl Clusterfile {
    pub fn masters(&self) -> impl Iterator<Item = &HostRef> {
        self.hosts.iter().filter(|h| h.role == Role::Master)
    }
    pub fn nodes(&self) -> impl Iterator<Item = &HostRef> {
        self.hosts.iter().filter(|h| h.role == Role::Node)
    }
}

const OVERRIDE_KINDS: &[(&str, &str)] = &[
    ("kubeadm.k8s.io/", "InitConfiguration"),
    ("kubeadm.k8s.io/", "ClusterConfiguration"),
    ("kubeadm.k8s.io/", "JoinConfiguration"),
    ("kubeproxy.config.k8s.io/", "KubeProxyConfiguration"),
    ("kubelet.config.k8s.io/", "KubeletConfiguration"),
];

/// "10.0.0.1:22" / "10.0.0.1" / "[fd00::1]:22" / "node-name" -> "10.0.0.1" / "fd00::1" / "node-name".
fn host_of(s: &str) -> Result<String, ClusterfileError> {
    let bad = || ClusterfileError::Invalid(format!("host {s:?} is not an IP, IP:PORT or node name"));
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Ok(sa.ip().to_string());
    }
    if crate::enroll::csr::validate_node_name(s).is_ok() {
        return Ok(s.to_string());
    }
    Err(bad())
}

/// The Clusterfile without its `ssh` blocks (`spec.ssh`, `spec.hosts[].ssh`: sealos's SSH user
/// and root password), and how many were dropped. The text is re-serialised only when something
/// was dropped.
pub fn without_ssh(text: &str) -> Result<(String, usize), ClusterfileError> {
    let mut docs = Vec::new();
    let mut dropped = 0;
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value =
            Value::deserialize(de).map_err(|e| ClusterfileError::Yaml { doc: i + 1, msg: e.to_string() })?;
        if let Some(spec) = value.get_mut("spec").and_then(Value::as_mapping_mut) {
            dropped += usize::from(spec.remove("ssh").is_some());
            if let Some(hosts) = spec.get_mut("hosts").and_then(Value::as_sequence_mut) {
                for h in hosts.iter_mut().filter_map(Value::as_mapping_mut) {
                    dropped += usize::from(h.remove("ssh").is_some());
                }
            }
        }
        if !value.is_null() {
            docs.push(value);
        }
    }
    if dropped == 0 {
        return Ok((text.to_string(), 0));
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d).map_err(|e| ClusterfileError::Yaml { doc: 0, msg: e.to_string() })?);
    }
    Ok((out, dropped))
}

pub fn parse(text: &str) -> Result<Clusterfile, ClusterfileError> {
    let mut cluster: Option<ClusterDoc> = None;
    let mut overrides = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = Value::deserialize(de).map_err(|e| ClusterfileError::Yaml { doc, msg: e.to_string() })?;
        if value.is_null() {
            continue; // empty document (e.g. a trailing ---)
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        if kind == "Cluster" && api_version == "apps.sealos.io/v1beta1" {
            if cluster.is_some() {
                return Err(ClusterfileError::TwoClusters);
            }
            cluster =
                Some(serde_yaml::from_value(value).map_err(|e| ClusterfileError::Yaml { doc, msg: e.to_string() })?);
        } else if OVERRIDE_KINDS.iter().any(|(prefix, k)| api_version.starts_with(prefix) && kind == *k) {
            overrides.push((kind, value));
        } else {
            return Err(ClusterfileError::Unsupported { doc, api_version, kind });
        }
    }
    let c = cluster.ok_or(ClusterfileError::NoCluster)?;
    if c.metadata.name.is_empty() || crate::enroll::csr::validate_node_name(&c.metadata.name).is_err() {
        return Err(ClusterfileError::Invalid(format!(
            "metadata.name {:?} is not a valid cluster name",
            c.metadata.name
        )));
    }
    let mut hosts = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, h) in c.spec.hosts.iter().enumerate() {
        if h.ips.is_empty() {
            return Err(ClusterfileError::Invalid(format!("spec.hosts[{i}] has no ips")));
        }
        let mut role = None;
        let mut arch = None;
        for r in &h.roles {
            match r.as_str() {
                "master" => role = Some(Role::Master),
                "node" => role = Some(Role::Node),
                "amd64" | "arm64" => arch = Some(r.clone()),
                "registry" => {}
                other => {
                    return Err(ClusterfileError::Invalid(format!(
                        "spec.hosts[{i}] has unknown role {other:?} (master, node, registry, amd64, arm64)"
                    )))
                }
            }
        }
        let role =
            role.ok_or_else(|| ClusterfileError::Invalid(format!("spec.hosts[{i}] is neither master nor node")))?;
        for ip in &h.ips {
            let host = host_of(ip)?;
            if !seen.insert(host.clone()) {
                return Err(ClusterfileError::Invalid(format!("host {host} is listed twice")));
            }
            hosts.push(HostRef { host, role, arch: arch.clone(), env: h.env.clone() });
        }
    }
    if !hosts.iter().any(|h| h.role == Role::Master) {
        return Err(ClusterfileError::Invalid("at least one master is required".into()));
    }
    Ok(Clusterfile {
        name: c.metadata.name,
        hosts,
        images: c.spec.image,
        env: c.spec.env,
        commands: c.spec.command,
        overrides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: apps.sealos.io/v1beta1
kind: Cluster
metadata:
  name: default
spec:
  hosts:
  - ips: [192.168.0.2:22, 192.168.0.3:22, 192.168.0.4:22]
    roles: [master, amd64]
  - ips: [192.168.0.5:22, worker-6]
    roles: [node, amd64]
  image: [labring/kubernetes:v1.29.9]
  ssh: {passwd: ignored}
status: {}
---
apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
networking:
  podSubnet: 10.244.0.0/16
---
"#;

    #[test]
    fn ssh_credentials_are_dropped_and_the_rest_is_kept() {
        let with_host_ssh = GOOD.replace(
            "    roles: [node, amd64]\n",
            "    roles: [node, amd64]\n    ssh: {user: root, passwd: hunter2}\n",
        );
        let (text, dropped) = without_ssh(&with_host_ssh).unwrap();
        assert_eq!(dropped, 2);
        assert!(!text.contains("passwd") && !text.contains("hunter2") && !text.contains("ignored"), "{text}");
        let (a, b) = (parse(&with_host_ssh).unwrap(), parse(&text).unwrap());
        assert_eq!(a.name, b.name);
        assert_eq!(a.hosts.len(), b.hosts.len());
        assert_eq!(a.overrides.len(), b.overrides.len(), "kubeadm overrides survive");
        let plain = "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\n";
        assert_eq!(without_ssh(plain).unwrap(), (plain.to_string(), 0));
    }

    #[test]
    fn parses_a_sealos_clusterfile() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(
            c.masters().map(|h| h.host.as_str()).collect::<Vec<_>>(),
            ["192.168.0.2", "192.168.0.3", "192.168.0.4"]
        );
        assert_eq!(c.nodes().map(|h| h.host.as_str()).collect::<Vec<_>>(), ["192.168.0.5", "worker-6"]);
        assert_eq!(c.hosts[0].arch.as_deref(), Some("amd64"));
        assert_eq!(c.overrides.len(), 1);
        assert_eq!(c.overrides[0].0, "ClusterConfiguration");
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("kind: Cluster\napiVersion: apps.sealos.io/v1beta1\nmetadata: {name: x}\nspec:\n  hosts: [{ips: [1.2.3.4], roles: [master]}\n", "document 1"),
            ("apiVersion: v1\nkind: Pod\n", "unsupported apiVersion/kind v1/Pod"),
            ("apiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\n", "no `kind: Cluster`"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hosts: [{ips: [1.2.3.4], roles: [node]}]\n", "at least one master"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hosts: [{ips: [], roles: [master]}]\n", "has no ips"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hosts: [{ips: [1.2.3.4, '1.2.3.4:22'], roles: [master]}]\n", "listed twice"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hosts: [{ips: [1.2.3.4], roles: [boss]}]\n", "unknown role \"boss\""),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hosts: [{ips: ['not a host!'], roles: [master]}]\n", "is not an IP"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: x}\nspec:\n  hostz: []\n", "unknown field `hostz`"),
            ("apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: Bad_Name}\nspec:\n  hosts: [{ips: [1.2.3.4], roles: [master]}]\n", "metadata.name"),
        ];
        for (text, expect) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expect), "expected {expect:?} in {err:?}");
        }
        let two = format!("{GOOD}\n---\n{GOOD}");
        assert_eq!(parse(&two).unwrap_err(), ClusterfileError::TwoClusters);
    }
}
