//! The node inventory: one record per enrolled node (identity, certificate, revocation) and its
//! latest facts. Identity-changing writes are flushed; liveness (last seen, clock skew) is lazy.
use std::sync::Arc;

use fleetadm_common::clock::now_unix;
use fleetadm_proto::Inventory;
use prost::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{self, Durability, Store, StoreError, Table, Update};

/// A node's non-loopback addresses from its facts.
pub fn addresses(facts: &Inventory) -> Vec<std::net::IpAddr> {
    facts
        .interfaces
        .iter()
        .filter(|i| i.name != "lo")
        .flat_map(|i| i.addresses.iter().filter_map(|a| a.split('/').next()?.parse().ok()))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub machine_id: String,
    pub enrolled_at: u64,
    /// Serial (hex) of the current certificate.
    pub cert_serial: String,
    /// Serial of the certificate replaced by the last renewal; still accepted until it expires,
    /// so a renewal never strands a node mid-session.
    #[serde(default)]
    pub previous_serial: Option<String>,
    pub cert_not_after: u64,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub revoked_at: u64,
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub clock_skew_ms: i64,
    #[serde(default)]
    pub peer_address: String,
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("node name {name:?} is already enrolled by another machine (machine-id {existing}); choose another --node-name, or run `controller nodes revoke {name}` first")]
    NameTaken { name: String, existing: String },
    #[error("no node named {0:?} is enrolled (see `controller nodes list`)")]
    Unknown(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Nodes {
    store: Arc<dyn Store>,
}

impl Nodes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub fn get(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        store::get_json(&*self.store, Table::Nodes, name)
    }

    pub fn list(&self) -> Result<Vec<NodeRecord>, StoreError> {
        store::list_json(&*self.store, Table::Nodes)
    }

    /// Refuse early (before a token is spent) if `name` belongs to another, unrevoked machine.
    pub fn check_claim(&self, name: &str, machine_id: &str) -> Result<(), NodeError> {
        match self.get(name)? {
            Some(rec) if !rec.revoked && rec.machine_id != machine_id => {
                Err(NodeError::NameTaken { name: name.into(), existing: rec.machine_id })
            }
            _ => Ok(()),
        }
    }

    /// Record a (re-)enrollment, atomically re-checking the name claim. Flushed.
    pub fn record_enrollment(
        &self,
        name: &str,
        machine_id: &str,
        serial: &str,
        not_after: u64,
    ) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                if let Some(rec) = &cur {
                    if !rec.revoked && rec.machine_id != machine_id {
                        return Err(NodeError::NameTaken { name: name.into(), existing: rec.machine_id.clone() });
                    }
                }
                Ok::<_, NodeError>(Update::Put(NodeRecord {
                    name: name.into(),
                    machine_id: machine_id.into(),
                    enrolled_at: now_unix(),
                    cert_serial: serial.into(),
                    previous_serial: None,
                    cert_not_after: not_after,
                    revoked: false,
                    revoked_at: 0,
                    last_seen_ms: cur.as_ref().map(|c| c.last_seen_ms).unwrap_or(0),
                    clock_skew_ms: 0,
                    peer_address: String::new(),
                }))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// Record a renewed certificate. Flushed.
    pub fn record_renewal(&self, name: &str, serial: &str, not_after: u64) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                let mut rec = cur.ok_or_else(|| NodeError::Unknown(name.into()))?;
                rec.previous_serial = Some(std::mem::replace(&mut rec.cert_serial, serial.into()));
                rec.cert_not_after = not_after;
                Ok::<_, NodeError>(Update::Put(rec))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// Revoke a node's certificates. Flushed before it returns.
    pub fn revoke(&self, name: &str) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                let mut rec = cur.ok_or_else(|| NodeError::Unknown(name.into()))?;
                if !rec.revoked {
                    rec.revoked = true;
                    rec.revoked_at = now_unix();
                }
                Ok::<_, NodeError>(Update::Put(rec))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// Liveness bookkeeping: not worth a flush.
    pub fn touch(
        &self,
        name: &str,
        last_seen_ms: u64,
        skew_ms: Option<i64>,
        peer: Option<&str>,
    ) -> Result<(), StoreError> {
        let out = store::update_json(&*self.store, Table::Nodes, name, Durability::Lazy, |cur: Option<NodeRecord>| {
            let Some(mut rec) = cur else { return Ok::<_, ()>(Update::Keep) };
            rec.last_seen_ms = last_seen_ms;
            if let Some(s) = skew_ms {
                rec.clock_skew_ms = s;
            }
            if let Some(p) = peer {
                rec.peer_address = p.to_string();
            }
            Ok(Update::Put(rec))
        })?;
        let _ = out;
        Ok(())
    }

    pub fn set_facts(&self, name: &str, facts: &Inventory) -> Result<(), StoreError> {
        self.store.put(Table::Facts, name, &facts.encode_to_vec(), Durability::Lazy)
    }

    /// The node's load balancer status (lazy: the guard reports again on its next change).
    pub fn set_lb_status(&self, name: &str, st: &fleetadm_proto::LbStatus) -> Result<(), StoreError> {
        self.store.put(Table::Facts, &format!("lb/{name}"), &st.encode_to_vec(), Durability::Lazy)
    }

    pub fn lb_status(&self, name: &str) -> Result<Option<fleetadm_proto::LbStatus>, StoreError> {
        Ok(self
            .store
            .get(Table::Facts, &format!("lb/{name}"))?
            .and_then(|b| fleetadm_proto::LbStatus::decode(b.as_slice()).ok()))
    }

    pub fn facts(&self, name: &str) -> Result<Option<Inventory>, StoreError> {
        Ok(self.store.get(Table::Facts, name)?.and_then(|b| Inventory::decode(b.as_slice()).ok()))
    }
}
