//! A reconnect storm meets polite load shedding: the controller admits session opens at
//! `--session-rate` and tells the rest when to come back (`RESOURCE_EXHAUSTED` with
//! `fleetadm-retry-after-ms`), each its own slot; agents follow the hint instead of their own
//! backoff. Real controller and agents on loopback, real TLS.
use std::time::Duration;

use fleetadm_tests::{free_port, http_get, metric, wait_connected, Agent, Controller};

const AGENTS: usize = 12;

fn shed(metrics_port: u16) -> f64 {
    metric(&http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics"), "fleetadm_sessions_shed_total").unwrap_or(-1.0)
}

/// The waits agents were told, from their logs.
fn hints(agents: &[Agent]) -> Vec<u64> {
    agents
        .iter()
        .flat_map(|a| {
            a.log()
                .lines()
                .filter(|l| l.contains("the controller is busy; retrying when it asked"))
                .filter_map(|l| l.split("retry_in_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

fn all_connected(ctl: &Controller, agents: &[Agent]) {
    for a in agents {
        wait_connected(ctl, &a.name, true, Duration::from_secs(60));
    }
}

#[test]
fn a_reconnect_storm_is_shed_with_retry_hints_and_everyone_gets_in() {
    let mport = free_port();
    let mut ctl = Controller::start(&["--session-rate", "2", "--metrics-listen", &format!("127.0.0.1:{mport}")]);
    let mut agents: Vec<Agent> = (0..AGENTS).map(|i| Agent::new(&format!("s{i}"))).collect();
    for a in &agents {
        a.enroll(&ctl);
    }
    // Twelve agents at once against two admissions a second.
    for a in &mut agents {
        a.run();
    }
    all_connected(&ctl, &agents);
    let first = shed(mport);
    assert!(first >= (AGENTS / 2) as f64, "most of the storm was shed: {first}");
    // Following the hints, an agent is turned away about once; agents that ignored them would
    // be back every 200 ms - 1 s (their own backoff here) and be refused many times over.
    assert!(first <= (2 * AGENTS) as f64, "agents followed the hints rather than hammering: {first} refusals");
    let told = hints(&agents);
    assert!(told.len() as f64 >= first * 0.9, "each refused agent logged the wait it was told: {told:?} vs {first}");
    let mut distinct = told.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= told.len() / 2, "the waits are spread, not one moment for the whole herd: {told:?}");
    assert!(told.iter().all(|ms| *ms <= 120_000), "{told:?}");
    assert!(ctl.log().contains("busy: shedding session opens"), "the controller logs the shedding");

    // A controller restart: the whole fleet comes back at once, and gets in the same way.
    ctl.restart();
    all_connected(&ctl, &agents);
    let again = shed(mport);
    assert!(
        again >= 1.0 && again <= (2 * AGENTS) as f64,
        "the reconnect storm after a restart was shed politely: {again}"
    );
}
