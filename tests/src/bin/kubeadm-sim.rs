//! Test-only stand-in for `kubeadm` (the real binaries cannot be downloaded here). Installed as
//! `kubeadm` on the lab hosts' PATH. It is strict where fleetadm must be right and plays kubeadm's
//! file-level effects so the next step has something real to find:
//!
//! - configuration: multi-document YAML; only the kinds and fields kubeadm knows for the API
//!   version (v1beta3 / v1beta4, and v1beta4 only from 1.31), extraArgs shape per version,
//!   bootstrap token format, CA hash format, kube-proxy mode;
//! - PKI (init and control-plane join): every file kubeadm expects in certificatesDir, private keys
//!   0600, the apiserver certificate valid for the endpoint name, the advertise address and the
//!   node name, signed by ca.crt; etcd server/peer certificates for this node;
//! - effects: static pod manifests, kubelet.conf (naming the kubelet's client certificate file,
//!   valid a year), /var/lib/kubelet/config.yaml, and a stand-in kubelet (its own process group,
//!   outliving kubeadm) that runs each static pod while its manifest is in
//!   /etc/kubernetes/manifests (SIGTERM when it goes, started again when it is back or dies): the
//!   apiserver serving HTTPS with pki/apiserver.crt on the advertise address :6443 (`/healthz`,
//!   `cluster-info` for discovery, a join endpoint that checks the bootstrap token), and for
//!   etcd, the controller-manager and the scheduler a listener on their ports (127.0.0.1:2379,
//!   :10257, :10259);
//! - join: resolves the endpoint through /etc/hosts, fetches cluster-info, checks the CA against
//!   `caCertHashes` like kubeadm, then talks verified TLS and presents the token;
//! - preflight like kubeadm's: init and control-plane join refuse existing static pod manifests,
//!   a non-empty /var/lib/etcd and a busy :6443; every join refuses an existing kubelet.conf, a
//!   worker join an existing pki/ca.crt (so a retry over a failed attempt fails unless it was
//!   reset first, as with the real kubeadm);
//! - bootstrap tokens expire (InitConfiguration `ttl`, default 24h; `token create --ttl`), and
//!   `kubeadm token create TOKEN --ttl D --description S --kubeconfig F` / `token delete ID
//!   --kubeconfig F` (unknown flags refused; create fails on an existing id, delete on a missing
//!   one, like kubeadm) change them through the apiserver named in the kubeconfig. The control
//!   plane's apiservers share their tokens the way etcd would: every change is replicated to each
//!   member, and a control-plane join makes the new member known to all;
//! - the stand-in apiserver behaves like kube-apiserver around a restart: on SIGTERM `/readyz`
//!   fails at once while everything else (`/healthz` included) is served for
//!   `--shutdown-delay-duration` (from the ClusterConfiguration's apiServer extraArgs, shared
//!   with joining masters like kubeadm's kubeadm-config), then it exits. `kubeadm-sim
//!   __restart-apiserver` restarts it by moving its manifest out and back; `kubeadm-sim __vip-client
//!   ADDR CA SECS` counts client requests that fail (a new connection each, every 20 ms);
//! - reset: a control-plane member first leaves etcd (every other member drops it, like
//!   kubeadm's remove-etcd-member phase), then it stops the kubelet and the pods (and waits for them to exit) and removes what init/join wrote,
//!   including the certificates directory.
//! - kubectl: `apply -f`, `drain NODE` (refuses DaemonSet pods without --ignore-daemonsets, an
//!   unknown node is NotFound) and `delete node NODE [--ignore-not-found]`, through the apiserver;
//!   Node objects (sim/nodes) are replicated to every member like tokens;
//! - upgrades: the cluster's version (kubeadm-config's kubernetesVersion) is replicated state;
//!   static pod manifests name their images at a version, and the stand-in kubelet restarts a
//!   pod whose manifest changed (running it at the manifest's version). `kubeadm upgrade plan
//!   [V]`, `upgrade apply V` (control-plane nodes only; needs `--yes` without a terminal) and
//!   `upgrade node` check kubeadm's rules (no downgrade, no skipped minor, kubeadm itself at the
//!   target: "Upgrade kubeadm first"; `upgrade node` needs the control plane upgraded first),
//!   renew the apiserver certificate for a year unless `--certificate-renewal=false` (what real
//!   kubeadm does to every certificate), roll the control-plane pods one by one and write the
//!   kubelet configuration; `apply` uploads the new version. A control-plane join refuses a
//!   kubeadm of another minor than the cluster's. Every kubelet (workers too) registers its
//!   version with the apiserver, which refuses one newer than itself; `kubectl get nodes` shows
//!   NAME STATUS ROLES VERSION, `kubectl uncordon` undoes a drain's cordon. `__restart-kubelet`
//!   and `__kubelet-active` are what the lab's `systemctl` stand-in calls;
//! - fault injection: `KUBEADM_SIM_FAIL=wait-control-plane` makes init or a control-plane join
//!   write its manifests, kubeconfigs and etcd data and then fail the way kubeadm does when the
//!   control plane never comes up (leaving all of it behind).
//!
//! Version: `KUBEADM_SIM_VERSION` (default v1.29.9).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_yaml::{Mapping, Value};
use sha2::{Digest, Sha256};

const KUBE: &str = "/etc/kubernetes";
const KUBELET_DIR: &str = "/var/lib/kubelet";
const ETCD_DIR: &str = "/var/lib/etcd";

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("kubectl") {
        if let Err(e) = kubectl(&args) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(tool @ ("etcdctl" | "etcdutl")) = argv0.rsplit('/').next() {
        let r = if tool == "etcdctl" { etcdctl(&args) } else { etcdutl(&args) };
        if let Err(e) = r {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let r = match args.first().map(String::as_str) {
        Some("init") => config_arg(&args).and_then(|c| init(&c)),
        Some("join") => config_arg(&args).and_then(|c| join(&c)),
        Some("reset") => reset(),
        Some("token") => token_cmd(&args[1..]),
        Some("upgrade") => upgrade(&args[1..]),
        Some("version") => {
            println!("{}", sim_version());
            Ok(())
        }
        Some("__apiserver") if args.len() == 4 => apiserver(&args[1], &args[2], &args[3]),
        Some("__restart-apiserver") => restart_apiserver(),
        Some("__restart-kubelet") => restart_kubelet(),
        Some("__kubelet-active") => kubelet_active(),
        Some("__kubelet") => kubelet(),
        Some("__pod") if args.len() == 3 => pod(&args[1], &args[2]),
        Some("__vip-client") if args.len() == 4 => vip_client(&args[1], &args[2], &args[3]),
        _ => Err(anyhow!("usage: kubeadm init|join --config FILE | reset --force | token create|delete ... | version")),
    };
    if let Err(e) = r {
        eprintln!("error execution phase: {e:#}");
        std::process::exit(1);
    }
}

fn sim_version() -> String {
    std::env::var("KUBEADM_SIM_VERSION").unwrap_or_else(|_| "v1.29.9".into())
}

fn minor(v: &str) -> Result<u32> {
    let v = v.strip_prefix('v').ok_or_else(|| anyhow!("version {v:?} must start with v"))?;
    let mut it = v.split('.');
    let (Some("1"), Some(m), Some(_)) = (it.next(), it.next(), it.next()) else { bail!("version {v:?} is not v1.X.Y") };
    m.parse().map_err(|_| anyhow!("version {v:?} is not v1.X.Y"))
}

fn config_arg(args: &[String]) -> Result<Vec<Value>> {
    let i = args.iter().position(|a| a == "--config").ok_or_else(|| anyhow!("--config is required"))?;
    let path = args.get(i + 1).ok_or_else(|| anyhow!("--config needs a file"))?;
    if let Some(extra) = args.iter().skip(1).find(|a| a.starts_with("--") && *a != "--config") {
        bail!("unknown flag {extra} (this simulator accepts --config only)");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("unable to read config from {path:?}"))?;
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize_from(d)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

trait FromDoc {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Value>;
}
impl FromDoc for Value {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Value> {
        serde::Deserialize::deserialize(d).context("invalid YAML")
    }
}

// ------------------------------------------------------------------ strict config checks

fn map<'a>(v: &'a Value, at: &str) -> Result<&'a Mapping> {
    v.as_mapping().ok_or_else(|| anyhow!("{at}: expected a mapping"))
}

fn only(v: &Value, at: &str, allowed: &[&str]) -> Result<()> {
    for k in map(v, at)?.keys() {
        let k = k.as_str().ok_or_else(|| anyhow!("{at}: non-string key"))?;
        if !allowed.contains(&k) {
            bail!("{at}: unknown field {k:?} (strict decoding)");
        }
    }
    Ok(())
}

fn s<'a>(v: &'a Value, at: &str, key: &str) -> Result<&'a str> {
    v.get(key).and_then(Value::as_str).ok_or_else(|| anyhow!("{at}.{key}: required string missing"))
}

/// extraArgs (already checked by [`extra_args`]) as "name=value" lines.
fn flag_values(v: Option<&Value>, v4: bool) -> Vec<String> {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_default();
    match v {
        Some(Value::Sequence(list)) if v4 => list
            .iter()
            .map(|a| {
                format!(
                    "{}={}",
                    a.get("name").map(text).unwrap_or_default(),
                    a.get("value").map(text).unwrap_or_default()
                )
            })
            .collect(),
        Some(Value::Mapping(m)) => m.iter().map(|(k, v)| format!("{}={}", text(k), text(v))).collect(),
        _ => vec![],
    }
}

fn extra_args(v: Option<&Value>, at: &str, v4: bool) -> Result<()> {
    let Some(v) = v else { return Ok(()) };
    if v4 {
        let list = v.as_sequence().ok_or_else(|| anyhow!("{at}: v1beta4 wants a list of {{name, value}}"))?;
        for (i, a) in list.iter().enumerate() {
            only(a, &format!("{at}[{i}]"), &["name", "value"])?;
            s(a, at, "name")?;
            s(a, at, "value")?;
        }
    } else if !v.is_mapping() {
        bail!("{at}: v1beta3 wants a map of flag: value");
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A Go duration as kubeadm takes it ("2h0m0s", "90m", "7200s"), in whole seconds.
fn go_duration(text: &str) -> Result<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    if text.is_empty() {
        bail!("empty duration");
    }
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| anyhow!("invalid duration {text:?}"))?;
        num.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => bail!("invalid duration {text:?}: unit {c:?}"),
        };
    }
    if !num.is_empty() {
        bail!("invalid duration {text:?}: missing unit");
    }
    Ok(total)
}

fn token_ok(t: &str) -> bool {
    let Some((a, b)) = t.split_once('.') else { return false };
    let ok = |x: &str, n| x.len() == n && x.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    ok(a, 6) && ok(b, 16)
}

fn endpoint(v: &Value, at: &str) -> Result<SocketAddr> {
    only(v, at, &["advertiseAddress", "bindPort"])?;
    let ip: std::net::IpAddr =
        s(v, at, "advertiseAddress")?.parse().map_err(|_| anyhow!("{at}.advertiseAddress is not an IP"))?;
    let port = v.get("bindPort").and_then(Value::as_u64).unwrap_or(6443) as u16;
    Ok(SocketAddr::new(ip, port))
}

fn node_registration(v: &Value, at: &str, v4: bool) -> Result<String> {
    only(
        v,
        at,
        &[
            "name",
            "criSocket",
            "taints",
            "kubeletExtraArgs",
            "ignorePreflightErrors",
            "imagePullPolicy",
            "imagePullSerial",
        ],
    )?;
    extra_args(v.get("kubeletExtraArgs"), &format!("{at}.kubeletExtraArgs"), v4)?;
    let cri = s(v, at, "criSocket")?;
    if !cri.starts_with("unix://") {
        bail!("{at}.criSocket {cri:?} must be a unix:// URL");
    }
    Ok(s(v, at, "name")?.to_string())
}

struct Docs {
    api: String,
    v4: bool,
    by_kind: Vec<(String, Value)>,
}

impl Docs {
    fn get(&self, kind: &str) -> Option<&Value> {
        self.by_kind.iter().find(|(k, _)| k == kind).map(|(_, v)| v)
    }
}

fn classify(docs: Vec<Value>, allowed_kubeadm: &[&str]) -> Result<Docs> {
    let mut api = None;
    let mut by_kind: Vec<(String, Value)> = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        let av = s(&d, &format!("document {i}"), "apiVersion")?.to_string();
        let kind = s(&d, &format!("document {i}"), "kind")?.to_string();
        match av.as_str() {
            "kubeadm.k8s.io/v1beta3" | "kubeadm.k8s.io/v1beta4" => {
                if !allowed_kubeadm.contains(&kind.as_str()) {
                    bail!("document {i}: kind {kind} is not expected here");
                }
                if api.as_ref().is_some_and(|a| a != &av) {
                    bail!("mixed kubeadm API versions in one config");
                }
                api = Some(av.clone());
            }
            "kubeproxy.config.k8s.io/v1alpha1" if kind == "KubeProxyConfiguration" => {}
            "kubelet.config.k8s.io/v1beta1" if kind == "KubeletConfiguration" => {}
            _ => bail!("document {i}: unknown apiVersion/kind {av}/{kind}"),
        }
        if by_kind.iter().any(|(k, _)| k == &kind) {
            bail!("kind {kind} given twice");
        }
        by_kind.push((kind, d));
    }
    let api = api.ok_or_else(|| anyhow!("no kubeadm configuration document"))?;
    let v4 = api.ends_with("v1beta4");
    if v4 && minor(&sim_version())? < 31 {
        bail!("kubeadm {} does not know {api} (use v1beta3 before 1.31)", sim_version());
    }
    Ok(Docs { api, v4, by_kind })
}

struct InitCfg {
    name: String,
    advertise: SocketAddr,
    endpoint: String,
    cert_dir: PathBuf,
    /// "TOKEN EXPIRES_UNIX" each.
    tokens: Vec<String>,
    /// The apiserver's extra flags, "name=value" each (what the kubeadm-config ConfigMap keeps).
    apiserver_args: Vec<String>,
    /// ClusterConfiguration.kubernetesVersion (what the kubeadm-config ConfigMap keeps).
    version: String,
}

fn check_init(docs: Vec<Value>) -> Result<InitCfg> {
    let d = classify(docs, &["InitConfiguration", "ClusterConfiguration"])?;
    let v4 = d.v4;
    let init = d.get("InitConfiguration").ok_or_else(|| anyhow!("InitConfiguration missing"))?;
    only(
        init,
        "InitConfiguration",
        &[
            "apiVersion",
            "kind",
            "bootstrapTokens",
            "nodeRegistration",
            "localAPIEndpoint",
            "certificateKey",
            "skipPhases",
            "patches",
            "timeouts",
            "dryRun",
        ],
    )?;
    if !v4 && (init.get("timeouts").is_some() || init.get("dryRun").is_some()) {
        bail!("InitConfiguration: timeouts/dryRun need v1beta4");
    }
    let mut tokens = Vec::new();
    for (i, t) in init.get("bootstrapTokens").and_then(Value::as_sequence).into_iter().flatten().enumerate() {
        let at = format!("bootstrapTokens[{i}]");
        only(t, &at, &["token", "groups", "usages", "ttl", "expires", "description"])?;
        let tok = s(t, &at, "token")?;
        if !token_ok(tok) {
            bail!("{at}.token {tok:?} does not match [a-z0-9]{{6}}.[a-z0-9]{{16}}");
        }
        let ttl = match t.get("ttl") {
            None => 24 * 3600,
            Some(v) => go_duration(v.as_str().ok_or_else(|| anyhow!("{at}.ttl must be a duration string"))?)
                .with_context(|| format!("{at}.ttl"))?,
        };
        tokens.push(format!("{tok} {}", now_secs() + ttl));
    }
    let name = node_registration(
        init.get("nodeRegistration").ok_or_else(|| anyhow!("nodeRegistration missing"))?,
        "InitConfiguration.nodeRegistration",
        v4,
    )?;
    let advertise = endpoint(
        init.get("localAPIEndpoint").ok_or_else(|| anyhow!("localAPIEndpoint missing"))?,
        "InitConfiguration.localAPIEndpoint",
    )?;
    let cc = d.get("ClusterConfiguration").ok_or_else(|| anyhow!("ClusterConfiguration missing"))?;
    only(
        cc,
        "ClusterConfiguration",
        &[
            "apiVersion",
            "kind",
            "etcd",
            "networking",
            "kubernetesVersion",
            "controlPlaneEndpoint",
            "apiServer",
            "controllerManager",
            "scheduler",
            "dns",
            "proxy",
            "certificatesDir",
            "imageRepository",
            "featureGates",
            "clusterName",
            "encryptionAlgorithm",
            "caCertificateValidityPeriod",
            "certificateValidityPeriod",
        ],
    )?;
    let version = s(cc, "ClusterConfiguration", "kubernetesVersion")?.to_string();
    if minor(&version)? != minor(&sim_version())? {
        bail!("kubernetesVersion {version} does not match this kubeadm ({})", sim_version());
    }
    let net = cc.get("networking").ok_or_else(|| anyhow!("ClusterConfiguration.networking missing"))?;
    only(net, "networking", &["dnsDomain", "podSubnet", "serviceSubnet"])?;
    for k in ["podSubnet", "serviceSubnet"] {
        let c = s(net, "networking", k)?;
        if !c.contains('/') {
            bail!("networking.{k} {c:?} is not a CIDR");
        }
    }
    for comp in ["apiServer", "controllerManager", "scheduler"] {
        if let Some(c) = cc.get(comp) {
            only(c, comp, &["extraArgs", "extraVolumes", "certSANs", "timeoutForControlPlane", "extraEnvs"])?;
            extra_args(c.get("extraArgs"), &format!("{comp}.extraArgs"), v4)?;
        }
    }
    let endpoint = s(cc, "ClusterConfiguration", "controlPlaneEndpoint")?.to_string();
    let apiserver_args = flag_values(cc.get("apiServer").and_then(|a| a.get("extraArgs")), v4);
    let cert_dir = PathBuf::from(cc.get("certificatesDir").and_then(Value::as_str).unwrap_or("/etc/kubernetes/pki"));
    if let Some(kp) = d.get("KubeProxyConfiguration") {
        let mode = kp.get("mode").and_then(Value::as_str).unwrap_or("");
        if !["", "iptables", "ipvs", "nftables"].contains(&mode) {
            bail!("KubeProxyConfiguration.mode {mode:?} is not valid");
        }
    }
    let _ = d.api;
    Ok(InitCfg { name, advertise, endpoint, cert_dir, tokens, apiserver_args, version })
}

struct JoinCfg {
    name: String,
    endpoint: String,
    token: String,
    ca_hash: String,
    control_plane: Option<SocketAddr>,
}

fn check_join(docs: Vec<Value>) -> Result<JoinCfg> {
    let d = classify(docs, &["JoinConfiguration"])?;
    let j = d.get("JoinConfiguration").ok_or_else(|| anyhow!("JoinConfiguration missing"))?;
    only(
        j,
        "JoinConfiguration",
        &[
            "apiVersion",
            "kind",
            "caCertPath",
            "discovery",
            "nodeRegistration",
            "controlPlane",
            "skipPhases",
            "patches",
            "timeouts",
            "dryRun",
        ],
    )?;
    let disc = j.get("discovery").ok_or_else(|| anyhow!("discovery missing"))?;
    let disc_fields: &[&str] = if d.v4 {
        &["bootstrapToken", "file", "tlsBootstrapToken"]
    } else {
        &["bootstrapToken", "file", "tlsBootstrapToken", "timeout"]
    };
    only(disc, "discovery", disc_fields)?;
    let bt = disc.get("bootstrapToken").ok_or_else(|| anyhow!("discovery.bootstrapToken missing"))?;
    only(bt, "discovery.bootstrapToken", &["apiServerEndpoint", "token", "caCertHashes", "unsafeSkipCAVerification"])?;
    let token = s(bt, "bootstrapToken", "token")?.to_string();
    if !token_ok(&token) {
        bail!("discovery.bootstrapToken.token is not a bootstrap token");
    }
    let hashes = bt
        .get("caCertHashes")
        .and_then(Value::as_sequence)
        .ok_or_else(|| anyhow!("caCertHashes missing (refusing unverified discovery)"))?;
    let ca_hash = hashes.first().and_then(Value::as_str).ok_or_else(|| anyhow!("caCertHashes is empty"))?.to_string();
    let hex = ca_hash.strip_prefix("sha256:").ok_or_else(|| anyhow!("caCertHashes: {ca_hash:?} must be sha256:HEX"))?;
    if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("caCertHashes: {ca_hash:?} is not a SHA-256");
    }
    let name = node_registration(
        j.get("nodeRegistration").ok_or_else(|| anyhow!("nodeRegistration missing"))?,
        "JoinConfiguration.nodeRegistration",
        d.v4,
    )?;
    let control_plane = match j.get("controlPlane") {
        Some(cp) => {
            only(cp, "controlPlane", &["localAPIEndpoint", "certificateKey"])?;
            Some(endpoint(
                cp.get("localAPIEndpoint").ok_or_else(|| anyhow!("controlPlane.localAPIEndpoint missing"))?,
                "controlPlane.localAPIEndpoint",
            )?)
        }
        None => None,
    };
    Ok(JoinCfg {
        name,
        endpoint: s(bt, "bootstrapToken", "apiServerEndpoint")?.to_string(),
        token,
        ca_hash,
        control_plane,
    })
}

// ------------------------------------------------------------------ PKI checks

const PAIRS: &[&str] = &[
    "ca",
    "apiserver",
    "apiserver-kubelet-client",
    "front-proxy-ca",
    "front-proxy-client",
    "etcd/ca",
    "etcd/server",
    "etcd/peer",
    "etcd/healthcheck-client",
    "apiserver-etcd-client",
];

fn pem_der(path: &Path) -> Result<Vec<u8>> {
    let c = CertificateDer::from_pem_file(path).with_context(|| format!("[certs] reading {}", path.display()))?;
    Ok(c.to_vec())
}

fn sans(der: &[u8]) -> Result<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("bad certificate: {e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => out.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 4 => {
                    out.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn check_pki(dir: &Path, node: &str, advertise: &SocketAddr, endpoint_host: &str) -> Result<()> {
    for p in PAIRS {
        let crt = dir.join(format!("{p}.crt"));
        let key = dir.join(format!("{p}.key"));
        pem_der(&crt)?;
        let meta = std::fs::metadata(&key).with_context(|| format!("[certs] {} missing", key.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "[certs] private key {} is mode {:o}; must be 0600",
                key.display(),
                meta.permissions().mode() & 0o777
            );
        }
        PrivateKeyDer::from_pem_file(&key).with_context(|| format!("[certs] reading {}", key.display()))?;
    }
    for f in ["sa.key", "sa.pub"] {
        std::fs::metadata(dir.join(f)).with_context(|| format!("[certs] {f} missing"))?;
    }
    let api = sans(&pem_der(&dir.join("apiserver.crt"))?)?;
    for want in [endpoint_host.to_string(), advertise.ip().to_string(), node.to_string()] {
        if !api.contains(&want) {
            bail!("[certs] apiserver.crt is not valid for {want} (SANs: {})", api.join(", "));
        }
    }
    let etcd = sans(&pem_der(&dir.join("etcd/server.crt"))?)?;
    if !etcd.contains(&node.to_string()) || !etcd.contains(&advertise.ip().to_string()) {
        bail!("[certs] etcd/server.crt is not for this node {node} / {} (SANs: {})", advertise.ip(), etcd.join(", "));
    }
    Ok(())
}

fn ca_pin(ca_der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca_der).map_err(|e| anyhow!("bad CA: {e}"))?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))))
}

// ------------------------------------------------------------------ effects

fn write(path: &str, body: &str, mode: u32) -> Result<()> {
    let p = Path::new(path);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, body).with_context(|| format!("writing {path}"))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The image of a control-plane component at a Kubernetes version (etcd keeps its own).
fn image(component: &str, version: &str) -> String {
    match component {
        "etcd" => "registry.k8s.io/etcd:3.5.15-0".to_string(),
        c => format!("registry.k8s.io/{c}:{version}"),
    }
}

/// The version a static pod manifest runs (its image tag).
fn manifest_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .and_then(|i| i.rsplit_once(':'))
        .map(|(_, v)| v.to_string())
}

fn manifests(node: &str, advertise: &SocketAddr, version: &str) -> Result<()> {
    for c in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"] {
        write_manifest(c, node, advertise, version)?;
    }
    Ok(())
}

fn write_manifest(c: &str, node: &str, advertise: &SocketAddr, version: &str) -> Result<()> {
    write(
        &format!("{KUBE}/manifests/{c}.yaml"),
        &format!("# written by kubeadm-sim\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {c}-{node}\n  namespace: kube-system\n  annotations:\n    kubeadm.kubernetes.io/advertise-address: {}\nspec:\n  containers:\n  - name: {c}\n    image: {}\n", advertise.ip(), image(c, version)),
        0o600,
    )
}

fn kubelet_files(node: &str, endpoint: &str, ca_pem: &str) -> Result<()> {
    use base64_like::encode;
    // The kubelet's client certificate (a year, as the kubelet's TLS bootstrap gets it; here
    // self-signed: only its file, name and expiry matter), referenced by path like kubeadm does.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "system:nodes");
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let key = rcgen::KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    write(
        &format!("{KUBELET_DIR}/pki/kubelet-client-current.pem"),
        &format!("{}{}", cert.pem(), key.serialize_pem()),
        0o600,
    )?;
    write(
        &format!("{KUBE}/kubelet.conf"),
        &format!("apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: https://{endpoint}\n  name: kubernetes\nusers:\n- name: system:node:{node}\n  user:\n    client-certificate: {KUBELET_DIR}/pki/kubelet-client-current.pem\n    client-key: {KUBELET_DIR}/pki/kubelet-client-current.pem\n", encode(ca_pem.as_bytes())),
        0o600,
    )?;
    write(
        &format!("{KUBELET_DIR}/config.yaml"),
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n",
        0o644,
    )
}

/// A tiny base64 encoder (the simulator needs nothing fancier).
mod base64_like {
    pub fn encode(b: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn sim_dir() -> PathBuf {
    PathBuf::from(KUBE).join("sim")
}

fn start_apiserver(
    listen: &SocketAddr,
    tokens: &[String],
    peers: &[String],
    args: &[String],
    nodes: &[String],
    version: &str,
) -> Result<()> {
    let dir = sim_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("version"), format!("{version}\n"))?;
    std::fs::write(dir.join("apiserver-args"), args.iter().map(|a| format!("{a}\n")).collect::<String>())?;
    std::fs::write(dir.join("tokens"), tokens.iter().map(|t| format!("{t}\n")).collect::<String>())?;
    std::fs::write(dir.join("peers"), peers.iter().map(|p| format!("{p}\n")).collect::<String>())?;
    std::fs::write(dir.join("nodes"), nodes.iter().map(|n| format!("{n} control-plane\n")).collect::<String>())?;
    std::fs::write(dir.join("advertise"), listen.to_string())?;
    ensure_kubelet()?;
    wait_apiserver(listen, Duration::from_secs(10))
}

/// Wait until the apiserver on `listen` answers `/healthz`.
fn wait_apiserver(listen: &SocketAddr, limit: Duration) -> Result<()> {
    let ca = std::fs::read_to_string(format!("{KUBE}/pki/ca.crt"))?;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if https(listen, "localhost", &ca, "GET", "/healthz", "").map(|(c, _)| c == 200).unwrap_or(false) {
            println!("[control-plane] apiserver healthy on {listen}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("[control-plane] apiserver on {listen} did not become healthy (see {}/apiserver.log)", sim_dir().display())
}

// ------------------------------------------------------------------ kubelet

/// The static pods the stand-in kubelet runs, and where the stand-ins of the others listen
/// (etcd's client port, the controller-manager's and scheduler's secure ports).
const PODS: &[(&str, &str)] = &[
    ("etcd", "127.0.0.1:2379"),
    ("kube-apiserver", ""),
    ("kube-controller-manager", "127.0.0.1:10257"),
    ("kube-scheduler", "127.0.0.1:10259"),
];

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| !st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn pid_in(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Start the stand-in kubelet unless one runs (its own process group, like the kubelet service).
fn ensure_kubelet() -> Result<()> {
    let dir = sim_dir();
    std::fs::create_dir_all(&dir)?;
    if pid_in(&dir.join("kubelet.pid")).is_some_and(alive) {
        return Ok(());
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("kubelet.log"))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("__kubelet")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the kubelet")?;
    std::fs::write(dir.join("kubelet.pid"), child.id().to_string())?;
    Ok(())
}

/// The kubelet's static pod loop: a pod runs while its manifest is in /etc/kubernetes/manifests
/// (started again if it dies), and is stopped with SIGTERM (graceful) when the manifest goes.
fn kubelet() -> Result<()> {
    let dir = sim_dir();
    std::thread::spawn(register_kubelet);
    let mut last_start: std::collections::HashMap<&str, std::time::Instant> = Default::default();
    let mut children: Vec<std::process::Child> = Vec::new();
    let mut stopping: std::collections::HashSet<i32> = Default::default();
    // What each pod was started from: a changed manifest restarts the pod (like the kubelet,
    // which is how `kubeadm upgrade` rolls the control plane). A kubelet that starts finds its
    // pods running: it adopts them with the manifests it finds.
    let mut started_from: std::collections::HashMap<&str, String> = Default::default();
    loop {
        children.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        for (pod, addr) in PODS {
            let pidfile = dir.join(format!("{pod}.pid"));
            let running = pid_in(&pidfile).filter(|p| alive(*p));
            let manifest = std::fs::read_to_string(format!("{KUBE}/manifests/{pod}.yaml")).ok();
            let wanted = manifest.is_some();
            if let (Some(m), Some(_)) = (&manifest, running) {
                started_from.entry(pod).or_insert_with(|| m.clone());
            }
            let changed = matches!((&manifest, started_from.get(pod)), (Some(m), Some(was)) if m != was);
            match (wanted, running) {
                (true, Some(pid)) if changed && stopping.insert(pid) => {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                    eprintln!("kubelet: manifest of {pod} changed: stopping it (pid {pid}) to start the new one");
                }
                (true, None) => {
                    if last_start.get(pod).is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
                        continue;
                    }
                    last_start.insert(pod, std::time::Instant::now());
                    let args: Vec<String> = if *pod == "kube-apiserver" {
                        let Ok(listen) = std::fs::read_to_string(dir.join("advertise")) else { continue };
                        vec![
                            "__apiserver".into(),
                            listen.trim().to_string(),
                            format!("{KUBE}/pki"),
                            dir.to_string_lossy().into_owned(),
                        ]
                    } else {
                        vec!["__pod".into(), pod.to_string(), addr.to_string()]
                    };
                    let log = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("{}.log", pod.trim_start_matches("kube-"))))?;
                    let version = manifest.as_deref().and_then(manifest_version).unwrap_or_else(sim_version);
                    if let Some(m) = &manifest {
                        started_from.insert(pod, m.clone());
                    }
                    match std::process::Command::new(std::env::current_exe()?)
                        .args(&args)
                        .env("KUBEADM_SIM_VERSION", version)
                        .stdin(std::process::Stdio::null())
                        .stdout(log.try_clone()?)
                        .stderr(log)
                        .spawn()
                    {
                        Ok(child) => {
                            std::fs::write(&pidfile, child.id().to_string())?;
                            if *pod == "kube-apiserver" {
                                std::fs::write(dir.join("apiserver.pid"), child.id().to_string())?;
                            }
                            eprintln!("kubelet: started {pod} (pid {})", child.id());
                            children.push(child);
                        }
                        Err(e) => eprintln!("kubelet: cannot start {pod}: {e}"),
                    }
                }
                (false, Some(pid)) if stopping.insert(pid) => {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                    eprintln!("kubelet: manifest of {pod} gone: stopping it (pid {pid})");
                }
                // Stopping (in its grace period), or running as it should: wait.
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kubelet registers its node's version with the apiserver of kubelet.conf (until it is
/// accepted: the apiserver refuses a kubelet newer than itself).
fn register_kubelet() {
    let version = sim_version();
    let mut said = String::new();
    loop {
        let r = (|| -> Result<(u16, String)> {
            let conf = std::fs::read_to_string(format!("{KUBE}/kubelet.conf"))?;
            let node = conf
                .lines()
                .find_map(|l| l.trim().strip_prefix("- name: system:node:"))
                .ok_or_else(|| anyhow!("kubelet.conf names no node"))?
                .to_string();
            let (addr, host, ca) = admin_server(&format!("{KUBE}/kubelet.conf"))?;
            https(&addr, &host, &ca, "POST", &format!("/sim/kubelet/{node}/{version}"), "")
        })();
        match r {
            Ok((200, _)) => {
                eprintln!("kubelet {version}: node registered");
                return;
            }
            Ok((_, body)) if body != said => {
                eprintln!("kubelet {version}: registration refused: {body}");
                said = body;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `systemctl restart kubelet` on a lab host: the stand-in kubelet stopped (its pods keep
/// running, as containers do) and started again from this binary, at this binary's version.
fn restart_kubelet() -> Result<()> {
    let dir = sim_dir();
    if let Some(pid) = pid_in(&dir.join("kubelet.pid")).filter(|p| alive(*p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        for _ in 0..200 {
            if !alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !Path::new(&format!("{KUBE}/kubelet.conf")).exists() {
        bail!("Job for kubelet.service failed: {KUBE}/kubelet.conf is missing (not joined)");
    }
    ensure_kubelet()
}

/// `systemctl is-active kubelet` on a lab host.
fn kubelet_active() -> Result<()> {
    if pid_in(&sim_dir().join("kubelet.pid")).is_some_and(alive) {
        println!("active");
        return Ok(());
    }
    println!("inactive");
    std::process::exit(3);
}

/// A static pod other than the apiserver: listens on its port until SIGTERM.
fn pod(name: &str, addr: &str) -> Result<()> {
    if name == "etcd" {
        load_restored()?;
    }
    let l = TcpListener::bind(addr).with_context(|| format!("{name}: bind {addr}"))?;
    eprintln!("{name} listening on {addr}");
    for c in l.incoming() {
        drop(c);
    }
    Ok(())
}

/// kubeadm's preflight checks over what an earlier init or join left on the host.
fn preflight(control_plane: Option<&SocketAddr>) -> Result<()> {
    let mut errors = Vec::new();
    let mut file_available = |p: String| {
        if Path::new(&p).exists() {
            let check = p.trim_start_matches('/').replace('/', "-");
            errors.push(format!("[ERROR FileAvailable--{check}]: {p} already exists"));
        }
    };
    match control_plane {
        Some(_) => {
            for c in ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"] {
                file_available(format!("{KUBE}/manifests/{c}.yaml"));
            }
        }
        None => file_available(format!("{KUBE}/pki/ca.crt")),
    }
    if let Some(adv) = control_plane {
        if std::fs::read_dir(ETCD_DIR).map(|mut d| d.next().is_some()).unwrap_or(false) {
            errors.push(format!("[ERROR DirAvailable--var-lib-etcd]: {ETCD_DIR} is not empty"));
        }
        if TcpListener::bind(adv).is_err() {
            errors.push(format!("[ERROR Port-{}]: Port {} is in use", adv.port(), adv.port()));
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    bail!(
        "[preflight] Some fatal errors occurred:\n\t{}\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`",
        errors.join("\n\t")
    )
}

fn kubelet_conf_available() -> Result<()> {
    let p = format!("{KUBE}/kubelet.conf");
    if Path::new(&p).exists() {
        bail!("[preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: {p} already exists");
    }
    Ok(())
}

/// The control plane's etcd data (what makes /var/lib/etcd non-empty afterwards).
fn etcd_data(node: &str) -> Result<()> {
    write(&format!("{ETCD_DIR}/member/snap/db"), &format!("etcd member {node}\n"), 0o600)
}

/// `KUBEADM_SIM_FAIL=wait-control-plane`: everything is written, the control plane never answers.
fn injected_failure() -> Result<()> {
    if std::env::var("KUBEADM_SIM_FAIL").as_deref() == Ok("wait-control-plane") {
        bail!("[wait-control-plane] timed out waiting for the condition: the control plane did not become healthy within 4m0s (KUBEADM_SIM_FAIL)");
    }
    Ok(())
}

fn init(docs: &[Value]) -> Result<()> {
    let c = check_init(docs.to_vec())?;
    preflight(Some(&c.advertise))?;
    let host = c.endpoint.rsplit_once(':').map(|x| x.0).unwrap_or(&c.endpoint).to_string();
    check_pki(&c.cert_dir, &c.name, &c.advertise, &host)?;
    let ca = std::fs::read_to_string(c.cert_dir.join("ca.crt"))?;
    for kc in ["admin.conf", "controller-manager.conf", "scheduler.conf"] {
        let text = std::fs::read_to_string(format!("{KUBE}/{kc}"))
            .with_context(|| format!("[kubeconfig] {KUBE}/{kc} missing"))?;
        if !text.contains(&format!("server: https://{}", c.endpoint)) {
            bail!("[kubeconfig] {kc} does not point at https://{}", c.endpoint);
        }
        if !text.contains(&base64_like::encode(ca.as_bytes())) {
            bail!("[kubeconfig] {kc} does not carry the cluster CA");
        }
    }
    manifests(&c.name, &c.advertise, &c.version)?;
    kubelet_files(&c.name, &c.endpoint, &ca)?;
    etcd_data(&c.name)?;
    injected_failure()?;
    start_apiserver(
        &c.advertise,
        &c.tokens,
        &[c.advertise.to_string()],
        &c.apiserver_args,
        std::slice::from_ref(&c.name),
        &c.version,
    )?;
    println!("Your Kubernetes control-plane has initialized successfully! (node {})", c.name);
    Ok(())
}

fn join(docs: &[Value]) -> Result<()> {
    let c = check_join(docs.to_vec())?;
    kubelet_conf_available()?;
    preflight(c.control_plane.as_ref())?;
    let addr = c
        .endpoint
        .to_socket_addrs()
        .with_context(|| format!("[discovery] cannot resolve {} (check /etc/hosts)", c.endpoint))?
        .next()
        .ok_or_else(|| anyhow!("[discovery] {} resolves to nothing", c.endpoint))?;
    let host = c.endpoint.rsplit_once(':').map(|x| x.0).unwrap_or(&c.endpoint).to_string();
    // Discovery: cluster-info without trust, then pin the CA like kubeadm does.
    let (code, body) = https(&addr, &host, "", "GET", "/api/v1/namespaces/kube-public/configmaps/cluster-info", "")
        .with_context(|| format!("[discovery] fetching cluster-info from {} ({addr})", c.endpoint))?;
    if code != 200 {
        bail!("[discovery] cluster-info: HTTP {code}");
    }
    let ca_pem = body;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("[discovery] cluster-info CA")?;
    let pin = ca_pin(&ca_der)?;
    if pin != c.ca_hash {
        bail!("[discovery] cluster CA found in cluster-info ({pin}) does not match caCertHashes ({})", c.ca_hash);
    }
    let node_role = if c.control_plane.is_some() { "control-plane" } else { "worker" };
    let member = c.control_plane.map(|a| format!("/{a}")).unwrap_or_default();
    let (code, tokens) =
        https(&addr, &host, &ca_pem, "POST", &format!("/sim/join/{}/{node_role}{member}", c.name), &c.token)
            .context("[preflight] joining through the apiserver endpoint")?;
    if code != 200 {
        bail!("[discovery] the apiserver refused the bootstrap token (HTTP {code}): {tokens}");
    }
    let (tokens, rest) = tokens.split_once("#peers\n").unwrap_or((&tokens, ""));
    let (peers, rest) = rest.split_once("#apiserver-args\n").unwrap_or((rest, ""));
    let (args, version) = rest.split_once("#version\n").unwrap_or((rest, ""));
    let version = version.trim().to_string();
    if let Some(adv) = c.control_plane {
        // kubeadm join --control-plane runs the cluster's version (from kubeadm-config): a
        // kubeadm of another minor cannot add a member.
        if minor(&version)? != minor(&sim_version())? {
            bail!("[preflight] the control plane runs {version}; this kubeadm is {}: a control-plane join needs kubeadm of the cluster's minor version", sim_version());
        }
        check_pki(&PathBuf::from(KUBE).join("pki"), &c.name, &adv, &host)?;
        if pem_der(&PathBuf::from(KUBE).join("pki/ca.crt"))? != ca_der.to_vec() {
            bail!("[certs] local ca.crt is not the cluster's CA");
        }
        manifests(&c.name, &adv, &version)?;
        etcd_data(&c.name)?;
        if let Err(e) = injected_failure() {
            kubelet_files(&c.name, &c.endpoint, &ca_pem)?;
            return Err(e);
        }
        let lines = |t: &str| t.lines().map(str::to_string).collect::<Vec<_>>();
        start_apiserver(&adv, &lines(tokens), &lines(peers), &lines(args), std::slice::from_ref(&c.name), &version)?;
    } else {
        write(&format!("{KUBE}/pki/ca.crt"), &ca_pem, 0o644)?;
    }
    kubelet_files(&c.name, &c.endpoint, &ca_pem)?;
    // kubeadm's kubelet-start phase: the kubelet runs (and registers the node with its version).
    ensure_kubelet()?;
    println!("This node ({}) has joined the cluster as {node_role}", c.name);
    Ok(())
}

fn reset() -> Result<()> {
    let dir = sim_dir();
    // kubeadm reset's remove-etcd-member phase: a control-plane member leaves etcd first.
    if let (Ok(me), Ok(ca)) =
        (std::fs::read_to_string(dir.join("advertise")), std::fs::read_to_string(format!("{KUBE}/pki/ca.crt")))
    {
        let me = me.trim();
        if std::fs::read_to_string(dir.join("peers")).unwrap_or_default().lines().any(|p| p == me) {
            println!("[reset] Removing the etcd member {me}");
            replicate(&dir, &ca, &format!("/sim/replicate/peer-remove/{me}"));
        }
    }
    // The kubelet first (it would start the pods again), then every pod.
    if let Some(pid) = pid_in(&dir.join("kubelet.pid")).filter(|p| alive(*p)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        for _ in 0..100 {
            if !alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (pod, _) in PODS.iter().filter(|(p, _)| *p != "kube-apiserver") {
        if let Some(pid) = pid_in(&dir.join(format!("{pod}.pid"))).filter(|p| alive(*p)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if let Ok(pid) = std::fs::read_to_string(dir.join("apiserver.pid")) {
        if let Ok(pid) = pid.trim().parse::<u32>() {
            // kubeadm reset removes the control-plane containers: no graceful shutdown.
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            // Like kubeadm stopping the static pods: return once it is gone (its port is free).
            let proc = PathBuf::from(format!("/proc/{pid}"));
            for _ in 0..100 {
                let zombie_or_gone = std::fs::read_to_string(proc.join("stat"))
                    .map(|st| st.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
                    .unwrap_or(true);
                if zombie_or_gone {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for p in [
        "manifests",
        "kubelet.conf",
        "admin.conf",
        "super-admin.conf",
        "controller-manager.conf",
        "scheduler.conf",
        "pki",
        "sim",
    ] {
        let p = PathBuf::from(KUBE).join(p);
        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
    }
    for d in [KUBELET_DIR, ETCD_DIR] {
        let _ = std::fs::remove_dir_all(d);
    }
    println!("[reset] done");
    Ok(())
}

// ------------------------------------------------------------------ HTTPS

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);
impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One HTTPS request; `ca_pem` empty = no verification (discovery only). Returns (status, body).
fn https(addr: &SocketAddr, host: &str, ca_pem: &str, method: &str, path: &str, bearer: &str) -> Result<(u16, String)> {
    let cfg = if ca_pem.is_empty() {
        let p = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(p)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()
    };
    let name = ServerName::try_from(host.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name)?;
    let mut tcp = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let auth = if bearer.is_empty() { String::new() } else { format!("Authorization: Bearer {bearer}\r\n") };
    tls.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("no HTTP answer"))?;
    Ok((code, text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()))
}

/// The stand-in apiserver: HTTPS with the cluster's apiserver certificate.
fn apiserver(listen: &str, pki: &str, state: &str) -> Result<()> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{pki}/apiserver.crt"))?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(format!("{pki}/apiserver.key"))?;
    let ca = std::fs::read_to_string(format!("{pki}/ca.crt"))?;
    let cfg = Arc::new(rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?);
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    eprintln!("sim apiserver listening on {listen}");
    let state = PathBuf::from(state);
    std::fs::write(state.join("listen"), listen)?;
    graceful_shutdown(&state)?;
    for stream in listener.incoming() {
        let Ok(mut tcp) = stream else { continue };
        let (cfg, ca, state) = (cfg.clone(), ca.clone(), state.clone());
        std::thread::spawn(move || {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let Ok(mut conn) = rustls::ServerConnection::new(cfg) else { return };
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.len() > 16 * 1024 {
                    return;
                }
            }
            let req = String::from_utf8_lossy(&buf).into_owned();
            let mut first = req.lines().next().unwrap_or_default().split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let bearer =
                req.lines().find_map(|l| l.strip_prefix("Authorization: Bearer ")).unwrap_or("").trim().to_string();
            let _guard = STATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let tokens = std::fs::read_to_string(state.join("tokens")).unwrap_or_default();
            let valid = |t: &str| {
                tokens.lines().any(|l| {
                    let mut f = l.split_whitespace();
                    f.next() == Some(t) && f.next().and_then(|e| e.parse::<u64>().ok()).is_some_and(|e| e > now_secs())
                })
            };
            let (code, body) = match (method, path) {
                ("GET", "/healthz") | ("GET", "/livez") => (200, "ok".to_string()),
                ("GET", "/readyz") if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) => {
                    (500, "[-]shutdown failed: reason withheld\nreadyz check failed".to_string())
                }
                ("GET", "/readyz") => (200, "ok".to_string()),
                ("GET", "/version") => (200, format!("{{\"gitVersion\": \"{}\"}}", sim_version())),
                ("GET", "/api/v1/namespaces/kube-public/configmaps/cluster-info") => (200, ca),
                ("GET", p @ ("/sim/nodes" | "/sim/kubelets" | "/sim/drained" | "/sim/version")) => {
                    (200, std::fs::read_to_string(state.join(&p[5..])).unwrap_or_default())
                }
                ("POST", p) if p.starts_with("/sim/kubelet/") => {
                    // A kubelet registering its version: never newer than the apiserver (the
                    // version skew policy; kubelets are upgraded after the control plane).
                    match p.trim_start_matches("/sim/kubelet/").split('/').collect::<Vec<_>>().as_slice() {
                        [name, v] if minor(v).is_ok() => {
                            let me = sim_version();
                            if minor(v).ok() > minor(&me).ok() {
                                (409, format!("kubelet {v} is newer than kube-apiserver {me}: upgrade the control plane first"))
                            } else {
                                let change = format!("kubelet/{name}/{v}");
                                apply(&state, &change);
                                replicate(&state, &ca, &format!("/sim/replicate/{change}"));
                                (200, "ok".to_string())
                            }
                        }
                        _ => (400, "bad kubelet registration".to_string()),
                    }
                }
                ("POST", p) if p.starts_with("/sim/version/") => {
                    let v = p.trim_start_matches("/sim/version/");
                    if minor(v).is_err() {
                        (400, format!("bad version {v:?}"))
                    } else {
                        let change = format!("version/{v}");
                        apply(&state, &change);
                        replicate(&state, &ca, &format!("/sim/replicate/{change}"));
                        (200, "ok".to_string())
                    }
                }
                ("POST", p) if p.starts_with("/sim/join/") => {
                    if bearer.is_empty() || !valid(&bearer) {
                        (401, "unknown or expired bootstrap token".to_string())
                    } else {
                        let parts: Vec<&str> = p.trim_start_matches("/sim/join/").split('/').collect();
                        let mut f =
                            std::fs::OpenOptions::new().append(true).create(true).open(state.join("nodes")).ok();
                        if let Some(f) = f.as_mut() {
                            let _ = writeln!(f, "{}", parts.iter().take(2).copied().collect::<Vec<_>>().join(" "));
                        }
                        // The Node object is cluster state: every member learns of it.
                        if let [name, role, ..] = parts.as_slice() {
                            replicate(&state, &ca, &format!("/sim/replicate/node/{name}/{role}"));
                        }
                        if let Some(member) = parts.get(2) {
                            // A new control-plane member: every member learns of it.
                            replicate(&state, &ca, &format!("/sim/replicate/peer/{member}"));
                            apply(&state, &format!("peer/{member}"));
                        }
                        let peers = std::fs::read_to_string(state.join("peers")).unwrap_or_default();
                        let args = std::fs::read_to_string(state.join("apiserver-args")).unwrap_or_default();
                        let version = std::fs::read_to_string(state.join("version")).unwrap_or_default();
                        (200, format!("{tokens}#peers\n{peers}#apiserver-args\n{args}#version\n{version}"))
                    }
                }
                ("POST", p) if p.starts_with("/sim/tokens/") => {
                    let change = p.trim_start_matches("/sim/tokens/");
                    let id = |t: &str| t.split('.').next().unwrap_or_default().to_string();
                    let exists = |i: &str| tokens.lines().any(|l| id(l) == i);
                    let bad = match change.split('/').collect::<Vec<_>>().as_slice() {
                        ["create", t, _] if exists(&id(t)) => {
                            Some((409, format!("secrets \"bootstrap-token-{}\" already exists", id(t))))
                        }
                        ["delete", i] if !exists(i) => {
                            Some((404, format!("secrets \"bootstrap-token-{i}\" not found")))
                        }
                        ["create", _, _] | ["delete", _] => None,
                        _ => Some((400, "bad token change".to_string())),
                    };
                    match bad {
                        Some(answer) => answer,
                        None => {
                            apply(&state, change);
                            replicate(&state, &ca, &format!("/sim/replicate/{change}"));
                            (200, "ok".to_string())
                        }
                    }
                }
                ("POST", p) if p.starts_with("/sim/nodes/") => {
                    let change = p.trim_start_matches("/sim/nodes/");
                    let nodes = std::fs::read_to_string(state.join("nodes")).unwrap_or_default();
                    match change.split_once('/') {
                        Some((op @ ("drain" | "delete" | "uncordon"), name))
                            if !name.is_empty() && !name.contains('/') =>
                        {
                            if !nodes.lines().any(|l| l.split(' ').next() == Some(name)) {
                                (404, format!("Error from server (NotFound): nodes \"{name}\" not found"))
                            } else {
                                let change = match op {
                                    "drain" => format!("drained/{name}"),
                                    "uncordon" => format!("uncordoned/{name}"),
                                    _ => format!("node-delete/{name}"),
                                };
                                apply(&state, &change);
                                replicate(&state, &ca, &format!("/sim/replicate/{change}"));
                                (200, "ok".to_string())
                            }
                        }
                        _ => (400, "bad node change".to_string()),
                    }
                }
                ("POST", p) if p.starts_with("/sim/replicate/") => {
                    apply(&state, p.trim_start_matches("/sim/replicate/"));
                    (200, "ok".to_string())
                }
                _ => (404, "not found".to_string()),
            };
            let reason = if code == 200 { "OK" } else { "Error" };
            let _ = tls.write_all(
                format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        });
    }
    Ok(())
}

/// `kubectl --kubeconfig FILE apply -f DIR|FILE`: checks the kubeconfig points at the cluster
/// endpoint and that every manifest document has apiVersion, kind and metadata.name; records the
/// objects in /etc/kubernetes/sim/applied.
static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// kube-apiserver's graceful termination: SIGTERM makes `/readyz` fail at once; the server keeps
/// serving for `--shutdown-delay-duration` (so load balancers can take it out of rotation), then
/// exits. SIGTERM is blocked here, before any other thread exists, and taken by one thread.
fn graceful_shutdown(state: &Path) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let delay = std::fs::read_to_string(state.join("apiserver-args"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("shutdown-delay-duration="))
        .map(go_duration)
        .transpose()
        .context("--shutdown-delay-duration")?
        .unwrap_or(0);
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            SHUTTING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("SIGTERM: /readyz fails now; serving for {delay}s more (--shutdown-delay-duration)");
            std::thread::sleep(Duration::from_secs(delay));
            eprintln!("shutting down");
            std::process::exit(0);
        }
    });
    Ok(())
}

/// The apiserver's static pod restarted the way an operator (or fleetadm) does it: its manifest
/// moved out until the kubelet has stopped it (gracefully: SIGTERM), then back.
fn restart_apiserver() -> Result<()> {
    let dir = sim_dir();
    let listen: SocketAddr = std::fs::read_to_string(dir.join("advertise"))?.trim().parse()?;
    let pid: i32 = std::fs::read_to_string(dir.join("apiserver.pid"))?.trim().parse()?;
    let manifest = format!("{KUBE}/manifests/kube-apiserver.yaml");
    let held = dir.join("kube-apiserver.yaml.held");
    let t0 = std::time::Instant::now();
    std::fs::rename(&manifest, &held).context("moving the apiserver manifest out")?;
    while alive(pid) {
        if t0.elapsed() > Duration::from_secs(120) {
            std::fs::rename(&held, &manifest)?;
            bail!("apiserver {pid} did not stop within 120s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("apiserver {pid} stopped after {:.1}s", t0.elapsed().as_secs_f64());
    std::fs::rename(&held, &manifest).context("putting the apiserver manifest back")?;
    wait_apiserver(&listen, Duration::from_secs(30))?;
    println!("apiserver restarted on {listen} after {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// A client of the cluster through ADDR (the VIP): `GET /version` on a new connection every 20 ms
/// for SECS seconds; prints how many requests were made and how many failed (and the first few
/// failures). Always exits 0: the caller judges the numbers.
fn vip_client(addr: &str, ca_file: &str, secs: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let ca = std::fs::read_to_string(ca_file)?;
    let secs: u64 = secs.parse()?;
    let t0 = std::time::Instant::now();
    let (mut n, mut failed, mut first) = (0u64, 0u64, Vec::new());
    while t0.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let r = https(&addr, &addr.ip().to_string(), &ca, "GET", "/version", "");
        if !matches!(r, Ok((200, _))) {
            failed += 1;
            if first.len() < 5 {
                let why = match r {
                    Ok((code, body)) => format!("HTTP {code} {}", body.lines().next().unwrap_or("")),
                    Err(e) => format!("{e:#}"),
                };
                first.push(format!("{:.2}s: {why}", t0.elapsed().as_secs_f64()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("requests={n} failed={failed}");
    for f in first {
        println!("failure at {f}");
    }
    Ok(())
}

/// One apiserver's state changes one at a time.
static STATE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Apply a change to this member's copy of the cluster state: `create/TOKEN/EXPIRES`,
/// `delete/ID`, `peer/ADDR`.
fn apply(state: &Path, change: &str) {
    let rewrite = |file: &str, f: &dyn Fn(Vec<String>) -> Vec<String>| {
        let path = state.join(file);
        let lines: Vec<String> =
            std::fs::read_to_string(&path).unwrap_or_default().lines().map(str::to_string).collect();
        let _ = std::fs::write(&path, f(lines).iter().map(|l| format!("{l}\n")).collect::<String>());
    };
    // etcd's revision: one per change
    let rev: u64 =
        std::fs::read_to_string(state.join("revision")).ok().and_then(|r| r.trim().parse().ok()).unwrap_or(1);
    let _ = std::fs::write(state.join("revision"), (rev + 1).to_string());
    match change.split('/').collect::<Vec<_>>().as_slice() {
        ["create", t, exp] => rewrite("tokens", &|mut l| {
            l.push(format!("{t} {exp}"));
            l
        }),
        ["delete", i] => rewrite("tokens", &|l| l.into_iter().filter(|t| !t.starts_with(&format!("{i}."))).collect()),
        ["node", n, role] => rewrite("nodes", &|mut l| {
            let line = format!("{n} {role}");
            if !l.contains(&line) {
                l.push(line);
            }
            l
        }),
        ["node-delete", n] => {
            rewrite("nodes", &|l| l.into_iter().filter(|x| x.split(' ').next() != Some(*n)).collect());
            rewrite("drained", &|l| l.into_iter().filter(|x| x != n).collect());
            rewrite("kubelets", &|l| l.into_iter().filter(|x| x.split(' ').next() != Some(*n)).collect());
        }
        ["uncordoned", n] => rewrite("drained", &|l| l.into_iter().filter(|x| x != n).collect()),
        ["version", v] => {
            let _ = std::fs::write(state.join("version"), format!("{v}\n"));
        }
        ["kubelet", n, v] => rewrite("kubelets", &|l| {
            let mut l: Vec<String> = l.into_iter().filter(|x| x.split(' ').next() != Some(*n)).collect();
            l.push(format!("{n} {v}"));
            l
        }),
        ["drained", n] => rewrite("drained", &|mut l| {
            if !l.iter().any(|x| x == n) {
                l.push(n.to_string());
            }
            l
        }),
        ["peer-remove", a] => rewrite("peers", &|l| l.into_iter().filter(|p| p != a).collect()),
        ["peer", a] => rewrite("peers", &|mut l| {
            if !l.iter().any(|p| p == a) {
                l.push(a.to_string());
            }
            l
        }),
        _ => {}
    }
}

/// Send a change to every other member (what etcd's replication does for the real apiservers).
/// A member that is down misses it, as a stopped etcd member would until it catches up.
fn replicate(state: &Path, ca: &str, path: &str) {
    let me = std::fs::read_to_string(state.join("listen")).unwrap_or_default();
    for peer in std::fs::read_to_string(state.join("peers")).unwrap_or_default().lines() {
        let Ok(addr) = peer.parse::<SocketAddr>() else { continue };
        if peer == me.trim() {
            continue;
        }
        if let Err(e) = https(&addr, &addr.ip().to_string(), ca, "POST", path, "") {
            eprintln!("replicating {path} to {peer}: {e:#}");
        }
    }
}

// ------------------------------------------------------------------ upgrade

/// (major, minor, patch) of `vX.Y.Z`.
fn semver(v: &str) -> Result<(u32, u32, u32)> {
    let bad = || anyhow!("version {v:?} is not vX.Y.Z");
    let mut it = v.strip_prefix('v').ok_or_else(bad)?.split('.');
    let mut n = || -> Result<u32> { it.next().ok_or_else(bad)?.parse().map_err(|_| bad()) };
    let r = (n()?, n()?, n()?);
    if it.next().is_some() {
        return Err(bad());
    }
    Ok(r)
}

/// The cluster's version (kubeadm-config's kubernetesVersion) from the apiserver of `kubeconfig`.
fn cluster_version(kubeconfig: &str) -> Result<(String, SocketAddr, String, String)> {
    let (addr, host, ca) = admin_server(kubeconfig)?;
    let (code, body) = https(&addr, &host, &ca, "GET", "/sim/version", "")
        .context("[upgrade/config] fetching the kubeadm-config ConfigMap")?;
    if code != 200 || body.trim().is_empty() {
        bail!("[upgrade/config] the cluster's kubeadm-config has no kubernetesVersion (HTTP {code})");
    }
    Ok((body.trim().to_string(), addr, host, ca))
}

/// kubeadm's version rules for `upgrade plan|apply VERSION` on a cluster at `cluster`.
fn check_target(target: &str, cluster: &str) -> Result<()> {
    let kubeadm = sim_version();
    let (t, c, k) = (semver(target)?, semver(cluster)?, semver(&kubeadm)?);
    if t < c {
        bail!("[upgrade/version] FATAL: the --version argument is invalid due to these fatal errors:\n\t- Specified version to upgrade to \"{target}\" is lower than the cluster version \"{cluster}\". Downgrades are not supported yet");
    }
    if t.0 != c.0 || t.1 > c.1 + 1 {
        bail!("[upgrade/version] FATAL: the --version argument is invalid due to these fatal errors:\n\t- Specified version to upgrade to \"{target}\" is at least one minor release higher than the kubeadm minimum supported control plane version \"{cluster}\". Skipping a minor version is not supported");
    }
    if t > k {
        bail!("[upgrade/version] FATAL: the --version argument is invalid due to these fatal errors:\n\t- Specified version to upgrade to \"{target}\" is higher than the kubeadm version \"{kubeadm}\". Upgrade kubeadm first using the tool you used to install kubeadm");
    }
    if t.1 < k.1 {
        bail!("[upgrade/version] FATAL: kubeadm {kubeadm} cannot upgrade a control plane to {target}: use the kubeadm of that minor version");
    }
    Ok(())
}

/// kubeadm renews the control plane's certificates during an upgrade unless
/// `--certificate-renewal=false`: for a year, whatever they had (what sealos users lose their
/// 100-year certificates to). Modelled for the apiserver's serving certificate.
fn renew_certificates() -> Result<()> {
    let pki = PathBuf::from(KUBE).join("pki");
    let read =
        |f: &str| std::fs::read_to_string(pki.join(f)).with_context(|| format!("[upgrade/certs] reading pki/{f}"));
    let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.crt")?, ca_key)?;
    let names = sans(&pem_der(&pki.join("apiserver.crt"))?)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.as_str().try_into()?),
        });
    }
    p.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let key = rcgen::KeyPair::from_pem(&read("apiserver.key")?)?;
    let cert = p.signed_by(&key, &issuer)?;
    write(&format!("{KUBE}/pki/apiserver.crt"), &cert.pem(), 0o644)?;
    println!("[upgrade/certs] renewed apiserver.crt (valid for 365 days)");
    Ok(())
}

/// Write this control-plane node's manifests at `version` and wait until the kubelet has
/// replaced each pod (its pid changed) and the apiserver is healthy again.
fn upgrade_static_pods(version: &str) -> Result<()> {
    let dir = sim_dir();
    let listen: SocketAddr = std::fs::read_to_string(dir.join("advertise"))
        .context("[upgrade/staticpods] this node's apiserver address")?
        .trim()
        .parse()?;
    let node = std::fs::read_to_string(format!("{KUBE}/manifests/kube-apiserver.yaml"))?
        .lines()
        .find_map(|l| l.trim().strip_prefix("name: kube-apiserver-"))
        .unwrap_or("node")
        .to_string();
    for c in ["kube-apiserver", "kube-controller-manager", "kube-scheduler"] {
        let path = format!("{KUBE}/manifests/{c}.yaml");
        let current = std::fs::read_to_string(&path).with_context(|| format!("[upgrade/staticpods] {path}"))?;
        if manifest_version(&current).as_deref() == Some(version) {
            println!("[upgrade/staticpods] {c} already runs {version}");
            continue;
        }
        let before = pid_in(&dir.join(format!("{c}.pid")));
        write_manifest(c, &node, &listen, version)?;
        println!("[upgrade/staticpods] Moved new manifest to {path}");
        let t0 = std::time::Instant::now();
        loop {
            let now = pid_in(&dir.join(format!("{c}.pid"))).filter(|p| alive(*p));
            if now.is_some() && now != before {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("[upgrade/staticpods] timed out waiting for the kubelet to restart {c}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if c == "kube-apiserver" {
            wait_apiserver(&listen, Duration::from_secs(60))?;
        }
        println!("[upgrade/staticpods] Component {c:?} upgraded successfully!");
    }
    Ok(())
}

fn write_kubelet_config(version: &str) -> Result<()> {
    write(
        &format!("{KUBELET_DIR}/config.yaml"),
        &format!("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n# kubeadm-sim: the kubelet configuration of {version}\n"),
        0o644,
    )?;
    println!("[upgrade] Writing kubelet configuration to file \"{KUBELET_DIR}/config.yaml\"");
    Ok(())
}

/// `kubeadm upgrade plan [VERSION]`, `upgrade apply VERSION --yes [--certificate-renewal=B]
/// [--etcd-upgrade=B]`, `upgrade node [--certificate-renewal=B] [--etcd-upgrade=B]`, each with
/// an optional `--kubeconfig F`. Unknown flags are refused, like kubeadm's.
fn upgrade(args: &[String]) -> Result<()> {
    let sub = args.first().map(String::as_str).unwrap_or("");
    let (mut yes, mut renew, mut kubeconfig, mut positional) = (false, true, None, Vec::new());
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (a.as_str(), None),
        };
        let boolean = |v: Option<&str>| -> Result<bool> {
            match v {
                None | Some("true") => Ok(true),
                Some("false") => Ok(false),
                Some(o) => {
                    bail!("invalid argument {o:?} for {flag:?} flag: strconv.ParseBool: parsing {o:?}: invalid syntax")
                }
            }
        };
        match (sub, flag) {
            ("apply", "--yes" | "-y") => yes = boolean(inline)?,
            ("apply" | "node", "--certificate-renewal") => renew = boolean(inline)?,
            ("apply" | "node", "--etcd-upgrade") => {
                boolean(inline)?;
            }
            (_, "--kubeconfig") => {
                kubeconfig = Some(match inline {
                    Some(v) => v.to_string(),
                    None => it.next().cloned().ok_or_else(|| anyhow!("flag needs an argument: --kubeconfig"))?,
                })
            }
            (_, f) if f.starts_with('-') => bail!("unknown flag: {f}"),
            (_, p) => positional.push(p.to_string()),
        }
    }
    let control_plane = Path::new(&format!("{KUBE}/manifests/kube-apiserver.yaml")).exists();
    match (sub, positional.as_slice()) {
        ("plan", [] | [_]) => {
            let kc = kubeconfig.unwrap_or_else(|| format!("{KUBE}/admin.conf"));
            let (cluster, ..) = cluster_version(&kc)?;
            let target = positional.first().cloned().unwrap_or_else(sim_version);
            check_target(&target, &cluster)?;
            println!(
                "[upgrade/versions] Cluster version: {cluster}\n[upgrade/versions] kubeadm version: {}",
                sim_version()
            );
            println!("Upgrade to the latest version in the v1.{} series:\n\nCOMPONENT                 NODE      CURRENT   TARGET", semver(&target)?.1);
            for c in ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"] {
                println!("{c:<25} all       {cluster:<9} {target}");
            }
            println!("\nYou can now apply the upgrade by executing the following command:\n\n\tkubeadm upgrade apply {target}");
            Ok(())
        }
        ("apply", [target]) => {
            if !control_plane {
                bail!(
                    "[upgrade/apply] this is not a control-plane node: {KUBE}/manifests/kube-apiserver.yaml not found"
                );
            }
            let kc = kubeconfig.unwrap_or_else(|| format!("{KUBE}/admin.conf"));
            let (cluster, addr, host, ca) = cluster_version(&kc)?;
            check_target(target, &cluster)?;
            if !yes {
                bail!("[upgrade/confirm] Are you sure you want to proceed? [y/N]: EOF\n[upgrade] aborted: no answer (run with --yes on a host without a terminal)");
            }
            println!("[upgrade/version] You have chosen to change the cluster version to \"{target}\"");
            if renew {
                renew_certificates()?;
            }
            upgrade_static_pods(target)?;
            let (code, body) = https(&addr, &host, &ca, "POST", &format!("/sim/version/{target}"), "")?;
            if code != 200 {
                bail!("[upgrade/postupgrade] uploading the kubeadm-config: HTTP {code}: {body}");
            }
            write_kubelet_config(target)?;
            println!("[upgrade/successful] SUCCESS! Your cluster was upgraded to \"{target}\". Enjoy!");
            Ok(())
        }
        ("apply", _) => bail!("kubeadm upgrade apply takes exactly one version (e.g. v1.30.5)"),
        ("node", []) => {
            let kc = kubeconfig.unwrap_or_else(|| {
                if control_plane {
                    format!("{KUBE}/admin.conf")
                } else {
                    format!("{KUBE}/kubelet.conf")
                }
            });
            let (cluster, ..) = cluster_version(&kc)?;
            let (c, k) = (semver(&cluster)?, semver(&sim_version())?);
            if k < c || k.1 != c.1 {
                bail!("[upgrade/node] the cluster runs {cluster}; this kubeadm is {}: use the kubeadm of the cluster's version (and upgrade the control plane first with `kubeadm upgrade apply`)", sim_version());
            }
            if control_plane {
                if renew {
                    renew_certificates()?;
                }
                upgrade_static_pods(&cluster)?;
            } else {
                println!("[upgrade] Skipping phase. Not a control-plane node.");
            }
            write_kubelet_config(&cluster)?;
            println!("[upgrade] The configuration for this node was successfully updated!");
            Ok(())
        }
        ("node", _) => bail!("kubeadm upgrade node takes no arguments"),
        _ => bail!("usage: kubeadm upgrade plan [VERSION] | apply VERSION --yes | node"),
    }
}

/// `kubeadm token create|delete`, through the apiserver of `--kubeconfig`.
fn token_cmd(args: &[String]) -> Result<()> {
    let mut positional = Vec::new();
    let (mut ttl, mut kubeconfig, mut description) = (24 * 3600, format!("{KUBE}/admin.conf"), String::new());
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| anyhow!("flag needs an argument: {a}"));
        match a.as_str() {
            "--ttl" => ttl = go_duration(&value()?)?,
            "--kubeconfig" => kubeconfig = value()?,
            "--description" => description = value()?,
            f if f.starts_with('-') => bail!("unknown flag: {f}"),
            p => positional.push(p.to_string()),
        }
    }
    let _ = description;
    let (addr, host, ca) = admin_server(&kubeconfig)?;
    let server = format!("{host}:{}", addr.port());
    let path = match (args.first().map(String::as_str), positional.as_slice()) {
        (Some("create"), [t]) if token_ok(t) => format!("/sim/tokens/create/{t}/{}", now_secs() + ttl),
        (Some("create"), [t]) => {
            bail!("the bootstrap token {t:?} was not of the form \"[a-z0-9]{{6}}.[a-z0-9]{{16}}\"")
        }
        (Some("create"), _) => bail!("kubeadm-sim: token create needs the token (fleetadm always passes one)"),
        (Some("delete"), [id]) if id.len() == 6 => format!("/sim/tokens/delete/{id}"),
        (Some("delete"), _) => bail!("kubeadm-sim: token delete takes one token id"),
        _ => bail!("usage: kubeadm token create TOKEN --ttl D | token delete ID"),
    };
    let (code, body) = https(&addr, &host, &ca, "POST", &path, "").with_context(|| format!("talking to {server}"))?;
    if code != 200 {
        bail!("failed to change bootstrap tokens: {body} (HTTP {code})");
    }
    match positional.first() {
        Some(t) if args[0] == "create" => println!("{t}"),
        Some(id) => println!("bootstrap token \"{id}\" deleted"),
        None => {}
    }
    Ok(())
}

/// The apiserver an admin kubeconfig points at: (address, TLS name, cluster CA).
fn admin_server(kubeconfig: &str) -> Result<(SocketAddr, String, String)> {
    let text =
        std::fs::read_to_string(kubeconfig).with_context(|| format!("failed to load kubeconfig {kubeconfig}"))?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .ok_or_else(|| anyhow!("{kubeconfig} has no server"))?
        .to_string();
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server} (check /etc/hosts)"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to nothing"))?;
    let host = server.rsplit_once(':').map(|x| x.0).unwrap_or(&server).to_string();
    let ca = std::fs::read_to_string(format!("{KUBE}/pki/ca.crt")).context("the cluster CA (pki/ca.crt)")?;
    Ok((addr, host, ca))
}

/// `kubectl --kubeconfig F drain NODE [--ignore-daemonsets] [--delete-emptydir-data]
/// [--timeout D] [--force] [--grace-period N]` and `kubectl --kubeconfig F delete node NODE
/// [--ignore-not-found]`, through the apiserver like the real one: an unknown node is NotFound;
/// drain refuses DaemonSet pods (any applied DaemonSet runs on every node) without
/// --ignore-daemonsets; a drained node is recorded in sim/drained, a deleted one leaves sim/nodes
/// on every member.
fn kubectl_node(kubeconfig: &str, rest: &[String]) -> Result<()> {
    let mut positional = Vec::new();
    let (mut ignore_ds, mut ignore_missing) = (false, false);
    let verb = rest.first().map(String::as_str).unwrap_or("");
    let mut it = rest.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| anyhow!("flag needs an argument: {a}"));
        match (verb, a.as_str()) {
            ("drain", "--ignore-daemonsets") => ignore_ds = true,
            ("drain", "--delete-emptydir-data" | "--force") => {}
            ("drain", "--timeout") => {
                go_duration(&value()?)?;
            }
            ("drain", "--grace-period") => {
                value()?.parse::<i64>().context("--grace-period")?;
            }
            ("delete", "--ignore-not-found") => ignore_missing = true,
            (_, f) if f.starts_with('-') => bail!("unknown flag: {f}"),
            (_, p) => positional.push(p.to_string()),
        }
    }
    let name = match (verb, positional.as_slice()) {
        ("drain" | "uncordon", [n]) => n.clone(),
        ("uncordon", _) => bail!("kubectl uncordon takes one node name"),
        ("delete", [kind, n]) if kind == "node" || kind == "nodes" => n.clone(),
        ("drain", _) => bail!("kubectl drain takes one node name"),
        _ => bail!("kubectl simulator: only `delete node NAME` is supported among deletes"),
    };
    if verb == "drain" && !ignore_ds {
        let applied = std::fs::read_to_string(sim_dir().join("applied")).unwrap_or_default();
        if let Some(ds) = applied.lines().find(|l| l.starts_with("DaemonSet/")) {
            bail!("unable to drain node \"{name}\": cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): {ds}");
        }
    }
    let (addr, host, ca) = admin_server(kubeconfig)?;
    let (code, body) = https(&addr, &host, &ca, "POST", &format!("/sim/nodes/{verb}/{name}"), "")
        .with_context(|| format!("talking to {host}"))?;
    match code {
        200 if verb == "drain" => println!("node/{name} cordoned\nnode/{name} drained"),
        200 if verb == "uncordon" => println!("node/{name} uncordoned"),
        200 => println!("node \"{name}\" deleted"),
        404 if verb == "delete" && ignore_missing => {}
        _ => bail!("{body}"),
    }
    Ok(())
}

/// `kubectl --kubeconfig F get nodes`: NAME STATUS ROLES VERSION, from the apiserver (the
/// version each node's kubelet registered; SchedulingDisabled while cordoned).
fn kubectl_get_nodes(kubeconfig: &str, rest: &[String]) -> Result<()> {
    if !matches!(rest, [what] if what == "nodes" || what == "node" || what == "no") {
        bail!("kubectl simulator: only `get nodes` is supported among gets (got {rest:?})");
    }
    let (addr, host, ca) = admin_server(kubeconfig)?;
    let get = |what: &str| -> Result<String> {
        match https(&addr, &host, &ca, "GET", &format!("/sim/{what}"), "")? {
            (200, body) => Ok(body),
            (code, body) => bail!("HTTP {code}: {body}"),
        }
    };
    let (nodes, kubelets, drained) = (get("nodes")?, get("kubelets")?, get("drained")?);
    println!("{:<16} {:<28} {:<16} VERSION", "NAME", "STATUS", "ROLES");
    let mut seen = std::collections::HashSet::new();
    for line in nodes.lines() {
        let mut f = line.split_whitespace();
        let (Some(name), role) = (f.next(), f.next().unwrap_or("worker")) else { continue };
        if !seen.insert(name.to_string()) {
            continue;
        }
        let version = kubelets.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or("<unknown>");
        let status = if drained.lines().any(|d| d == name) { "Ready,SchedulingDisabled" } else { "Ready" };
        let roles = if role == "control-plane" { "control-plane" } else { "<none>" };
        println!("{name:<16} {status:<28} {roles:<16} {version}");
    }
    Ok(())
}

fn kubectl(args: &[String]) -> Result<()> {
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    if let [flag, kc, rest @ ..] = args {
        if flag == "--kubeconfig" && matches!(rest.first().map(String::as_str), Some("drain" | "delete" | "uncordon")) {
            return kubectl_node(kc, rest);
        }
        if flag == "--kubeconfig" && rest.first().map(String::as_str) == Some("get") {
            return kubectl_get_nodes(kc, &rest[1..]);
        }
    }
    if !args.iter().any(|a| a == "apply") {
        bail!("kubectl simulator: only `apply -f`, `drain` and `delete node` are supported (after --kubeconfig FILE)");
    }
    let kc = get("--kubeconfig").ok_or_else(|| anyhow!("--kubeconfig is required"))?;
    let text = std::fs::read_to_string(&kc).with_context(|| format!("reading kubeconfig {kc}"))?;
    if !text.contains("server: https://") {
        bail!("kubeconfig {kc} has no server");
    }
    let target = PathBuf::from(get("-f").ok_or_else(|| anyhow!("-f is required"))?);
    let mut files = Vec::new();
    if target.is_dir() {
        for e in std::fs::read_dir(&target)? {
            files.push(e?.path());
        }
        files.sort();
    } else {
        files.push(target);
    }
    let mut applied = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize_from(d)?;
            if v.is_null() {
                continue;
            }
            let at = f.display().to_string();
            let kind = s(&v, &at, "kind")?;
            s(&v, &at, "apiVersion")?;
            let name = v
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("{at}: metadata.name missing"))?;
            println!("{}/{name} created", kind.to_lowercase());
            applied.push_str(&format!("{kind}/{name}\n"));
        }
    }
    let dir = sim_dir();
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("applied"))?;
    f.write_all(applied.as_bytes())?;
    Ok(())
}

// ------------------------------------------------------------------ etcd

/// What the stand-in etcd holds: the cluster state files every member replicates.
const ETCD_KEYS: &[&str] = &["nodes", "tokens", "applied", "drained", "peers", "version", "kubelets"];
const SNAPSHOT_MAGIC: &str = "fleetadm-sim etcd snapshot v1";

/// `etcdctl --endpoints URL --cacert F --cert F --key F snapshot save FILE`: refuses unknown
/// flags, missing TLS files and an endpoint where no member listens; writes a snapshot of the
/// member's keyspace with its revision and an integrity hash at the end (like etcd's).
fn etcdctl(args: &[String]) -> Result<()> {
    let (mut endpoints, mut cacert, mut cert, mut key) = (None, None, None, None);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| anyhow!("flag needs an argument: {flag}"));
        match flag.as_str() {
            "--endpoints" => endpoints = Some(value()?),
            "--cacert" => cacert = Some(value()?),
            "--cert" => cert = Some(value()?),
            "--key" => key = Some(value()?),
            f if f.starts_with('-') => bail!("unknown flag: {f}"),
            _ => rest.push(a.clone()),
        }
    }
    let ["snapshot", "save", file] = rest.iter().map(String::as_str).collect::<Vec<_>>()[..] else {
        bail!("etcdctl simulator: only `snapshot save FILE` is supported (got {rest:?})");
    };
    let endpoint =
        endpoints.ok_or_else(|| anyhow!("snapshot must be requested to one selected node, not multiple []"))?;
    let addr = endpoint
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("--endpoints {endpoint}: the member serves https only"))?;
    if endpoint.contains(',') {
        bail!("snapshot must be requested to one selected node, not multiple [{endpoint}]");
    }
    for (flag, f) in [("--cacert", &cacert), ("--cert", &cert), ("--key", &key)] {
        let f = f.as_ref().ok_or_else(|| anyhow!("{flag} is required: the member asks for a client certificate"))?;
        std::fs::metadata(f).with_context(|| format!("open {f}"))?;
    }
    let addr: SocketAddr = addr.parse().with_context(|| format!("--endpoints {endpoint}"))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| anyhow!("failed to dial {endpoint}: {e} (context deadline exceeded)"))?;
    let state = sim_dir();
    let member = std::fs::read_to_string(format!("{ETCD_DIR}/member/snap/db")).unwrap_or_default();
    let revision = std::fs::read_to_string(state.join("revision")).unwrap_or_else(|_| "1".into());
    let mut body = format!("{SNAPSHOT_MAGIC}\n{}revision: {}\n", member, revision.trim());
    let mut keys = 0;
    for k in ETCD_KEYS {
        let text = std::fs::read_to_string(state.join(k)).unwrap_or_default();
        keys += text.lines().count();
        body.push_str(&format!("=== {k}\n{text}"));
    }
    body.push_str(&format!("keys: {keys}\n"));
    let sum = hex::encode(Sha256::digest(body.as_bytes()));
    let tmp = format!("{file}.part");
    std::fs::write(&tmp, format!("{body}sha256: {sum}\n")).with_context(|| format!("writing {tmp}"))?;
    std::fs::rename(&tmp, file)?;
    println!("Snapshot saved at {file}");
    Ok(())
}

/// A snapshot's body, checked against its trailing hash.
fn read_snapshot(file: &str) -> Result<(String, u64, u64)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("open {file}"))?;
    let (body, trailer) =
        text.rsplit_once("sha256: ").ok_or_else(|| anyhow!("snapshot file integrity check failed (no hash)"))?;
    if !body.starts_with(SNAPSHOT_MAGIC) || hex::encode(Sha256::digest(body.as_bytes())) != trailer.trim() {
        bail!("snapshot file integrity check failed");
    }
    let field = |name: &str| {
        body.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    Ok((body.to_string(), field("revision: "), field("keys: ")))
}

/// `etcdutl snapshot status FILE [--write-out=json|-w json]`: verifies the snapshot.
fn etcdutl(args: &[String]) -> Result<()> {
    if args.get(..2).is_some_and(|a| a[0] == "snapshot" && a[1] == "restore") {
        let file = args.get(2).ok_or_else(|| anyhow!("snapshot restore needs a FILE"))?;
        return etcdutl_restore(file, &args[3..]);
    }
    let mut rest = Vec::new();
    let mut json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--write-out=json" => json = true,
            "-w" | "--write-out" => json = it.next().map(String::as_str) == Some("json"),
            f if f.starts_with('-') => bail!("unknown flag: {f}"),
            _ => rest.push(a.as_str()),
        }
    }
    let ["snapshot", "status", file] = rest[..] else {
        bail!("etcdutl simulator: only `snapshot status FILE` and `snapshot restore FILE ...` are supported (got {rest:?})");
    };
    let (body, revision, keys) = read_snapshot(file)?;
    let size = std::fs::metadata(file)?.len();
    let hash = u32::from_str_radix(&hex::encode(Sha256::digest(body.as_bytes()))[..8], 16).unwrap_or(0);
    if json {
        println!("{{\"hash\":{hash},\"revision\":{revision},\"totalKey\":{keys},\"totalSize\":{size}}}");
    } else {
        println!("{hash:x}, {revision}, {keys}, {size}");
    }
    Ok(())
}

/// `etcdutl snapshot restore FILE --data-dir DIR --name N --initial-cluster C
/// --initial-advertise-peer-urls U`: checks the snapshot's hash, refuses an existing data
/// directory and a member name missing from the initial cluster (or with another peer URL), and
/// writes a data directory whose member, once started, serves the snapshot's keyspace.
fn etcdutl_restore(file: &str, flags: &[String]) -> Result<()> {
    let (mut data_dir, mut name, mut cluster, mut peer) = (None, None, None, None);
    let mut it = flags.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| anyhow!("flag needs an argument: {a}"));
        match a.as_str() {
            "--data-dir" => data_dir = Some(value()?),
            "--name" => name = Some(value()?),
            "--initial-cluster" => cluster = Some(value()?),
            "--initial-advertise-peer-urls" => peer = Some(value()?),
            f => bail!("unknown flag: {f}"),
        }
    }
    let data_dir = data_dir.ok_or_else(|| anyhow!("--data-dir is required"))?;
    let name = name.unwrap_or_else(|| "default".into());
    let peer = peer.unwrap_or_else(|| "http://localhost:2380".into());
    let cluster = cluster.unwrap_or_else(|| format!("{name}={peer}"));
    let members: Vec<(&str, &str)> = cluster.split(',').filter_map(|m| m.split_once('=')).collect();
    match members.iter().find(|(n, _)| *n == name) {
        None => bail!("couldn't find local name {name:?} in the initial cluster configuration"),
        Some((_, u)) if *u != peer => {
            bail!("--initial-cluster has {name}={u} but missing from --initial-advertise-peer-urls={peer}")
        }
        Some(_) => {}
    }
    if Path::new(&data_dir).exists() {
        bail!("data-dir {data_dir:?} exists");
    }
    let (body, revision, _) = read_snapshot(file)?;
    write(
        &format!("{data_dir}/member/snap/db"),
        &format!("etcd member {name}\nrestored at revision {revision}\n"),
        0o600,
    )?;
    write(&format!("{data_dir}/member/snap/restored"), &body, 0o600)?;
    println!("restored snapshot {file} (revision {revision}) into {data_dir} as member {name} of {cluster}");
    Ok(())
}

/// A member started on a restored data directory serves the snapshot's keyspace.
fn load_restored() -> Result<()> {
    let marker = PathBuf::from(format!("{ETCD_DIR}/member/snap/restored"));
    let Ok(body) = std::fs::read_to_string(&marker) else { return Ok(()) };
    let state = sim_dir();
    let mut current: Option<&str> = None;
    let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
    for line in body.lines() {
        if let Some(k) = line.strip_prefix("=== ") {
            current = ETCD_KEYS.iter().copied().find(|x| *x == k);
            if let Some(k) = current {
                sections.entry(k).or_default();
            }
            continue;
        }
        if line.starts_with("keys: ") {
            current = None;
        }
        if let Some(k) = current {
            let s = sections.entry(k).or_default();
            s.push_str(line);
            s.push('\n');
        }
    }
    for (k, v) in &sections {
        std::fs::write(state.join(k), v)?;
    }
    let revision = body.lines().find_map(|l| l.strip_prefix("revision: ")).unwrap_or("1").trim().to_string();
    std::fs::write(state.join("revision"), revision)?;
    std::fs::remove_file(&marker)?;
    eprintln!("etcd: serving the restored keyspace ({} keys sections)", sections.len());
    Ok(())
}
