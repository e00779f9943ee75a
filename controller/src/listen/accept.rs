//! Accepting agent connections under limits: a global cap on open connections (a connection
//! over it is closed at once, before any TLS work), a deadline for the TLS handshake (a client
//! that connects and sends nothing, or sends slowly, loses its slot after it), and an idle
//! deadline afterwards. Handshakes run in their own tasks, so slow clients never delay others.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::conn::Conn;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, established or handshaking (10,000 agents and headroom by default).
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Close a connection that has sent nothing for this long (agents answer the server's
    /// HTTP/2 keepalive ping every 30 s, so a live agent never comes near it).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
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
}

/// The TLS connections accepted on `listener`, for `Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Limits,
    stats: Arc<ListenStats>,
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut last_warn = None::<tokio::time::Instant>;
        loop {
            let (tcp, peer) = tokio::select! {
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
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Conn::new(tls, limits.idle_timeout, slot))).await;
                    }
                    Ok(Err(e)) => {
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
