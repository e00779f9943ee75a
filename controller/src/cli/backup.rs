//! `controller cluster backup|backups|set`: etcd snapshots taken through a master's agent and
//! kept by the controller, and the backup schedule.
use std::time::Duration;

use clap::Args;
use fleetadm_common::output::{render_structured, table, term, OutputFormat};
use serde::Serialize;

use super::{rpc_error, DataDir};
use crate::admin::client;

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
}

#[derive(Debug, Args)]
pub struct BackupsArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// Take an etcd backup this often (`6h`; `0` turns the schedule off).
    #[arg(long, value_parser = fleetadm_common::clock::parse_duration)]
    backup_every: Duration,
    /// Keep this many backups (the oldest beyond are dropped).
    #[arg(long, default_value = "12")]
    keep: u32,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// The backup to restore (an ID from `controller cluster backups NAME`).
    #[arg(long, value_name = "ID")]
    snapshot: String,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the restore and return.
    #[arg(long)]
    detach: bool,
}

#[derive(Serialize)]
struct BackupView {
    id: String,
    host: String,
    taken_at: String,
    size: u64,
    revision: u64,
    total_keys: u64,
    sha256: String,
    scheduled: bool,
}

fn view(b: &fleetadm_proto::BackupInfo) -> BackupView {
    BackupView {
        id: b.id.clone(),
        host: b.host.clone(),
        taken_at: humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(b.taken_unix_ms))
            .to_string(),
        size: b.size,
        revision: b.revision,
        total_keys: b.total_keys,
        sha256: b.sha256.clone(),
        scheduled: b.scheduled,
    }
}

fn schedule_line(every_secs: u64, keep: u32) -> String {
    if every_secs == 0 {
        "schedule: none (controller cluster set NAME --backup-every 6h --keep 12)".into()
    } else {
        format!("schedule: every {}, keeping {keep}", humantime::format_duration(Duration::from_secs(every_secs)))
    }
}

pub async fn backup(a: BackupArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let b = c
        .backup_cluster(fleetadm_proto::ClusterRef { name: a.name.clone(), with_output: false })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!(
        "backup {} of cluster {}: etcd revision {}, {} keys, {} bytes, taken on {} (sha256 {})",
        b.id,
        b.cluster,
        b.revision,
        b.total_keys,
        b.size,
        term(&b.host),
        b.sha256
    );
    Ok(())
}

pub async fn list(a: BackupsArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let l = c
        .list_backups(fleetadm_proto::ClusterRef { name: a.name.clone(), with_output: false })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let views: Vec<BackupView> = l.backups.iter().map(view).collect();
    if let Some(text) = render_structured(&views, a.output) {
        println!("{text}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.id.clone(),
                v.taken_at.clone(),
                v.host.clone(),
                v.revision.to_string(),
                v.size.to_string(),
                if v.scheduled { "schedule".into() } else { "operator".into() },
            ]
        })
        .collect();
    print!("{}", term(&table(&["ID", "TAKEN", "HOST", "REVISION", "BYTES", "BY"], &rows)));
    println!("{}", schedule_line(l.every_secs, l.keep));
    Ok(())
}

pub async fn set(a: SetArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let l = c
        .set_cluster(fleetadm_proto::SetClusterRequest {
            cluster: a.name.clone(),
            set_backup: true,
            backup_every_secs: a.backup_every.as_secs(),
            backup_keep: a.keep,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!("cluster {}: {}", a.name, schedule_line(l.every_secs, l.keep));
    Ok(())
}

pub async fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let resp = c
        .restore_cluster(fleetadm_proto::RestoreClusterRequest {
            cluster: a.name.clone(),
            backup: a.snapshot.clone(),
            dry_run: a.dry_run,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    super::cluster::change(&mut c, resp, "restore", a.dry_run, a.detach).await
}
