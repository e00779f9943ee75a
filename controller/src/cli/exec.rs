//! `controller exec`: run a command on hosts through their agents; each host's output streamed
//! with the host name in front; exit status 1 if any host failed.
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use fleetadm_common::clock::parse_duration;
use fleetadm_common::output::term;
use fleetadm_proto::ExecRequest;

use super::{rpc_error, DataDir};
use crate::admin::client;

/// Which hosts a fleet operation runs on, and how (shared by `exec` and `agent upgrade`).
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Every host of this cluster (or, with --role, the masters or the workers).
    #[arg(long, conflicts_with = "nodes", required_unless_present_any = ["nodes", "selector"])]
    cluster: Option<String>,
    /// Only hosts whose labels match (`zone=b,role!=gpu`, `ssd`, `!gpu`); alone: every enrolled
    /// node that matches.
    #[arg(short = 'l', long = "selector")]
    selector: Option<String>,
    /// With --cluster: only `master` or only `node` hosts.
    #[arg(long, requires = "cluster", value_parser = ["master", "node"])]
    role: Option<String>,
    /// Enrolled nodes by name, comma-separated.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Per host: give up after this long [default: 10m; ping: 30s].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Hosts working at once: N, or P% of the chosen hosts (rounded up) [default: 10; ping:
    /// every host].
    #[arg(long, value_name = "N|P%", value_parser = parse_parallel)]
    max_parallel: Option<String>,
    /// Failures tolerated, N or P% of the hosts: once more hosts have failed, no further host
    /// starts and the rest are reported as skipped [default: no limit].
    #[arg(long, value_name = "N|P%")]
    max_failures: Option<String>,
    /// Run this many hosts first, then pause until `controller op resume ID` (a failed canary
    /// host stops the rest).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    canary: Option<u32>,
    /// After a passed canary, start the rest by themselves after this long.
    #[arg(long, requires = "canary", value_parser = parse_duration)]
    auto_promote: Option<Duration>,
}

impl FleetArgs {
    pub fn request(self, argv: Vec<String>) -> ExecRequest {
        ExecRequest {
            cluster: self.cluster.unwrap_or_default(),
            role: self.role.unwrap_or_default(),
            nodes: self.nodes,
            argv,
            // 0: the operation's own default.
            timeout_secs: self.timeout.map(|t| t.as_secs().clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(0),
            // The number also in the field older controllers read.
            max_parallel: self.max_parallel.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
            max_parallel_spec: self.max_parallel.unwrap_or_default(),
            selector: self.selector.unwrap_or_default(),
            max_failures: self.max_failures.unwrap_or_default(),
            canary: self.canary.unwrap_or(0),
            auto_promote_secs: self.auto_promote.map(|d| d.as_secs().clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(0),
        }
    }
}

/// `--max-parallel`: 1-10000 hosts, or 1-100% of them.
fn parse_parallel(s: &str) -> Result<String, String> {
    let ok = match s.strip_suffix('%') {
        Some(p) => p.parse::<u32>().is_ok_and(|p| (1..=100).contains(&p)),
        None => s.parse::<u32>().is_ok_and(|n| (1..=10_000).contains(&n)),
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected 1-10000 hosts or 1-100%".into())
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    fleet: FleetArgs,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

pub async fn run(a: ExecArgs) -> anyhow::Result<()> {
    let mut c = client::connect(&a.data.data_dir).await?;
    let stream = c.exec(a.fleet.request(a.command)).await.map_err(rpc_error)?.into_inner();
    print_stream("exec", "the command", stream).await
}

/// Print a fleet operation's events as they come: each host's lines with the host in front, the
/// operation's notices on stderr, a summary at the end; an error if any host failed.
pub async fn print_stream(
    label: &str,
    what: &str,
    mut stream: tonic::Streaming<fleetadm_proto::ExecEvent>,
) -> anyhow::Result<()> {
    // Output arrives in pieces; each host's lines are printed whole, with the host in front.
    let mut partial: BTreeMap<String, String> = BTreeMap::new();
    let (mut ok, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = std::io::stdout();
    while let Some(ev) = stream.message().await.map_err(rpc_error)? {
        if ev.host.is_empty() {
            // About the operation itself.
            if ev.notice.is_empty() {
                eprintln!("{label}: operation {} (controller op list | pause | resume | abort {0})", term(&ev.op));
            } else {
                eprintln!("{label}: {}", term(&ev.notice));
            }
            continue;
        }
        let buf = partial.entry(ev.host.clone()).or_default();
        buf.push_str(&ev.output);
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            writeln!(out, "{} | {}", ev.host, term(line.trim_end_matches('\n')))?;
        }
        if ev.done {
            if !buf.is_empty() {
                writeln!(out, "{} | {}", ev.host, term(buf))?;
                buf.clear();
            }
            if ev.success {
                ok.push(ev.host);
            } else if ev.error.starts_with("skipped:") {
                skipped.push(ev.host);
            } else {
                writeln!(out, "{} | ! {}", ev.host, term(&ev.error))?;
                failed.push(ev.host);
            }
        }
        out.flush()?;
    }
    if ok.len() + failed.len() + skipped.len() == 0 {
        return Ok(());
    }
    eprintln!(
        "{label}: {} hosts, {} succeeded, {} failed, {} skipped",
        ok.len() + failed.len() + skipped.len(),
        ok.len(),
        failed.len(),
        skipped.len()
    );
    failed.sort();
    skipped.sort();
    match (failed.is_empty(), skipped.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => anyhow::bail!("{what} failed on {}", failed.join(", ")),
        _ => anyhow::bail!(
            "{what} failed on {}; over --max-failures, not started on {}",
            failed.join(", "),
            skipped.join(", ")
        ),
    }
}
