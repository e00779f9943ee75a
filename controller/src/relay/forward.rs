//! The relay an operator runs on a bastion (`controller relay`): it accepts agent connections,
//! dials the controller for each one, sends the signed header (the agent's real address), then
//! copies bytes both ways. It never terminates TLS: it cannot read the session or present an
//! agent's certificate, only vouch for where a connection came from. Each connection dials the
//! upstream afresh (resolving its name again), so a restarted controller is reached by the next
//! connection; while the upstream is down, agents are turned away and retry with their backoff.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::header;
use super::keys::SigningKey;

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The controller's agent port, `HOST:PORT` (resolved for every connection).
    pub upstream: String,
    /// The name the controller knows this relay by.
    pub name: String,
    pub max_connections: usize,
    pub connect_timeout: Duration,
}

/// Connection counts, logged every minute and served on `--metrics-listen`.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub over_limit: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_agents: AtomicU64,
}

impl RelayStats {
    /// The counts in Prometheus text format.
    pub fn render(&self, name: &str) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let l = format!("relay=\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""));
        format!(
            "# HELP fleetadm_relay_connections Connections being forwarded now.\n\
             # TYPE fleetadm_relay_connections gauge\n\
             fleetadm_relay_connections{{{l}}} {}\n\
             # HELP fleetadm_relay_connections_total Connections accepted.\n\
             # TYPE fleetadm_relay_connections_total counter\n\
             fleetadm_relay_connections_total{{{l}}} {}\n\
             # HELP fleetadm_relay_refused_total Connections closed at once: over the limit, or the upstream unreachable.\n\
             # TYPE fleetadm_relay_refused_total counter\n\
             fleetadm_relay_refused_total{{{l},reason=\"over_limit\"}} {}\n\
             fleetadm_relay_refused_total{{{l},reason=\"upstream\"}} {}\n\
             # HELP fleetadm_relay_bytes_total Bytes forwarded by closed connections, by direction.\n\
             # TYPE fleetadm_relay_bytes_total counter\n\
             fleetadm_relay_bytes_total{{{l},direction=\"upstream\"}} {}\n\
             fleetadm_relay_bytes_total{{{l},direction=\"agents\"}} {}\n",
            n(&self.active),
            n(&self.accepted),
            n(&self.over_limit),
            n(&self.upstream_failed),
            n(&self.bytes_to_upstream),
            n(&self.bytes_to_agents),
        )
    }
}

/// Forward connections accepted on `listener` until the process ends.
pub async fn run(listener: TcpListener, opts: RelayOptions, key: Arc<SigningKey>, stats: Arc<RelayStats>) {
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let opts = Arc::new(opts);
    let mut last_warn = None::<tokio::time::Instant>;
    loop {
        let (agent, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.over_limit.fetch_add(1, Ordering::Relaxed);
            if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_warn = Some(tokio::time::Instant::now());
                tracing::warn!(max = opts.max_connections, %peer, "relay: connection limit reached; closing new connections");
            }
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (opts, key, stats) = (opts.clone(), key.clone(), stats.clone());
        tokio::spawn(async move {
            let _slot = slot;
            stats.active.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = forward(agent, peer, &opts, &key, &stats).await {
                tracing::debug!(%peer, error = %e, "relay: connection ended");
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn forward(
    mut agent: TcpStream,
    peer: SocketAddr,
    opts: &RelayOptions,
    key: &SigningKey,
    stats: &RelayStats,
) -> std::io::Result<()> {
    let _ = agent.set_nodelay(true);
    let local = agent.local_addr()?;
    let mut up = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&opts.upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %opts.upstream, %peer, error = %e, "relay: cannot reach the controller; closing the agent's connection");
            return Err(e);
        }
        Err(_) => {
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %opts.upstream, %peer, "relay: connecting to the controller timed out");
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream connect timed out"));
        }
    };
    let _ = up.set_nodelay(true);
    let nonce: [u8; header::NONCE_LEN] = rand::random();
    let h = header::encode(peer, local, &opts.name, fleetadm_common::clock::now_unix_ms(), nonce, |m| key.sign(m))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    up.write_all(&h).await?;
    let (to_up, to_agent) = tokio::io::copy_bidirectional(&mut agent, &mut up).await?;
    stats.bytes_to_upstream.fetch_add(to_up, Ordering::Relaxed);
    stats.bytes_to_agents.fetch_add(to_agent, Ordering::Relaxed);
    Ok(())
}

/// Log the counts once a minute when they changed.
pub async fn log_counts(name: String, stats: Arc<RelayStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut last = (u64::MAX, u64::MAX);
    loop {
        tick.tick().await;
        let now = (stats.active.load(Ordering::Relaxed), stats.accepted.load(Ordering::Relaxed));
        if now != last {
            last = now;
            tracing::info!(
                relay = %name,
                active = now.0,
                accepted = now.1,
                refused_over_limit = stats.over_limit.load(Ordering::Relaxed),
                refused_upstream = stats.upstream_failed.load(Ordering::Relaxed),
                "relay connections"
            );
        }
    }
}
