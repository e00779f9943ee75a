//! Trust model (docs/security.md): a node's name moves only with proof of its key, a revocation
//! sticks until an operator forgets the record, and only a revocation stops an agent.
use std::process::Command;
use std::time::Duration;

use fleetadm_tests::{text, wait_connected, wait_for, Agent, Controller};

const T: Duration = Duration::from_secs(30);

fn uses_left(ctl: &Controller, token: &str) -> u64 {
    let id = token.split('.').next().unwrap();
    let list = ctl.admin_json(&["token", "list"]);
    list.as_array().unwrap().iter().find(|t| t["id"] == id).and_then(|t| t["uses_left"].as_u64()).unwrap()
}

fn serial(ctl: &Controller, name: &str) -> String {
    ctl.node(name).unwrap()["cert_serial"].as_str().unwrap().to_string()
}

#[test]
fn an_enrolled_name_moves_only_with_proof_of_its_key() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut real = Agent::new("m1");
    real.enroll(&ctl);
    let first = serial(&ctl, "m1");
    let machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim().to_string();

    // Another host (same machine-id: it is world-readable, so no secret) with a fresh token.
    let thief = Agent::new("m1");
    let (token, hash) = ctl.token(&["--uses", "3"]);
    for extra in [&[][..], &["--force"][..]] {
        let out = thief.enroll_with(&ctl.addr(), &token, &hash, extra);
        let t = text(&out);
        assert!(!out.status.success(), "a token alone must not take over an enrolled name: {t}");
        assert!(t.contains("already enrolled") && t.contains("controller nodes forget m1"), "{t}");
        assert!(
            machine_id.is_empty() || !t.contains(&machine_id),
            "the error must not echo the owner's machine-id: {t}"
        );
        assert!(!thief.file("identity/agent.json").exists());
    }
    assert_eq!(uses_left(&ctl, &token), 3, "a refused claim spends nothing");
    assert_eq!(serial(&ctl, "m1"), first, "the owner's record is untouched");

    // The owner is unaffected and keeps its session.
    real.run();
    wait_connected(&ctl, "m1", true, T);
    real.kill();
    // (a copy of the current key and certificate, to show below that they stop proving anything)
    let stale = Agent::new("m1");
    let st = Command::new("cp").arg("-a").arg(real.state_dir()).arg(stale.state_dir()).status().unwrap();
    assert!(st.success());

    // The holder of the key re-enrolls (its current certificate is the proof).
    let out = real.enroll_with(&ctl.addr(), &token, &hash, &["--force"]);
    assert!(out.status.success(), "the key holder may re-enroll: {}", text(&out));
    let second = serial(&ctl, "m1");
    assert_ne!(second, first);
    assert_eq!(uses_left(&ctl, &token), 2);
    real.run();
    let n = wait_connected(&ctl, "m1", true, T);
    assert_eq!(n["cert_serial"], second.as_str());

    // The replaced certificate proves nothing any more.
    let out = stale.enroll_with(&ctl.addr(), &token, &hash, &["--force"]);
    assert!(!out.status.success() && text(&out).contains("already enrolled"), "{}", text(&out));
    assert_eq!(serial(&ctl, "m1"), second);
}

#[test]
fn a_revoked_name_stays_refused_until_an_operator_forgets_it() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let mut a = Agent::new("r1");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "r1", true, T);

    // Forgetting an active node is refused: it would hand its name to the next token holder.
    let out = ctl.admin(&["nodes", "forget", "r1"]);
    assert!(!out.status.success() && text(&out).contains("controller nodes revoke r1"), "{}", text(&out));
    assert!(ctl.node("r1").is_some());

    let out = ctl.admin(&["nodes", "revoke", "r1"]);
    assert!(out.status.success(), "{}", text(&out));
    let st = wait_for(T, "revoked agent to stop", || a.exited());
    assert!(!st.success());

    // Neither the holder of the (revoked) key nor a newcomer gets the name back, with any token.
    let (token, hash) = ctl.token(&["--uses", "5"]);
    let newcomer = Agent::new("r1");
    for (who, extra) in [(&a, &["--force"][..]), (&newcomer, &[][..])] {
        let out = who.enroll_with(&ctl.addr(), &token, &hash, extra);
        let t = text(&out);
        assert!(!out.status.success(), "a revoked name must stay refused: {t}");
        assert!(t.contains("revoked") && t.contains("controller nodes forget r1"), "{t}");
    }
    assert_eq!(uses_left(&ctl, &token), 5);
    // Still refused after a controller restart (the revocation was flushed).
    let mut ctl = ctl;
    ctl.restart();
    let out = newcomer.enroll_with(&ctl.addr(), &token, &hash, &[]);
    assert!(!out.status.success() && text(&out).contains("revoked"), "{}", text(&out));

    // The operator frees the name; its facts go with it.
    let out = ctl.admin(&["nodes", "forget", "r1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(ctl.node("r1").is_none());
    let out = ctl.admin(&["nodes", "forget", "r1"]);
    assert!(!out.status.success() && text(&out).contains("no node named"), "{}", text(&out));
    let out = newcomer.enroll_with(&ctl.addr(), &token, &hash, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let mut newcomer = newcomer;
    newcomer.run();
    let n = wait_connected(&ctl, "r1", true, T);
    assert_eq!(n["revoked"], false);
}

#[test]
fn only_a_revocation_stops_the_agent() {
    let mut ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    // A backup taken before the node enrolled (same CA, no node record).
    ctl.kill();
    let backup = ctl.dir.path().join("backup");
    let current = ctl.dir.path().join("current");
    let cp = |from: &std::path::Path, to: &std::path::Path| {
        let _ = std::fs::remove_dir_all(to);
        let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(st.success());
    };
    cp(&ctl.data_dir(), &backup);
    ctl.spawn();
    let mut a = Agent::new("b1");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "b1", true, T);

    // The operator restores the old backup: the controller does not know b1.
    ctl.kill();
    cp(&ctl.data_dir(), &current);
    cp(&backup, &ctl.data_dir());
    ctl.spawn();
    wait_for(T, "the agent to be refused a few times", || {
        (a.log().matches("retrying (only a revocation stops the agent)").count() >= 3).then_some(())
    });
    assert!(a.exited().is_none(), "a refusal that is not a revocation must not stop the agent: {}", a.log());
    let st = a.status_json();
    assert!(st["session"].as_str().is_some_and(|s| s.starts_with("backoff")), "{st}");
    assert!(st["last_error"].as_str().is_some_and(|s| s.contains("not enrolled")), "{st}");

    // The right state comes back: the agent reconnects by itself.
    ctl.kill();
    cp(&current, &ctl.data_dir());
    ctl.spawn();
    wait_connected(&ctl, "b1", true, T);
    assert!(a.exited().is_none());

    // A revocation does stop it, on a fresh start too.
    let out = ctl.admin(&["nodes", "revoke", "b1"]);
    assert!(out.status.success(), "{}", text(&out));
    let st = wait_for(T, "revoked agent to stop", || a.exited());
    assert_eq!(st.code(), Some(3), "{}", a.log());
    a.run();
    let st = wait_for(T, "restarted revoked agent to stop", || a.exited());
    assert_eq!(st.code(), Some(3), "{}", a.log());
}

#[test]
fn text_from_hosts_reaches_the_terminal_without_live_control_characters() {
    use fleetadm_common::dial::{self, DialOptions, PinReport, Trust};
    let ctl = Controller::start(&[]);
    let a = Agent::new("esc");
    a.enroll(&ctl);
    let identity = fleetadm_agent::identity::Identity::load(&fleetadm_agent::identity::StateDir::new(a.state_dir()))
        .expect("identity");
    fleetadm_common::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let cfg = dial::client_config(
            &Trust::Ca(identity.ca_der().unwrap()),
            Some(identity.tls_identity().unwrap()),
            PinReport::default(),
        )
        .unwrap();
        let ch = dial::connect(&ctl.addr(), cfg, &DialOptions::default()).await.unwrap();
        // A host that renames the operator's terminal window and clears the screen.
        let inv = fleetadm_proto::Inventory {
            hostname: "esc\u{1b}]0;pwned\u{7}\u{1b}[2J".into(),
            os: Some(fleetadm_proto::OsRelease { pretty_name: "Debian\u{9b}31m".into(), ..Default::default() }),
            ..Default::default()
        };
        fleetadm_proto::agent_client::AgentClient::new(ch).report_inventory(inv).await.expect("inventory");
    });
    let out = ctl.admin(&["nodes", "list"]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Debian\\u{9b}31m"), "shown escaped: {t}");
    assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "raw control characters reached the terminal: {t:?}");
    // `nodes show` (YAML) escapes them too.
    let out = ctl.admin(&["nodes", "show", "esc"]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && t.contains("pwned"), "{t}");
    assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "raw control characters in YAML: {t:?}");
    // JSON escapes them (C1 included) yet stays parseable, carrying the exact text for programs.
    let out = ctl.admin(&["nodes", "list", "-o", "json"]);
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && t.contains("\\u009b"), "{t}");
    assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "raw control characters in JSON: {t:?}");
    let n = ctl.admin_json(&["nodes", "show", "esc"]);
    assert_eq!(n["facts"]["os_pretty_name"], "Debian\u{9b}31m");
    assert_eq!(n["facts"]["hostname"], "esc\u{1b}]0;pwned\u{7}\u{1b}[2J");
}
