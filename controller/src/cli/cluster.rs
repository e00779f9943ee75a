//! `controller cluster create`: for now, planning and `--dry-run` (host resolution against
//! enrolled nodes, inventory preflight, and every task per host in order).
use std::path::PathBuf;

use clap::{Args, Subcommand};
use fleetadm_proto::PlanClusterRequest;

use super::{rpc_error, DataDir};
use crate::admin::client;

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Turn enrolled hosts into a highly available Kubernetes cluster.
    #[command(disable_version_flag = true)]
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Cluster name (taken from the Clusterfile with -f).
    name: Option<String>,
    #[command(flatten)]
    data: DataDir,
    /// Masters: IP addresses or node names, comma separated.
    #[arg(long, value_delimiter = ',')]
    masters: Vec<String>,
    /// Workers: IP addresses or node names, comma separated.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// A sealos Clusterfile (apps.sealos.io/v1beta1 Cluster, plus kubeadm documents).
    #[arg(short = 'f', long = "file")]
    clusterfile: Option<PathBuf>,
    /// Kubernetes version.
    #[arg(long = "version", id = "kube_version", default_value = "v1.29.9")]
    kube_version: String,
    #[arg(long, default_value = "10.103.97.2")]
    vip: String,
    #[arg(long, default_value = "100.64.0.0/10")]
    pod_cidr: String,
    #[arg(long, default_value = "10.96.0.0/22")]
    service_cidr: String,
    /// Workers joined at once: N or P%.
    #[arg(long, default_value = "10")]
    max_parallel: String,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Plan output: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

pub async fn run(cmd: ClusterCmd) -> anyhow::Result<()> {
    let ClusterCmd::Create(a) = cmd;
    let clusterfile = match &a.clusterfile {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read Clusterfile {}: {e}", p.display()))?
        }
        None => String::new(),
    };
    if clusterfile.is_empty() && a.name.is_none() {
        anyhow::bail!("give a cluster name (controller cluster create NAME --masters ...) or -f Clusterfile");
    }
    let mut c = client::connect(&a.data.data_dir).await?;
    let resp = c
        .plan_cluster(PlanClusterRequest {
            name: a.name.clone().unwrap_or_default(),
            masters: a.masters.clone(),
            nodes: a.nodes.clone(),
            version: a.kube_version.clone(),
            vip: a.vip.clone(),
            pod_cidr: a.pod_cidr.clone(),
            service_cidr: a.service_cidr.clone(),
            max_parallel: a.max_parallel.clone(),
            clusterfile,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    if !resp.errors.is_empty() {
        for e in &resp.errors {
            eprintln!("error: {e}");
        }
        anyhow::bail!("preflight failed with {} error(s); nothing was changed", resp.errors.len());
    }
    if a.output == "json" {
        println!("{}", resp.plan_json);
    } else {
        print!("{}", resp.plan_text);
    }
    if !a.dry_run {
        anyhow::bail!(
            "executing the plan is not available in this build yet; the plan above was checked (use --dry-run to print it without this error)"
        );
    }
    Ok(())
}
