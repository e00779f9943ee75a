//! `controller op list|status|logs|pause|resume|abort`: the operations running now (execs) and
//! the cluster rollouts, one operation host by host (failed hosts with their error and output's
//! tail), and steering a running exec (no new host starts while paused; abort skips the hosts
//! not started; hosts already running finish).
use clap::Subcommand;
use fleetadm_common::clock::rfc3339_ms;
use fleetadm_common::output::{render_structured, table, term};
use fleetadm_proto::{Empty, OpControlRequest, OpInfo, OpRef};
use serde::Serialize;

use super::{rpc_error, DataDir, Output};
use crate::admin::client;

#[derive(Debug, Subcommand)]
pub enum OpCmd {
    /// Running execs (with progress) and cluster rollouts.
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
    },
    /// One operation (a running or recently finished exec, or cluster/NAME): its state and
    /// progress, each host's state, and every failed host's error and the tail of its output.
    Status {
        id: String,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
    },
    /// The output of an operation's hosts (`host | line`), or of one host with --host.
    Logs {
        id: String,
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Start no further host (an exec) or task (a cluster rollout, ID cluster/NAME) until
    /// `op resume ID`; what is running finishes. A paused rollout stays paused across a
    /// controller restart.
    Pause {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Continue a paused operation (after a canary, or a pause).
    Resume {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Start no further host, for good; those not started are reported as skipped. A cluster
    /// rollout (cluster/NAME) fails as aborted; running the same command again resumes it.
    Abort {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Serialize)]
struct OpView {
    id: String,
    kind: String,
    state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    hosts: u32,
    done: u32,
    failed: u32,
    started: String,
    description: String,
}

fn view(o: OpInfo) -> OpView {
    OpView {
        id: o.id,
        kind: o.kind,
        state: o.state,
        reason: o.reason,
        hosts: o.hosts,
        done: o.done,
        failed: o.failed,
        started: rfc3339_ms(o.started_unix_ms),
        description: o.description,
    }
}

pub async fn run(c: OpCmd) -> anyhow::Result<()> {
    let (data, id, action) = match c {
        OpCmd::List { data, out } => {
            let mut client = client::connect(&data.data_dir).await?;
            let list = client.list_ops(Empty {}).await.map_err(rpc_error)?.into_inner();
            let views: Vec<OpView> = list.ops.into_iter().map(view).collect();
            match render_structured(&views, out.output) {
                Some(s) => println!("{s}"),
                None => {
                    let rows: Vec<Vec<String>> = views
                        .iter()
                        .map(|v| {
                            let progress = if v.kind == "exec" {
                                format!("{}/{} done, {} failed", v.done, v.hosts, v.failed)
                            } else {
                                format!("{} hosts", v.hosts)
                            };
                            let state = if v.reason.is_empty() {
                                v.state.clone()
                            } else {
                                format!("{}: {}", v.state, v.reason)
                            };
                            vec![
                                v.id.clone(),
                                v.kind.clone(),
                                term(&state).into_owned(),
                                progress,
                                term(&v.description).into_owned(),
                            ]
                        })
                        .collect();
                    print!("{}", table(&["ID", "KIND", "STATE", "PROGRESS", "WHAT"], &rows));
                }
            }
            return Ok(());
        }
        OpCmd::Status { id, data, out } => return status(&data, id, out).await,
        OpCmd::Logs { id, host, data } => return logs(&data, id, host).await,
        OpCmd::Pause { id, data } => (data, id, "pause"),
        OpCmd::Resume { id, data } => (data, id, "resume"),
        OpCmd::Abort { id, data } => (data, id, "abort"),
    };
    let mut client = client::connect(&data.data_dir).await?;
    let op = client.control_op(OpControlRequest { id, action: action.into() }).await.map_err(rpc_error)?.into_inner();
    println!("{}: {} ({}/{} hosts done)", op.id, op.state, op.done, op.hosts);
    Ok(())
}

#[derive(Serialize)]
struct HostView {
    host: String,
    state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

#[derive(Serialize)]
struct StatusView {
    #[serde(flatten)]
    op: OpView,
    hosts: Vec<HostView>,
}

/// The last `n` non-empty lines of `text`.
fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

async fn status(data: &DataDir, id: String, out: Output) -> anyhow::Result<()> {
    let mut client = client::connect(&data.data_dir).await?;
    let st = client.get_op(OpRef { id }).await.map_err(rpc_error)?.into_inner();
    let info = view(st.info.unwrap_or_default());
    let hosts: Vec<HostView> = st
        .hosts
        .iter()
        .map(|h| HostView { host: h.host.clone(), state: h.state.clone(), error: h.error.clone() })
        .collect();
    let failed: Vec<&fleetadm_proto::OpHost> = st.hosts.iter().filter(|h| h.state == "failed").collect();
    let sv = StatusView { op: info, hosts };
    if let Some(s) = render_structured(&sv, out.output) {
        println!("{s}");
        return Ok(());
    }
    let v = &sv.op;
    println!("{} ({}): {}", v.id, v.kind, term(&v.description));
    let state = if v.reason.is_empty() { v.state.clone() } else { format!("{}: {}", v.state, v.reason) };
    println!("state: {}", term(&state));
    let by = |s: &str| sv.hosts.iter().filter(|h| h.state == s).count();
    println!(
        "hosts: {} succeeded, {} failed, {} running, {} pending, {} skipped (of {})",
        by("succeeded"),
        by("failed"),
        by("running"),
        by("pending"),
        by("skipped"),
        v.hosts
    );
    let rows: Vec<Vec<String>> =
        sv.hosts.iter().map(|h| vec![h.host.clone(), h.state.clone(), term(&h.error).into_owned()]).collect();
    print!("{}", table(&["HOST", "STATE", "ERROR"], &rows));
    for h in failed {
        println!("--- {} (last lines of its output)", h.host);
        for l in last_lines(&h.output, 10) {
            println!("  {}", term(l));
        }
    }
    Ok(())
}

async fn logs(data: &DataDir, id: String, host: Option<String>) -> anyhow::Result<()> {
    let mut client = client::connect(&data.data_dir).await?;
    let st = client.get_op(OpRef { id: id.clone() }).await.map_err(rpc_error)?.into_inner();
    let mut shown = 0;
    for h in st.hosts.iter().filter(|h| host.as_deref().is_none_or(|want| want == h.host)) {
        shown += 1;
        for l in h.output.lines() {
            println!("{} | {}", h.host, term(l));
        }
    }
    if let (Some(want), 0) = (host, shown) {
        anyhow::bail!("operation {id} has no host {want:?}");
    }
    Ok(())
}
