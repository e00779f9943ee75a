//! Hosts behind a bastion, reaching the controller only through an HTTP CONNECT proxy: a real
//! tinyproxy (Debian's package) in a bastion namespace with two links and IP forwarding off; the
//! hosts' namespaces reach only the bastion. Enrollment, sessions and the bundle transfer of a
//! cluster create all go through it (TLS end to end), and the proxy is restarted mid-rollout.
use std::time::{Duration, Instant};

use fleetadm_tests::lab::{Lab, ONE_LAB};

fn connects(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.dir.join("tinyproxy.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Request") && l.contains("CONNECT 10.79.0.1:9443"))
        .count()
}

#[test]
fn enrollment_sessions_and_a_cluster_create_through_a_proxy_on_a_bastion() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let lab =
        Lab::up_env("bastion", 2, bin.parent().expect("bin dir"), &[("LAB_BASTION", "proxy"), ("LAB_BUNDLE", "1")]);

    // The hosts cannot reach the controller themselves ...
    let direct = std::process::Command::new("ip")
        .args(["netns", "exec", "flab-h1", "timeout", "3", "bash", "-c", "exec 3<>/dev/tcp/10.79.0.1/9443"])
        .status()
        .expect("ip netns exec");
    assert!(!direct.success(), "h1 must have no direct path to the controller");
    // ... so both enrolled and connected through the proxy (lab up waited for both sessions).
    let (ok, nodes) = lab.ctl(&["nodes", "list", "-o", "json"]);
    assert!(ok && nodes.matches("\"connected\": true").count() == 2, "{nodes}");
    let before = connects(&lab);
    assert!(before >= 4, "enrollment and sessions of both hosts went through tinyproxy ({before} CONNECTs)");

    // A cluster from a bundle: every blob travels through the proxy; the proxy restarts while
    // the rollout runs, the agents reconnect through the new one, and the rollout completes.
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
    let (ok, out) = lab.ctl(&["cluster", "create", "px", "--masters", "h1,h2", "--bundle", "k8s-lab", "--detach"]);
    assert!(ok, "{out}");
    let t = Instant::now();
    loop {
        let st = lab.status("px");
        if st["phase"] != "preflight" || t.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted = lab.run(&["restart-proxy"]);
    assert!(restarted.status.success(), "{}", String::from_utf8_lossy(&restarted.stderr));
    let after_restart = connects(&lab);
    let (ok, out) = lab.ctl(&["cluster", "status", "px", "--watch"]);
    assert!(ok, "the rollout completes through the restarted proxy: {out}");
    assert!(connects(&lab) > after_restart, "the agents reconnected through the new proxy process");
    let (_, logs) = lab.ctl(&["cluster", "logs", "px", "--host", "h2"]);
    assert!(logs.contains("blobs fetched"), "h2 fetched the bundle (through the proxy): {logs}");
    assert!(lab.host("h2").join("usr-local-bin/kubeadm").exists(), "bootstrap installed it");
}
