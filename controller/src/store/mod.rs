//! The controller's state store.
//!
//! A deliberately small key-value interface ([`Store`]) so the sled implementation can later be
//! joined by a replicated one. Typed helpers on top keep JSON (de)serialisation in one place.
//! Every write says whether it must be durable: [`Durability::Flush`] writes are on disk before the
//! call returns, so the caller may acknowledge them.
mod sled_store;

pub use sled_store::SledStore;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// The logical tables of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Tokens,
    Nodes,
    Facts,
    Meta,
    /// One record per cluster (its request, plan, secrets and state).
    Clusters,
    /// One record per rollout task, keyed by task id (`cluster/phase/host/kind`).
    Tasks,
    /// Imported bundles, by name.
    Bundles,
    /// The audit log, keyed by a zero-padded sequence number (time order).
    Events,
    /// Registered relays (their public keys), by name.
    Relays,
    /// etcd backups, keyed `CLUSTER/ID`.
    Backups,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Tokens => "tokens",
            Table::Nodes => "nodes",
            Table::Facts => "facts",
            Table::Meta => "meta",
            Table::Clusters => "clusters",
            Table::Tasks => "tasks",
            Table::Bundles => "bundles",
            Table::Events => "events",
            Table::Relays => "relays",
            Table::Backups => "backups",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk before the call returns.
    Flush,
    /// Written to the store now, flushed in the background (within about a second).
    Lazy,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the state store at {path}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("state store I/O on table {table}")]
    Io {
        table: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("corrupt record {key:?} in table {table}")]
    Corrupt {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {key:?} in table {table} kept changing under concurrent updates")]
    Contended { table: &'static str, key: String },
    #[error("the store worker thread failed")]
    Worker(#[source] tokio::task::JoinError),
}

/// Run store work (reads, writes, flushes) on a blocking thread, so an fsync never stalls the
/// async workers that carry heartbeats and sessions.
pub async fn off_thread<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| E::from(StoreError::Worker(e)))?
}

/// Raw key-value operations. Keys are UTF-8 strings; values opaque bytes.
pub trait Store: Send + Sync + 'static {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, table: Table, key: &str, value: &[u8], d: Durability) -> Result<(), StoreError>;
    fn remove(&self, table: Table, key: &str, d: Durability) -> Result<bool, StoreError>;
    /// All entries of a table in key order.
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Entries whose key starts with `prefix`, in key order.
    fn list_prefix(&self, table: Table, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Up to `limit` entries whose key is at or after `from`, in key order.
    fn range_from(&self, table: Table, from: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The last `n` entries in key order (oldest of them first).
    fn last(&self, table: Table, n: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// How many entries the table holds (a full scan: call rarely).
    fn count(&self, table: Table) -> Result<usize, StoreError>;
    /// Remove and return the entry with the smallest key.
    fn pop_first(&self, table: Table) -> Result<Option<String>, StoreError>;
    /// Replace `expected` with `new` atomically; `Ok(false)` when the current value differs.
    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
        d: Durability,
    ) -> Result<bool, StoreError>;
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table: table.name(),
        key: key.to_string(),
        source,
    })
}

fn encode<T: Serialize>(table: Table, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Io { table: table.name(), source: Box::new(e) })
}

pub fn get_json<T: DeserializeOwned>(s: &dyn Store, table: Table, key: &str) -> Result<Option<T>, StoreError> {
    s.get(table, key)?.map(|b| decode(table, key, &b)).transpose()
}

pub fn put_json<T: Serialize>(
    s: &dyn Store,
    table: Table,
    key: &str,
    value: &T,
    d: Durability,
) -> Result<(), StoreError> {
    s.put(table, key, &encode(table, value)?, d)
}

pub fn list_json<T: DeserializeOwned>(s: &dyn Store, table: Table) -> Result<Vec<T>, StoreError> {
    s.list(table)?.into_iter().map(|(k, v)| decode(table, &k, &v)).collect()
}

pub fn list_prefix_json<T: DeserializeOwned>(s: &dyn Store, table: Table, prefix: &str) -> Result<Vec<T>, StoreError> {
    s.list_prefix(table, prefix)?.into_iter().map(|(k, v)| decode(table, &k, &v)).collect()
}

/// Outcome of an [`update_json`] closure.
pub enum Update<T> {
    Keep,
    Put(T),
    Delete,
}

/// Atomic read-modify-write of one JSON record. `f` may refuse with a domain error `E`, in which
/// case nothing is written. Retries on concurrent modification.
pub fn update_json<T, E, F>(
    s: &dyn Store,
    table: Table,
    key: &str,
    d: Durability,
    mut f: F,
) -> Result<Result<Option<T>, E>, StoreError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Result<Update<T>, E>,
{
    for _ in 0..64 {
        let raw = s.get(table, key)?;
        let current: Option<T> = raw.as_deref().map(|b| decode(table, key, b)).transpose()?;
        let decision = match f(current) {
            Ok(dec) => dec,
            Err(e) => return Ok(Err(e)),
        };
        let (new_bytes, result) = match decision {
            Update::Keep => {
                let cur = raw.as_deref().map(|b| decode(table, key, b)).transpose()?;
                return Ok(Ok(cur));
            }
            Update::Put(v) => (Some(encode(table, &v)?), Some(v)),
            Update::Delete => (None, None),
        };
        if s.compare_and_swap(table, key, raw.as_deref(), new_bytes, d)? {
            return Ok(Ok(result));
        }
    }
    Err(StoreError::Contended { table: table.name(), key: key.to_string() })
}
