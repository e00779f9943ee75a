//! The audit log: every admin operation (who: the admin socket peer's uid; what; on what; when;
//! the result) and every task outcome (which host, which task, which attempt, the result), kept in
//! the store in time order and bounded to [`MAX_EVENTS`] (the oldest go first).
//!
//! Admin operations are flushed before the operation's answer goes back; task outcomes are
//! written after their (flushed) task record and reach the disk with the next flush (within a
//! second).
use std::sync::{Arc, Mutex};

use fleetadm_common::clock::now_unix_ms;
use serde::{Deserialize, Serialize};

use crate::store::{Durability, Store, StoreError, Table};

/// Events kept; the oldest are dropped beyond this.
pub const MAX_EVENTS: usize = 200_000;
/// Most events one query returns.
pub const MAX_QUERY: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log (time-ordered, unique).
    pub seq: u64,
    pub time_ms: u64,
    /// Who: `uid:N` (a peer of the admin socket), `node:NAME` (an agent), `controller`.
    pub actor: String,
    /// What: `cluster.create`, `node.revoke`, `task`, ...
    pub action: String,
    /// On what: a cluster, node, token id, bundle or task id.
    pub target: String,
    /// The cluster it concerns, if any.
    #[serde(default)]
    pub cluster: String,
    /// `ok`, `error: ...`, or a task's outcome.
    pub result: String,
    #[serde(default)]
    pub detail: String,
}

/// An event before it has its place in the log.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub cluster: String,
    pub result: String,
    pub detail: String,
}

impl NewEvent {
    pub fn new(actor: impl Into<String>, action: &str, target: impl Into<String>) -> Self {
        Self { actor: actor.into(), action: action.to_string(), target: target.into(), ..Default::default() }
    }

    pub fn cluster(mut self, c: impl Into<String>) -> Self {
        self.cluster = c.into();
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = d.into();
        self
    }

    /// `ok`, or `error: ` and the error's chain.
    pub fn outcome<T, E: std::error::Error + 'static>(mut self, r: &Result<T, E>) -> Self {
        self.result = match r {
            Ok(_) => "ok".into(),
            Err(e) => format!("error: {}", fleetadm_common::error_chain(e)),
        };
        self
    }

    pub fn result(mut self, r: impl Into<String>) -> Self {
        self.result = r.into();
        self
    }
}

/// Which events a query wants.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub cluster: Option<String>,
    pub since_ms: u64,
    /// The newest `limit` matching events (at most [`MAX_QUERY`]).
    pub limit: usize,
}

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Where the log ends and how long it is, learnt from the store on the first append.
#[derive(Debug, Clone, Copy)]
struct Tail {
    last_seq: u64,
    count: usize,
}

/// The log. Clones share one tail, so appends from the admin API and the rollouts interleave
/// without clashing; create one per store.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn Store>,
    tail: Arc<Mutex<Option<Tail>>>,
}

impl Audit {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, tail: Arc::default() }
    }

    /// Append an event (blocking: call off the async threads).
    pub fn record(&self, e: NewEvent, d: Durability) -> Result<Event, StoreError> {
        let mut guard = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut tail = match *guard {
            Some(t) => t,
            None => Tail {
                last_seq: self
                    .store
                    .last(Table::Events, 1)?
                    .pop()
                    .and_then(|(k, _)| k.parse::<u64>().ok())
                    .unwrap_or(0),
                count: self.store.count(Table::Events)?,
            },
        };
        let now = now_unix_ms();
        // Time-ordered across restarts (a millisecond holds a thousand), unique within the log.
        let seq = (tail.last_seq + 1).max(now.saturating_mul(1000));
        let ev = Event {
            seq,
            time_ms: now,
            actor: e.actor,
            action: e.action,
            target: e.target,
            cluster: e.cluster,
            result: fleetadm_common::redact::secrets(&e.result).into_owned(),
            detail: fleetadm_common::redact::secrets(&e.detail).into_owned(),
        };
        let bytes = serde_json::to_vec(&ev).map_err(|e| StoreError::Io { table: "events", source: Box::new(e) })?;
        self.store.put(Table::Events, &key(seq), &bytes, d)?;
        tail.last_seq = seq;
        tail.count += 1;
        while tail.count > MAX_EVENTS {
            if self.store.pop_first(Table::Events)?.is_none() {
                break;
            }
            tail.count -= 1;
        }
        *guard = Some(tail);
        Ok(ev)
    }

    /// The newest `q.limit` events that match, oldest first (blocking).
    pub fn query(&self, q: &Query) -> Result<Vec<Event>, StoreError> {
        let limit = q.limit.clamp(1, MAX_QUERY);
        let mut out = std::collections::VecDeque::with_capacity(limit.min(1024));
        let mut from = key(q.since_ms.saturating_mul(1000));
        loop {
            let page = self.store.range_from(Table::Events, &from, 1024)?;
            let Some((last, _)) = page.last() else { break };
            from = format!("{last}\u{0}");
            let full = page.len() == 1024;
            for (k, v) in page {
                let ev: Event = serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    table: "events",
                    key: k.clone(),
                    source,
                })?;
                if q.cluster.as_deref().is_some_and(|c| c != ev.cluster) {
                    continue;
                }
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(ev);
            }
            if !full {
                break;
            }
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn the_oldest_events_go_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let a = Audit::new(store.clone());
        *a.tail.lock().unwrap() = Some(Tail { last_seq: 0, count: MAX_EVENTS - 1 });
        let first = a.record(NewEvent::new("controller", "x", "1"), Durability::Lazy).unwrap();
        a.record(NewEvent::new("controller", "x", "2"), Durability::Lazy).unwrap();
        let left = a.query(&Query { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(left.len(), 1, "the log was full: the oldest went");
        assert_ne!(left[0], first);
        assert_eq!(store.count(Table::Events).unwrap(), 1);
    }

    #[test]
    fn events_are_ordered_filtered_redacted_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
            let a = Audit::new(store);
            let bad: Result<(), std::io::Error> = Err(std::io::Error::other("no such host"));
            a.record(NewEvent::new("uid:0", "cluster.create", "lab").cluster("lab").outcome(&bad), Durability::Flush)
                .unwrap();
            a.record(
                NewEvent::new("node:h1", "task", "lab/init/h1/kubeadm-init")
                    .cluster("lab")
                    .result("succeeded")
                    .detail("kubeadm join x --token abcdef.0123456789abcdef"),
                Durability::Flush,
            )
            .unwrap();
            a.record(NewEvent::new("uid:1000", "token.create", "qwerty").result("ok"), Durability::Flush).unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let a = Audit::new(store);
        let later = a.record(NewEvent::new("uid:0", "node.revoke", "h2").result("ok"), Durability::Flush).unwrap();
        let all = a.query(&Query { limit: 100, ..Default::default() }).unwrap();
        assert_eq!(all.len(), 4);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "time order, after a reopen too");
        assert_eq!(all[3], later);
        assert_eq!(all[0].result, "error: no such host");
        assert!(!all[1].detail.contains("0123456789abcdef"), "secrets redacted: {}", all[1].detail);
        let lab = a.query(&Query { cluster: Some("lab".into()), limit: 100, ..Default::default() }).unwrap();
        assert_eq!(lab.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["cluster.create", "task"]);
        let newest = a.query(&Query { limit: 2, ..Default::default() }).unwrap();
        assert_eq!(newest.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["token.create", "node.revoke"]);
        let since = a.query(&Query { since_ms: later.time_ms + 1, limit: 100, ..Default::default() }).unwrap();
        assert!(since.is_empty(), "{since:?}");
    }
}
