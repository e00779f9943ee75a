//! The controller's shared state, handed to every service.
use std::sync::Arc;
use std::time::Duration;

use crate::dispatch::Sessions;
use crate::enroll::Tokens;
use crate::nodes::Nodes;
use crate::pki::FleetCa;
use crate::rollout::{RolloutSettings, Rollouts};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of node client certificates.
    pub node_cert_validity: Duration,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// What agents should dial (HOST:PORT), shown in the enrollment command.
    pub enroll_endpoint: String,
    /// The controller's data directory (state store, PKI, blobs).
    pub data_dir: std::path::PathBuf,
}

/// Blob chunks served at once, in all.
pub const TRANSFER_SLOTS: usize = 32;
/// ... and to one node (an agent keeps 4 chunk requests in flight).
pub const NODE_TRANSFER_SLOTS: usize = 4;

pub struct Controller {
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    pub nodes: Arc<Nodes>,
    pub ca: FleetCa,
    pub sessions: Sessions,
    pub rollouts: Arc<Rollouts>,
    pub bundles: Arc<crate::bundle::Bundles>,
    /// Registered relays, whose signed headers say where relayed agents really connect from.
    pub relays: Arc<crate::relay::Relays>,
    /// etcd backups of the clusters.
    pub backups: Arc<crate::ops::backup::Backups>,
    /// Bounds the blob chunks served at once (transfers to many agents share the disk and link).
    pub transfers: Arc<tokio::sync::Semaphore>,
    /// Each node's own share of those slots.
    node_transfers: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Who holds which blob, for peer-to-peer fetches.
    pub swarm: crate::dispatch::peers::Swarm,
    pub settings: Settings,
}

/// The secret the agents' peer keys derive from: made once, kept in the store (flushed).
fn peer_secret(store: &dyn Store) -> Vec<u8> {
    use crate::store::{Durability, Table};
    if let Ok(Some(s)) = store.get(Table::Meta, "peer-secret") {
        if s.len() == 32 {
            return s;
        }
    }
    let mut s = vec![0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s).is_err() {
        tracing::error!("no randomness for the peer secret; peer-to-peer fetches stay off");
        return Vec::new();
    }
    if let Err(e) = store.put(Table::Meta, "peer-secret", &s, Durability::Flush) {
        tracing::warn!(error = %e, "peer secret not stored; peer tickets change with the next restart");
    }
    s
}

impl Controller {
    pub fn new(store: Arc<dyn Store>, ca: FleetCa, settings: Settings) -> Arc<Self> {
        let nodes = Arc::new(Nodes::new(store.clone()));
        let on_close_nodes = nodes.clone();
        let sessions = Sessions::new(move |name| {
            let _ = on_close_nodes.touch(name, fleetadm_common::clock::now_unix_ms(), None, None);
            tracing::info!(node = name, "session closed");
        });
        let rollouts = Rollouts::new(store.clone(), sessions.clone(), RolloutSettings::default());
        let bundles = Arc::new(crate::bundle::Bundles::new(store.clone(), &settings.data_dir));
        let secret = peer_secret(&*store);
        Arc::new(Self {
            swarm: crate::dispatch::peers::Swarm::new(&secret),
            tokens: Tokens::new(store.clone()),
            relays: Arc::new(crate::relay::Relays::new(store.clone())),
            backups: crate::ops::backup::Backups::new(store.clone(), &settings.data_dir),
            nodes,
            store,
            ca,
            sessions,
            rollouts,
            bundles,
            transfers: Arc::new(tokio::sync::Semaphore::new(TRANSFER_SLOTS)),
            node_transfers: Default::default(),
            settings,
        })
    }

    /// The semaphore a node's blob requests queue on before they take a shared slot.
    pub fn node_transfers(&self, node: &str) -> Arc<tokio::sync::Semaphore> {
        let mut m = self.node_transfers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(node.to_string()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(NODE_TRANSFER_SLOTS))).clone()
    }

    /// Make lazily written liveness data durable before exit (one flushed write flushes all).
    pub fn store_flush(&self) {
        let now = fleetadm_common::clock::now_unix_ms().to_string();
        if let Err(e) =
            self.store.put(crate::store::Table::Meta, "last-shutdown", now.as_bytes(), crate::store::Durability::Flush)
        {
            tracing::warn!(error = %e, "final flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_never_holds_every_transfer_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let settings = Settings {
            node_cert_validity: Duration::from_secs(3600),
            heartbeat_interval: Duration::from_secs(15),
            enroll_endpoint: String::new(),
            data_dir: dir.path().to_path_buf(),
        };
        let ctl = Controller::new(store, ca, settings);
        // A greedy node takes all of its own slots, and with them a few shared ones...
        let greedy = ctl.node_transfers("greedy");
        let mut held = Vec::new();
        while let Ok(own) = greedy.clone().try_acquire_owned() {
            held.push((own, ctl.transfers.clone().try_acquire_owned().unwrap()));
            assert!(held.len() <= NODE_TRANSFER_SLOTS);
        }
        assert_eq!(held.len(), NODE_TRANSFER_SLOTS);
        // ... and waits for them; the others still find shared slots free.
        assert!(ctl.node_transfers("greedy").try_acquire().is_err(), "same semaphore for the same node");
        assert!(ctl.node_transfers("other").try_acquire().is_ok());
        assert_eq!(ctl.transfers.available_permits(), TRANSFER_SLOTS - NODE_TRANSFER_SLOTS);
    }
}
