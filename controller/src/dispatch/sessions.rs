//! Connected sessions: one server-to-agent stream per node. A newer session for the same node
//! replaces the older one; dropping a stream (agent gone) unregisters it.
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fleetadm_proto::ServerEvent;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

pub type EventTx = mpsc::Sender<Result<ServerEvent, Status>>;

struct Entry {
    id: u64,
    tx: EventTx,
    meta: Arc<SessionMeta>,
    since_ms: u64,
}

/// What the agent said (and where it connected from) when the session opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionMeta {
    /// The address the session's TCP connection came from (observed, not claimed).
    pub peer: String,
    pub agent_version: String,
    pub protocol: u32,
    /// Task capabilities the agent announced ("hosts-v1", ...).
    pub capabilities: std::collections::BTreeSet<String>,
    /// The port it serves blob chunks to peers on (0: none).
    pub peer_port: u16,
}

/// Information about a live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub peer: String,
    pub since_ms: u64,
    pub meta: Arc<SessionMeta>,
}

type OnClose = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    next: Arc<AtomicU64>,
    on_close: OnClose,
}

impl Sessions {
    /// `on_close` runs when a node's (current) session ends, e.g. to persist its last-seen time.
    pub fn new(on_close: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self { inner: Arc::default(), next: Arc::new(AtomicU64::new(1)), on_close: Arc::new(on_close) }
    }

    /// Register a new session for `node`, replacing (and thereby closing) any older one.
    pub fn open(&self, node: &str, meta: SessionMeta, now_ms: u64, buffer: usize) -> (u64, EventTx, SessionStream) {
        let (tx, rx) = mpsc::channel(buffer);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let meta = Arc::new(meta);
        let old = self
            .inner
            .lock()
            .map(|mut m| m.insert(node.to_string(), Entry { id, tx: tx.clone(), meta, since_ms: now_ms }))
            .ok()
            .flatten();
        drop(old);
        let guard = Guard { sessions: self.clone(), node: node.to_string(), id };
        (id, tx, SessionStream { rx, _guard: guard })
    }

    fn close_if_current(&self, node: &str, id: u64) {
        let removed = self
            .inner
            .lock()
            .map(|mut m| if m.get(node).map(|e| e.id) == Some(id) { m.remove(node).is_some() } else { false })
            .unwrap_or(false);
        if removed {
            (self.on_close)(node);
        }
    }

    pub fn info(&self, node: &str) -> Option<SessionInfo> {
        let m = self.inner.lock().ok()?;
        m.get(node).map(|e| SessionInfo {
            id: e.id,
            peer: e.meta.peer.clone(),
            since_ms: e.since_ms,
            meta: e.meta.clone(),
        })
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.info(node).is_some()
    }

    pub fn count(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Queue an event on a node's current session. Returns that session's id, or `None` when the
    /// node is not connected or its queue is full (the caller retries on its next round).
    pub fn send(&self, node: &str, ev: ServerEvent) -> Option<u64> {
        let (id, tx) = {
            let m = self.inner.lock().ok()?;
            let e = m.get(node)?;
            (e.id, e.tx.clone())
        };
        tx.try_send(Ok(ev)).ok().map(|_| id)
    }

    /// End every session (controller shutdown); agents reconnect with backoff.
    pub fn terminate_all(&self, reason: &str) {
        let nodes: Vec<String> = self.inner.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for n in nodes {
            self.terminate(
                &n,
                Some(ServerEvent {
                    event: Some(fleetadm_proto::server_event::Event::Shutdown(fleetadm_proto::Shutdown {
                        reason: reason.to_string(),
                        r#final: false,
                    })),
                }),
            );
        }
    }

    /// End a node's session now, sending `last` first when there is room.
    pub fn terminate(&self, node: &str, last: Option<ServerEvent>) {
        let entry = self.inner.lock().ok().and_then(|mut m| m.remove(node));
        if let Some(e) = entry {
            if let Some(ev) = last {
                let _ = e.tx.try_send(Ok(ev));
            }
            (self.on_close)(node);
        }
    }
}

struct Guard {
    sessions: Sessions,
    node: String,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.sessions.close_if_current(&self.node, self.id);
    }
}

/// The response stream of `Agent.OpenSession`: ends when the session is replaced or terminated.
pub struct SessionStream {
    rx: mpsc::Receiver<Result<ServerEvent, Status>>,
    _guard: Guard,
}

impl Stream for SessionStream {
    type Item = Result<ServerEvent, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn replacing_and_dropping_sessions() {
        let closed = Arc::new(AtomicUsize::new(0));
        let c = closed.clone();
        let s = Sessions::new(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let (_id1, tx1, stream1) = s.open("n1", SessionMeta::default(), 0, 4);
        assert!(s.is_connected("n1"));
        let (id2, _tx2, stream2) = s.open("n1", SessionMeta::default(), 0, 4);
        // dropping the replaced stream does not unregister the newer session
        drop(stream1);
        drop(tx1);
        assert_eq!(s.info("n1").unwrap().id, id2);
        assert_eq!(closed.load(Ordering::SeqCst), 0);
        drop(stream2);
        assert!(!s.is_connected("n1"));
        assert_eq!(closed.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn terminate_delivers_last_event_and_ends_stream() {
        let s = Sessions::new(|_| {});
        let (_id, tx, mut stream) = s.open("n1", SessionMeta::default(), 0, 4);
        drop(tx);
        s.terminate(
            "n1",
            Some(ServerEvent {
                event: Some(fleetadm_proto::server_event::Event::Shutdown(fleetadm_proto::Shutdown {
                    reason: "bye".into(),
                    r#final: true,
                })),
            }),
        );
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
        assert_eq!(s.count(), 0);
    }
}
