//! Accepting agent connections under limits: a global cap on open connections (a connection
//! over it is closed at once, before any TLS work), a deadline for the TLS handshake (a client
//! that connects and sends nothing, or sends slowly, loses its slot after it), and an idle
//! deadline afterwards. Handshakes run in their own tasks, so slow clients never delay others.
//! A connection forwarded by a relay starts with the relay's signed header (before TLS): its
//! source address is used only when a registered relay vouches for it; otherwise the connection
//! is closed before the handshake.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Conn;
use crate::relay::header;
use crate::relay::Relays;

use super::log_budget::{LogBudget, Verdict};

/// Refused relay headers are logged at most 50 times a minute (anyone can send one); the count
/// of those left out rides on the next line, and every refusal is counted in the metrics.
static REFUSED_LOG: LogBudget = LogBudget::new(50, Duration::from_secs(60));

#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, established or handshaking (10,000 agents and headroom by default).
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Close a connection that has sent nothing for this long (agents answer the server's
    /// HTTP/2 keepalive ping every 30 s, so a live agent never comes near it).
    pub idle_timeout: Duration,
    /// Session opens admitted per second; over it, agents are told when to retry.
    pub session_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            session_rate: crate::dispatch::service::DEFAULT_SESSION_RATE,
        }
    }
}

/// Counters for logs and benchmarks.
#[derive(Debug, Default)]
pub struct ListenStats {
    pub accepted: AtomicU64,
    pub over_limit: AtomicU64,
    pub handshake_failed: AtomicU64,
    pub handshake_timed_out: AtomicU64,
    /// Connections a registered relay vouched for, and relayed ones refused.
    pub relayed: AtomicU64,
    pub relay_refused: AtomicU64,
}

/// What went wrong before the TLS handshake of a relayed connection.
#[derive(Debug, thiserror::Error)]
enum RelayedError {
    #[error("reading the relay header")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Header(#[from] header::HeaderError),
    #[error(transparent)]
    Refused(#[from] crate::relay::Refusal),
    #[error("relay check task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// If the connection starts with a relay header (TLS starts with 0x16, the header with 0x0D),
/// read and check it: `Some(source)` is the agent's address as the relay vouched for it.
async fn relayed_source(
    tcp: &mut TcpStream,
    relays: &Arc<Relays>,
) -> Result<Option<std::net::SocketAddr>, RelayedError> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(RelayedError::Io)?;
    if n == 0 || first[0] != header::MAGIC[0] {
        return Ok(None);
    }
    let mut prefix = [0u8; header::PREFIX_LEN];
    tcp.read_exact(&mut prefix).await.map_err(RelayedError::Io)?;
    let len = header::body_len(&prefix)?;
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.map_err(RelayedError::Io)?;
    let h = header::decode(&prefix, &body)?;
    let relays = relays.clone();
    // The relay's key is read from the store: off the async workers.
    let v = tokio::task::spawn_blocking(move || relays.vouch(&h, fleetadm_common::clock::now_unix_ms()))
        .await
        .map_err(RelayedError::Task)??;
    tracing::debug!(relay = %v.relay, source = %v.source, "relayed connection");
    Ok(Some(v.source))
}

/// The TLS connections accepted on `listener`, for `Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Limits,
    stats: Arc<ListenStats>,
    relays: Arc<Relays>,
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut last_warn = None::<tokio::time::Instant>;
        loop {
            let (mut tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                stats.over_limit.fetch_add(1, Ordering::Relaxed);
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_warn = Some(tokio::time::Instant::now());
                    tracing::warn!(max = limits.max_connections, %peer, "connection limit reached; closing new connections");
                }
                drop(tcp);
                continue;
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, stats, limits) = (acceptor.clone(), tx.clone(), stats.clone(), limits.clone());
            let relays = relays.clone();
            tokio::spawn(async move {
                // The relay header and the handshake share one deadline.
                let handshake = async {
                    let source = match relayed_source(&mut tcp, &relays).await {
                        Ok(s) => s,
                        Err(e) => {
                            stats.relay_refused.fetch_add(1, Ordering::Relaxed);
                            crate::metrics::metrics().relayed("refused");
                            if let Verdict::Log { suppressed } = REFUSED_LOG.check() {
                                tracing::warn!(%peer, error = %fleetadm_common::error_chain(&e), suppressed, "relayed connection refused");
                            }
                            return None;
                        }
                    };
                    if source.is_some() {
                        stats.relayed.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::metrics().relayed("vouched");
                    }
                    Some(acceptor.accept(tcp).await.map(|tls| (tls, source)))
                };
                match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(None) => {}
                    Ok(Some(Ok((tls, source)))) => {
                        let _ = tx.send(Ok(Conn::new(tls, source, limits.idle_timeout, slot))).await;
                    }
                    Ok(Some(Err(e))) => {
                        stats.handshake_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        stats.handshake_timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
