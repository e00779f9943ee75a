//! `controller events`: the audit log (admin operations and task outcomes).
use std::time::Duration;

use clap::Args;
use fleetadm_common::clock::{now_unix_ms, parse_duration, rfc3339_ms};
use fleetadm_common::output::{render_structured, table};
use fleetadm_proto::ListEventsRequest;
use serde::Serialize;

use super::{rpc_error, DataDir, Output};
use crate::admin::client;

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    out: Output,
    /// Only events of this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Only events of the last D (e.g. 30m, 6h, 7d).
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// Show the newest N matching events (at most 10000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
}

#[derive(Serialize)]
struct EventView {
    seq: u64,
    time: String,
    actor: String,
    action: String,
    target: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    cluster: String,
    result: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
}

pub async fn run(a: EventsArgs) -> anyhow::Result<()> {
    let since_unix_ms = a.since.map(|d| now_unix_ms().saturating_sub(d.as_millis() as u64)).unwrap_or(0);
    let mut c = client::connect(&a.data.data_dir).await?;
    let list = c
        .list_events(ListEventsRequest { cluster: a.cluster.unwrap_or_default(), since_unix_ms, limit: a.limit })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let views: Vec<EventView> = list
        .events
        .into_iter()
        .map(|e| EventView {
            seq: e.seq,
            time: rfc3339_ms(e.time_unix_ms),
            actor: e.actor,
            action: e.action,
            target: e.target,
            cluster: e.cluster,
            result: e.result,
            detail: e.detail,
        })
        .collect();
    match render_structured(&views, a.out.output) {
        Some(s) => println!("{s}"),
        None => {
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|v| {
                    let result =
                        if v.detail.is_empty() { v.result.clone() } else { format!("{}: {}", v.result, v.detail) };
                    vec![v.time.clone(), v.actor.clone(), v.action.clone(), v.target.clone(), result]
                })
                .collect();
            print!("{}", table(&["TIME", "WHO", "WHAT", "ON", "RESULT"], &rows));
        }
    }
    Ok(())
}
