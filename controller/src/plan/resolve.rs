//! Match the operator's host references (IP address or node name) to enrolled nodes, and turn a
//! request into a plan. Unknown or disconnected hosts fail fast, listed together.
use std::net::IpAddr;

use fleetadm_proto::{Inventory, PlanClusterRequest, PlanClusterResponse};

use super::clusterfile::{self, Clusterfile, Role};
use super::kubeadm;
use super::phases::{self, ClusterShape, PlannedHost};
use super::preflight::{self, Severity};
use crate::nodes::NodeRecord;

/// A node with what the planner needs to know about it.
pub struct Candidate {
    pub record: NodeRecord,
    pub facts: Option<Inventory>,
    pub connected: bool,
    /// The address its session actually connects from (the TCP peer the controller saw).
    pub observed: Option<IpAddr>,
}

use crate::nodes::addresses;

/// The IP of a recorded peer address (`IP:PORT`), IPv4-mapped IPv6 folded to IPv4.
pub fn peer_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip().to_canonical())
}

enum Resolution<'a> {
    Found(&'a Candidate, IpAddr),
    Unknown,
    Refused(String),
}

/// The node a reference means, and the IP the cluster should use for it.
///
/// By node name: the operator chose the node; its own (first IPv4) address is used. By IP:
/// an address a node merely reports proves nothing (any node can claim a master's IP), so the
/// IP must be the one exactly one node both reports and connects from.
fn resolve<'a>(r: &str, nodes: &'a [Candidate]) -> Resolution<'a> {
    let Ok(ip) = r.parse::<IpAddr>() else {
        return match nodes.iter().find(|c| c.record.name == r) {
            None => Resolution::Unknown,
            Some(c) => match c.facts.as_ref().and_then(|f| addresses(f).into_iter().find(|a| a.is_ipv4())) {
                Some(ip) => Resolution::Found(c, ip),
                None => Resolution::Refused(format!("host {r}: node {r} has reported no IPv4 address yet")),
            },
        };
    };
    let ip = ip.to_canonical();
    let names = |v: &[&Candidate]| v.iter().map(|c| c.record.name.as_str()).collect::<Vec<_>>().join(", ");
    let claim: Vec<&Candidate> =
        nodes.iter().filter(|c| c.facts.as_ref().is_some_and(|f| addresses(f).contains(&ip))).collect();
    let seen: Vec<&Candidate> = nodes.iter().filter(|c| c.observed == Some(ip)).collect();
    match (claim.as_slice(), seen.as_slice()) {
        ([], []) => Resolution::Unknown,
        ([_, _, ..], _) => Resolution::Refused(format!(
            "host {r}: nodes {} all report this address; an address must belong to one node: name the host by node name",
            names(&claim)
        )),
        ([c], [s]) if c.record.name == s.record.name => Resolution::Found(c, ip),
        ([c], []) => Resolution::Refused(format!(
            "host {r}: node {} reports this address but connects from {}; an address is used only when it is observed too (behind NAT or a relay, name the host by node name: {})",
            c.record.name,
            c.observed.map(|o| o.to_string()).unwrap_or_else(|| "nowhere yet".into()),
            c.record.name
        )),
        ([c], others) => Resolution::Refused(format!(
            "host {r}: node {} reports this address but node {} connects from it; name the host by node name",
            c.record.name,
            names(others)
        )),
        ([], others) => Resolution::Refused(format!(
            "host {r}: node {} connects from this address but has it on no interface (NAT?); name the host by node name",
            names(others)
        )),
    }
}

/// Resolves host references, collecting what is wrong with them: unknown and disconnected
/// hosts are listed together (one line each), a host named twice is refused.
#[derive(Default)]
pub struct Picker {
    seen: std::collections::BTreeSet<String>,
    unknown: Vec<String>,
    offline: Vec<String>,
    errors: Vec<String>,
}

impl Picker {
    pub fn pick<'a>(&mut self, refs: &[String], nodes: &'a [Candidate]) -> Vec<(PlannedHost, &'a Candidate)> {
        let mut out = Vec::new();
        for r in refs {
            match resolve(r, nodes) {
                Resolution::Unknown => self.unknown.push(r.clone()),
                Resolution::Refused(why) => self.errors.push(why),
                Resolution::Found(c, ip) => {
                    if !self.seen.insert(c.record.name.clone()) {
                        self.errors.push(format!("host {r} ({}) is listed twice", c.record.name));
                        continue;
                    }
                    if !c.connected || c.record.revoked {
                        self.offline.push(format!("{r} ({})", c.record.name));
                    }
                    out.push((PlannedHost { node: c.record.name.clone(), ip }, c));
                }
            }
        }
        out
    }

    /// The errors found (empty when every reference resolved to a connected node).
    pub fn finish(mut self) -> Vec<String> {
        if !self.unknown.is_empty() {
            self.errors.push(format!(
                "unknown hosts (not enrolled; see `controller nodes list`): {}",
                self.unknown.join(", ")
            ));
        }
        if !self.offline.is_empty() {
            self.errors.push(format!("disconnected hosts (is node-agent running there?): {}", self.offline.join(", ")));
        }
        self.errors
    }
}

/// Workers to add to the cluster `shape`: resolved, connected, checked like a create's hosts
/// (inventory preflight as workers of this cluster's VIP and CIDRs).
pub fn resolve_additions(
    refs: &[String],
    nodes: &[Candidate],
    shape: &ClusterShape,
    pod_cidr: &str,
    service_cidr: &str,
) -> (Vec<PlannedHost>, Vec<String>, Vec<String>) {
    let mut picker = Picker::default();
    let picked = picker.pick(refs, nodes);
    let mut errors = picker.finish();
    let mut warnings = Vec::new();
    if refs.is_empty() {
        errors.push("name the hosts to add (--masters, --nodes or --node-selector)".into());
    }
    let facts: Vec<(String, Option<Inventory>, i64)> =
        picked.iter().map(|(h, c)| (h.node.clone(), c.facts.clone(), c.record.clock_skew_ms)).collect();
    for f in preflight::check(&facts, 0, shape.vip, pod_cidr, service_cidr) {
        let line = format!("{}: {}", f.host, f.message);
        match f.severity {
            Severity::Error => errors.push(line),
            Severity::Warning => warnings.push(line),
        }
    }
    // Kubernetes node names must stay unique across the whole cluster, not only among the new.
    let members: Vec<&str> = shape.masters.iter().chain(shape.workers.iter()).map(|h| h.node.as_str()).collect();
    for (h, c) in &picked {
        let Some(hostname) = c.facts.as_ref().map(|f| f.hostname.as_str()).filter(|n| !n.is_empty()) else {
            continue;
        };
        let clash = nodes.iter().find(|o| {
            o.record.name != h.node
                && members.contains(&o.record.name.as_str())
                && o.facts.as_ref().is_some_and(|f| f.hostname == hostname)
        });
        if let Some(o) = clash {
            errors.push(format!(
                "{}: its hostname {hostname:?} is already the node name of {} in cluster {}; \
                 Kubernetes node names must be unique (hostnamectl set-hostname)",
                h.node, o.record.name, shape.name
            ));
        }
    }
    (picked.into_iter().map(|(h, _)| h).collect(), errors, warnings)
}

/// The outcome of resolving a request: what `--dry-run` prints, and (when there are no errors)
/// what the rollout is built from.
pub struct Resolved {
    pub response: PlanClusterResponse,
    pub shape: Option<ClusterShape>,
    pub clusterfile: Option<Clusterfile>,
}

pub fn plan(req: &PlanClusterRequest, nodes: &[Candidate]) -> PlanClusterResponse {
    resolve_request(req, nodes).response
}

pub fn resolve_request(req: &PlanClusterRequest, nodes: &[Candidate]) -> Resolved {
    let mut resp = PlanClusterResponse::default();
    let mut parsed_cf = None;
    let (name, masters, workers) = if req.clusterfile.trim().is_empty() {
        (req.name.clone(), req.masters.clone(), req.nodes.clone())
    } else {
        match clusterfile::parse(&req.clusterfile) {
            Ok(cf) => {
                let out = (
                    cf.name.clone(),
                    cf.hosts.iter().filter(|h| h.role == Role::Master).map(|h| h.host.clone()).collect(),
                    cf.hosts.iter().filter(|h| h.role == Role::Node).map(|h| h.host.clone()).collect(),
                );
                parsed_cf = Some(cf);
                out
            }
            Err(e) => {
                resp.errors.push(e.to_string());
                return Resolved { response: resp, shape: None, clusterfile: None };
            }
        }
    };
    if crate::enroll::csr::validate_node_name(&name).is_err() {
        resp.errors.push(format!("cluster name {name:?} is not valid (lowercase letters, digits, '-', '.')"));
    }
    if masters.is_empty() {
        resp.errors.push("at least one master is required (--masters)".into());
    }
    if let Err(e) = kubeadm::kubeadm_api(&req.version) {
        resp.errors.push(e.to_string());
    }
    let vip: Option<IpAddr> = match req.vip.parse() {
        Ok(v) => Some(v),
        Err(_) => {
            resp.errors.push(format!("--vip {:?} is not an IP address", req.vip));
            None
        }
    };
    let wave = match phases::wave_size(&req.max_parallel, workers.len()) {
        Ok(w) => w,
        Err(e) => {
            resp.errors.push(e.to_string());
            1
        }
    };
    let mut picker = Picker::default();
    let m = picker.pick(&masters, nodes);
    let w = picker.pick(&workers, nodes);
    resp.errors.extend(picker.finish());
    let mut planned = None;
    if let Some(vip) = vip {
        let facts: Vec<(String, Option<Inventory>, i64)> =
            m.iter().chain(w.iter()).map(|(h, c)| (h.node.clone(), c.facts.clone(), c.record.clock_skew_ms)).collect();
        if !m.is_empty() {
            for f in preflight::check(&facts, m.len(), vip, &req.pod_cidr, &req.service_cidr) {
                let line = format!("{}: {}", f.host, f.message);
                match f.severity {
                    Severity::Error => resp.errors.push(line),
                    Severity::Warning => resp.warnings.push(line),
                }
            }
        }
        if !m.is_empty() {
            let shape = ClusterShape {
                name: name.clone(),
                version: req.version.clone(),
                vip,
                masters: m.into_iter().map(|(h, _)| h).collect(),
                workers: w.into_iter().map(|(h, _)| h).collect(),
                wave_size: wave,
                bundle: (!req.bundle.is_empty()).then(|| req.bundle.clone()),
                canary: req.canary as usize,
            };
            let mut plan = phases::build(&shape);
            plan.mark_canary(shape.canary.min(shape.workers.len().saturating_sub(1)), &shape.name);
            resp.plan_text = plan.render();
            resp.plan = Some(plan.view());
            planned = Some(shape);
        }
    }
    let shape = if resp.errors.is_empty() { planned } else { None };
    Resolved { response: resp, shape, clusterfile: parsed_cf }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetadm_proto::Interface as NetInterface;

    fn node(name: &str, reports: &[&str], observed: Option<&str>) -> Candidate {
        Candidate {
            record: NodeRecord {
                name: name.into(),
                machine_id: String::new(),
                enrolled_at: 0,
                cert_serial: String::new(),
                previous_serial: None,
                cert_not_after: 0,
                revoked: false,
                revoked_at: 0,
                last_seen_ms: 0,
                clock_skew_ms: 0,
                peer_address: String::new(),
                labels: Default::default(),
            },
            facts: Some(Inventory {
                interfaces: vec![NetInterface {
                    name: "eth0".into(),
                    addresses: reports.iter().map(|a| format!("{a}/24")).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            connected: true,
            observed: observed.map(|o| o.parse().unwrap()),
        }
    }

    fn outcome(r: &str, nodes: &[Candidate]) -> Result<String, String> {
        match resolve(r, nodes) {
            Resolution::Found(c, ip) => Ok(format!("{} {ip}", c.record.name)),
            Resolution::Unknown => Err("unknown".into()),
            Resolution::Refused(why) => Err(why),
        }
    }

    #[test]
    fn additions_are_checked_against_the_cluster_they_join() {
        let named = |name: &str, ip: &str, hostname: &str| {
            let mut c = node(name, &[ip], Some(ip));
            if let Some(f) = c.facts.as_mut() {
                f.hostname = hostname.into();
            }
            c
        };
        let nodes = [
            named("m1", "10.0.0.1", "m1"),
            named("w1", "10.0.0.2", "w1"),
            named("w2", "10.0.0.3", "w2"),
            named("w3", "10.0.0.4", "w1"),
        ];
        let host = |n: &str, ip: &str| PlannedHost { node: n.into(), ip: ip.parse().unwrap() };
        let shape = ClusterShape {
            name: "lab".into(),
            version: "v1.29.9".into(),
            vip: "10.103.97.2".parse().unwrap(),
            masters: vec![host("m1", "10.0.0.1")],
            workers: vec![host("w1", "10.0.0.2")],
            wave_size: 1,
            bundle: None,
            canary: 0,
        };
        let add = |refs: &[&str]| {
            let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
            resolve_additions(&refs, &nodes, &shape, "100.64.0.0/10", "10.96.0.0/22")
        };
        let (hosts, errors, warnings) = add(&["10.0.0.3"]);
        assert_eq!((hosts, errors, warnings), (vec![host("w2", "10.0.0.3")], vec![], vec![]), "no quorum warning");
        let (_, errors, _) = add(&["w2", "nosuch"]);
        assert!(errors.iter().any(|e| e.contains("unknown hosts") && e.contains("nosuch")), "{errors:?}");
        let (_, errors, _) = add(&["w3"]);
        assert!(errors.iter().any(|e| e.contains("w3") && e.contains("node name of w1")), "{errors:?}");
        // A member named again is refused by the rollout ("already belong"), not as a clash.
        let (_, errors, _) = add(&["w1"]);
        assert!(errors.is_empty(), "{errors:?}");
        let (_, errors, _) = add(&[]);
        assert!(errors.iter().any(|e| e.contains("name the hosts to add")), "{errors:?}");
    }

    #[test]
    fn an_address_resolves_only_when_exactly_one_node_reports_and_connects_from_it() {
        let honest = [node("m1", &["10.0.0.2"], Some("10.0.0.2")), node("w1", &["10.0.0.3"], Some("10.0.0.3"))];
        assert_eq!(outcome("10.0.0.2", &honest), Ok("m1 10.0.0.2".into()));
        assert_eq!(outcome("m1", &honest), Ok("m1 10.0.0.2".into()));
        assert_eq!(outcome("10.9.9.9", &honest), Err("unknown".into()));

        // A compromised worker claims the master's address too: refused, both named.
        let claim = [node("m1", &["10.0.0.2"], Some("10.0.0.2")), node("evil", &["10.0.0.2"], Some("10.0.0.7"))];
        let e = outcome("10.0.0.2", &claim).unwrap_err();
        assert!(e.contains("m1") && e.contains("evil") && e.contains("node name"), "{e}");

        // It claims an address that is not its own (the master is offline or not enrolled).
        let lone = [node("evil", &["10.0.0.2"], Some("10.0.0.7"))];
        let e = outcome("10.0.0.2", &lone).unwrap_err();
        assert!(e.contains("evil") && e.contains("connects from 10.0.0.7"), "{e}");

        // Reported by one node, observed from another.
        let split = [node("m1", &["10.0.0.2"], Some("10.0.0.9")), node("w1", &["10.0.0.3"], Some("10.0.0.2"))];
        let e = outcome("10.0.0.2", &split).unwrap_err();
        assert!(e.contains("m1") && e.contains("w1"), "{e}");

        // Behind NAT: observed only; the operator names the node instead.
        let nat = [node("n1", &["192.168.1.5"], Some("203.0.113.9"))];
        let e = outcome("203.0.113.9", &nat).unwrap_err();
        assert!(e.contains("n1") && e.contains("NAT"), "{e}");
        assert_eq!(outcome("n1", &nat), Ok("n1 192.168.1.5".into()));

        // IPv4-mapped IPv6 peers count as their IPv4 address.
        assert_eq!(peer_ip("[::ffff:10.0.0.2]:5000"), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(peer_ip("garbage"), None);
    }
}
