//! The rollout plan as data: ordered phases, each with per-host tasks whose ids are stable
//! (derived from cluster, phase, host and step), so re-planning after a crash yields the same ids
//! and finished work is recognised instead of redone.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use super::ids::{PhaseName, StepKind, TaskId};

/// A host after matching the operator's reference to an enrolled node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedHost {
    pub node: String,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterShape {
    pub name: String,
    pub version: String,
    pub vip: IpAddr,
    pub masters: Vec<PlannedHost>,
    pub workers: Vec<PlannedHost>,
    /// Workers joined at once.
    pub wave_size: usize,
    /// The offline bundle to distribute and bootstrap from; without one, the hosts must already
    /// carry the Kubernetes binaries (kubeadm, kubelet, kubectl) and a container runtime.
    #[serde(default)]
    pub bundle: Option<String>,
    /// Planning input, not stored: the current operation's canary, the first this many workers
    /// in a wave of their own (0: none). The record keeps what the rollout does with it.
    #[serde(skip)]
    pub canary: usize,
}

/// Workers in waves of `size`; with a `canary` smaller than all of them, its hosts first in a
/// wave of their own.
pub fn in_waves<T>(items: &[T], size: usize, canary: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    if canary > 0 && canary < items.len() {
        let (first, r) = items.split_at(canary);
        out.push(first);
        rest = r;
    }
    out.extend(rest.chunks(size.max(1)));
    out
}

/// The phases whose workers go in waves (where a canary pauses the rollout).
pub const WAVED: [PhaseName; 2] = [PhaseName::JoinWorkers, PhaseName::UpgradeWorkers];

impl Plan {
    /// Say in the plan where a canary pauses it.
    pub fn mark_canary(&mut self, canary: usize, cluster: &str) {
        if canary == 0 {
            return;
        }
        if let Some(p) = self.phases.iter_mut().find(|p| WAVED.contains(&p.name) && !p.steps.is_empty()) {
            let n = p.steps.first().map(|s| s.len()).unwrap_or(0);
            let what =
                format!("canary: the first {n} worker(s), then a pause until `controller op resume cluster/{cluster}`");
            p.note = Some(match p.note.take() {
                Some(old) => format!("{old}; {what}"),
                None => what,
            });
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub description: String,
}

impl Task {
    pub fn host(&self) -> &str {
        &self.id.host
    }
    pub fn kind(&self) -> StepKind {
        self.id.step
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: PhaseName,
    /// Tasks in one step run in parallel; steps run in order.
    pub steps: Vec<Vec<Task>>,
    /// Why a phase has nothing to do, shown in the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub cluster: String,
    pub phases: Vec<Phase>,
}

fn task(cluster: &str, phase: PhaseName, host: &str, kind: StepKind, description: String) -> Task {
    Task { id: TaskId::new(cluster, phase, host, kind), description }
}

/// One drain per leaving node, all run by `on` (master0, which holds the admin credentials) at
/// once, each with its own timeout.
fn drains(cluster: &str, on: &str, nodes: &[&str]) -> Vec<Task> {
    nodes
        .iter()
        .map(|n| Task {
            id: TaskId::about(cluster, PhaseName::Drain, on, StepKind::DrainNodes, n),
            description: format!("kubectl drain {n} --ignore-daemonsets --delete-emptydir-data"),
        })
        .collect()
}

/// A `--max-parallel` / `--max-failures` value that is neither `N` nor `P%`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {spec:?}: {why}")]
pub struct CountError {
    flag: &'static str,
    spec: String,
    why: &'static str,
}

/// `N`, or `P%` of `total` (rounded up when `round_up`, down otherwise), for the flag `flag`.
pub fn count_or_percent(flag: &'static str, spec: &str, total: usize, round_up: bool) -> Result<usize, CountError> {
    let spec = spec.trim();
    let err = |why| CountError { flag, spec: spec.to_string(), why };
    match spec.strip_suffix('%') {
        Some(p) => {
            let p: usize = p.parse().map_err(|_| err("expected N or P%"))?;
            if p > 100 {
                return Err(err("percentage must be 0-100"));
            }
            Ok(if round_up { (total * p).div_ceil(100) } else { total * p / 100 })
        }
        None => spec.parse().map_err(|_| err("expected N or P%")),
    }
}

/// Wave size from `--max-parallel N` or `P%` of the workers (at least 1).
pub fn wave_size(spec: &str, workers: usize) -> Result<usize, CountError> {
    if spec.trim() == "0%" {
        return Err(CountError { flag: "--max-parallel", spec: spec.to_string(), why: "percentage must be 1-100" });
    }
    Ok(count_or_percent("--max-parallel", spec, workers, true)?.max(1))
}

/// Build the plan: preflight, distribute, bootstrap, hosts, init master0, join masters one at a
/// time, then workers in waves (each after its load balancer exists), sync IPVS, addons, record.
pub fn build(shape: &ClusterShape) -> Plan {
    let c = shape.name.as_str();
    let all: Vec<&PlannedHost> = shape.masters.iter().chain(shape.workers.iter()).collect();
    let master0 = &shape.masters[0];
    let mut phases = Vec::new();
    let each = |phase: PhaseName, kind: StepKind, desc: &dyn Fn(&PlannedHost) -> String| -> Vec<Task> {
        all.iter().map(|h| task(c, phase, &h.node, kind, desc(h))).collect()
    };
    phases.push(Phase {
        name: PhaseName::Preflight,
        steps: vec![each(PhaseName::Preflight, StepKind::Preflight, &|_| {
            "host checks: ports free, swap off, kubeadm present".into()
        })],
        note: None,
    });
    match &shape.bundle {
        Some(b) => {
            phases.push(Phase {
                name: PhaseName::Distribute,
                steps: vec![each(PhaseName::Distribute, StepKind::FetchBundle, &|_| format!("fetch bundle {b}"))],
                note: None,
            });
            phases.push(Phase {
                name: PhaseName::Bootstrap,
                steps: vec![each(PhaseName::Bootstrap, StepKind::Bootstrap, &|_| {
                    "install binaries, units, modules, sysctls, images".into()
                })],
                note: None,
            });
        }
        None => {
            let note = Some("no --bundle: the hosts already carry kubeadm, kubelet and a runtime".to_string());
            phases.push(Phase { name: PhaseName::Distribute, steps: vec![], note: note.clone() });
            phases.push(Phase { name: PhaseName::Bootstrap, steps: vec![], note });
        }
    }
    let hosts_desc = |h: &PlannedHost| {
        if shape.masters.iter().any(|m| m.node == h.node) {
            format!("/etc/hosts: apiserver.cluster.local -> {} (master0 until joined)", master0.ip)
        } else {
            format!("/etc/hosts: apiserver.cluster.local -> {} (VIP)", shape.vip)
        }
    };
    phases.push(Phase {
        name: PhaseName::Hosts,
        steps: vec![each(PhaseName::Hosts, StepKind::Hosts, &hosts_desc)],
        note: None,
    });
    phases.push(Phase {
        name: PhaseName::InitMaster0,
        steps: vec![
            vec![task(
                c,
                PhaseName::InitMaster0,
                &master0.node,
                StepKind::Pki,
                "install the cluster PKI (keys 0600)".into(),
            )],
            vec![task(
                c,
                PhaseName::InitMaster0,
                &master0.node,
                StepKind::KubeadmInit,
                format!("kubeadm init ({})", master0.ip),
            )],
        ],
        note: None,
    });
    // Every operation that joins hosts makes its own short-lived bootstrap token (the first one
    // is also in the init configuration) and deletes it when it is done.
    let joining = shape.masters.len() > 1 || !shape.workers.is_empty();
    phases.push(Phase {
        name: PhaseName::JoinToken,
        steps: if joining {
            vec![vec![task(
                c,
                PhaseName::JoinToken,
                &master0.node,
                StepKind::JoinToken,
                "kubeadm token create: this operation's join token (short-lived)".into(),
            )]]
        } else {
            vec![]
        },
        note: (!joining).then(|| "no host joins".to_string()),
    });
    let mut joins = Vec::new();
    for m in shape.masters.iter().skip(1) {
        let jm = PhaseName::JoinMasters;
        joins.push(vec![task(c, jm, &m.node, StepKind::Pki, "install the cluster PKI (keys 0600)".into())]);
        joins.push(vec![task(
            c,
            jm,
            &m.node,
            StepKind::KubeadmJoin,
            format!("kubeadm join --control-plane ({})", m.ip),
        )]);
        joins.push(vec![task(
            c,
            jm,
            &m.node,
            StepKind::Hosts,
            format!("/etc/hosts: apiserver.cluster.local -> {} (itself)", m.ip),
        )]);
    }
    let note = joins.is_empty().then(|| "single master".to_string());
    phases.push(Phase { name: PhaseName::JoinMasters, steps: joins, note });
    let rs: Vec<String> = shape.masters.iter().map(|m| format!("{}:6443", m.ip)).collect();
    let mut waves = Vec::new();
    for wave in in_waves(&shape.workers, shape.wave_size, shape.canary) {
        waves.push(
            wave.iter()
                .map(|w| {
                    task(
                        c,
                        PhaseName::JoinWorkers,
                        &w.node,
                        StepKind::Lb,
                        format!("IPVS {}:6443 -> {}", shape.vip, rs.join(", ")),
                    )
                })
                .collect(),
        );
        waves.push(
            wave.iter()
                .map(|w| task(c, PhaseName::JoinWorkers, &w.node, StepKind::KubeadmJoin, "kubeadm join".into()))
                .collect(),
        );
    }
    let no_workers = shape.workers.is_empty().then(|| "no workers".to_string());
    phases.push(Phase { name: PhaseName::JoinWorkers, steps: waves, note: no_workers.clone() });
    let sync: Vec<Task> = shape
        .workers
        .iter()
        .map(|w| {
            task(c, PhaseName::SyncIpvs, &w.node, StepKind::Lb, format!("guard IPVS real servers {}", rs.join(", ")))
        })
        .collect();
    phases.push(Phase {
        name: PhaseName::SyncIpvs,
        steps: if sync.is_empty() { vec![] } else { vec![sync] },
        note: no_workers,
    });
    match &shape.bundle {
        Some(_) => phases.push(Phase {
            name: PhaseName::Addons,
            steps: vec![vec![task(
                c,
                PhaseName::Addons,
                &master0.node,
                StepKind::Addons,
                "kubectl apply the bundle's manifests".into(),
            )]],
            note: None,
        }),
        None => phases.push(Phase {
            name: PhaseName::Addons,
            steps: vec![],
            note: Some("no --bundle: no addon manifests to apply".into()),
        }),
    }
    phases.push(Phase {
        name: PhaseName::Record,
        steps: if joining {
            vec![vec![task(
                c,
                PhaseName::Record,
                &master0.node,
                StepKind::DropToken,
                "kubeadm token delete: this operation's join tokens".into(),
            )]]
        } else {
            vec![]
        },
        note: Some("record the cluster".into()),
    });
    Plan { cluster: c.to_string(), phases }
}

/// The plan that joins the workers `added` (already in `shape.workers`) to a running cluster:
/// preflight, bundle and bootstrap, /etc/hosts and the load balancer on the new hosts only, a
/// fresh join token on master0, the joins in waves, their IPVS guard, and the token deleted.
/// The other hosts are not touched: their masters are unchanged.
pub fn add_workers(shape: &ClusterShape, added: &[String]) -> Plan {
    let c = shape.name.as_str();
    let master0 = &shape.masters[0];
    let new: Vec<&PlannedHost> = shape.workers.iter().filter(|w| added.contains(&w.node)).collect();
    let each = |phase: PhaseName, kind: StepKind, desc: &dyn Fn(&PlannedHost) -> String| -> Vec<Task> {
        new.iter().map(|h| task(c, phase, &h.node, kind, desc(h))).collect()
    };
    let mut phases = vec![Phase {
        name: PhaseName::Preflight,
        steps: vec![each(PhaseName::Preflight, StepKind::Preflight, &|_| "host checks: ports free, swap off".into())],
        note: None,
    }];
    match &shape.bundle {
        Some(b) => {
            phases.push(Phase {
                name: PhaseName::Distribute,
                steps: vec![each(PhaseName::Distribute, StepKind::FetchBundle, &|_| format!("fetch bundle {b}"))],
                note: None,
            });
            phases.push(Phase {
                name: PhaseName::Bootstrap,
                steps: vec![each(PhaseName::Bootstrap, StepKind::Bootstrap, &|_| {
                    "install binaries, units, modules, sysctls, images".into()
                })],
                note: None,
            });
        }
        None => {
            let note = Some("no bundle: the hosts already carry kubeadm, kubelet and a runtime".to_string());
            phases.push(Phase { name: PhaseName::Distribute, steps: vec![], note: note.clone() });
            phases.push(Phase { name: PhaseName::Bootstrap, steps: vec![], note });
        }
    }
    phases.push(Phase {
        name: PhaseName::Hosts,
        steps: vec![each(PhaseName::Hosts, StepKind::Hosts, &|_| {
            format!("/etc/hosts: apiserver.cluster.local -> {} (VIP)", shape.vip)
        })],
        note: Some("the new hosts only".into()),
    });
    phases.push(Phase {
        name: PhaseName::JoinToken,
        steps: vec![vec![task(
            c,
            PhaseName::JoinToken,
            &master0.node,
            StepKind::JoinToken,
            "kubeadm token create: this operation's join token (short-lived)".into(),
        )]],
        note: None,
    });
    let rs: Vec<String> = shape.masters.iter().map(|m| format!("{}:6443", m.ip)).collect();
    let mut waves = Vec::new();
    for wave in in_waves(&new, shape.wave_size, shape.canary) {
        waves.push(
            wave.iter()
                .map(|w| {
                    let desc = format!("IPVS {}:6443 -> {}", shape.vip, rs.join(", "));
                    task(c, PhaseName::JoinWorkers, &w.node, StepKind::Lb, desc)
                })
                .collect(),
        );
        waves.push(
            wave.iter()
                .map(|w| task(c, PhaseName::JoinWorkers, &w.node, StepKind::KubeadmJoin, "kubeadm join".into()))
                .collect(),
        );
    }
    phases.push(Phase { name: PhaseName::JoinWorkers, steps: waves, note: None });
    let sync = each(PhaseName::SyncIpvs, StepKind::Lb, &|_| format!("guard IPVS real servers {}", rs.join(", ")));
    phases.push(Phase { name: PhaseName::SyncIpvs, steps: vec![sync], note: None });
    phases.push(Phase {
        name: PhaseName::Record,
        steps: vec![vec![task(
            c,
            PhaseName::Record,
            &master0.node,
            StepKind::DropToken,
            "kubeadm token delete: this operation's join tokens".into(),
        )]],
        note: Some("record the cluster".into()),
    });
    Plan { cluster: c.to_string(), phases }
}

/// The plan that takes `leaving` workers out of a running cluster: with `drain`, their pods
/// evicted first (on master0); then each host reset like a teardown (kubeadm reset, its load
/// balancer, its /etc/hosts block, what bootstrap installed); then their Node objects deleted
/// (after the reset, so a still-running kubelet cannot register the node again). With `force`
/// the hosts are gone: only the Node objects are deleted.
pub fn remove_workers(shape: &ClusterShape, leaving: &[PlannedHost], drain: bool, force: bool) -> Plan {
    let c = shape.name.as_str();
    let master0 = &shape.masters[0];
    let mut phases = Vec::new();
    let names: Vec<&str> = leaving.iter().map(|h| h.node.as_str()).collect();
    if drain {
        phases.push(Phase { name: PhaseName::Drain, steps: vec![drains(c, &master0.node, &names)], note: None });
    }
    let each = |kind: StepKind, desc: &str| -> Vec<Task> {
        leaving.iter().map(|h| task(c, PhaseName::Reset, &h.node, kind, desc.to_string())).collect()
    };
    if force {
        phases.push(Phase {
            name: PhaseName::Reset,
            steps: vec![],
            note: Some("--force: the hosts are not touched".into()),
        });
    } else {
        let mut steps = vec![
            each(StepKind::KubeadmReset, "kubeadm reset --force"),
            each(StepKind::LbClean, "remove the IPVS service and VIP"),
            each(StepKind::HostsClean, "remove the managed /etc/hosts block"),
        ];
        if shape.bundle.is_some() {
            steps.push(each(StepKind::BootstrapReset, "undo what bootstrap installed"));
        }
        phases.push(Phase { name: PhaseName::Reset, steps, note: None });
    }
    phases.push(Phase {
        name: PhaseName::RemoveNodes,
        steps: vec![vec![task(
            c,
            PhaseName::RemoveNodes,
            &master0.node,
            StepKind::DeleteNodes,
            format!("kubectl delete node {}", names.join(" ")),
        )]],
        note: None,
    });
    Plan { cluster: c.to_string(), phases }
}

/// The plan that takes a cluster apart again: kubeadm reset everywhere (workers first, then the
/// masters), the workers' load balancers, the /etc/hosts blocks, and (with a bundle) what
/// bootstrap installed.
pub fn teardown(shape: &ClusterShape) -> Plan {
    let c = shape.name.as_str();
    let each = |hosts: &[PlannedHost], kind: StepKind, desc: &str| -> Vec<Task> {
        hosts.iter().map(|h| task(c, PhaseName::Reset, &h.node, kind, desc.to_string())).collect()
    };
    let mut steps = Vec::new();
    if !shape.workers.is_empty() {
        steps.push(each(&shape.workers, StepKind::KubeadmReset, "kubeadm reset --force"));
        steps.push(each(&shape.workers, StepKind::LbClean, "remove the IPVS service and VIP"));
    }
    steps.push(each(&shape.masters, StepKind::KubeadmReset, "kubeadm reset --force"));
    let all: Vec<PlannedHost> = shape.masters.iter().chain(shape.workers.iter()).cloned().collect();
    steps.push(each(&all, StepKind::HostsClean, "remove the managed /etc/hosts block"));
    if shape.bundle.is_some() {
        steps.push(each(&all, StepKind::BootstrapReset, "undo what bootstrap installed"));
    }
    Plan { cluster: c.to_string(), phases: vec![Phase { name: PhaseName::Reset, steps, note: None }] }
}

impl Plan {
    /// Human-readable plan for `--dry-run`.
    pub fn render(&self) -> String {
        let mut out = format!("plan for cluster {}\n", self.cluster);
        for (i, p) in self.phases.iter().enumerate() {
            out.push_str(&format!("{}. {}\n", i + 1, p.name));
            if let Some(note) = &p.note {
                out.push_str(&format!("     ({note})\n"));
            }
            for (j, step) in p.steps.iter().enumerate() {
                for t in step {
                    out.push_str(&format!(
                        "   {}.{}  {:<14} {:<14} {}\n",
                        i + 1,
                        j + 1,
                        t.host(),
                        t.kind().as_str(),
                        t.description
                    ));
                }
            }
        }
        out
    }

    /// The plan as the admin API returns it.
    pub fn view(&self) -> fleetadm_proto::PlanView {
        use fleetadm_proto as pb;
        pb::PlanView {
            cluster: self.cluster.clone(),
            phases: self
                .phases
                .iter()
                .map(|ph| pb::PhaseView {
                    name: ph.name.to_string(),
                    note: ph.note.clone().unwrap_or_default(),
                    steps: ph
                        .steps
                        .iter()
                        .map(|s| pb::PlanStep {
                            tasks: s
                                .iter()
                                .map(|t| pb::PlannedTask {
                                    id: t.id.to_string(),
                                    host: t.host().to_string(),
                                    kind: t.kind().to_string(),
                                    description: t.description.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.phases.iter().flat_map(|p| p.steps.iter().flatten())
    }
}

/// The plan that installs reissued certificates on every master, one master at a time: each
/// master's task writes its new files and restarts the static pods that use them, and the next
/// master starts only when they answer again (so the VIP always has ready apiservers).
pub fn certs(shape: &ClusterShape, what: &str, pods: &[&str]) -> Plan {
    let c = shape.name.as_str();
    let restart =
        if pods.is_empty() { "no static pod restarts".to_string() } else { format!("restart {}", pods.join(", ")) };
    let steps = shape
        .masters
        .iter()
        .map(|m| {
            vec![task(
                c,
                PhaseName::Certificates,
                &m.node,
                StepKind::CertsInstall,
                format!("install {what}; {restart}"),
            )]
        })
        .collect();
    Plan {
        cluster: c.to_string(),
        phases: vec![Phase {
            name: PhaseName::Certificates,
            steps,
            note: Some("one master at a time; workers keep the cluster CA they have".into()),
        }],
    }
}

/// The plan that joins `new_masters` (and `new_workers`; all already in `shape`) to a running
/// cluster: the new hosts prepared like a create's; the apiserver certificate, reissued with the
/// new masters' names, installed on the existing masters one at a time; the masters joined one
/// at a time (kubeadm adds each to etcd), then the workers in waves; every worker's IPVS real
/// servers and every earlier host's /etc/hosts brought up to date; the token deleted.
pub fn add_hosts(shape: &ClusterShape, new_masters: &[String], new_workers: &[String]) -> Plan {
    let c = shape.name.as_str();
    let master0 = &shape.masters[0];
    let is_new = |h: &PlannedHost| new_masters.contains(&h.node) || new_workers.contains(&h.node);
    let new: Vec<&PlannedHost> = shape.masters.iter().chain(shape.workers.iter()).filter(|h| is_new(h)).collect();
    let old: Vec<&PlannedHost> = shape.masters.iter().chain(shape.workers.iter()).filter(|h| !is_new(h)).collect();
    let each = |hosts: &[&PlannedHost], phase: PhaseName, kind: StepKind, desc: &dyn Fn(&PlannedHost) -> String| {
        hosts.iter().map(|h| task(c, phase, &h.node, kind, desc(h))).collect::<Vec<Task>>()
    };
    let mut phases = vec![Phase {
        name: PhaseName::Preflight,
        steps: vec![each(&new, PhaseName::Preflight, StepKind::Preflight, &|_| {
            "host checks: ports free, swap off".into()
        })],
        note: None,
    }];
    match &shape.bundle {
        Some(b) => {
            phases.push(Phase {
                name: PhaseName::Distribute,
                steps: vec![each(&new, PhaseName::Distribute, StepKind::FetchBundle, &|_| format!("fetch bundle {b}"))],
                note: None,
            });
            phases.push(Phase {
                name: PhaseName::Bootstrap,
                steps: vec![each(&new, PhaseName::Bootstrap, StepKind::Bootstrap, &|_| {
                    "install binaries, units, modules, sysctls, images".into()
                })],
                note: None,
            });
        }
        None => {
            let note = Some("no bundle: the hosts already carry kubeadm, kubelet and a runtime".to_string());
            phases.push(Phase { name: PhaseName::Distribute, steps: vec![], note: note.clone() });
            phases.push(Phase { name: PhaseName::Bootstrap, steps: vec![], note });
        }
    }
    let hosts_desc = |h: &PlannedHost| {
        if new_masters.contains(&h.node) {
            format!("/etc/hosts: apiserver.cluster.local -> {} (master0 until joined)", master0.ip)
        } else {
            format!("/etc/hosts: apiserver.cluster.local -> {} (VIP)", shape.vip)
        }
    };
    phases.push(Phase {
        name: PhaseName::Hosts,
        steps: vec![each(&new, PhaseName::Hosts, StepKind::Hosts, &hosts_desc)],
        note: Some("the new hosts only".into()),
    });
    let old_masters: Vec<&PlannedHost> = shape.masters.iter().filter(|m| !new_masters.contains(&m.node)).collect();
    phases.push(Phase {
        name: PhaseName::Certificates,
        steps: old_masters
            .iter()
            .map(|m| {
                vec![task(
                    c,
                    PhaseName::Certificates,
                    &m.node,
                    StepKind::CertsInstall,
                    format!("apiserver certificate valid for {} too; restart kube-apiserver", new_masters.join(", ")),
                )]
            })
            .collect(),
        note: Some("one master at a time, before any new master serves".into()),
    });
    phases.push(Phase {
        name: PhaseName::JoinToken,
        steps: vec![vec![task(
            c,
            PhaseName::JoinToken,
            &master0.node,
            StepKind::JoinToken,
            "kubeadm token create: this operation's join token (short-lived)".into(),
        )]],
        note: None,
    });
    let mut joins = Vec::new();
    for m in shape.masters.iter().filter(|m| new_masters.contains(&m.node)) {
        let jm = PhaseName::JoinMasters;
        joins.push(vec![task(c, jm, &m.node, StepKind::Pki, "install the cluster PKI (keys 0600)".into())]);
        joins.push(vec![task(
            c,
            jm,
            &m.node,
            StepKind::KubeadmJoin,
            format!("kubeadm join --control-plane ({}; a new etcd member)", m.ip),
        )]);
        joins.push(vec![task(
            c,
            jm,
            &m.node,
            StepKind::Hosts,
            format!("/etc/hosts: apiserver.cluster.local -> {} (itself)", m.ip),
        )]);
    }
    phases.push(Phase { name: PhaseName::JoinMasters, steps: joins, note: None });
    let rs: Vec<String> = shape.masters.iter().map(|m| format!("{}:6443", m.ip)).collect();
    let joining: Vec<&PlannedHost> = shape.workers.iter().filter(|w| new_workers.contains(&w.node)).collect();
    let mut waves = Vec::new();
    for wave in in_waves(&joining, shape.wave_size, shape.canary) {
        waves.push(each(wave, PhaseName::JoinWorkers, StepKind::Lb, &|_| {
            format!("IPVS {}:6443 -> {}", shape.vip, rs.join(", "))
        }));
        waves.push(each(wave, PhaseName::JoinWorkers, StepKind::KubeadmJoin, &|_| "kubeadm join".into()));
    }
    let no_workers = joining.is_empty().then(|| "no new workers".to_string());
    phases.push(Phase { name: PhaseName::JoinWorkers, steps: waves, note: no_workers });
    let workers: Vec<&PlannedHost> = shape.workers.iter().collect();
    let sync = each(&workers, PhaseName::SyncIpvs, StepKind::Lb, &|_| format!("IPVS real servers {}", rs.join(", ")));
    phases.push(Phase {
        name: PhaseName::SyncIpvs,
        steps: if sync.is_empty() { vec![] } else { vec![sync] },
        note: Some("every worker: the new masters in rotation".into()),
    });
    let old_hosts = each(&old, PhaseName::SyncHosts, StepKind::Hosts, &|_| {
        "/etc/hosts: the cluster's hosts, the new ones too".into()
    });
    phases.push(Phase { name: PhaseName::SyncHosts, steps: vec![old_hosts], note: None });
    phases.push(Phase {
        name: PhaseName::Record,
        steps: vec![vec![task(
            c,
            PhaseName::Record,
            &master0.node,
            StepKind::DropToken,
            "kubeadm token delete: this operation's join tokens".into(),
        )]],
        note: Some("record the cluster".into()),
    });
    Plan { cluster: c.to_string(), phases }
}

/// The plan that takes masters (and workers) out of a running cluster; `shape` is the cluster
/// without them (its first master is the reference from now on, also when master0 leaves).
/// Every remaining worker's IPVS loses the leaving masters first; then (with `drain`) their
/// pods are evicted; the leaving masters are reset one at a time (`kubeadm reset` removes each
/// from etcd before it stops), the leaving workers together; their Node objects are deleted; and
/// the remaining hosts' /etc/hosts blocks no longer list them.
pub fn remove_hosts(shape: &ClusterShape, masters: &[PlannedHost], workers: &[PlannedHost], drain: bool) -> Plan {
    let c = shape.name.as_str();
    let master0 = &shape.masters[0];
    let names: Vec<&str> = masters.iter().chain(workers.iter()).map(|h| h.node.as_str()).collect();
    let rs: Vec<String> = shape.masters.iter().map(|m| format!("{}:6443", m.ip)).collect();
    let mut phases = Vec::new();
    let sync: Vec<Task> = shape
        .workers
        .iter()
        .map(|w| task(c, PhaseName::SyncIpvs, &w.node, StepKind::Lb, format!("IPVS real servers {}", rs.join(", "))))
        .collect();
    phases.push(Phase {
        name: PhaseName::SyncIpvs,
        steps: if sync.is_empty() { vec![] } else { vec![sync] },
        note: Some("first: the leaving masters out of every worker's rotation".into()),
    });
    if drain {
        phases.push(Phase { name: PhaseName::Drain, steps: vec![drains(c, &master0.node, &names)], note: None });
    }
    let mut steps: Vec<Vec<Task>> = Vec::new();
    for m in masters {
        steps.push(vec![task(
            c,
            PhaseName::Reset,
            &m.node,
            StepKind::KubeadmReset,
            "kubeadm reset --force (leaves etcd first)".into(),
        )]);
        steps.push(vec![task(
            c,
            PhaseName::Reset,
            &m.node,
            StepKind::HostsClean,
            "remove the managed /etc/hosts block".into(),
        )]);
        if shape.bundle.is_some() {
            steps.push(vec![task(
                c,
                PhaseName::Reset,
                &m.node,
                StepKind::BootstrapReset,
                "undo what bootstrap installed".into(),
            )]);
        }
    }
    if !workers.is_empty() {
        let each = |kind: StepKind, desc: &str| -> Vec<Task> {
            workers.iter().map(|h| task(c, PhaseName::Reset, &h.node, kind, desc.to_string())).collect()
        };
        steps.push(each(StepKind::KubeadmReset, "kubeadm reset --force"));
        steps.push(each(StepKind::LbClean, "remove the IPVS service and VIP"));
        steps.push(each(StepKind::HostsClean, "remove the managed /etc/hosts block"));
        if shape.bundle.is_some() {
            steps.push(each(StepKind::BootstrapReset, "undo what bootstrap installed"));
        }
    }
    phases.push(Phase { name: PhaseName::Reset, steps, note: Some("masters one at a time".into()) });
    phases.push(Phase {
        name: PhaseName::RemoveNodes,
        steps: vec![vec![task(
            c,
            PhaseName::RemoveNodes,
            &master0.node,
            StepKind::DeleteNodes,
            format!("kubectl delete node {}", names.join(" ")),
        )]],
        note: None,
    });
    let rest: Vec<Task> = shape
        .masters
        .iter()
        .chain(shape.workers.iter())
        .map(|h| {
            task(c, PhaseName::SyncHosts, &h.node, StepKind::Hosts, format!("/etc/hosts without {}", names.join(", ")))
        })
        .collect();
    phases.push(Phase { name: PhaseName::SyncHosts, steps: vec![rest], note: None });
    Plan { cluster: c.to_string(), phases }
}

/// The plan that restores every master's etcd from one backup (`what` names it): the
/// apiservers and etcd members stopped on all masters, the data restored on all of them from the
/// same snapshot, every etcd started (a restored member waits for its peers), then the
/// apiservers one at a time, each ready before the next.
pub fn restore(shape: &ClusterShape, what: &str) -> Plan {
    let c = shape.name.as_str();
    let p = PhaseName::RestoreEtcd;
    let all = |kind: StepKind, desc: &str| -> Vec<Task> {
        shape.masters.iter().map(|m| task(c, p, &m.node, kind, desc.to_string())).collect()
    };
    let mut steps = vec![
        all(StepKind::EtcdStop, "stop kube-apiserver and etcd (manifests held)"),
        all(StepKind::EtcdRestore, &format!("etcdutl snapshot restore {what}; swap the data directory")),
        all(StepKind::EtcdStart, "start etcd"),
    ];
    for m in &shape.masters {
        steps.push(vec![task(
            c,
            p,
            &m.node,
            StepKind::ApiserverStart,
            "start kube-apiserver; wait for /readyz".into(),
        )]);
    }
    Plan { cluster: c.to_string(), phases: vec![Phase { name: p, steps, note: Some("every master".into()) }] }
}

/// The plan that upgrades Kubernetes from `from` to `shape.version` in the order kubeadm's
/// documentation gives, host by host: the bundle to every host first (if any); then each master
/// in turn (master0 first, with `kubeadm upgrade apply`; the others with `upgrade node`): its new
/// binaries and images, kubeadm, a drain (on master0), the kubelet restarted, an uncordon; then
/// the workers the same way in waves of `shape.wave_size`, within the failure budget.
pub fn upgrade(shape: &ClusterShape, from: &str) -> Plan {
    let c = shape.name.as_str();
    let to = shape.version.as_str();
    let master0 = &shape.masters[0];
    let mut phases = Vec::new();
    let all: Vec<&PlannedHost> = shape.masters.iter().chain(shape.workers.iter()).collect();
    match &shape.bundle {
        Some(b) => phases.push(Phase {
            name: PhaseName::Distribute,
            steps: vec![all
                .iter()
                .map(|h| task(c, PhaseName::Distribute, &h.node, StepKind::FetchBundle, format!("fetch bundle {b}")))
                .collect()],
            note: None,
        }),
        None => phases.push(Phase {
            name: PhaseName::Distribute,
            steps: vec![],
            note: Some(format!("no --bundle: every host must carry kubeadm and kubelet {to} already")),
        }),
    }
    // One host's (or one wave's) upgrade, as steps.
    let host_steps = |phase: PhaseName, hosts: &[&PlannedHost], first: bool| -> Vec<Vec<Task>> {
        let each = |kind: StepKind, desc: &dyn Fn(&PlannedHost) -> String| -> Vec<Task> {
            hosts.iter().map(|h| task(c, phase, &h.node, kind, desc(h))).collect()
        };
        let about = |kind: StepKind, desc: &dyn Fn(&PlannedHost) -> String| -> Vec<Task> {
            hosts
                .iter()
                .map(|h| Task { id: TaskId::about(c, phase, &master0.node, kind, &h.node), description: desc(h) })
                .collect()
        };
        let mut steps = Vec::new();
        if shape.bundle.is_some() {
            steps.push(each(StepKind::Bootstrap, &|_| format!("install the {to} binaries, units and images")));
        }
        steps.push(each(StepKind::KubeadmUpgrade, &|_| {
            if first {
                format!("kubeadm upgrade plan {to}; kubeadm upgrade apply {to} --certificate-renewal=false")
            } else {
                "kubeadm upgrade node --certificate-renewal=false".into()
            }
        }));
        steps.push(about(StepKind::DrainNodes, &|h| format!("kubectl drain {} --ignore-daemonsets", h.node)));
        steps.push(each(StepKind::KubeletRestart, &|_| "systemctl restart kubelet (the new kubelet)".into()));
        steps.push(about(StepKind::Uncordon, &|h| format!("kubectl uncordon {}", h.node)));
        steps
    };
    let mut steps = Vec::new();
    for (i, m) in shape.masters.iter().enumerate() {
        steps.extend(host_steps(PhaseName::UpgradeMasters, &[m], i == 0));
    }
    phases.push(Phase {
        name: PhaseName::UpgradeMasters,
        steps,
        note: Some(format!("{from} -> {to}, one master at a time, {} first", master0.node)),
    });
    let workers: Vec<&PlannedHost> = shape.workers.iter().collect();
    let mut waves = Vec::new();
    for wave in in_waves(&workers, shape.wave_size, shape.canary) {
        waves.extend(host_steps(PhaseName::UpgradeWorkers, wave, false));
    }
    let note =
        if workers.is_empty() { "no workers".to_string() } else { format!("in waves of {}", shape.wave_size.max(1)) };
    phases.push(Phase { name: PhaseName::UpgradeWorkers, steps: waves, note: Some(note) });
    phases.push(Phase { name: PhaseName::Record, steps: vec![], note: Some(format!("record the cluster at {to}")) });
    Plan { cluster: c.to_string(), phases }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_shape() -> ClusterShape {
        let h = |n: &str, ip: &str| PlannedHost { node: n.into(), ip: ip.parse().unwrap() };
        ClusterShape {
            name: "lab".into(),
            version: "v1.30.5".into(),
            vip: "10.103.97.2".parse().unwrap(),
            masters: vec![h("m1", "10.0.0.1"), h("m2", "10.0.0.2")],
            workers: vec![h("w1", "10.0.0.11"), h("w2", "10.0.0.12"), h("w3", "10.0.0.13")],
            wave_size: 2,
            bundle: Some("k8s-v1.30.5".into()),
            canary: 0,
        }
    }

    #[test]
    fn an_upgrade_goes_master_by_master_then_workers_in_waves() {
        let shape = plan_shape();
        let plan = upgrade(&shape, "v1.29.9");
        let names: Vec<PhaseName> = plan.phases.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [PhaseName::Distribute, PhaseName::UpgradeMasters, PhaseName::UpgradeWorkers, PhaseName::Record]
        );
        assert_eq!(plan.phases[0].steps[0].len(), 5, "the bundle goes to every host at once");
        let masters = &plan.phases[1].steps;
        let ids = |steps: &[Vec<Task>]| -> Vec<Vec<String>> {
            steps.iter().map(|s| s.iter().map(|t| t.id.to_string()).collect()).collect()
        };
        assert_eq!(
            ids(masters),
            [
                vec!["lab/upgrade-masters/m1/bootstrap"],
                vec!["lab/upgrade-masters/m1/kubeadm-upgrade"],
                vec!["lab/upgrade-masters/m1/drain-nodes@m1"],
                vec!["lab/upgrade-masters/m1/kubelet-restart"],
                vec!["lab/upgrade-masters/m1/uncordon@m1"],
                vec!["lab/upgrade-masters/m2/bootstrap"],
                vec!["lab/upgrade-masters/m2/kubeadm-upgrade"],
                vec!["lab/upgrade-masters/m1/drain-nodes@m2"],
                vec!["lab/upgrade-masters/m2/kubelet-restart"],
                vec!["lab/upgrade-masters/m1/uncordon@m2"],
            ]
        );
        assert!(masters[1][0].description.contains("upgrade apply v1.30.5 --certificate-renewal=false"));
        assert!(masters[6][0].description.contains("upgrade node"));
        let workers = ids(&plan.phases[2].steps);
        assert_eq!(workers.len(), 10, "two waves of five steps");
        assert_eq!(workers[0], ["lab/upgrade-workers/w1/bootstrap", "lab/upgrade-workers/w2/bootstrap"]);
        assert_eq!(workers[2], ["lab/upgrade-workers/m1/drain-nodes@w1", "lab/upgrade-workers/m1/drain-nodes@w2"]);
        assert_eq!(workers[9], ["lab/upgrade-workers/m1/uncordon@w3"]);
        // failures in the worker phase count against the workers the tasks are about
        assert!(PhaseName::UpgradeWorkers.is_worker_phase() && !PhaseName::UpgradeMasters.is_worker_phase());
        let drain: TaskId = "lab/upgrade-workers/m1/drain-nodes@w3".parse().unwrap();
        assert_eq!(drain.subject(), "w3");
        // without a bundle: no distribution, no bootstrap
        let plan = upgrade(&ClusterShape { bundle: None, ..shape }, "v1.29.9");
        assert!(plan.phases[0].steps.is_empty() && plan.phases[0].note.as_deref().unwrap_or("").contains("v1.30.5"));
        assert_eq!(plan.phases[1].steps.len(), 8);
        assert!(!plan.tasks().any(|t| t.kind() == StepKind::Bootstrap));
        // a canary of one: w1 alone first, then the others in waves of two; the plan says so
        let mut plan = upgrade(&ClusterShape { canary: 1, ..plan_shape() }, "v1.29.9");
        plan.mark_canary(1, "lab");
        let workers = ids(&plan.phases[2].steps);
        assert_eq!(workers.len(), 10);
        assert_eq!(workers[0], ["lab/upgrade-workers/w1/bootstrap"]);
        assert_eq!(workers[5], ["lab/upgrade-workers/w2/bootstrap", "lab/upgrade-workers/w3/bootstrap"]);
        assert!(plan.render().contains("canary: the first 1 worker(s), then a pause"), "{}", plan.render());
        assert_eq!(in_waves(&[1, 2, 3], 2, 3), vec![&[1, 2][..], &[3][..]], "a canary of everyone is no canary");
        assert_eq!(in_waves(&[1, 2, 3, 4], 2, 1), vec![&[1][..], &[2, 3][..], &[4][..]]);
    }

    #[test]
    fn every_leaving_node_is_drained_by_a_task_of_its_own() {
        let h = |n: &str, ip: &str| PlannedHost { node: n.into(), ip: ip.parse().unwrap() };
        let shape = ClusterShape {
            name: "lab".into(),
            version: "v1.29.9".into(),
            vip: "10.103.97.2".parse().unwrap(),
            masters: vec![h("m1", "10.0.0.1")],
            workers: vec![h("w1", "10.0.0.2"), h("w2", "10.0.0.3")],
            wave_size: 1,
            bundle: None,
            canary: 0,
        };
        let plan = remove_workers(&shape, &shape.workers.clone(), true, false);
        let drain = &plan.phases[0];
        assert_eq!(drain.name, PhaseName::Drain);
        let ids: Vec<String> = drain.steps.iter().flatten().map(|t| t.id.to_string()).collect();
        assert_eq!(ids, ["lab/drain/m1/drain-nodes@w1", "lab/drain/m1/drain-nodes@w2"]);
        assert_eq!(drain.steps.len(), 1, "drained at once");
    }

    fn shape(masters: usize, workers: usize, wave: usize) -> ClusterShape {
        let h = |p: &str, i: usize| PlannedHost {
            node: format!("{p}{i}"),
            ip: format!("10.77.0.{}", 10 + i).parse().unwrap(),
        };
        ClusterShape {
            name: "lab".into(),
            version: "v1.29.9".into(),
            vip: "10.103.97.2".parse().unwrap(),
            masters: (1..=masters).map(|i| h("m", i)).collect(),
            workers: (1..=workers).map(|i| h("w", 10 + i)).collect(),
            wave_size: wave,
            bundle: Some("k8s-v1.29.9".into()),
            canary: 0,
        }
    }

    #[test]
    fn ordering_masters_serial_workers_in_waves_lb_before_join() {
        let plan = build(&shape(3, 5, 2));
        let names: Vec<&str> = plan.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "preflight",
                "distribute",
                "bootstrap",
                "hosts",
                "init-master0",
                "join-token",
                "join-masters",
                "join-workers",
                "sync-ipvs",
                "addons",
                "record"
            ]
        );
        let jt = &plan.phases[5];
        assert_eq!(jt.steps, [[jt.steps[0][0].clone()]], "one join token, made before any host joins");
        assert_eq!((jt.steps[0][0].host(), jt.steps[0][0].kind()), ("m1", StepKind::JoinToken));
        let record = plan.phases.last().unwrap();
        assert_eq!(record.steps[0][0].kind(), StepKind::DropToken, "and deleted at the end");
        let jm = &plan.phases[6];
        assert!(jm.steps.iter().all(|s| s.len() == 1), "masters join one at a time");
        assert_eq!(jm.steps[1][0].host(), "m2");
        assert_eq!(jm.steps[4][0].host(), "m3");
        let jw = &plan.phases[7];
        // waves of 2, 2, 1: each wave's lb step precedes its join step
        assert_eq!(jw.steps.iter().map(|s| s.len()).collect::<Vec<_>>(), [2, 2, 2, 2, 1, 1]);
        assert!(
            jw.steps[0].iter().all(|t| t.kind() == StepKind::Lb)
                && jw.steps[1].iter().all(|t| t.kind() == StepKind::KubeadmJoin)
        );
        // the PKI is in place before kubeadm init runs (separate steps, not in parallel)
        assert_eq!(plan.phases[4].steps[0][0].kind(), StepKind::Pki);
        assert!(plan.phases[4].steps[1][0].description.contains("kubeadm init"));
        assert!(
            plan.phases.iter().flat_map(|p| &p.steps).all(|s| {
                let hosts: std::collections::BTreeSet<&str> = s.iter().map(|t| t.host()).collect();
                hosts.len() == s.len()
            }),
            "no step runs two tasks on one host at once"
        );
    }

    #[test]
    fn a_single_master_cluster_needs_no_join_token() {
        let plan = build(&shape(1, 0, 1));
        assert!(plan.tasks().all(|t| !matches!(t.kind(), StepKind::JoinToken | StepKind::DropToken)));
        assert!(build(&shape(1, 1, 1)).tasks().any(|t| t.kind() == StepKind::JoinToken), "a worker joins");
    }

    #[test]
    fn task_ids_are_stable_and_unique() {
        let a = build(&shape(3, 4, 2));
        let b = build(&shape(3, 4, 2));
        assert_eq!(a, b);
        let ids: Vec<String> = a.tasks().map(|t| t.id.to_string()).collect();
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn workers_resolve_to_the_vip_masters_to_master0() {
        let plan = build(&shape(3, 1, 1));
        let hosts = &plan.phases[3].steps[0];
        assert!(hosts.iter().find(|t| t.host() == "m2").unwrap().description.contains("10.77.0.11"));
        assert!(hosts.iter().find(|t| t.host() == "w11").unwrap().description.contains("10.103.97.2"));
        assert!(plan.render().contains("kubeadm join --control-plane"));
    }

    #[test]
    fn adding_workers_touches_only_them_and_master0s_token() {
        let mut s = shape(3, 2, 1);
        let before = build(&s);
        s.workers.push(PlannedHost { node: "w21".into(), ip: "10.77.0.31".parse().unwrap() });
        s.workers.push(PlannedHost { node: "w22".into(), ip: "10.77.0.32".parse().unwrap() });
        let plan = add_workers(&s, &["w21".into(), "w22".into()]);
        let hosts: std::collections::BTreeSet<&str> = plan.tasks().map(|t| t.host()).collect();
        assert_eq!(hosts.into_iter().collect::<Vec<_>>(), ["m1", "w21", "w22"]);
        let on_m1: Vec<StepKind> = plan.tasks().filter(|t| t.host() == "m1").map(|t| t.kind()).collect();
        assert_eq!(on_m1, [StepKind::JoinToken, StepKind::DropToken], "master0 only makes and drops the token");
        let jw = plan.phases.iter().find(|p| p.name == PhaseName::JoinWorkers).unwrap();
        // waves of one: lb, join, lb, join
        assert_eq!(jw.steps.len(), 4);
        assert!(jw.steps[0][0].kind() == StepKind::Lb && jw.steps[1][0].kind() == StepKind::KubeadmJoin);
        assert!(jw.steps[0][0].description.contains("10.77.0.11:6443, 10.77.0.12:6443, 10.77.0.13:6443"));
        // The token tasks are the create's (same ids, run again); the new hosts' are new ids.
        let old: std::collections::BTreeSet<String> = before.tasks().map(|t| t.id.to_string()).collect();
        let reused: Vec<String> = plan.tasks().map(|t| t.id.to_string()).filter(|id| old.contains(id)).collect();
        assert_eq!(reused, ["lab/join-token/m1/join-token", "lab/record/m1/drop-token"]);
    }

    #[test]
    fn wave_sizes() {
        assert_eq!(wave_size("3", 10).unwrap(), 3);
        assert_eq!(wave_size("25%", 10).unwrap(), 3);
        assert_eq!(wave_size("1%", 10).unwrap(), 1);
        assert_eq!(wave_size("0", 10).unwrap(), 1);
        assert!(wave_size("0%", 10).is_err());
        assert!(wave_size("many", 10).is_err());
    }
}
