//! The controller's side of relays: the registered relays (name and public key, durable in the
//! store), and the check each relayed connection's header must pass before
//! its source address is believed: a registered relay's valid signature, a timestamp within
//! [`MAX_SKEW_MS`] of the controller's clock, and a nonce not seen before in that window (a
//! header copied off the wire cannot be replayed). Removing a relay takes effect on the next
//! connection.
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::header::{Header, NONCE_LEN};
use super::keys::PublicKey;
use super::RelayError;
use crate::store::{self, Durability, Store, StoreError, Table};

/// How far a relay's clock may be from the controller's.
pub const MAX_SKEW_MS: u64 = 60_000;
/// Nonces remembered at once; a flood beyond it is refused rather than forgotten.
const MAX_NONCES: usize = 1_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayRecord {
    pub name: String,
    pub public_key: String,
    pub added_ms: u64,
}

/// Why a relayed connection is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("relay {0:?} is not registered (register it with `controller relays add {0} --public-key KEY`)")]
    Unknown(String),
    #[error("relay {0:?}: the signature does not verify with its registered public key")]
    BadSignature(String),
    #[error("relay {relay:?}: its clock is {skew_s}s away from the controller's (at most {}s allowed)", MAX_SKEW_MS / 1000)]
    Clock { relay: String, skew_s: i64 },
    #[error("relay {0:?}: this header was seen before (a replay)")]
    Replay(String),
    #[error("too many relayed connections in the replay window; refusing until it drains")]
    Busy,
    #[error("state store: {0}")]
    Store(String),
}

/// A header that passed: the agent's real address, vouched for by `relay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vouched {
    pub relay: String,
    pub source: SocketAddr,
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<[u8; NONCE_LEN], u64>,
    order: VecDeque<([u8; NONCE_LEN], u64)>,
}

impl Nonces {
    /// Record `nonce` (expiring at `until`), or `false` if it is already there.
    fn insert(&mut self, nonce: [u8; NONCE_LEN], now: u64, until: u64) -> Result<bool, Refusal> {
        while let Some((n, exp)) = self.order.front().copied() {
            if exp > now {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&n) == Some(&exp) {
                self.seen.remove(&n);
            }
        }
        if self.seen.contains_key(&nonce) {
            return Ok(false);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(Refusal::Busy);
        }
        self.seen.insert(nonce, until);
        self.order.push_back((nonce, until));
        Ok(true)
    }
}

pub struct Relays {
    store: Arc<dyn Store>,
    nonces: Mutex<Nonces>,
}

impl Relays {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, nonces: Mutex::default() }
    }

    /// Register (or re-key) a relay. Flushed before it is acknowledged.
    pub fn add(&self, name: &str, public_key: &str, now_ms: u64) -> Result<RelayRecord, RelayError> {
        crate::enroll::csr::validate_node_name(name).map_err(|_| RelayError::BadName(name.to_string()))?;
        if name.len() > super::header::MAX_NAME {
            return Err(RelayError::BadName(name.to_string()));
        }
        let key = PublicKey::parse(public_key)?;
        let rec = RelayRecord { name: name.to_string(), public_key: key.to_string(), added_ms: now_ms };
        store::put_json(&*self.store, Table::Relays, name, &rec, Durability::Flush)?;
        Ok(rec)
    }

    /// Forget a relay: connections it forwards are refused from now on.
    pub fn remove(&self, name: &str) -> Result<RelayRecord, RelayError> {
        let rec: RelayRecord = store::get_json(&*self.store, Table::Relays, name)?
            .ok_or_else(|| RelayError::UnknownRelay(name.to_string()))?;
        self.store.remove(Table::Relays, name, Durability::Flush)?;
        Ok(rec)
    }

    pub fn list(&self) -> Result<Vec<RelayRecord>, StoreError> {
        store::list_json(&*self.store, Table::Relays)
    }

    /// Check a relayed connection's header at `now_ms`. Reads the store (blocking): the key is
    /// looked up for every connection, so a removed relay is refused from the next one on.
    pub fn vouch(&self, h: &Header, now_ms: u64) -> Result<Vouched, Refusal> {
        let rec: Option<RelayRecord> = store::get_json(&*self.store, Table::Relays, &h.relay)
            .map_err(|e| Refusal::Store(fleetadm_common::error_chain(&e)))?;
        let Some(rec) = rec else { return Err(Refusal::Unknown(h.relay.clone())) };
        let key = PublicKey::parse(&rec.public_key).map_err(|_| Refusal::BadSignature(h.relay.clone()))?;
        if !key.verify(&h.signed, &h.signature) {
            return Err(Refusal::BadSignature(h.relay.clone()));
        }
        let skew = h.time_ms as i64 - now_ms as i64;
        if skew.unsigned_abs() > MAX_SKEW_MS {
            return Err(Refusal::Clock { relay: h.relay.clone(), skew_s: skew / 1000 });
        }
        // Remembered until the header's own time falls out of the window.
        let until = h.time_ms + MAX_SKEW_MS + 1;
        let fresh = match self.nonces.lock() {
            Ok(mut n) => n.insert(h.nonce, now_ms, until)?,
            Err(_) => return Err(Refusal::Busy),
        };
        if !fresh {
            return Err(Refusal::Replay(h.relay.clone()));
        }
        Ok(Vouched { relay: h.relay.clone(), source: h.source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::header;
    use crate::relay::keys::SigningKey;

    fn signed(k: &SigningKey, name: &str, time_ms: u64, nonce: u8) -> Header {
        let h = header::encode(
            "10.78.0.11:40000".parse().unwrap(),
            "10.78.0.254:9443".parse().unwrap(),
            name,
            time_ms,
            [nonce; 16],
            |m| k.sign(m),
        )
        .unwrap();
        let mut p = [0u8; header::PREFIX_LEN];
        p.copy_from_slice(&h[..header::PREFIX_LEN]);
        header::decode(&p, &h[header::PREFIX_LEN..]).unwrap()
    }

    #[test]
    fn vouches_only_for_registered_fresh_unreplayed_signed_headers_and_forgets_removed_relays() {
        let dir = tempfile::tempdir().unwrap();
        let st: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let relays = Relays::new(st.clone());
        let (k, _) = SigningKey::load_or_create(&dir.path().join("k")).unwrap();
        let (other, _) = SigningKey::load_or_create(&dir.path().join("o")).unwrap();
        let now = 1_000_000_000;

        assert_eq!(relays.vouch(&signed(&k, "bst", now, 1), now), Err(Refusal::Unknown("bst".into())));
        relays.add("bst", &k.public(), now).unwrap();
        let v = relays.vouch(&signed(&k, "bst", now, 1), now).unwrap();
        assert_eq!(v.source.to_string(), "10.78.0.11:40000");
        assert_eq!(relays.vouch(&signed(&k, "bst", now, 1), now + 5), Err(Refusal::Replay("bst".into())));
        assert_eq!(relays.vouch(&signed(&other, "bst", now, 2), now), Err(Refusal::BadSignature("bst".into())));
        assert!(matches!(relays.vouch(&signed(&k, "bst", now - 61_000, 3), now), Err(Refusal::Clock { .. })));
        assert!(matches!(relays.vouch(&signed(&k, "bst", now + 61_000, 4), now), Err(Refusal::Clock { .. })));
        // A tampered address breaks the signature.
        let mut h = signed(&k, "bst", now, 5);
        h.signed[20] ^= 1;
        assert_eq!(relays.vouch(&h, now), Err(Refusal::BadSignature("bst".into())));

        // Durable: a restarted controller knows the relay.
        drop(relays);
        let relays = Relays::new(st.clone());
        assert!(relays.vouch(&signed(&k, "bst", now, 6), now).is_ok());
        assert_eq!(relays.list().unwrap().len(), 1);
        relays.remove("bst").unwrap();
        assert_eq!(relays.vouch(&signed(&k, "bst", now, 7), now), Err(Refusal::Unknown("bst".into())));
        assert!(Relays::new(st).list().unwrap().is_empty());
        assert!(matches!(relays.remove("bst"), Err(RelayError::UnknownRelay(_))));
        assert!(matches!(relays.add("Bad Name", &k.public(), now), Err(RelayError::BadName(_))));
        assert!(matches!(relays.add("ok", "ed25519:xx", now), Err(RelayError::BadPublicKey(_))));
    }

    #[test]
    fn nonces_expire_with_their_window() {
        let mut n = Nonces::default();
        assert_eq!(n.insert([1; 16], 0, 100), Ok(true));
        assert_eq!(n.insert([1; 16], 50, 150), Ok(false));
        assert_eq!(n.insert([1; 16], 100, 200), Ok(true), "expired entries are dropped");
        assert_eq!(n.seen.len(), 1);
    }
}
