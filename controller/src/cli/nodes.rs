//! `controller nodes list|show|revoke|forget`.
use clap::Subcommand;
use fleetadm_common::clock::{rfc3339, rfc3339_ms};
use fleetadm_common::output::{render_structured, table};
use fleetadm_proto::{Empty, Inventory, NodeInfo, NodeRef};
use serde::Serialize;

use super::{rpc_error, DataDir, Output};
use crate::admin::client;

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List enrolled nodes.
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
        /// Only nodes whose labels match (`zone=b,role!=gpu`, `ssd`, `!gpu`).
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
    },
    /// Set (`KEY=VALUE`) or remove (`KEY-`) labels of a node, for selecting hosts with `-l`.
    Label {
        name: String,
        #[arg(required = true)]
        changes: Vec<String>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Show one node with all its facts.
    Show {
        name: String,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
    },
    /// Revoke a node's certificate: its next call is refused and its session is closed.
    Revoke {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Delete a revoked node's record and facts, so that a new machine may enroll under its
    /// name (a revoked name is refused for good until then).
    Forget {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Serialize)]
pub struct InterfaceView {
    pub name: String,
    pub addresses: Vec<String>,
}

#[derive(Serialize)]
pub struct ComponentView {
    pub name: String,
    pub present: bool,
    pub path: String,
}

#[derive(Serialize)]
pub struct FactsView {
    pub hostname: String,
    pub machine_id: String,
    pub interfaces: Vec<InterfaceView>,
    pub os_id: String,
    pub os_version_id: String,
    pub os_pretty_name: String,
    pub kernel: String,
    pub arch: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub swap_enabled: bool,
    pub clock: String,
    pub cgroup_version: u32,
    pub components: Vec<ComponentView>,
    /// Kubernetes certificates on the host that expire within 30 days (the agent's warning).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expiring_certificates: Vec<ExpiringCertView>,
}

#[derive(Serialize)]
pub struct ExpiringCertView {
    pub name: String,
    pub path: String,
    pub expires_at: String,
}

#[derive(Serialize)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub last_seen: String,
    pub addresses: Vec<String>,
    pub revoked: bool,
    pub enrolled_at: String,
    pub cert_expires_at: String,
    pub cert_serial: String,
    pub clock_skew_ms: i64,
    pub peer_address: String,
    /// What the agent announced when its session opened (empty while disconnected).
    pub agent_version: String,
    pub protocol: u32,
    pub capabilities: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub facts: Option<FactsView>,
    /// The node's apiserver load balancer, as its guard last reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LbView>,
}

#[derive(Serialize)]
pub struct LbView {
    pub vip: String,
    pub all_failing: bool,
    pub real_servers: Vec<RealServerView>,
}

#[derive(Serialize)]
pub struct RealServerView {
    pub address: String,
    pub healthy: bool,
    pub in_rotation: bool,
    pub weight: u32,
    pub last_probe: String,
    pub last_probe_at: String,
}

fn facts_view(f: &Inventory) -> FactsView {
    let os = f.os.clone().unwrap_or_default();
    FactsView {
        hostname: f.hostname.clone(),
        machine_id: f.machine_id.clone(),
        interfaces: f
            .interfaces
            .iter()
            .map(|i| InterfaceView { name: i.name.clone(), addresses: i.addresses.clone() })
            .collect(),
        os_id: os.id,
        os_version_id: os.version_id,
        os_pretty_name: os.pretty_name,
        kernel: f.kernel.clone(),
        arch: f.arch.clone(),
        cpus: f.cpus,
        memory_bytes: f.memory_bytes,
        swap_enabled: f.swap_enabled,
        clock: rfc3339_ms(f.clock_unix_ms),
        cgroup_version: f.cgroup_version,
        components: f
            .components
            .iter()
            .map(|c| ComponentView { name: c.name.clone(), present: c.present, path: c.path.clone() })
            .collect(),
        expiring_certificates: f
            .expiring_certs
            .iter()
            .map(|c| ExpiringCertView {
                name: c.name.clone(),
                path: c.path.clone(),
                expires_at: rfc3339(c.not_after_unix),
            })
            .collect(),
    }
}

pub fn node_view(n: &NodeInfo) -> NodeView {
    NodeView {
        name: n.name.clone(),
        connected: n.connected,
        last_seen: rfc3339_ms(n.last_seen_unix_ms),
        addresses: n.addresses.clone(),
        revoked: n.revoked,
        enrolled_at: rfc3339(n.enrolled_at_unix),
        cert_expires_at: rfc3339(n.cert_not_after_unix),
        cert_serial: n.cert_serial.clone(),
        clock_skew_ms: n.clock_skew_ms,
        peer_address: n.peer_address.clone(),
        agent_version: n.agent_version.clone(),
        protocol: n.protocol,
        capabilities: n.capabilities.clone(),
        labels: n.labels.clone().into_iter().collect(),
        facts: n.facts.as_ref().map(facts_view),
        load_balancer: n.lb.as_ref().filter(|l| !l.vip.is_empty()).map(|l| LbView {
            vip: l.vip.clone(),
            all_failing: l.all_failing,
            real_servers: l
                .servers
                .iter()
                .map(|s| RealServerView {
                    address: s.address.clone(),
                    healthy: s.healthy,
                    in_rotation: s.in_rotation,
                    weight: s.weight,
                    last_probe: s.last_probe.clone(),
                    last_probe_at: rfc3339_ms(s.last_probe_unix_ms),
                })
                .collect(),
        }),
    }
}

fn status_word(v: &NodeView) -> &'static str {
    if v.revoked {
        "Revoked"
    } else if v.connected {
        "Connected"
    } else {
        "Disconnected"
    }
}

pub async fn run(cmd: NodesCmd) -> anyhow::Result<()> {
    match cmd {
        NodesCmd::List { data, out, selector } => {
            let selector = crate::plan::select::Selector::parse(selector.as_deref().unwrap_or(""))?;
            let mut c = client::connect(&data.data_dir).await?;
            let list = c.list_nodes(Empty {}).await.map_err(rpc_error)?.into_inner();
            let views: Vec<NodeView> =
                list.nodes.iter().map(node_view).filter(|v| selector.matches(&v.labels)).collect();
            match render_structured(&views, out.output) {
                // JSON and YAML escape control characters themselves (and must stay parseable).
                Some(s) => println!("{s}"),
                None => {
                    let rows: Vec<Vec<String>> = views
                        .iter()
                        .map(|v| {
                            let f = v.facts.as_ref();
                            vec![
                                v.name.clone(),
                                status_word(v).into(),
                                v.addresses.join(","),
                                f.map(|f| f.os_pretty_name.clone()).unwrap_or_default(),
                                f.map(|f| f.kernel.clone()).unwrap_or_default(),
                                v.agent_version.clone(),
                                v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                                v.last_seen.clone(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["NAME", "STATUS", "ADDRESSES", "OS", "KERNEL", "AGENT", "LABELS", "LAST SEEN"], &rows)
                    );
                    for v in &views {
                        let soon = v.facts.as_ref().map(|f| f.expiring_certificates.len()).unwrap_or(0);
                        if soon > 0 {
                            eprintln!(
                                "warning: {}: {soon} Kubernetes certificates expire within 30 days (controller nodes show {}; renew with controller cluster certs NAME --renew all)",
                                v.name, v.name
                            );
                        }
                    }
                }
            }
        }
        NodesCmd::Show { name, data, out } => {
            let mut c = client::connect(&data.data_dir).await?;
            let n = c.get_node(NodeRef { name }).await.map_err(rpc_error)?.into_inner();
            let v = node_view(&n);
            let fmt = if out.output == fleetadm_common::output::OutputFormat::Table {
                fleetadm_common::output::OutputFormat::Yaml
            } else {
                out.output
            };
            if let Some(s) = render_structured(&v, fmt) {
                println!("{s}");
            }
        }
        NodesCmd::Revoke { name, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            c.revoke_node(NodeRef { name: name.clone() }).await.map_err(rpc_error)?;
            println!("node {name} revoked; its certificate is refused from now on");
            println!("the name stays taken; `controller nodes forget {name}` frees it for a new enrollment");
        }
        NodesCmd::Label { name, changes, data } => {
            let (set, remove) = crate::plan::select::parse_changes(&changes)?;
            let mut c = client::connect(&data.data_dir).await?;
            let n = c
                .label_node(fleetadm_proto::LabelNodeRequest {
                    name: name.clone(),
                    set: set.into_iter().collect(),
                    remove,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let sorted: std::collections::BTreeMap<String, String> = n.labels.into_iter().collect();
            let now: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("node {name} labels: {}", if now.is_empty() { "(none)".to_string() } else { now.join(",") });
        }
        NodesCmd::Forget { name, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            c.forget_node(NodeRef { name: name.clone() }).await.map_err(rpc_error)?;
            println!("node {name} forgotten; a host may now enroll under this name with a new token");
        }
    }
    Ok(())
}
