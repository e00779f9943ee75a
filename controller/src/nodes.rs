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
    /// Labels for selecting hosts (`controller nodes label`, `node-agent enroll --labels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Who asks to (re-)enroll a name: a newcomer with only a token, or the holder of one of the
/// name's current certificates (proved by the TLS handshake, checked against this record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim<'a> {
    Newcomer,
    /// The serial of the client certificate the request was made with.
    Holder(&'a str),
}

#[derive(Debug, Error)]
pub enum NodeError {
    // Never name anything of the other machine here: the asker has only a token.
    #[error("node name {name:?} is already enrolled; re-enroll from the host that holds its key (`node-agent enroll --force` there), choose another --node-name, or, to replace that host, run `controller nodes revoke {name}` and `controller nodes forget {name}` on the controller")]
    NameTaken { name: String },
    #[error("node {name:?} has been revoked; it cannot enroll again under this name until an operator runs `controller nodes forget {name}` on the controller")]
    Revoked { name: String },
    #[error("node {name:?} is not revoked; run `controller nodes revoke {name}` first (forgetting an active node would let another machine take its name)")]
    NotRevoked { name: String },
    #[error("no node named {0:?} is enrolled (see `controller nodes list`)")]
    Unknown(String),
    #[error("node {name:?} would have {count} labels; at most 64")]
    TooManyLabels { name: String, count: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// May `claim` take `name`, given its current record? A free name: anyone with a token. An
/// enrolled name: only the holder of its current (or just-renewed-from) certificate. A revoked
/// name: nobody, until an operator forgets the record.
pub fn judge_claim(cur: Option<&NodeRecord>, name: &str, claim: Claim<'_>) -> Result<(), NodeError> {
    let Some(rec) = cur else { return Ok(()) };
    if rec.revoked {
        return Err(NodeError::Revoked { name: name.into() });
    }
    match claim {
        Claim::Holder(serial) if rec.holds(serial) => Ok(()),
        _ => Err(NodeError::NameTaken { name: name.into() }),
    }
}

impl NodeRecord {
    /// Is `serial` one of this node's accepted certificates?
    pub fn holds(&self, serial: &str) -> bool {
        serial == self.cert_serial || self.previous_serial.as_deref() == Some(serial)
    }
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

    /// Refuse early (before a token is spent) a claim on a name that is taken or revoked.
    pub fn check_claim(&self, name: &str, claim: Claim<'_>) -> Result<(), NodeError> {
        judge_claim(self.get(name)?.as_ref(), name, claim)
    }

    /// Record a (re-)enrollment, atomically re-checking the name claim. Flushed.
    pub fn record_enrollment(
        &self,
        name: &str,
        machine_id: &str,
        claim: Claim<'_>,
        serial: &str,
        not_after: u64,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                judge_claim(cur.as_ref(), name, claim)?;
                // A re-enrollment keeps the operator's labels; the host's own are added.
                let mut all = cur.as_ref().map(|c| c.labels.clone()).unwrap_or_default();
                all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
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
                    labels: all,
                }))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// Set and remove labels of an enrolled node. Flushed.
    pub fn label(
        &self,
        name: &str,
        set: &std::collections::BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                let mut rec = cur.ok_or_else(|| NodeError::Unknown(name.into()))?;
                for k in remove {
                    rec.labels.remove(k);
                }
                rec.labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                if rec.labels.len() > 64 {
                    return Err(NodeError::TooManyLabels { name: name.into(), count: rec.labels.len() });
                }
                Ok::<_, NodeError>(Update::Put(rec))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// Record a renewed certificate, issued to a caller authenticated with `presented`. Flushed.
    ///
    /// The certificate the caller used stays accepted as the previous one until the new one is
    /// seen in use ([`Nodes::seen_in_use`]) or it expires: a reply lost on the way leaves the
    /// agent with a working certificate, and its retry (again with `presented`) replaces the
    /// never-used one instead of pushing `presented` out.
    pub fn record_renewal(
        &self,
        name: &str,
        presented: &str,
        serial: &str,
        not_after: u64,
    ) -> Result<NodeRecord, NodeError> {
        let out =
            store::update_json(&*self.store, Table::Nodes, name, Durability::Flush, |cur: Option<NodeRecord>| {
                let mut rec = cur.ok_or_else(|| NodeError::Unknown(name.into()))?;
                if rec.revoked {
                    return Err(NodeError::Revoked { name: name.into() });
                }
                if !rec.holds(presented) {
                    return Err(NodeError::NameTaken { name: name.into() });
                }
                rec.previous_serial = Some(presented.to_string());
                rec.cert_serial = serial.to_string();
                rec.cert_not_after = not_after;
                Ok::<_, NodeError>(Update::Put(rec))
            })?;
        out?.ok_or_else(|| NodeError::Unknown(name.into()))
    }

    /// The node connected with its current certificate: the one it replaced is no longer
    /// accepted (a copy of the old key is worth nothing from now on). Flushed; a no-op when there
    /// is nothing to drop.
    pub fn seen_in_use(&self, name: &str, serial: &str) -> Result<(), NodeError> {
        store::update_json(
            &*self.store,
            Table::Nodes,
            name,
            Durability::Flush,
            |cur: Option<NodeRecord>| match cur {
                Some(mut rec) if rec.cert_serial == serial && rec.previous_serial.is_some() => {
                    rec.previous_serial = None;
                    Ok::<_, NodeError>(Update::Put(rec))
                }
                _ => Ok(Update::Keep),
            },
        )??;
        Ok(())
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

    /// Delete a revoked node's record and facts: the only way a revoked name is freed. Flushed.
    pub fn forget(&self, name: &str) -> Result<NodeRecord, NodeError> {
        let rec = self.get(name)?.ok_or_else(|| NodeError::Unknown(name.into()))?;
        if !rec.revoked {
            return Err(NodeError::NotRevoked { name: name.into() });
        }
        // Facts first: a crash in between leaves a revoked record (still refusing), never facts
        // that a newcomer under this name would inherit.
        self.store.remove(Table::Facts, &format!("lb/{name}"), Durability::Lazy)?;
        self.store.remove(Table::Facts, name, Durability::Flush)?;
        store::update_json(
            &*self.store,
            Table::Nodes,
            name,
            Durability::Flush,
            |cur: Option<NodeRecord>| match cur {
                None => Err(NodeError::Unknown(name.into())),
                Some(r) if !r.revoked => Err(NodeError::NotRevoked { name: name.into() }),
                Some(_) => Ok(Update::Delete),
            },
        )??;
        Ok(rec)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_set_removed_bounded_and_kept_across_a_re_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = Nodes::new(Arc::new(crate::store::SledStore::open(dir.path()).unwrap()));
        let asked: std::collections::BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        nodes.record_enrollment("n1", "m1", Claim::Newcomer, "aa", 9, &asked).unwrap();
        let set = [("rack".to_string(), "r1".to_string())].into();
        let r = nodes.label("n1", &set, &["zone".to_string()]).unwrap();
        assert_eq!(r.labels, set);
        let again: std::collections::BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        let r = nodes.record_enrollment("n1", "m1", Claim::Holder("aa"), "bb", 9, &again).unwrap();
        assert_eq!(r.labels.len(), 2, "the operator's label stays, the host's is added: {:?}", r.labels);
        let many = (0..70).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(matches!(nodes.label("n1", &many, &[]), Err(NodeError::TooManyLabels { .. })));
        assert_eq!(nodes.get("n1").unwrap().unwrap().labels.len(), 2, "a refused change writes nothing");
        assert!(matches!(nodes.label("nope", &set, &[]), Err(NodeError::Unknown(_))));
    }

    fn rec(serial: &str, previous: Option<&str>, revoked: bool) -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            machine_id: "m1".into(),
            enrolled_at: 1,
            cert_serial: serial.into(),
            previous_serial: previous.map(Into::into),
            cert_not_after: 2,
            revoked,
            revoked_at: 0,
            last_seen_ms: 0,
            clock_skew_ms: 0,
            peer_address: String::new(),
            labels: Default::default(),
        }
    }

    #[test]
    fn a_name_moves_only_with_proof_and_never_once_revoked() {
        use Claim::*;
        let live = rec("aa", Some("bb"), false);
        let revoked = rec("aa", None, true);
        let cases: &[(Option<&NodeRecord>, Claim<'_>, Option<&str>)] = &[
            (None, Newcomer, None),
            (None, Holder("zz"), None),
            (Some(&live), Newcomer, Some("already enrolled")),
            (Some(&live), Holder("zz"), Some("already enrolled")),
            (Some(&live), Holder("aa"), None),
            (Some(&live), Holder("bb"), None),
            (Some(&revoked), Newcomer, Some("revoked")),
            (Some(&revoked), Holder("aa"), Some("revoked")),
        ];
        for (cur, claim, want) in cases {
            let got = judge_claim(*cur, "n1", *claim).err().map(|e| e.to_string());
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) => {
                    assert!(g.contains(w), "{claim:?}: {g}");
                    assert!(!g.contains("m1"), "no machine-id in errors: {g}");
                }
                _ => panic!("{claim:?} on {cur:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn forget_needs_a_revoked_record_and_removes_its_facts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let nodes = Nodes::new(store);
        nodes.record_enrollment("n1", "m1", Claim::Newcomer, "aa", 9, &Default::default()).unwrap();
        nodes.set_facts("n1", &Inventory { hostname: "h".into(), ..Default::default() }).unwrap();
        assert!(matches!(nodes.forget("n1"), Err(NodeError::NotRevoked { .. })));
        assert!(matches!(nodes.forget("nope"), Err(NodeError::Unknown(_))));
        nodes.revoke("n1").unwrap();
        assert!(matches!(
            nodes.record_enrollment("n1", "m1", Claim::Holder("aa"), "cc", 9, &Default::default()),
            Err(NodeError::Revoked { .. })
        ));
        nodes.forget("n1").unwrap();
        assert!(nodes.get("n1").unwrap().is_none());
        assert!(nodes.facts("n1").unwrap().is_none());
        nodes.record_enrollment("n1", "m2", Claim::Newcomer, "dd", 9, &Default::default()).unwrap();
    }

    #[test]
    fn a_lost_renewal_reply_never_strands_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let nodes = Nodes::new(store);
        nodes.record_enrollment("n1", "m1", Claim::Newcomer, "a", 9, &Default::default()).unwrap();
        // The agent asks with A; B is issued but the reply is lost; it asks again with A.
        nodes.record_renewal("n1", "a", "b", 9).unwrap();
        let rec = nodes.record_renewal("n1", "a", "c", 9).unwrap();
        assert!(rec.holds("a"), "the certificate in use must keep working: {rec:?}");
        assert!(rec.holds("c") && !rec.holds("b"), "{rec:?}");
        // Once C is seen in use, A is refused.
        nodes.seen_in_use("n1", "a").unwrap();
        assert!(nodes.get("n1").unwrap().unwrap().holds("a"));
        nodes.seen_in_use("n1", "c").unwrap();
        let rec = nodes.get("n1").unwrap().unwrap();
        assert!(!rec.holds("a") && rec.holds("c"), "{rec:?}");
        // A certificate that is not the node's cannot renew.
        assert!(nodes.record_renewal("n1", "a", "d", 9).is_err());
    }
}
