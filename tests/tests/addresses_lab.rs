//! Hosts named by IP resolve by the address a node connects from, not by what it reports: on a
//! lab fleet in network namespaces, a host that adds a master's IP to its interface does not
//! become that master (docs/security.md, "Addresses are observed").
use std::process::Command;
use std::time::Duration;

use fleetadm_tests::lab::{Lab, ONE_LAB};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

#[test]
fn a_claimed_address_is_not_an_identity() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up_with("addr", 2, fleetadm_tests::bin("controller").parent().unwrap());

    // h1 is 10.78.0.11: it reports that address and connects from it.
    let (ok, out) = lab.ctl(&["cluster", "create", "c", "--masters", "10.78.0.11", "--dry-run"]);
    assert!(ok && out.contains("plan for cluster c"), "{out}");
    let (_, show) = lab.ctl(&["nodes", "show", "h1", "-o", "json"]);
    assert!(show.contains("\"peer_address\": \"10.78.0.11:"), "{show}");

    // h2 puts h1's address on its own interface (without answering ARP for it) and reports it.
    sh("ip -n flab-h2 addr add 10.78.0.11/32 dev eth0 && ip netns exec flab-h2 sysctl -qw net.ipv4.conf.eth0.arp_ignore=8");
    assert!(lab.run(&["stop-agent", "h2"]).status.success());
    assert!(lab.run(&["start-agent", "h2"]).status.success());
    fleetadm_tests::wait_for(Duration::from_secs(30), "h2 to report the claimed address", || {
        let (_, show) = lab.ctl(&["nodes", "show", "h2", "-o", "json"]);
        (show.contains("10.78.0.11/32") && show.contains("\"connected\": true")).then_some(())
    });

    // Two nodes report the address: refused, both named.
    let (ok, out) = lab.ctl(&["cluster", "create", "c", "--masters", "10.78.0.11", "--dry-run"]);
    assert!(!ok && out.contains("h1") && out.contains("h2") && out.contains("node name"), "{out}");
    assert!(!out.contains("plan for cluster"), "{out}");

    // With h1 gone from the fleet, h2 is the only node reporting it, but it connects from its
    // own address: still refused.
    assert!(lab.run(&["stop-agent", "h1"]).status.success());
    let (ok, out) = lab.ctl(&["nodes", "revoke", "h1"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["nodes", "forget", "h1"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["cluster", "create", "c", "--masters", "10.78.0.11", "--dry-run"]);
    assert!(!ok && out.contains("h2") && out.contains("connects from 10.78.0.12"), "{out}");
    // The operator can still name the host explicitly.
    let (ok, out) = lab.ctl(&["cluster", "create", "c", "--masters", "h2", "--dry-run"]);
    assert!(ok, "{out}");
}
