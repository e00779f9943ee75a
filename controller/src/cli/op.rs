//! `controller op list|pause|resume|abort`: the operations running now (execs) and the cluster
//! rollouts, and steering a running exec (no new host starts while paused; abort skips the hosts
//! not started; hosts already running finish).
use clap::Subcommand;
use fleetadm_common::clock::rfc3339_ms;
use fleetadm_common::output::{render_structured, table, term};
use fleetadm_proto::{Empty, OpControlRequest, OpInfo};
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
        OpCmd::Pause { id, data } => (data, id, "pause"),
        OpCmd::Resume { id, data } => (data, id, "resume"),
        OpCmd::Abort { id, data } => (data, id, "abort"),
    };
    let mut client = client::connect(&data.data_dir).await?;
    let op = client.control_op(OpControlRequest { id, action: action.into() }).await.map_err(rpc_error)?.into_inner();
    println!("{}: {} ({}/{} hosts done)", op.id, op.state, op.done, op.hosts);
    Ok(())
}
