//! The node-local apiserver load balancer: an IPVS virtual server on a VIP held by a dummy
//! interface, one real server per master, kept healthy by the agent's own guard.
//!
//! - [`ipvs`]: the IPVS generic-netlink client; [`link`]: dummy interface and VIP (rtnetlink)
//! - [`host`]: kernel modules and sysctls
//! - [`reconcile`]: desired vs kernel state, converged idempotently
//! - [`probe`] + [`guard`]: HTTPS `/readyz` checks and the rotation decisions
pub mod guard;
pub mod host;
pub mod ipvs;
pub mod link;
pub mod probe;
pub mod reconcile;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::netlink::NetlinkError;
use guard::{Guard, GuardConfig, GuardStatus};
use ipvs::{Dest, Ipvs};
use link::Links;
use probe::Prober;
use reconcile::{converge, Desired, LbKernel};

pub const DEFAULT_INTERFACE: &str = "fleetadm-lb0";
pub const DEFAULT_VIP: &str = "10.103.97.2:6443";

#[derive(Debug, Error)]
pub enum LbError {
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error("IPVS")]
    Netlink(#[from] NetlinkError),
    #[error("invalid load balancer spec: {0}")]
    Spec(String),
    #[error("health checks: {0}")]
    Probe(String),
    #[error("the load balancer worker thread failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// One virtual server and its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSpec {
    pub vip: SocketAddr,
    pub real_servers: Vec<SocketAddr>,
    pub interface: String,
    pub scheduler: String,
}

impl LbSpec {
    pub fn validate(&self) -> Result<(), LbError> {
        if self.real_servers.is_empty() {
            return Err(LbError::Spec("at least one real server (--rs IP:PORT) is required".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for rs in &self.real_servers {
            if !seen.insert(rs) {
                return Err(LbError::Spec(format!("real server {rs} is listed twice")));
            }
            if rs.ip() == self.vip.ip() {
                return Err(LbError::Spec(format!("real server {rs} cannot be the VIP itself")));
            }
            if rs.ip().is_unspecified() || rs.port() == 0 {
                return Err(LbError::Spec(format!("real server {rs} is not a usable address")));
            }
            if rs.is_ipv4() != self.vip.is_ipv4() {
                return Err(LbError::Spec(format!("real server {rs} and VIP {} are different IP families", self.vip)));
            }
        }
        if self.vip.ip().is_unspecified() || self.vip.ip().is_loopback() || self.vip.port() == 0 {
            return Err(LbError::Spec(format!("VIP {} is not usable", self.vip)));
        }
        if self.interface.is_empty() || self.interface.len() > 15 || self.interface.contains(['/', ' ']) {
            return Err(LbError::Spec(format!("interface name {:?} is not valid (1-15 characters)", self.interface)));
        }
        if self.scheduler.is_empty() || !self.scheduler.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(LbError::Spec(format!("scheduler {:?} is not valid (e.g. rr, wrr, lc)", self.scheduler)));
        }
        Ok(())
    }

    pub fn desired_all_healthy(&self) -> Desired {
        Desired {
            vip: self.vip,
            scheduler: self.scheduler.clone(),
            dests: self.real_servers.iter().map(|rs| (*rs, 1)).collect(),
        }
    }
}

/// What an operation changed (empty = nothing to do).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Changes(pub Vec<String>);

/// Modules, sysctls, the dummy interface and the VIP address. Idempotent.
pub fn prepare_host(spec: &LbSpec) -> Result<Changes, LbError> {
    let mut changes = Changes::default();
    for m in host::load_modules(Path::new("/sys"), &spec.scheduler)? {
        changes.0.push(format!("loaded module {m}"));
    }
    for s in host::set_sysctls(Path::new("/proc/sys"))? {
        changes.0.push(format!("set {s}"));
    }
    let links = Links::open()?;
    let (link, created) = links.ensure_dummy(&spec.interface)?;
    if created {
        changes.0.push(format!("created interface {}", spec.interface));
    }
    if links.ensure_address(link.index, &spec.vip.ip())? {
        changes.0.push(format!("added {} to {}", spec.vip.ip(), spec.interface));
    }
    // Local clients must not use the VIP as their source (replies would not come back here):
    // use the address this host reaches the real servers from.
    if let Some(rs) = spec.real_servers.first() {
        if let Some(src) = links.source_for(&rs.ip())? {
            if src != spec.vip.ip() && links.ensure_local_source(link.index, &spec.vip.ip(), &src)? {
                changes.0.push(format!("connections to {} leave from {src}", spec.vip.ip()));
            }
        }
    }
    Ok(changes)
}

/// `lb apply`: converge once with every real server in rotation.
pub fn apply(spec: &LbSpec) -> Result<Changes, LbError> {
    spec.validate()?;
    let mut changes = prepare_host(spec)?;
    let ipvs = Ipvs::open()?;
    for op in converge(&ipvs, &spec.desired_all_healthy())? {
        changes.0.push(op.to_string());
    }
    Ok(changes)
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub vip: SocketAddr,
    pub scheduler: String,
    pub real_servers: Vec<Dest>,
}

/// `lb show`: the kernel's view.
pub fn show() -> Result<Vec<ServiceView>, LbError> {
    let ipvs = Ipvs::open()?;
    let mut out = Vec::new();
    for s in ipvs.services()? {
        let dests = ipvs.dests(&s.vip)?;
        out.push(ServiceView { vip: s.vip, scheduler: s.scheduler, real_servers: dests });
    }
    Ok(out)
}

/// `lb clean`: remove the virtual service(s) on our interface's addresses (or just `vip`), the
/// addresses, and the interface once it holds nothing else.
pub fn clean(vip: Option<SocketAddr>, interface: &str) -> Result<Changes, LbError> {
    let mut changes = Changes::default();
    let links = Links::open()?;
    let link = links.get(interface)?;
    let ours: Vec<std::net::IpAddr> = match &link {
        Some(l) => links.addresses(l.index)?.into_iter().map(|(ip, _)| ip).collect(),
        None => Vec::new(),
    };
    match Ipvs::open() {
        Ok(ipvs) => {
            for s in ipvs.services()? {
                let selected = match vip {
                    Some(v) => s.vip == v,
                    None => ours.contains(&s.vip.ip()),
                };
                if selected {
                    ipvs.del_service(&s.vip)?;
                    changes.0.push(format!("removed virtual service {}", s.vip));
                }
            }
        }
        Err(NetlinkError::NoFamily(_)) => {} // IPVS not loaded: no services to remove
        Err(e) => return Err(e.into()),
    }
    if let Some(l) = link {
        let remove: Vec<_> = match vip {
            Some(v) => ours.iter().filter(|ip| **ip == v.ip()).copied().collect(),
            None => ours.clone(),
        };
        for ip in &remove {
            if links.remove_address(l.index, ip)? {
                changes.0.push(format!("removed {ip} from {interface}"));
            }
        }
        if links.addresses(l.index)?.is_empty() && l.kind == "dummy" {
            links.delete(l.index)?;
            changes.0.push(format!("deleted interface {interface}"));
        }
    }
    Ok(changes)
}

/// Publish the guard's status where `node-agent lb show` and the session can read it.
fn write_status(path: &Path, st: &GuardStatus) {
    if let Ok(json) = serde_json::to_vec_pretty(st) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = fleetadm_common::fsutil::write_atomic(path, &json, 0o644);
    }
}

pub fn read_status(path: &Path) -> Option<GuardStatus> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Status file location inside a state dir.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lb-status.json")
}

/// `lb guard` (and the agent's lb task): prepare, adopt the kernel's state, then probe every
/// real server on its own schedule and converge on every health change, until `stop`.
pub async fn run_guard(
    spec: LbSpec,
    cfg: GuardConfig,
    prober: Prober,
    status_file: PathBuf,
    status: tokio::sync::watch::Sender<Option<GuardStatus>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), LbError> {
    let publish = |st: GuardStatus| {
        write_status(&status_file, &st);
        status.send_replace(Some(st));
    };
    spec.validate()?;
    // Netlink calls, sysctl writes and modprobe block: they run on blocking threads, never on the
    // async workers that carry the agent's session.
    let s = spec.clone();
    let changes = tokio::task::spawn_blocking(move || prepare_host(&s)).await.map_err(LbError::Worker)??;
    for c in &changes.0 {
        tracing::info!(change = %c, "load balancer host setup");
    }
    let vip = spec.vip;
    let (ipvs, kernel_dests) = tokio::task::spawn_blocking(move || -> Result<_, LbError> {
        let ipvs = Ipvs::open()?;
        let dests = match ipvs.service(&vip)? {
            Some(_) => LbKernel::dests(&ipvs, &vip)?,
            None => Vec::new(),
        };
        Ok((std::sync::Arc::new(ipvs), dests))
    })
    .await
    .map_err(LbError::Worker)??;
    let converge_off = |d: Desired| {
        let ipvs = ipvs.clone();
        async move {
            tokio::task::spawn_blocking(move || converge(&*ipvs, &d))
                .await
                .unwrap_or_else(|e| Err(NetlinkError::Io(std::io::Error::other(e.to_string()))))
        }
    };
    let previous = read_status(&status_file);
    let mut guard =
        Guard::new(spec.vip, &spec.scheduler, &spec.real_servers, cfg.clone(), &kernel_dests, previous.as_ref());
    let d = guard.desired();
    for op in converge_off(d.clone()).await? {
        tracing::info!(vip = %spec.vip, change = %op, "load balancer converged");
    }
    guard.applied(d);
    publish(guard.status());

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(SocketAddr, Result<(), probe::ProbeFailure>)>(64);
    let mut tasks = Vec::new();
    for rs in spec.real_servers.clone() {
        let (tx, prober, interval, fall) = (tx.clone(), prober.clone(), cfg.interval, cfg.fall.max(1));
        tasks.push(tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let r = prober.probe(rs).await;
                failures = if r.is_err() { failures.saturating_add(1) } else { 0 };
                if tx.send((rs, r)).await.is_err() {
                    return;
                }
                // A fresh failure is confirmed quickly (like HAProxy's fastinter), so a dead
                // master leaves rotation in about one interval instead of `fall` intervals.
                let pause = if failures > 0 && failures < fall { interval / 4 } else { interval };
                tokio::time::sleep(pause).await;
            }
        }));
    }
    drop(tx);
    tokio::pin!(stop);
    let mut resync = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut warned_all_failing = false;
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = resync.tick() => {
                // Repair drift (someone flushed the table) even when health is steady.
                let d = guard.desired();
                match converge_off(d).await {
                    Ok(ops) => for op in ops { tracing::warn!(vip = %spec.vip, change = %op, "repaired drift"); },
                    Err(e) => tracing::error!(error = %e, "converge failed"),
                }
                let s = spec.clone();
                match tokio::task::spawn_blocking(move || prepare_host(&s)).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "host setup drifted and could not be repaired"),
                    Err(e) => tracing::error!(error = %e, "host setup check failed"),
                    Ok(Ok(_)) => {}
                }
            }
            Some((rs, r)) = rx.recv() => {
                let now = fleetadm_common::clock::now_unix_ms();
                let failed = r.as_ref().err().cloned();
                let flipped = guard.observe(rs, r, now);
                if flipped {
                    match &failed {
                        Some(e) => tracing::warn!(real_server = %rs, error = %e, "real server unhealthy: out of rotation"),
                        None => tracing::info!(real_server = %rs, "real server healthy: back in rotation"),
                    }
                }
                if guard.all_failing() && !warned_all_failing {
                    tracing::error!(vip = %spec.vip, "every real server is failing its health check; keeping the last known set");
                }
                warned_all_failing = guard.all_failing();
                let d = guard.desired();
                match converge_off(d.clone()).await {
                    Ok(ops) => {
                        for op in ops { tracing::info!(vip = %spec.vip, change = %op, "load balancer converged"); }
                        guard.applied(d);
                    }
                    Err(e) => tracing::error!(error = %e, "converge failed"),
                }
                publish(guard.status());
            }
        }
    };
    for t in tasks {
        t.abort();
    }
    result
}

/// Parse `IP:PORT` for flags.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr, BadEndpoint> {
    s.parse::<SocketAddr>().map_err(|_| BadEndpoint(s.to_string()))
}

/// An endpoint that is not IP:PORT.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not IP:PORT (IPv6 as [::1]:6443)")]
pub struct BadEndpoint(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rs: &[&str]) -> LbSpec {
        LbSpec {
            vip: DEFAULT_VIP.parse().unwrap(),
            real_servers: rs.iter().map(|r| r.parse().unwrap()).collect(),
            interface: DEFAULT_INTERFACE.into(),
            scheduler: "rr".into(),
        }
    }

    #[test]
    fn specs_are_validated() {
        spec(&["10.0.0.1:6443"]).validate().unwrap();
        assert!(spec(&[]).validate().is_err());
        assert!(spec(&["10.0.0.1:6443", "10.0.0.1:6443"]).validate().is_err());
        assert!(spec(&["10.103.97.2:6443"]).validate().is_err());
        assert!(spec(&["[fd00::1]:6443"]).validate().is_err());
        let mut s = spec(&["10.0.0.1:6443"]);
        s.interface = "x".repeat(16);
        assert!(s.validate().is_err());
        assert!(parse_endpoint("10.0.0.1").is_err());
    }
}
