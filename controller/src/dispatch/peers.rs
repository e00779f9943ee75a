//! Which source each agent fetches a blob from: the controller, or a peer that holds (or is
//! fetching) it. Every agent that asks for a blob becomes one of its holders; a new asker is sent
//! to the earliest holder with fewer than [`FANOUT`] downstream, else to the controller. So
//! the first agents fetch from the controller and the rest fan out from them as a tree, each
//! byte leaving the controller about once per branch instead of once per host. A peer is only
//! chosen while its session is open and it announced a peer port; the answer for an
//! (agent, blob) pair stays the same until the agent gives up on that peer.
//!
//! Tickets: the controller signs (requester, holder, blob, expiry) with the holder's peer key
//! (HMAC-SHA256 of the controller's peer secret and the holder's name, handed to the holder in
//! its Welcome). The holder serves only a request whose ticket it can verify and whose client
//! certificate names the ticket's requester: a peer serves exactly whom the controller sent.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fleetadm_proto::{PeerSource, PeerTicket};
use ring::hmac;

/// Downstream agents one holder serves at once.
pub const FANOUT: usize = 2;
/// How long a ticket is good for.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// A blob nobody asked for in this long is forgotten.
const IDLE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Controller,
    Peer(String),
}

#[derive(Default)]
struct BlobSwarm {
    /// Agents that asked for the blob, in order (they hold it, or some of it).
    holders: Vec<String>,
    is_holder: std::collections::HashSet<String>,
    /// Holders before this index were full when last looked at, so the search starts here:
    /// choosing costs O(1) amortised, not O(holders), with 10,000 agents on one blob. (A holder
    /// whose downstream later gave up on it is not offered again: its room is lost, nothing else.)
    full_before: usize,
    assigned: HashMap<String, Source>,
    /// Downstream per holder.
    loads: HashMap<String, usize>,
    last_ms: u64,
}

impl BlobSwarm {
    fn load(&self, holder: &str) -> usize {
        self.loads.get(holder).copied().unwrap_or(0)
    }

    fn assign(&mut self, requester: &str, to: Source) {
        if let Some(Source::Peer(old)) = self.assigned.get(requester) {
            if let Some(l) = self.loads.get_mut(old) {
                *l = l.saturating_sub(1);
            }
        }
        if let Source::Peer(h) = &to {
            *self.loads.entry(h.clone()).or_default() += 1;
        }
        self.assigned.insert(requester.to_string(), to);
    }
}

/// The controller's view of who holds which blob.
pub struct Swarm {
    /// Off without a secret (no randomness at start): everything comes from the controller.
    enabled: bool,
    secret: hmac::Key,
    blobs: Mutex<HashMap<String, BlobSwarm>>,
}

impl Swarm {
    pub fn new(secret: &[u8]) -> Self {
        Self { enabled: !secret.is_empty(), secret: hmac::Key::new(hmac::HMAC_SHA256, secret), blobs: Mutex::default() }
    }

    /// The key `node`'s tickets are signed with.
    pub fn peer_key(&self, node: &str) -> Vec<u8> {
        hmac::sign(&self.secret, format!("fleetadm peer key\0{node}").as_bytes()).as_ref().to_vec()
    }

    /// Where `requester` fetches blob `sha256` from. `reachable(node)`: a peer address when the
    /// node serves peers now. `peers_ok` false: the requester gave up on peers for this blob.
    pub fn route(
        &self,
        requester: &str,
        sha256: &str,
        peers_ok: bool,
        serves: bool,
        now_ms: u64,
        reachable: impl Fn(&str) -> Option<String>,
    ) -> Option<PeerSource> {
        if !self.enabled {
            return None;
        }
        let mut blobs = self.blobs.lock().ok()?;
        blobs.retain(|_, b| now_ms.saturating_sub(b.last_ms) < IDLE.as_millis() as u64);
        let b = blobs.entry(sha256.to_string()).or_default();
        b.last_ms = now_ms;
        if serves && b.is_holder.insert(requester.to_string()) {
            b.holders.push(requester.to_string());
        }
        if !peers_ok {
            if b.assigned.get(requester) != Some(&Source::Controller) {
                b.assign(requester, Source::Controller);
            }
            return None;
        }
        if let Some(Source::Peer(h)) = b.assigned.get(requester) {
            if let Some(addr) = reachable(h) {
                let h = h.clone();
                return Some(self.source(requester, &h, addr, sha256, now_ms));
            }
        } else if b.assigned.contains_key(requester) {
            return None;
        }
        // The earliest holder with room: it has the most of the blob, and filling holders in
        // order makes a tree FANOUT wide (depth log_FANOUT(hosts)), not a long chain.
        while b.full_before < b.holders.len() && b.load(&b.holders[b.full_before]) >= FANOUT {
            b.full_before += 1;
        }
        let best = b.holders[b.full_before..]
            .iter()
            .filter(|h| *h != requester && b.load(h) < FANOUT)
            .find_map(|h| reachable(h).map(|addr| (h.clone(), addr)));
        match best {
            Some((h, addr)) => {
                b.assign(requester, Source::Peer(h.clone()));
                Some(self.source(requester, &h, addr, sha256, now_ms))
            }
            None => {
                b.assign(requester, Source::Controller);
                None
            }
        }
    }

    fn source(&self, requester: &str, holder: &str, address: String, sha256: &str, now_ms: u64) -> PeerSource {
        let mut ticket = PeerTicket {
            requester: requester.to_string(),
            holder: holder.to_string(),
            sha256: sha256.to_string(),
            expires_unix_ms: now_ms + TICKET_TTL.as_millis() as u64,
            mac: Vec::new(),
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.peer_key(holder));
        ticket.mac = hmac::sign(&key, &ticket_message(&ticket)).as_ref().to_vec();
        PeerSource { node: holder.to_string(), address, ticket: Some(ticket) }
    }
}

/// What a ticket's MAC covers (the agent computes the same).
pub use fleetadm_common::tasks::peer_ticket_message as ticket_message;

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "aa";

    #[test]
    fn the_first_asker_gets_the_controller_then_a_tree_of_at_most_fanout_per_holder() {
        let s = Swarm::new(b"secret");
        let all = |n: &str| Some(format!("10.0.0.{}:7451", &n[1..]));
        assert_eq!(s.route("h1", SHA, true, true, 1, all), None, "nobody holds it yet");
        let mut from: HashMap<String, String> = HashMap::new();
        for i in 2..=14 {
            let h = format!("h{i}");
            let src = s.route(&h, SHA, true, true, 1, all).expect("a peer");
            assert_ne!(src.node, h);
            from.insert(h, src.node);
        }
        let mut load: HashMap<&str, usize> = HashMap::new();
        for p in from.values() {
            *load.entry(p).or_default() += 1;
        }
        assert!(load.values().all(|l| *l <= FANOUT), "{load:?}");
        assert_eq!(load["h1"], FANOUT);
        // Sticky: the same answer again.
        assert_eq!(s.route("h5", SHA, true, true, 2, all).unwrap().node, from["h5"]);
        // Given up on peers: the controller, and it stays so.
        assert_eq!(s.route("h5", SHA, false, true, 3, all), None);
        assert_eq!(s.route("h5", SHA, true, true, 4, all), None);
    }

    #[test]
    fn ten_thousand_agents_on_one_blob_form_a_tree_and_fallbacks_free_room() {
        let s = Swarm::new(b"secret");
        let all = |_: &str| Some("10.0.0.1:7451".to_string());
        let names: Vec<String> = (0..10_000).map(|i| format!("n{i}")).collect();
        let mut from_controller = 0;
        for n in &names {
            if s.route(n, SHA, true, true, 1, all).is_none() {
                from_controller += 1;
            }
        }
        assert_eq!(from_controller, 1, "only the first asker is served by the controller");
        {
            let blobs = s.blobs.lock().unwrap();
            let b = &blobs[SHA];
            assert!(b.loads.values().all(|l| *l <= FANOUT));
            assert_eq!(b.loads.values().sum::<usize>(), 9_999);
            // A downstream that gives up frees its holder's room.
            let Some(Source::Peer(h)) = b.assigned.get("n9999").cloned() else { panic!() };
            let before = b.load(&h);
            drop(blobs);
            assert_eq!(s.route("n9999", SHA, false, true, 2, all), None);
            assert_eq!(s.blobs.lock().unwrap()[SHA].load(&h), before - 1);
        }
    }

    #[test]
    fn unreachable_or_non_serving_agents_are_never_chosen() {
        let s = Swarm::new(b"secret");
        let none = |_: &str| None;
        assert_eq!(s.route("h1", SHA, true, true, 1, none), None);
        assert_eq!(s.route("h2", SHA, true, true, 1, none), None, "h1 has no open session");
        let s = Swarm::new(b"secret");
        let all = |_: &str| Some("10.0.0.1:7451".to_string());
        assert_eq!(s.route("h1", SHA, true, false, 1, all), None);
        assert_eq!(s.route("h2", SHA, true, false, 1, all), None, "h1 does not serve peers");
        // A holder that went away: the requester is sent elsewhere.
        let s = Swarm::new(b"secret");
        s.route("h1", SHA, true, true, 1, all);
        s.route("h2", SHA, true, true, 1, all);
        assert_eq!(s.route("h3", SHA, true, true, 1, all).unwrap().node, "h1");
        let not_h1 = |n: &str| (n != "h1").then(|| "10.0.0.2:7451".to_string());
        assert_eq!(s.route("h3", SHA, true, true, 2, not_h1).map(|p| p.node), Some("h2".into()));
    }

    #[test]
    fn tickets_are_signed_with_the_holders_key_only() {
        let s = Swarm::new(b"secret");
        let all = |_: &str| Some("10.0.0.1:7451".to_string());
        s.route("h1", SHA, true, true, 1, all);
        let src = s.route("h2", SHA, true, true, 1000, all).unwrap();
        let t = src.ticket.unwrap();
        assert_eq!((t.requester.as_str(), t.holder.as_str(), t.expires_unix_ms), ("h2", "h1", 1000 + 600_000));
        let verify =
            |key: &[u8]| hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), &ticket_message(&t), &t.mac).is_ok();
        assert!(verify(&s.peer_key("h1")));
        assert!(!verify(&s.peer_key("h2")), "another node's key does not verify it");
        assert!(!verify(&Swarm::new(b"other").peer_key("h1")), "another controller's neither");
        let mut forged = t.clone();
        forged.requester = "h9".into();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &s.peer_key("h1"));
        assert!(hmac::verify(&key, &ticket_message(&forged), &t.mac).is_err());
    }
}
