//! Pieces the benchmarks share: an agent's mTLS channel from its enrolled identity, heartbeat
//! round trips, percentiles.
use std::time::{Duration, Instant};

use fleetadm_agent::identity::Identity;
use fleetadm_common::dial::{self, DialOptions, PinReport, Trust};
use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::HeartbeatRequest;
use tonic::transport::Channel;

/// The `p` quantile (0..=1) of sorted microseconds, in milliseconds (NaN when empty).
pub fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// An Agent client over the identity's own mTLS connection to `addr`.
pub async fn connect(identity: &Identity, addr: &str) -> anyhow::Result<AgentClient<Channel>> {
    let cfg =
        dial::client_config(&Trust::Ca(identity.ca_der()?), Some(identity.tls_identity()?), PinReport::default())?;
    let ch = dial::connect(addr, cfg, &DialOptions::default()).await?;
    Ok(AgentClient::new(ch)
        .max_decoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES))
}

/// Heartbeat every `every` (after `delay`, to spread many callers over the interval), forever:
/// `record` gets each round trip in microseconds, or `None` for a failed call.
pub async fn heartbeats(
    client: AgentClient<Channel>,
    every: Duration,
    delay: Duration,
    mut record: impl FnMut(Option<u64>),
) {
    tokio::time::sleep(delay).await;
    let mut tick = tokio::time::interval(every);
    let mut c = client;
    loop {
        tick.tick().await;
        let t = Instant::now();
        let mut req =
            tonic::Request::new(HeartbeatRequest { agent_time_unix_ms: fleetadm_common::clock::now_unix_ms() });
        req.set_timeout(Duration::from_secs(10));
        let r = c.heartbeat(req).await;
        record(r.ok().map(|_| t.elapsed().as_micros() as u64));
    }
}
