//! The health guard (fleetadm's lvscare): probes each real server on its own schedule, takes a
//! failing one out of rotation (weight 0 after `fall` failures, removed after `fall` more), and
//! brings it back after `rise` successes. A server that answers "not ready" (an apiserver shutting
//! down fails `/readyz` while it still serves) leaves rotation on that first answer: it said so
//! itself, and it keeps serving the connections it has. It never empties the VIP because of failing probes:
//! when every server fails, it keeps the last applied set and says so.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::ipvs::Dest;
use super::probe::ProbeFailure;
use super::reconcile::Desired;

#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self { interval: Duration::from_millis(500), timeout: Duration::from_secs(1), fall: 2, rise: 2 }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServerStatus {
    pub address: SocketAddr,
    pub healthy: bool,
    pub weight: Option<u32>,
    pub last_probe: String,
    pub last_probe_unix_ms: u64,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct GuardStatus {
    pub vip: SocketAddr,
    pub servers: Vec<ServerStatus>,
    /// Every real server is failing; the last known set is kept.
    pub all_failing: bool,
}

#[derive(Debug, Clone)]
struct RsState {
    healthy: bool,
    /// Out of the kernel table until it is healthy again.
    removed: bool,
    ok: u32,
    fail: u32,
    last: String,
    last_ms: u64,
}

/// The guard's decision logic, free of I/O.
#[derive(Debug, Clone)]
pub struct Guard {
    vip: SocketAddr,
    scheduler: String,
    cfg: GuardConfig,
    states: BTreeMap<SocketAddr, RsState>,
    last_applied: Option<Desired>,
}

impl Guard {
    /// Start from what the kernel already has, so an agent restart changes nothing: a server
    /// present with weight > 0 is healthy, with weight 0 is out of rotation; new ones start
    /// healthy and must prove otherwise.
    /// `previous`: the status the last guard published, so a server it had removed stays out.
    pub fn new(
        vip: SocketAddr,
        scheduler: &str,
        servers: &[SocketAddr],
        cfg: GuardConfig,
        kernel: &[Dest],
        previous: Option<&GuardStatus>,
    ) -> Self {
        let states = servers
            .iter()
            .map(|rs| {
                let was_removed = previous
                    .filter(|p| p.vip == vip)
                    .and_then(|p| p.servers.iter().find(|s| s.address == *rs))
                    .map(|s| !s.healthy && s.weight.is_none())
                    .unwrap_or(false);
                let in_kernel = kernel.iter().find(|d| d.addr == *rs);
                let removed = in_kernel.is_none() && was_removed;
                let healthy = !removed && in_kernel.map(|d| d.weight > 0).unwrap_or(true);
                let st = RsState {
                    healthy,
                    removed,
                    ok: if healthy { cfg.rise } else { 0 },
                    fail: if healthy {
                        0
                    } else if removed {
                        cfg.fall.saturating_mul(2)
                    } else {
                        cfg.fall
                    },
                    last: "not probed yet".into(),
                    last_ms: 0,
                };
                (*rs, st)
            })
            .collect();
        Self { vip, scheduler: scheduler.to_string(), cfg, states, last_applied: None }
    }

    /// Record one probe result. Returns true if the server's health flipped.
    pub fn observe(&mut self, rs: SocketAddr, result: Result<(), ProbeFailure>, now_ms: u64) -> bool {
        let (fall, rise) = (self.cfg.fall.max(1), self.cfg.rise.max(1));
        let Some(st) = self.states.get_mut(&rs) else { return false };
        st.last_ms = now_ms;
        let before = st.healthy;
        match result {
            Ok(()) => {
                st.ok = st.ok.saturating_add(1);
                st.fail = 0;
                st.last = "ok".into();
                if !st.healthy && st.ok >= rise {
                    st.healthy = true;
                    st.removed = false;
                }
            }
            Err(e) => {
                st.fail = st.fail.saturating_add(1);
                st.ok = 0;
                // Its own word, not a network hiccup: no second probe needed.
                let said_not_ready = matches!(e, ProbeFailure::Unhealthy(_));
                st.last = e.to_string();
                if st.healthy && (st.fail >= fall || said_not_ready) {
                    st.healthy = false;
                }
                if !st.healthy && st.fail >= fall.saturating_mul(2) {
                    st.removed = true;
                }
            }
        }
        before != st.healthy
    }

    pub fn all_failing(&self) -> bool {
        !self.states.is_empty() && self.states.values().all(|s| !s.healthy)
    }

    /// What the kernel should hold now.
    pub fn desired(&self) -> Desired {
        if self.all_failing() {
            if let Some(last) = &self.last_applied {
                return last.clone();
            }
            // Nothing applied yet: keep every server rather than an empty VIP.
            return Desired {
                vip: self.vip,
                scheduler: self.scheduler.clone(),
                dests: self.states.keys().map(|rs| (*rs, 1)).collect(),
            };
        }
        let dests = self
            .states
            .iter()
            .filter_map(|(rs, st)| {
                if st.healthy {
                    Some((*rs, 1))
                } else if !st.removed {
                    Some((*rs, 0)) // out of rotation, existing connections drain
                } else {
                    None // removed; expire_nodest_conn drops its connections on their next packet
                }
            })
            .collect();
        Desired { vip: self.vip, scheduler: self.scheduler.clone(), dests }
    }

    pub fn applied(&mut self, d: Desired) {
        self.last_applied = Some(d);
    }

    pub fn status(&self) -> GuardStatus {
        let applied = self.last_applied.as_ref();
        GuardStatus {
            vip: self.vip,
            all_failing: self.all_failing(),
            servers: self
                .states
                .iter()
                .map(|(rs, st)| ServerStatus {
                    address: *rs,
                    healthy: st.healthy,
                    weight: applied.and_then(|d| d.dests.get(rs).copied()),
                    last_probe: st.last.clone(),
                    last_probe_unix_ms: st.last_ms,
                    consecutive_failures: st.fail,
                    consecutive_successes: st.ok,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::ipvs::FWD_MASQ;

    fn rs(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 6443))
    }

    fn guard(kernel: &[Dest]) -> Guard {
        Guard::new(
            "10.103.97.2:6443".parse().unwrap(),
            "rr",
            &[rs(1), rs(2), rs(3)],
            GuardConfig::default(),
            kernel,
            None,
        )
    }

    #[test]
    fn a_server_that_says_it_is_not_ready_leaves_rotation_on_the_first_answer() {
        let mut g = guard(&[]);
        let not_ready = || Err(ProbeFailure::Unhealthy("HTTP/1.1 500 Internal Server Error".into()));
        assert!(g.observe(rs(2), not_ready(), 1), "flipped at once");
        assert_eq!(g.desired().dests[&rs(2)], 0, "out of rotation, connections drain");
        assert!(!g.observe(rs(2), not_ready(), 2));
        assert_eq!(g.desired().dests[&rs(2)], 0, "still listed while it answers");
        g.observe(rs(2), Err(ProbeFailure::Refused), 3);
        g.observe(rs(2), Err(ProbeFailure::Refused), 4);
        assert!(!g.desired().dests.contains_key(&rs(2)), "removed once it stops answering");
        g.observe(rs(2), Ok(()), 5);
        assert!(g.observe(rs(2), Ok(()), 6), "back after rise successes");
        assert_eq!(g.desired().dests[&rs(2)], 1);
    }

    #[test]
    fn failing_server_leaves_rotation_then_is_removed_and_comes_back() {
        let mut g = guard(&[]);
        assert_eq!(g.desired().dests.values().copied().collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(!g.observe(rs(2), Err(ProbeFailure::Refused), 1));
        assert_eq!(g.desired().dests[&rs(2)], 1, "one failure is not enough");
        assert!(g.observe(rs(2), Err(ProbeFailure::Refused), 2));
        assert_eq!(g.desired().dests[&rs(2)], 0, "out of rotation");
        g.observe(rs(2), Err(ProbeFailure::Empty), 3);
        g.observe(rs(2), Err(ProbeFailure::Empty), 4);
        assert!(!g.desired().dests.contains_key(&rs(2)), "removed");
        g.observe(rs(2), Ok(()), 5);
        assert!(!g.desired().dests.contains_key(&rs(2)));
        assert!(g.observe(rs(2), Ok(()), 6));
        assert_eq!(g.desired().dests[&rs(2)], 1, "back after rise successes");
        let st = g.status();
        assert_eq!(st.servers[1].last_probe, "ok");
    }

    #[test]
    fn all_failing_keeps_the_last_applied_set() {
        let mut g = guard(&[]);
        let d = g.desired();
        g.applied(d.clone());
        for t in 0..10 {
            for n in 1..=3 {
                g.observe(rs(n), Err(ProbeFailure::Timeout(Duration::from_secs(1))), t);
            }
        }
        assert!(g.all_failing());
        assert_eq!(g.desired(), d);
        assert!(g.status().all_failing);
    }

    #[test]
    fn restart_adopts_kernel_state_without_flapping() {
        let k = |n, w| Dest { addr: rs(n), weight: w, forward: FWD_MASQ, active_conns: 0, inactive_conns: 0 };
        let g = guard(&[k(1, 1), k(2, 0), k(3, 1)]);
        let d = g.desired();
        assert_eq!(d.dests[&rs(1)], 1);
        assert_eq!(d.dests[&rs(2)], 0);
        assert_eq!(d.dests[&rs(3)], 1);
    }

    #[test]
    fn restart_keeps_a_removed_server_out() {
        let mut g = guard(&[]);
        g.applied(g.desired());
        for t in 0..4 {
            g.observe(rs(3), Err(ProbeFailure::Refused), t);
        }
        let d = g.desired();
        assert!(!d.dests.contains_key(&rs(3)));
        g.applied(d.clone());
        let status = g.status();
        let k = |n, w| Dest { addr: rs(n), weight: w, forward: FWD_MASQ, active_conns: 0, inactive_conns: 0 };
        let restarted = Guard::new(
            "10.103.97.2:6443".parse().unwrap(),
            "rr",
            &[rs(1), rs(2), rs(3)],
            GuardConfig::default(),
            &[k(1, 1), k(2, 1)],
            Some(&status),
        );
        assert_eq!(restarted.desired(), d, "no flap after restart");
    }
}
