//! `controller cluster certs NAME`: the expiry of every certificate and kubeconfig on every host
//! (read by each host's agent), or with `--renew` / `--add-san` a rollout that reissues them.
use std::time::Duration;

use clap::Args;
use fleetadm_common::output::{render_structured, table, term, OutputFormat};
use serde::Serialize;

use super::{rpc_error, DataDir};
use crate::admin::client;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// The cluster.
    name: String,
    #[command(flatten)]
    data: DataDir,
    /// Renew certificates (kubeadm's names, comma separated, or `all`), keeping the cluster's
    /// validity; the CAs are kept. Installed master by master, restarting the static pods that
    /// use them one at a time.
    #[arg(long, value_delimiter = ',', value_name = "all|NAME")]
    renew: Vec<String>,
    /// Add names or IP addresses to the apiserver certificate (reissued on every master, each
    /// apiserver restarted in turn).
    #[arg(long, value_delimiter = ',', value_name = "NAME|IP")]
    add_san: Vec<String>,
    /// Warn about certificates that expire within this long.
    #[arg(long, default_value = "30d", value_parser = fleetadm_common::clock::parse_duration)]
    warn_within: Duration,
    /// With --renew/--add-san: print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --renew/--add-san: start the operation and return.
    #[arg(long)]
    detach: bool,
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, Serialize)]
struct Row {
    host: String,
    role: String,
    name: String,
    path: String,
    subject: String,
    not_after_unix: u64,
    residual_secs: i64,
    is_ca: bool,
    sans: Vec<String>,
    error: String,
}

#[derive(Debug, Serialize)]
struct Report {
    cluster: String,
    validity_secs: u64,
    certificates: Vec<Row>,
    unreachable: Vec<(String, String)>,
    expiring: usize,
}

/// `12d`, `3y 41d`, `5h`, or `EXPIRED`.
pub fn residual(secs: i64) -> String {
    if secs <= 0 {
        return "EXPIRED".into();
    }
    let days = secs / 86400;
    match days {
        0 => format!("{}h", secs / 3600),
        d if d < 365 => format!("{d}d"),
        d => format!("{}y {}d", d / 365, d % 365),
    }
}

pub async fn run(a: CertsArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    if !a.renew.is_empty() || !a.add_san.is_empty() {
        let resp = c
            .renew_cluster_certs(fleetadm_proto::RenewCertsRequest {
                cluster: a.name.clone(),
                renew: a.renew.clone(),
                add_sans: a.add_san.clone(),
                dry_run: a.dry_run,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        return super::cluster::change(&mut c, resp, "certs", a.dry_run, a.detach).await;
    }
    let rep = c
        .check_cluster_certs(fleetadm_proto::ClusterRef { name: a.name.clone(), with_output: false })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let now = fleetadm_common::clock::now_unix_ms() as i64 / 1000;
    let warn = a.warn_within.as_secs() as i64;
    let mut report = Report {
        cluster: rep.cluster.clone(),
        validity_secs: rep.validity_secs,
        certificates: vec![],
        unreachable: vec![],
        expiring: 0,
    };
    for h in &rep.hosts {
        let role = if h.role == fleetadm_proto::HostRole::Master as i32 { "master" } else { "worker" };
        if !h.error.is_empty() {
            report.unreachable.push((h.host.clone(), h.error.clone()));
            continue;
        }
        for ci in &h.certs {
            let left = ci.not_after_unix as i64 - now;
            if ci.error.is_empty() && left < warn {
                report.expiring += 1;
            }
            report.certificates.push(Row {
                host: h.host.clone(),
                role: role.into(),
                name: ci.name.clone(),
                path: ci.path.clone(),
                subject: ci.subject.clone(),
                not_after_unix: ci.not_after_unix,
                residual_secs: if ci.error.is_empty() { left } else { 0 },
                is_ca: ci.is_ca,
                sans: ci.sans.clone(),
                error: ci.error.clone(),
            });
        }
    }
    if let Some(text) = render_structured(&report, a.output) {
        println!("{text}");
    } else {
        let rows: Vec<Vec<String>> = report
            .certificates
            .iter()
            .map(|r| {
                let expires = if r.error.is_empty() {
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.not_after_unix))
                        .to_string()
                } else {
                    "-".into()
                };
                let left = if r.error.is_empty() { residual(r.residual_secs) } else { format!("error: {}", r.error) };
                let flag = if r.error.is_empty() && r.residual_secs < warn { "  <-- expires soon" } else { "" };
                vec![
                    r.host.clone(),
                    r.name.clone(),
                    expires,
                    format!("{left}{flag}"),
                    if r.is_ca { "yes".into() } else { "no".into() },
                ]
            })
            .collect();
        print!("{}", term(&table(&["HOST", "CERTIFICATE", "EXPIRES", "RESIDUAL TIME", "CA"], &rows)));
        println!("issued with a validity of {}", residual(i64::try_from(report.validity_secs).unwrap_or(i64::MAX)));
    }
    for (host, why) in &report.unreachable {
        eprintln!("error: {host}: {}", term(why));
    }
    if report.expiring > 0 {
        eprintln!(
            "warning: {} certificates expire within {}; renew them with `controller cluster certs {} --renew all`",
            report.expiring,
            humantime::format_duration(a.warn_within),
            report.cluster
        );
    }
    if !report.unreachable.is_empty() {
        anyhow::bail!("{} of {} hosts did not answer", report.unreachable.len(), rep.hosts.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn residual_times() {
        assert_eq!(super::residual(-5), "EXPIRED");
        assert_eq!(super::residual(7200), "2h");
        assert_eq!(super::residual(12 * 86400 + 5), "12d");
        assert_eq!(super::residual((100 * 365 + 3) * 86400), "100y 3d");
    }
}
