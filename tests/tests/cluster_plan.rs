//! `controller cluster create --dry-run`: hosts resolved against enrolled, connected agents,
//! inventory preflight, and the plan printed without changing anything.
use std::time::Duration;

use fleetadm_tests::{text, wait_connected, Agent, Controller};

#[test]
fn dry_run_prints_the_plan_and_preflight_catches_problems() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut agents: Vec<Agent> = ["m1", "m2", "w1"].iter().map(|n| Agent::new(n)).collect();
    for a in &mut agents {
        a.enroll(&ctl);
        a.run();
    }
    for a in &agents {
        wait_connected(&ctl, &a.name, true, Duration::from_secs(30));
    }

    let out = ctl.admin(&["cluster", "create", "lab", "--masters", "m1", "--dry-run"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for expect in ["plan for cluster lab", "1. preflight", "init-master0", "kubeadm init", "join-workers", "addons"] {
        assert!(t.contains(expect), "missing {expect:?} in:\n{t}");
    }

    // unknown hosts fail fast, listed together, and nothing is planned
    let out = ctl.admin(&["cluster", "create", "lab", "--masters", "m1,ghost", "--nodes", "10.9.9.9", "--dry-run"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("unknown hosts") && t.contains("ghost") && t.contains("10.9.9.9"), "{t}");
    assert!(!t.contains("plan for cluster"), "{t}");

    // these three agents run on one machine: same hostname, which preflight must refuse
    let out = ctl.admin(&["cluster", "create", "lab", "--masters", "m1,m2", "--nodes", "w1", "--dry-run"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("share the hostname"), "{t}");
    assert!(t.contains("even count"), "two masters warn: {t}");

    // a VIP inside the service CIDR is refused
    let out = ctl.admin(&["cluster", "create", "lab", "--masters", "m1", "--vip", "10.96.0.10", "--dry-run"]);
    assert!(text(&out).contains("inside the service CIDR"), "{}", text(&out));

    // a disconnected host is reported as such
    agents[2].kill();
    wait_connected(&ctl, "w1", false, Duration::from_secs(30));
    let out = ctl.admin(&["cluster", "create", "lab", "--masters", "m1", "--nodes", "w1", "--dry-run"]);
    assert!(text(&out).contains("disconnected hosts") && text(&out).contains("w1"), "{}", text(&out));

    // a Clusterfile works the same way, and a bad one says why
    let dir = tempfile::tempdir().unwrap();
    let cf = dir.path().join("Clusterfile");
    std::fs::write(
        &cf,
        "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {name: fromfile}\nspec:\n  hosts:\n  - {ips: [m1], roles: [master, amd64]}\n  ssh: {user: root, passwd: hunter2}\n",
    )
    .unwrap();
    let out = ctl.admin(&["cluster", "create", "-f", cf.to_str().unwrap(), "--dry-run"]);
    assert!(out.status.success() && text(&out).contains("plan for cluster fromfile"), "{}", text(&out));
    // sealos's SSH password is dropped with a warning, never echoed.
    assert!(text(&out).contains("ssh settings (1 block(s)") && !text(&out).contains("hunter2"), "{}", text(&out));
    std::fs::write(&cf, "apiVersion: v1\nkind: Pod\n").unwrap();
    let out = ctl.admin(&["cluster", "create", "-f", cf.to_str().unwrap(), "--dry-run"]);
    assert!(!out.status.success() && text(&out).contains("unsupported apiVersion/kind v1/Pod"), "{}", text(&out));
}

#[test]
fn hosts_can_be_chosen_by_label_selectors() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut agents: Vec<Agent> = ["m1", "m2", "w1"].iter().map(|n| Agent::new(n)).collect();
    for a in &mut agents {
        a.enroll(&ctl);
        a.run();
    }
    for a in &agents {
        wait_connected(&ctl, &a.name, true, Duration::from_secs(30));
    }
    for (node, labels) in
        [("m1", &["role=cp", "zone=a"][..]), ("m2", &["role=cp", "gpu=yes"]), ("w1", &["role=worker"])]
    {
        let mut args = vec!["nodes", "label", node];
        args.extend_from_slice(labels);
        let out = ctl.admin(&args);
        assert!(out.status.success(), "{}", text(&out));
    }
    let hosts = |plan: &serde_json::Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = plan["phases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == "init-master0" || p["name"] == "join-workers" || p["name"] == "join-masters")
            .flat_map(|p| p["steps"].as_array().into_iter().flatten().flat_map(|s| s.as_array().into_iter().flatten()))
            .map(|t| {
                (t["host"].as_str().unwrap_or_default().to_string(), t["kind"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };

    // One master chosen by label; the plan names it, and only it.
    let out = ctl.admin(&["cluster", "create", "sel", "--master-selector", "role=cp,!gpu", "--dry-run", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    let chosen = hosts(&plan);
    assert!(!chosen.is_empty() && chosen.iter().all(|(h, _)| h == "m1"), "{chosen:?}");

    // Masters and workers by label: a master is never also a worker. These agents share one
    // machine's hostname, so preflight names exactly the chosen hosts when it refuses them.
    let out =
        ctl.admin(&["cluster", "create", "sel", "--master-selector", "zone=a", "--node-selector", "role", "--dry-run"]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("m1,m2,w1: hosts share the hostname"), "{t}");
    let out = ctl.admin(&[
        "cluster",
        "create",
        "sel",
        "--master-selector",
        "zone=a",
        "--node-selector",
        "role=worker",
        "--dry-run",
    ]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("m1,w1: hosts share the hostname"), "{t}");

    // Selectors that match nothing, are malformed, or clash with a host list are refused.
    let out = ctl.admin(&["cluster", "create", "sel", "--master-selector", "zone=nowhere", "--dry-run"]);
    assert!(text(&out).contains("matches no enrolled node"), "{}", text(&out));
    let out = ctl.admin(&[
        "cluster",
        "create",
        "sel",
        "--master-selector",
        "role=cp",
        "--node-selector",
        "role=cp",
        "--dry-run",
    ]);
    assert!(text(&out).contains("matches no enrolled node that is not a master"), "{}", text(&out));
    let out = ctl.admin(&["cluster", "create", "sel", "--master-selector", "a=b=c", "--dry-run"]);
    assert!(!out.status.success() && text(&out).contains("--master-selector"), "{}", text(&out));
    let out = ctl.admin(&["cluster", "create", "sel", "--masters", "m1", "--master-selector", "role=cp", "--dry-run"]);
    assert!(!out.status.success() && text(&out).contains("cannot be used with"), "{}", text(&out));
    // A revoked node is never chosen.
    let out = ctl.admin(&["nodes", "revoke", "m2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl.admin(&["cluster", "create", "sel", "--master-selector", "gpu=yes", "--dry-run"]);
    assert!(text(&out).contains("matches no enrolled node"), "{}", text(&out));
}
