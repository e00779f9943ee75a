//! Hosts behind a bastion: a bastion namespace with two links and IP forwarding off; the hosts'
//! namespaces reach only the bastion. Through a real tinyproxy (Debian's package) doing HTTP
//! CONNECT, and through `controller relay`, enrollment, sessions and the bundle transfer of a
//! cluster create all go (TLS end to end), and the proxy or relay is restarted mid-rollout.
use std::time::{Duration, Instant};

use fleetadm_tests::lab::{Lab, ONE_LAB};
use fleetadm_tests::{http_get, metric};

const RELAY_METRICS: &str = "10.79.0.2:9101";

/// Whether `ok` holds within `limit` (checked every 200 ms).
fn eventually(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ok()
}

fn connects(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.dir.join("tinyproxy.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Request") && l.contains("CONNECT 10.79.0.1:9443"))
        .count()
}

/// Lines in tinyproxy's log so far.
fn proxy_log_lines(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.dir.join("tinyproxy.log")).unwrap_or_default().lines().count()
}

/// The hosts that opened a connection through tinyproxy after line `skip` of its log.
fn proxy_clients_since(lab: &Lab, skip: usize) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(lab.dir.join("tinyproxy.log"))
        .unwrap_or_default()
        .lines()
        .skip(skip)
        .filter(|l| l.contains(": Connect (file descriptor "))
        .filter_map(|l| l.rsplit(' ').next().map(str::to_string))
        .collect()
}

/// Nodes the controller has a session with now.
fn sessions(lab: &Lab) -> usize {
    let (_, out) = lab.ctl(&["nodes", "list", "-o", "json"]);
    out.matches("\"connected\": true").count()
}

fn no_direct_path() {
    let direct = std::process::Command::new("ip")
        .args(["netns", "exec", "flab-h1", "timeout", "3", "bash", "-c", "exec 3<>/dev/tcp/10.79.0.1/9443"])
        .status()
        .expect("ip netns exec");
    assert!(!direct.success(), "h1 must have no direct path to the controller");
}

/// Build the lab bundle and import it.
fn import_bundle(lab: &Lab) {
    let bin = fleetadm_tests::bin("controller");
    let bundles = lab.dir.join("bundles");
    std::fs::create_dir_all(&bundles).expect("dir");
    let tarball = bundles.join("k8s-lab.tar.gz");
    let made = std::process::Command::new(fleetadm_tests::vm::repo_root().join("tests/lab/make-bundle.sh"))
        .arg(&tarball)
        .env("FLEETADM_BIN_DIR", bin.parent().expect("bin dir"))
        .output()
        .expect("make-bundle");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (ok, out) = lab.ctl(&["bundle", "import", tarball.to_str().expect("utf-8")]);
    assert!(ok, "{out}");
}

/// Wait until the rollout has left preflight, so a restart lands in the middle of it.
fn wait_past_preflight(lab: &Lab, name: &str) {
    let t = Instant::now();
    while lab.status(name)["phase"] == "preflight" && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn enrollment_sessions_and_a_cluster_create_through_a_proxy_on_a_bastion() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let lab =
        Lab::up_env("bastion", 2, bin.parent().expect("bin dir"), &[("LAB_BASTION", "proxy"), ("LAB_BUNDLE", "1")]);

    // The hosts cannot reach the controller themselves ...
    no_direct_path();
    // ... so both enrolled and connected through the proxy (lab up waited for both sessions).
    let (ok, nodes) = lab.ctl(&["nodes", "list", "-o", "json"]);
    assert!(ok && nodes.matches("\"connected\": true").count() == 2, "{nodes}");
    let before = connects(&lab);
    assert!(before >= 4, "enrollment and sessions of both hosts went through tinyproxy ({before} CONNECTs)");

    // A cluster from a bundle: every blob travels through the proxy; the proxy restarts while
    // the rollout runs, the agents reconnect through the new one, and the rollout completes.
    import_bundle(&lab);
    let (ok, out) = lab.ctl(&["cluster", "create", "px", "--masters", "h1,h2", "--bundle", "k8s-lab", "--detach"]);
    assert!(ok, "{out}");
    wait_past_preflight(&lab, "px");
    let mark = proxy_log_lines(&lab);
    let restarted = lab.run(&["restart-proxy"]);
    assert!(restarted.status.success(), "{}", String::from_utf8_lossy(&restarted.stderr));
    let (ok, out) = lab.ctl(&["cluster", "status", "px", "--watch"]);
    assert!(ok, "the rollout completes through the restarted proxy: {out}");
    // Both agents come back through the new proxy process (their only way out); the rollout may
    // finish before they notice the old one is gone, so wait for it.
    let reconnected =
        eventually(Duration::from_secs(30), || proxy_clients_since(&lab, mark).len() >= 2 && sessions(&lab) == 2);
    assert!(
        reconnected,
        "both agents reconnected through the new proxy process: {:?} connected through it, {} sessions",
        proxy_clients_since(&lab, mark),
        sessions(&lab)
    );
    let (_, logs) = lab.ctl(&["cluster", "logs", "px", "--host", "h2"]);
    assert!(logs.contains("blobs fetched"), "h2 fetched the bundle (through the proxy): {logs}");
    assert!(lab.host("h2").join("usr-local-bin/kubeadm").exists(), "bootstrap installed it");
}

#[test]
fn enrollment_and_a_cluster_create_by_address_through_a_relay_on_a_bastion() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let lab = Lab::up_env("relay", 2, bin.parent().expect("bin dir"), &[("LAB_BASTION", "relay"), ("LAB_BUNDLE", "1")]);
    no_direct_path();

    // Both hosts enrolled and hold sessions through the relay, and the controller records each
    // one's own address (vouched for by the relay), not the bastion's 10.79.0.2.
    let (ok, nodes) = lab.ctl(&["nodes", "list", "-o", "json"]);
    assert!(ok, "{nodes}");
    let nodes: serde_json::Value = serde_json::from_str(&nodes).expect("json");
    for (name, ip) in [("h1", "10.78.0.11"), ("h2", "10.78.0.12")] {
        let n = nodes.as_array().and_then(|a| a.iter().find(|n| n["name"] == name)).expect("node");
        assert_eq!(n["connected"], true, "{n}");
        let peer = n["peer_address"].as_str().unwrap_or_default();
        assert!(peer.starts_with(&format!("{ip}:")), "{name}'s recorded peer is its own address: {n}");
    }
    let m = http_get(RELAY_METRICS, "/metrics");
    let through = metric(&m, "fleetadm_relay_connections_total{").unwrap_or(0.0);
    assert!(through >= 4.0, "enrollments and sessions went through the relay: {m}");

    // A cluster named by the hosts' addresses: planning resolves an address only to the node that
    // connects from it, so this works only because the relay's vouching is believed. The relay
    // restarts mid-rollout and the rollout completes through the new process.
    import_bundle(&lab);
    let (ok, out) =
        lab.ctl(&["cluster", "create", "rl", "--masters", "10.78.0.11,10.78.0.12", "--bundle", "k8s-lab", "--detach"]);
    assert!(ok, "{out}");
    wait_past_preflight(&lab, "rl");
    let restarted = lab.run(&["restart-relay"]);
    assert!(restarted.status.success(), "{}", String::from_utf8_lossy(&restarted.stderr));
    let (ok, out) = lab.ctl(&["cluster", "status", "rl", "--watch"]);
    assert!(ok, "the rollout completes through the restarted relay: {out}");
    // Both sessions open again, through the new relay process (connections open through it now).
    let open = || metric(&http_get(RELAY_METRICS, "/metrics"), "fleetadm_relay_connections{").unwrap_or(0.0);
    let reconnected = eventually(Duration::from_secs(30), || open() >= 2.0 && sessions(&lab) == 2);
    assert!(
        reconnected,
        "both agents reconnected through the new relay process: {} open, {} sessions",
        open(),
        sessions(&lab)
    );
    let (_, logs) = lab.ctl(&["cluster", "logs", "rl", "--host", "h2"]);
    assert!(logs.contains("blobs fetched"), "h2 fetched the bundle (through the relay): {logs}");
    assert!(lab.host("h2").join("usr-local-bin/kubeadm").exists(), "bootstrap installed it");
    let controller_log = std::fs::read_to_string(lab.dir.join("controller.log")).unwrap_or_default();
    assert!(!controller_log.contains("not registered"), "no relayed connection was refused: {controller_log}");
}
