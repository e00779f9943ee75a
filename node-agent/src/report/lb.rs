//! Load balancer status for the controller: reported when health or rotation changes, not on
//! every probe (at 10,000 agents, a report per probe round would be thousands of calls a second).

/// What counts as a change of the load balancer for the controller: health and rotation of
/// each real server, not probe times or counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbKey {
    vip: Option<std::net::SocketAddr>,
    all_failing: bool,
    servers: Vec<(std::net::SocketAddr, bool, Option<u32>)>,
}

fn key(st: Option<&crate::lb::guard::GuardStatus>) -> LbKey {
    match st {
        None => LbKey { vip: None, all_failing: false, servers: vec![] },
        Some(st) => LbKey {
            vip: Some(st.vip),
            all_failing: st.all_failing,
            servers: st.servers.iter().map(|s| (s.address, s.healthy, s.weight)).collect(),
        },
    }
}

/// The report to send for `st`, when it differs in what matters from the last one sent.
pub fn if_changed(
    st: Option<&crate::lb::guard::GuardStatus>,
    last: &mut Option<LbKey>,
) -> Option<fleetadm_proto::LbStatus> {
    let key = key(st);
    if last.as_ref() == Some(&key) || (last.is_none() && key.vip.is_none()) {
        return None;
    }
    *last = Some(key);
    let Some(st) = st else { return Some(fleetadm_proto::LbStatus::default()) };
    Some(fleetadm_proto::LbStatus {
        vip: st.vip.to_string(),
        all_failing: st.all_failing,
        servers: st
            .servers
            .iter()
            .map(|s| fleetadm_proto::RealServerStatus {
                address: s.address.to_string(),
                healthy: s.healthy,
                weight: s.weight.unwrap_or(0),
                in_rotation: s.weight.is_some(),
                last_probe: s.last_probe.clone(),
                last_probe_unix_ms: s.last_probe_unix_ms,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::guard::{GuardStatus, ServerStatus};

    fn status(healthy: bool, weight: Option<u32>, probe_ms: u64) -> GuardStatus {
        GuardStatus {
            vip: "10.103.97.2:6443".parse().unwrap(),
            all_failing: false,
            servers: vec![ServerStatus {
                address: "10.0.0.1:6443".parse().unwrap(),
                healthy,
                weight,
                last_probe: "ok".into(),
                last_probe_unix_ms: probe_ms,
                consecutive_failures: 0,
                consecutive_successes: probe_ms as u32,
            }],
        }
    }

    #[test]
    fn lb_status_is_reported_only_when_health_or_rotation_changes() {
        let mut last = None;
        assert!(if_changed(None, &mut last).is_none(), "no load balancer, nothing to say");
        assert!(if_changed(Some(&status(true, Some(1), 1)), &mut last).is_some(), "first status");
        for t in 2..50 {
            assert!(if_changed(Some(&status(true, Some(1), t)), &mut last).is_none(), "probe {t} changes nothing");
        }
        let down = if_changed(Some(&status(false, None, 51)), &mut last).expect("unhealthy is a change");
        assert!(!down.servers[0].healthy && !down.servers[0].in_rotation);
        assert!(if_changed(Some(&status(false, None, 52)), &mut last).is_none());
        assert!(if_changed(Some(&status(true, Some(1), 53)), &mut last).is_some(), "back in rotation");
        let gone = if_changed(None, &mut last).expect("removal is reported");
        assert!(gone.vip.is_empty());
    }
}
