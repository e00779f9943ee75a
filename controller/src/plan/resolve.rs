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
}

use crate::nodes::addresses;

/// The node a reference means, and the IP the cluster should use for it.
fn resolve<'a>(r: &str, nodes: &'a [Candidate]) -> Option<(&'a Candidate, IpAddr)> {
    if let Ok(ip) = r.parse::<IpAddr>() {
        return nodes
            .iter()
            .find(|c| c.facts.as_ref().map(|f| addresses(f).contains(&ip)).unwrap_or(false))
            .map(|c| (c, ip));
    }
    let c = nodes.iter().find(|c| c.record.name == r)?;
    let ip = c.facts.as_ref().and_then(|f| addresses(f).into_iter().find(|a| a.is_ipv4()))?;
    Some((c, ip))
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
    let mut unknown = Vec::new();
    let mut offline = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut pick = |refs: &[String]| -> Vec<(PlannedHost, &Candidate)> {
        let mut out = Vec::new();
        for r in refs {
            match resolve(r, nodes) {
                None => unknown.push(r.clone()),
                Some((c, ip)) => {
                    if !seen.insert(c.record.name.clone()) {
                        resp.errors.push(format!("host {r} ({}) is listed twice", c.record.name));
                        continue;
                    }
                    if !c.connected || c.record.revoked {
                        offline.push(format!("{r} ({})", c.record.name));
                    }
                    out.push((PlannedHost { node: c.record.name.clone(), ip }, c));
                }
            }
        }
        out
    };
    let m = pick(&masters);
    let w = pick(&workers);
    if !unknown.is_empty() {
        resp.errors.push(format!("unknown hosts (not enrolled; see `controller nodes list`): {}", unknown.join(", ")));
    }
    if !offline.is_empty() {
        resp.errors.push(format!("disconnected hosts (is node-agent running there?): {}", offline.join(", ")));
    }
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
            };
            let plan = phases::build(&shape);
            resp.plan_text = plan.render();
            resp.plan = Some(plan.view());
            planned = Some(shape);
        }
    }
    let shape = if resp.errors.is_empty() { planned } else { None };
    Resolved { response: resp, shape, clusterfile: parsed_cf }
}
