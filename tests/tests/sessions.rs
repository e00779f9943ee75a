//! A real controller and several agents over real TLS on loopback: enrollment, sessions,
//! inventory, controller restart, revocation and certificate renewal.
use std::time::Duration;

use fleetadm_tests::{mode, text, wait_connected, wait_for, Agent, Controller};

const T: Duration = Duration::from_secs(30);

#[test]
fn agents_enroll_connect_and_report_inventory() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let (token, hash) = ctl.token(&["--uses", "3", "--description", "lab"]);
    let mut agents: Vec<Agent> = ["n1", "n2", "n3"].iter().map(|n| Agent::new(n)).collect();
    for a in &mut agents {
        let out = a.enroll_with(&ctl.addr(), &token, &hash, &[]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(&format!("enrolled as {}", a.name)));
        // the private key never left the host and is private
        assert_eq!(mode(&a.file("identity/node.key")), 0o600);
        assert_eq!(mode(&a.state_dir()), 0o700);
        a.run();
    }
    for a in &agents {
        let n = wait_connected(&ctl, &a.name, true, T);
        let facts = &n["facts"];
        assert_eq!(facts["machine_id"].as_str().map(|s| !s.is_empty()), Some(true), "{n}");
        assert!(!facts["kernel"].as_str().unwrap_or_default().is_empty(), "{n}");
        assert!(facts["cpus"].as_u64().unwrap_or(0) >= 1, "{n}");
        assert!(facts["memory_bytes"].as_u64().unwrap_or(0) > 0, "{n}");
        assert!(facts["swap_enabled"].is_boolean());
        assert!(facts["cgroup_version"].is_u64());
        assert_eq!(facts["components"].as_array().map(|c| c.len()), Some(3));
        let lo = facts["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == "lo").cloned().unwrap();
        assert!(lo["addresses"].as_array().unwrap().iter().any(|a| a == "127.0.0.1/8"), "{lo}");
        assert!(n["cert_expires_at"].as_str().unwrap().starts_with('2'));
        assert_eq!(n["revoked"], false);
    }
    // heartbeats move last_seen forward and give a clock skew near zero (same host)
    let first = ctl.node("n1").unwrap()["last_seen"].as_str().unwrap().to_string();
    let later = wait_for(T, "a newer heartbeat", || {
        ctl.node("n1").filter(|n| n["last_seen"].as_str().unwrap() > first.as_str())
    });
    assert!(later["clock_skew_ms"].as_i64().unwrap().abs() < 2000, "{later}");
    // the token's three uses are spent
    let tokens = ctl.admin_json(&["token", "list"]);
    assert_eq!(tokens[0]["uses_left"], 0, "{tokens}");
    assert_eq!(tokens[0]["description"], "lab");
    // agent-side status
    let st = agents[0].status_json();
    assert_eq!(st["enrolled"], true);
    assert_eq!(st["session"], "connected", "{st}");
    assert_eq!(st["controller"], ctl.addr());
    // the human table lists every node
    let table = text(&ctl.admin(&["nodes", "list"]));
    for n in ["n1", "n2", "n3"] {
        assert!(table.contains(n), "{table}");
    }
    let show = ctl.admin(&["nodes", "show", "n2", "-o", "yaml"]);
    assert!(text(&show).contains("name: n2"), "{}", text(&show));
}

#[test]
fn controller_restart_keeps_state_and_agents_come_back() {
    let mut ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut a = Agent::new("r1");
    a.enroll(&ctl);
    let (spare, _) = ctl.token(&["--uses", "5"]);
    a.run();
    wait_connected(&ctl, "r1", true, T);
    let pin_before = ctl.admin_json(&["token", "list"])[0]["id"].clone();

    ctl.kill(); // SIGKILL: nothing graceful
    wait_for(T, "agent to notice", || {
        let st = a.status_json();
        (st["session"] != "connected").then_some(())
    });
    ctl.spawn();
    let n = wait_connected(&ctl, "r1", true, T);
    assert_eq!(n["revoked"], false);
    // tokens survived, including their remaining uses
    let tokens = ctl.admin_json(&["token", "list"]);
    let spare_id = spare.split('.').next().unwrap();
    let t = tokens.as_array().unwrap().iter().find(|t| t["id"] == spare_id).expect("spare token survives");
    assert_eq!(t["uses_left"], 5);
    assert!(tokens.as_array().unwrap().iter().any(|t| t["id"] == pin_before));
    assert!(a.exited().is_none(), "agent must keep running across controller restarts");
}

#[test]
fn revocation_closes_the_session_and_refuses_the_next_call() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut keep = Agent::new("keep");
    let mut gone = Agent::new("gone");
    keep.enroll(&ctl);
    gone.enroll(&ctl);
    keep.run();
    gone.run();
    wait_connected(&ctl, "keep", true, T);
    wait_connected(&ctl, "gone", true, T);

    let out = ctl.admin(&["nodes", "revoke", "gone"]);
    assert!(out.status.success(), "{}", text(&out));
    // the open session is closed and the agent stops for good with a clear reason
    let status = wait_for(T, "revoked agent to exit", || gone.exited());
    assert!(!status.success());
    assert!(gone.log().contains("revoked"), "{}", gone.log());
    let n = ctl.node("gone").unwrap();
    assert_eq!(n["revoked"], true);
    assert_eq!(n["connected"], false);
    // a fresh start with the revoked certificate is refused on its first call
    gone.run();
    wait_for(T, "restarted revoked agent to exit", || gone.exited());
    assert!(gone.log().matches("revoked").count() >= 2, "{}", gone.log());
    // the other node is untouched
    assert_eq!(ctl.node("keep").unwrap()["connected"], true);
    assert!(keep.exited().is_none());
    // re-admission needs the operator to forget the record, then a new token and --force
    let (token, hash) = ctl.token(&[]);
    let out = gone.enroll_with(&ctl.addr(), &token, &hash, &[]);
    assert!(!out.status.success() && text(&out).contains("--force"), "{}", text(&out));
    let out = gone.enroll_with(&ctl.addr(), &token, &hash, &["--force"]);
    assert!(!out.status.success() && text(&out).contains("nodes forget gone"), "{}", text(&out));
    let out = ctl.admin(&["nodes", "forget", "gone"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = gone.enroll_with(&ctl.addr(), &token, &hash, &["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    gone.run();
    let n = wait_connected(&ctl, "gone", true, T);
    assert_eq!(n["revoked"], false);
}

#[test]
fn certificates_are_renewed_before_they_expire() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s", "--node-cert-validity", "12s"]);
    let mut a = Agent::new("short");
    a.enroll(&ctl);
    let first_cert = std::fs::read_to_string(a.file("identity/node.crt")).unwrap();
    let first_key = std::fs::read_to_string(a.file("identity/node.key")).unwrap();
    let serial0 = ctl.node("short").unwrap()["cert_serial"].as_str().unwrap().to_string();
    a.run();
    wait_connected(&ctl, "short", true, T);
    // renewal at ~70% of 12s; wait past two full lifetimes to prove the node keeps going
    let mut serials = vec![serial0];
    wait_for(Duration::from_secs(40), "two renewals", || {
        let n = ctl.node("short")?;
        let s = n["cert_serial"].as_str()?.to_string();
        if !serials.contains(&s) {
            serials.push(s);
        }
        (serials.len() >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let n = wait_connected(&ctl, "short", true, T);
    assert!(a.exited().is_none(), "{}", a.log());
    assert_ne!(std::fs::read_to_string(a.file("identity/node.crt")).unwrap(), first_cert);
    assert_ne!(std::fs::read_to_string(a.file("identity/node.key")).unwrap(), first_key, "renewal uses a new key");
    assert_eq!(mode(&a.file("identity/node.key")), 0o600);
    assert!(a.log().contains("certificate renewed"), "{}", a.log());
    assert_eq!(n["revoked"], false);
}
