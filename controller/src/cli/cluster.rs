//! `controller cluster ...`: create (plan, persist, follow the rollout), status, list, logs, get
//! (a Clusterfile with status) and kubeconfig. The rollout runs in the daemon: interrupting the CLI
//! leaves it running, and `cluster status` picks it up again.
use fleetadm_common::output::term;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetadm_common::output::OutputFormat;
use fleetadm_proto::admin_client::AdminClient;
use fleetadm_proto::{ClusterRef, CreateClusterRequest, DeleteClusterRequest, Empty, PlanClusterRequest};
use tonic::transport::Channel;

use super::cluster_view::{self, ClusterView};
use super::{rpc_error, DataDir, Output};
use crate::admin::client;
use crate::rollout::record::{ClusterState, TaskState};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Turn enrolled hosts into a highly available Kubernetes cluster.
    #[command(disable_version_flag = true)]
    Create(Box<CreateArgs>),
    /// Phase, conditions and per-host task state of a cluster.
    Status {
        name: String,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        output: Output,
        /// Follow the rollout until it ends (exit code 0 only on success).
        #[arg(short, long)]
        watch: bool,
    },
    /// Every cluster this controller knows.
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        output: Output,
    },
    /// Task output, per host.
    Logs {
        name: String,
        #[command(flatten)]
        data: DataDir,
        /// Only this host (node name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Export the cluster as a Clusterfile (apps.sealos.io/v1beta1) with its status.
    Get {
        name: String,
        #[command(flatten)]
        data: DataDir,
        #[arg(short = 'o', long = "output", default_value = "yaml")]
        output: OutputFormat,
    },
    /// Join more workers (and masters) to a cluster that is up: preflight, bundle and bootstrap
    /// on the new hosts, a fresh join token, the joins in waves behind their IPVS load balancer.
    /// With --masters, the apiserver certificate is reissued for them on every master first, and
    /// every worker's IPVS and every host's /etc/hosts are updated after. Run it again after a
    /// failure to resume.
    Add(AddArgs),
    /// Take workers (and masters) out of a cluster that is up: drained first with --drain, reset
    /// like a delete (kubeadm reset, load balancer, /etc/hosts block, bootstrap), then their Node
    /// objects deleted. With --masters, every worker's IPVS drops them first and the remaining
    /// hosts' /etc/hosts follow. Run it again after a failure to resume; --force for workers that
    /// are gone (only their Node objects are deleted).
    Remove(RemoveArgs),
    /// Certificates: without options, the expiry of every certificate and kubeconfig on every
    /// host (like `kubeadm certs check-expiration`). With --renew or --add-san, reissue them from
    /// the cluster's CAs (same validity) and install them master by master.
    Certs(super::certs::CertsArgs),
    /// Take an etcd snapshot now on a healthy master (through its agent), verify it and keep it
    /// in the controller's store.
    Backup(super::backup::BackupArgs),
    /// The cluster's etcd backups (size, revision, where and when taken) and its schedule.
    Backups(super::backup::BackupsArgs),
    /// Change a cluster's settings: its etcd backup schedule (`--backup-every 6h --keep 12`).
    Set(super::backup::SetArgs),
    /// Restore every master's etcd from a backup: the control plane is stopped on all masters,
    /// each member restored from the same snapshot, etcd started, then the apiservers one at a
    /// time. Run it again after a failure to resume.
    Restore(super::backup::RestoreArgs),
    /// Upgrade Kubernetes by one minor version (or a patch): the bundle to every host, `kubeadm
    /// upgrade apply` on the first master, `upgrade node` on the other masters one at a time,
    /// then the workers in waves; each host drained, its kubelet restarted on the new binary,
    /// uncordoned. Certificates keep their validity. Run it again after a failure to resume.
    #[command(disable_version_flag = true)]
    Upgrade(UpgradeArgs),
    /// Take a cluster apart: kubeadm reset on every host, the workers' load balancers, the
    /// /etc/hosts blocks and what bootstrap installed; then forget it.
    Delete {
        name: String,
        #[command(flatten)]
        data: DataDir,
        /// Forget the cluster without touching its hosts (for hosts that are gone).
        #[arg(long)]
        force: bool,
        /// Start the teardown and return.
        #[arg(long)]
        detach: bool,
    },
    /// Print a kubeconfig. Without --user: the cluster's admin kubeconfig (cluster-admin, long
    /// lived: guard it like the cluster's root password). With --user: a client certificate for
    /// that user (and --group), valid for --ttl, that can do only what RBAC grants it.
    Kubeconfig {
        name: String,
        /// Issue a kubeconfig for this user (the certificate's CN) instead of the admin one.
        #[arg(long)]
        user: Option<String>,
        /// The user's group (the certificate's O), e.g. one bound to a ClusterRole.
        #[arg(long, requires = "user")]
        group: Option<String>,
        /// Lifetime of the issued certificate (1m to 8760h).
        #[arg(long, default_value = "24h", value_parser = fleetadm_common::clock::parse_duration, requires = "user")]
        ttl: Duration,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// Masters to add: IP addresses or node names, comma separated. Every master's apiserver
    /// certificate, every worker's IPVS and every host's /etc/hosts follow.
    #[arg(long, value_delimiter = ',')]
    masters: Vec<String>,
    /// Workers to add: IP addresses or node names, comma separated.
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["node_selector", "masters"])]
    nodes: Vec<String>,
    /// Choose them by label instead, among enrolled nodes in no cluster (`pool=web`).
    #[arg(long, conflicts_with = "nodes", value_name = "SELECTOR")]
    node_selector: Option<String>,
    /// Workers joined at once: N or P%.
    #[arg(long, default_value = "10")]
    max_parallel: String,
    #[command(flatten)]
    canary: CanaryArgs,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the operation and return; follow it with `controller cluster status NAME --watch`.
    #[arg(long)]
    detach: bool,
}

/// A rollout's canary: the first workers in a wave of their own, then a pause.
#[derive(Debug, Args)]
pub struct CanaryArgs {
    /// The first N workers go first, as a wave of their own; then the rollout pauses until
    /// `controller op resume cluster/NAME` (a failed canary worker fails the rollout instead).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    canary: Option<u32>,
    /// After a passed canary, go on by itself after this long.
    #[arg(long, requires = "canary", value_parser = fleetadm_common::clock::parse_duration)]
    auto_promote: Option<Duration>,
}

impl CanaryArgs {
    fn values(&self) -> (u32, u32) {
        let secs = self.auto_promote.map(|d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)).unwrap_or(0);
        (self.canary.unwrap_or(0), secs)
    }
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// The Kubernetes version to upgrade to (vX.Y.Z): the next minor version or a later patch.
    #[arg(long = "version", id = "kube_version")]
    version: String,
    /// The imported bundle carrying that version (without one, every host must have kubeadm and
    /// kubelet of that version installed already).
    #[arg(long)]
    bundle: Option<String>,
    /// Workers upgraded at once: N or P% (default: the cluster's wave size).
    #[arg(long)]
    max_parallel: Option<String>,
    /// Workers that may fail before the upgrade stops: N or P% (default: the cluster's setting).
    #[arg(long)]
    max_failures: Option<String>,
    #[command(flatten)]
    canary: CanaryArgs,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the upgrade and return; follow it with `controller cluster status NAME --watch`.
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// Masters to remove (they leave etcd through their reset; master0 may go, the next master
    /// becomes the reference; the last one is refused).
    #[arg(long, value_delimiter = ',')]
    masters: Vec<String>,
    /// Workers to remove: IP addresses or node names, comma separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "masters")]
    nodes: Vec<String>,
    /// Drain them first (kubectl drain --ignore-daemonsets --delete-emptydir-data).
    #[arg(long)]
    drain: bool,
    /// The hosts are gone: do not touch them, only delete their Node objects.
    #[arg(long)]
    force: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the operation and return; follow it with `controller cluster status NAME --watch`.
    #[arg(long)]
    detach: bool,
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
    /// Choose the masters by label instead (`role=cp,zone=a`; see `controller nodes label`).
    #[arg(long, conflicts_with = "masters", value_name = "SELECTOR")]
    master_selector: Option<String>,
    /// Choose the workers by label instead (`pool=web,!gpu`); a chosen master is never a worker.
    #[arg(long, conflicts_with = "nodes", value_name = "SELECTOR")]
    node_selector: Option<String>,
    /// A sealos Clusterfile (apps.sealos.io/v1beta1 Cluster, plus kubeadm documents).
    #[arg(short = 'f', long = "file")]
    clusterfile: Option<PathBuf>,
    /// Kubernetes version [default: the bundle's, or v1.29.9 without a bundle].
    #[arg(long = "version", id = "kube_version")]
    kube_version: Option<String>,
    #[arg(long, default_value = "10.103.97.2")]
    vip: String,
    #[arg(long, default_value = "100.64.0.0/10")]
    pod_cidr: String,
    #[arg(long, default_value = "10.96.0.0/22")]
    service_cidr: String,
    /// Offline bundle (see `controller bundle import`) to distribute to the hosts and install.
    #[arg(long)]
    bundle: Option<String>,
    /// Workers joined at once: N or P%.
    #[arg(long, default_value = "10")]
    max_parallel: String,
    /// Workers that may fail (and are left out) before the rollout stops: N or P%.
    #[arg(long, default_value = "0")]
    max_failures: String,
    #[command(flatten)]
    canary: CanaryArgs,
    /// Take an etcd backup this often once the cluster is up (`6h`; see `cluster set`).
    #[arg(long, value_parser = fleetadm_common::clock::parse_duration)]
    backup_every: Option<Duration>,
    /// With --backup-every: keep this many backups.
    #[arg(long, default_value = "12", requires = "backup_every")]
    keep: u32,
    /// Validity of the Kubernetes certificates.
    #[arg(long, value_parser = humantime::parse_duration)]
    cert_validity: Option<Duration>,
    /// Wait this long for unknown or disconnected hosts to come online instead of failing.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait_for_agents: Option<Duration>,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the rollout and return; follow it with `controller cluster status NAME --watch`.
    #[arg(long)]
    detach: bool,
    /// Plan output for --dry-run: text or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

pub async fn run(cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Create(a) => create(*a).await,
        ClusterCmd::Add(a) => add(a).await,
        ClusterCmd::Remove(a) => remove(a).await,
        ClusterCmd::Certs(a) => super::certs::run(a).await,
        ClusterCmd::Backup(a) => super::backup::backup(a).await,
        ClusterCmd::Backups(a) => super::backup::list(a).await,
        ClusterCmd::Set(a) => super::backup::set(a).await,
        ClusterCmd::Restore(a) => super::backup::restore(a).await,
        ClusterCmd::Upgrade(a) => upgrade(a).await,
        ClusterCmd::Status { name, data, output, watch } => {
            let mut c = client::connect(&data.data_dir).await?;
            if watch {
                let view = follow(&mut c, &name).await?;
                return outcome(&view);
            }
            let view = get_view(&mut c, &name, false).await?;
            match output.output {
                OutputFormat::Table => print!("{}", term(&render_status(&view))),
                f => println!("{}", render(&view, f)),
            }
            Ok(())
        }
        ClusterCmd::List { data, output } => {
            let mut c = client::connect(&data.data_dir).await?;
            let list = c.list_clusters(Empty {}).await.map_err(rpc_error)?.into_inner();
            let views: Vec<ClusterView> = list.clusters.iter().map(parse_view).collect::<anyhow::Result<_>>()?;
            match output.output {
                OutputFormat::Table => {
                    let rows: Vec<Vec<String>> = views
                        .iter()
                        .map(|v| {
                            vec![
                                v.name.clone(),
                                v.state.to_string(),
                                v.phase.clone(),
                                v.version.clone(),
                                v.masters.len().to_string(),
                                v.workers.len().to_string(),
                                format!("{}/{}", v.counts.succeeded + v.counts.skipped, v.counts.total),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        fleetadm_common::output::table(
                            &["NAME", "STATE", "PHASE", "VERSION", "MASTERS", "WORKERS", "TASKS"],
                            &rows
                        )
                    );
                }
                f => println!("{}", render(&views, f)),
            }
            Ok(())
        }
        ClusterCmd::Logs { name, data, host } => {
            let mut c = client::connect(&data.data_dir).await?;
            let view = get_view(&mut c, &name, true).await?;
            if let Some(h) = &host {
                if !view.hosts.iter().any(|x| &x.name == h) {
                    anyhow::bail!("host {h} is not part of cluster {name} (hosts: {})", host_names(&view));
                }
            }
            for h in view.hosts.iter().filter(|x| host.as_ref().is_none_or(|want| &x.name == want)) {
                for t in &h.tasks {
                    println!(
                        "{}",
                        term(&format!("==> {} {} [{}] {} (attempt {})", h.name, t.kind, t.phase, t.state, t.attempt))
                    );
                    if !t.output.is_empty() {
                        println!("{}", term(t.output.trim_end()));
                    }
                }
            }
            Ok(())
        }
        ClusterCmd::Get { name, data, output } => {
            let mut c = client::connect(&data.data_dir).await?;
            let view = get_view(&mut c, &name, false).await?;
            let doc = clusterfile_with_status(&view);
            let f = if output == OutputFormat::Table { OutputFormat::Yaml } else { output };
            println!("{}", render(&doc, f));
            Ok(())
        }
        ClusterCmd::Delete { name, data, force, detach } => {
            let mut c = client::connect(&data.data_dir).await?;
            let v = c
                .delete_cluster(DeleteClusterRequest { name: name.clone(), force })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if v.name.is_empty() {
                println!("cluster {name} forgotten (its hosts were not touched)");
                return Ok(());
            }
            if detach {
                println!("deleting cluster {name}; follow it with: controller cluster status {name} --watch");
                return Ok(());
            }
            match follow(&mut c, &name).await {
                Err(e) if e.to_string().contains("not found") => {
                    println!("cluster {name} deleted: its hosts are reset");
                    Ok(())
                }
                Err(e) => Err(e),
                Ok(v) => anyhow::bail!(
                    "deleting cluster {name} stopped: {}\nsee `controller cluster logs {name}`; run delete again to retry, or --force to forget it",
                    v.message
                ),
            }
        }
        ClusterCmd::Kubeconfig { name, user: None, data, .. } => {
            let mut c = client::connect(&data.data_dir).await?;
            let kc = c.get_kubeconfig(ClusterRef { name, with_output: false }).await.map_err(rpc_error)?.into_inner();
            print!("{}", kc.yaml);
            Ok(())
        }
        ClusterCmd::Kubeconfig { name, user: Some(user), group, ttl, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            let kc = c
                .issue_kubeconfig(fleetadm_proto::IssueKubeconfigRequest {
                    cluster: name,
                    user,
                    groups: group.into_iter().collect(),
                    ttl_secs: ttl.as_secs(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            eprintln!(
                "client certificate {} valid until {}",
                kc.serial,
                fleetadm_common::clock::rfc3339(kc.not_after_unix)
            );
            print!("{}", kc.yaml);
            Ok(())
        }
    }
}

fn render<T: serde::Serialize>(v: &T, f: OutputFormat) -> String {
    fleetadm_common::output::render_structured(v, f).unwrap_or_default().trim_end().to_string()
}

fn host_names(v: &ClusterView) -> String {
    v.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
}

async fn create(a: CreateArgs) -> anyhow::Result<()> {
    let clusterfile = match &a.clusterfile {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read Clusterfile {}", p.display()))?,
        None => String::new(),
    };
    if clusterfile.is_empty() && a.name.is_none() {
        anyhow::bail!("give a cluster name (controller cluster create NAME --masters ...) or -f Clusterfile");
    }
    let mut c = client::connect(&a.data.data_dir).await?;
    let plan_req = PlanClusterRequest {
        name: a.name.clone().unwrap_or_default(),
        masters: a.masters.clone(),
        nodes: a.nodes.clone(),
        version: a.kube_version.clone().unwrap_or_default(),
        bundle: a.bundle.clone().unwrap_or_default(),
        vip: a.vip.clone(),
        pod_cidr: a.pod_cidr.clone(),
        service_cidr: a.service_cidr.clone(),
        max_parallel: a.max_parallel.clone(),
        clusterfile,
        master_selector: a.master_selector.clone().unwrap_or_default(),
        node_selector: a.node_selector.clone().unwrap_or_default(),
        canary: a.canary.values().0,
        auto_promote_secs: a.canary.values().1,
    };
    let deadline = a.wait_for_agents.map(|d| Instant::now() + d);
    let resp = loop {
        let resp = c.plan_cluster(plan_req.clone()).await.map_err(rpc_error)?.into_inner();
        let waiting = resp.errors.iter().any(|e| e.starts_with("unknown hosts") || e.starts_with("disconnected hosts"));
        match deadline {
            Some(d) if waiting && Instant::now() < d => {
                eprintln!("waiting for agents: {}", resp.errors.join("; "));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            _ => break resp,
        }
    };
    for w in &resp.warnings {
        eprintln!("warning: {}", term(w));
    }
    if !resp.errors.is_empty() {
        for e in &resp.errors {
            eprintln!("error: {}", term(e));
        }
        anyhow::bail!("preflight failed with {} error(s); nothing was changed", resp.errors.len());
    }
    if a.dry_run {
        if a.output == "json" {
            let plan = resp.plan.as_ref().map(cluster_view::plan_json).unwrap_or_default();
            println!("{}", fleetadm_common::output::json_for_terminal(&serde_json::to_string_pretty(&plan)?));
        } else {
            print!("{}", resp.plan_text);
        }
        return Ok(());
    }
    let created = c
        .create_cluster(CreateClusterRequest {
            plan: Some(plan_req),
            max_failures: a.max_failures.clone(),
            cert_validity_secs: a.cert_validity.map(|d| d.as_secs()).unwrap_or(0),
            backup_every_secs: a.backup_every.map(|d| d.as_secs()).unwrap_or(0),
            backup_keep: a.keep,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let view = parse_view(&created)?;
    eprintln!(
        "cluster {} recorded: {} tasks on {} hosts; rollout running in the controller",
        view.name,
        view.counts.total,
        view.hosts.len()
    );
    if a.detach {
        println!("follow it with: controller cluster status {} --watch", view.name);
        return Ok(());
    }
    let view = follow(&mut c, &view.name).await?;
    outcome(&view)
}

async fn add(a: AddArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let resp = c
        .add_cluster_hosts(fleetadm_proto::ChangeClusterRequest {
            cluster: a.name.clone(),
            masters: a.masters.clone(),
            nodes: a.nodes.clone(),
            node_selector: a.node_selector.clone().unwrap_or_default(),
            max_parallel: a.max_parallel.clone(),
            dry_run: a.dry_run,
            drain: false,
            force: false,
            canary: a.canary.values().0,
            auto_promote_secs: a.canary.values().1,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    change(&mut c, resp, "add", a.dry_run, a.detach).await
}

async fn upgrade(a: UpgradeArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let resp = c
        .upgrade_cluster(fleetadm_proto::UpgradeClusterRequest {
            cluster: a.name.clone(),
            version: a.version.clone(),
            bundle: a.bundle.clone().unwrap_or_default(),
            max_parallel: a.max_parallel.clone().unwrap_or_default(),
            max_failures: a.max_failures.clone().unwrap_or_default(),
            dry_run: a.dry_run,
            canary: a.canary.values().0,
            auto_promote_secs: a.canary.values().1,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    change(&mut c, resp, "upgrade", a.dry_run, a.detach).await
}

async fn remove(a: RemoveArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let resp = c
        .remove_cluster_hosts(fleetadm_proto::ChangeClusterRequest {
            cluster: a.name.clone(),
            masters: a.masters.clone(),
            nodes: a.nodes.clone(),
            dry_run: a.dry_run,
            drain: a.drain,
            force: a.force,
            ..Default::default()
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    change(&mut c, resp, "remove", a.dry_run, a.detach).await
}

/// The rest of `cluster add|remove|certs`: the plan's errors, the dry run, or the operation followed.
pub(super) async fn change(
    c: &mut AdminClient<Channel>,
    resp: fleetadm_proto::ChangeClusterResponse,
    verb: &str,
    dry_run: bool,
    detach: bool,
) -> anyhow::Result<()> {
    let plan = resp.plan.unwrap_or_default();
    for w in &plan.warnings {
        eprintln!("warning: {}", term(w));
    }
    if !plan.errors.is_empty() {
        for e in &plan.errors {
            eprintln!("error: {}", term(e));
        }
        anyhow::bail!("cluster {verb} refused with {} error(s); nothing was changed", plan.errors.len());
    }
    if dry_run {
        print!("{}", plan.plan_text);
        return Ok(());
    }
    let Some(started) = resp.cluster else {
        anyhow::bail!("the controller recorded no operation (a controller older than this CLI?)");
    };
    let view = parse_view(&started)?;
    eprintln!(
        "cluster {}: {} recorded ({} tasks); running in the controller",
        view.name, view.operation, view.counts.total
    );
    if detach {
        println!("follow it with: controller cluster status {} --watch", view.name);
        return Ok(());
    }
    let view = follow(c, &view.name).await?;
    match view.state {
        ClusterState::Succeeded => {
            println!("{}", term(&view.message));
            Ok(())
        }
        ClusterState::Failed => anyhow::bail!(
            "{}\nsee `controller cluster logs {}`; run the same {verb} again to retry (finished work is kept)",
            view.message,
            view.name
        ),
        ClusterState::Running => anyhow::bail!("cluster {} is still running", view.name),
    }
}

fn outcome(view: &ClusterView) -> anyhow::Result<()> {
    match view.state {
        ClusterState::Succeeded => {
            println!("{}", term(&view.message));
            println!("admin kubeconfig: controller cluster kubeconfig {}", view.name);
            Ok(())
        }
        ClusterState::Failed => anyhow::bail!(
            "{}\nsee `controller cluster logs {}`; run the same create again to retry (finished work is kept)",
            view.message,
            view.name
        ),
        ClusterState::Running => anyhow::bail!("cluster {} is still running", view.name),
    }
}

fn parse_view(v: &fleetadm_proto::ClusterView) -> anyhow::Result<ClusterView> {
    Ok(ClusterView::try_from(v)?)
}

async fn get_view(c: &mut AdminClient<Channel>, name: &str, with_output: bool) -> anyhow::Result<ClusterView> {
    let v = c.get_cluster(ClusterRef { name: name.to_string(), with_output }).await.map_err(rpc_error)?.into_inner();
    parse_view(&v)
}

fn progress_line(v: &ClusterView, elapsed: Duration) -> String {
    let done = v.counts.succeeded + v.counts.skipped;
    format!(
        "[{:>4}s] phase {:<13} tasks {done}/{} running {} failed {} pending {}",
        elapsed.as_secs(),
        v.phase,
        v.counts.total,
        v.counts.running,
        v.counts.failed,
        v.counts.pending
    )
}

/// Follow a rollout until it ends: indicatif bars on a terminal, one line per change otherwise.
async fn follow(c: &mut AdminClient<Channel>, name: &str) -> anyhow::Result<ClusterView> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut last_line = String::new();
    let mut last_phase = String::new();
    loop {
        let v = get_view(c, name, false).await?;
        let done = (v.counts.succeeded + v.counts.skipped) as u64;
        if let Some(b) = &bar {
            if v.phase != last_phase && !last_phase.is_empty() {
                b.println(format!("phase {last_phase} done"));
            }
            b.set_length(v.counts.total as u64);
            b.set_position(done);
            let running: Vec<String> = v
                .hosts
                .iter()
                .flat_map(|h| {
                    h.tasks
                        .iter()
                        .filter(|t| t.state == TaskState::Running)
                        .map(move |t| format!("{}:{}", h.name, t.kind))
                })
                .take(4)
                .collect();
            b.set_message(format!(
                "{} | failed {} | {}",
                v.phase,
                v.counts.failed,
                if running.is_empty() { String::new() } else { running.join(" ") }
            ));
        } else {
            let mut line = progress_line(&v, started.elapsed());
            for w in waiting(&v) {
                line.push_str(&format!("\n  waiting: {w}"));
            }
            // Print when something other than the clock changed.
            let key = line.split_once(']').map(|x| x.1).unwrap_or_default().to_string();
            if key != last_line {
                eprintln!("{}", term(&line));
                last_line = key;
            }
        }
        last_phase = v.phase.clone();
        if v.state != ClusterState::Running {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            eprint!("{}", term(&render_status(&v)));
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Why tasks are held back (an agent that cannot run them), once per reason.
fn waiting(v: &ClusterView) -> Vec<String> {
    let mut out: Vec<String> = v
        .hosts
        .iter()
        .flat_map(|h| h.tasks.iter())
        .filter(|t| !t.waiting.is_empty())
        .map(|t| t.waiting.clone())
        .collect();
    out.dedup();
    out
}

fn render_status(v: &ClusterView) -> String {
    let state = if v.paused { format!("{} (paused)", v.state) } else { v.state.to_string() };
    let mut out =
        format!("cluster {}  state {state}  phase {}  version {}  vip {}\n", v.name, v.phase, v.version, v.vip);
    if !v.message.is_empty() {
        out.push_str(&format!("  {}\n", v.message));
    }
    let rows: Vec<Vec<String>> = v
        .hosts
        .iter()
        .map(|h| {
            let done = h.tasks.iter().filter(|t| t.state.is_final()).count();
            let current = h
                .tasks
                .iter()
                .find(|t| !t.state.is_final())
                .map(|t| format!("{} {}", t.kind, t.state))
                .unwrap_or_else(|| "done".into());
            vec![h.name.clone(), h.role.clone(), h.ip.clone(), format!("{done}/{}", h.tasks.len()), current]
        })
        .collect();
    out.push_str(&fleetadm_common::output::table(&["HOST", "ROLE", "IP", "TASKS", "CURRENT"], &rows));
    for w in waiting(v) {
        out.push_str(&format!("waiting: {w}\n"));
    }
    let conds: Vec<String> =
        v.conditions.iter().map(|c| format!("{}={}", c.kind, if c.status { "True" } else { "False" })).collect();
    if !conds.is_empty() {
        out.push_str(&format!("conditions: {}\n", conds.join(" ")));
    }
    out
}

/// A sealos-style Clusterfile describing the cluster, with a status block.
fn clusterfile_with_status(v: &ClusterView) -> serde_json::Value {
    let hosts: Vec<serde_json::Value> = v
        .hosts
        .iter()
        .map(|h| serde_json::json!({"ips": [h.ip], "roles": [if h.role == "master" { "master" } else { "node" }]}))
        .collect();
    serde_json::json!({
        "apiVersion": "apps.sealos.io/v1beta1",
        "kind": "Cluster",
        "metadata": {"name": v.name},
        "spec": {"hosts": hosts},
        "status": {
            "phase": v.state.to_string(),
            "currentPhase": v.phase,
            "message": v.message,
            "kubernetesVersion": v.version,
            "vip": v.vip,
            "podCIDR": v.pod_cidr,
            "serviceCIDR": v.service_cidr,
            "failedWorkers": v.failed_workers,
            "conditions": v.conditions.iter().map(|c| serde_json::json!({
                "type": c.kind, "status": if c.status { "True" } else { "False" }, "message": c.message,
                "lastTransitionTime": humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(c.time_ms)).to_string(),
            })).collect::<Vec<_>>(),
        }
    })
}
