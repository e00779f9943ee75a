//! Every bad input gets a clear one-line error, the daemon keeps serving, and nothing is lost.
use std::time::Duration;

use fleetadm_common::dial::{self, ClientIdentity, DialOptions, PinReport, Trust};
use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::enrollment_client::EnrollmentClient;
use fleetadm_proto::{EnrollRequest, HeartbeatRequest};
use fleetadm_tests::{bin, free_port, pinned_channel, rt, text, Agent, Controller};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn uses_left(ctl: &Controller, token: &str) -> u64 {
    let id = token.split('.').next().unwrap();
    let list = ctl.admin_json(&["token", "list"]);
    list.as_array().unwrap().iter().find(|t| t["id"] == id).map(|t| t["uses_left"].as_u64().unwrap()).unwrap()
}

fn enroll_fails(a: &Agent, ctl_addr: &str, token: &str, hash: &str, expect: &str) -> String {
    let out = a.enroll_with(ctl_addr, token, hash, &[]);
    let t = text(&out);
    assert!(!out.status.success(), "enrollment unexpectedly succeeded: {t}");
    assert!(t.contains(expect), "expected {expect:?} in: {t}");
    assert_eq!(t.trim().lines().count(), 1, "one-line error expected: {t}");
    assert!(!a.file("identity/agent.json").exists(), "a failed enrollment must not leave an identity");
    t
}

#[test]
fn enrollment_refusals_are_clear_and_spend_nothing() {
    let ctl = Controller::start(&[]);
    let a = Agent::new("bad1");
    let (token, hash) = ctl.token(&["--uses", "2"]);
    let id = token.split('.').next().unwrap();

    enroll_fails(&a, &ctl.addr(), &format!("{id}.0000000000000000"), &hash, "is not valid");
    enroll_fails(&a, &ctl.addr(), "zzzzzz.0000000000000000", &hash, "is not valid");
    enroll_fails(&a, &ctl.addr(), "not-a-token", &hash, "malformed");
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    enroll_fails(&a, &ctl.addr(), &token, &wrong_pin, "does not match the pin");
    enroll_fails(&a, &ctl.addr(), &token, "sha256:xyz", "CA pin");
    let dead = format!("127.0.0.1:{}", free_port());
    enroll_fails(&a, &dead, &token, &hash, "connection refused");
    // none of that spent the token
    assert_eq!(uses_left(&ctl, &token), 2);

    // expired token
    let (short, _) = ctl.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    enroll_fails(&a, &ctl.addr(), &short, &hash, "expired at");

    // token with no uses left
    let (once, _) = ctl.token(&["--uses", "1"]);
    Agent::new("first").enroll_with(&ctl.addr(), &once, &hash, &[]);
    enroll_fails(&a, &ctl.addr(), &once, &hash, "no uses left");

    // deleted token
    let (del, _) = ctl.token(&[]);
    let out = ctl.admin(&["token", "delete", del.split('.').next().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    enroll_fails(&a, &ctl.addr(), &del, &hash, "is not valid");

    // the daemon is still serving and the good token still works
    let out = a.enroll_with(&ctl.addr(), &token, &hash, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(uses_left(&ctl, &token), 1);
    // enrolling twice needs --force
    let out = a.enroll_with(&ctl.addr(), &token, &hash, &[]);
    assert!(!out.status.success() && text(&out).contains("already enrolled"), "{}", text(&out));
    assert_eq!(uses_left(&ctl, &token), 1);
}

#[test]
fn admin_cli_without_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(fleetadm_tests::bin("controller"))
        .args(["nodes", "list", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("no controller daemon is running"), "{}", text(&out));
    let out = std::process::Command::new(fleetadm_tests::bin("node-agent"))
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("not enrolled"), "{}", text(&out));
}

fn csr(name: Option<&str>, sans: Vec<String>, ca: bool) -> Vec<u8> {
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(n) = name {
        p.distinguished_name.push(DnType::CommonName, n);
    }
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    p.serialize_request(&kp).unwrap().der().to_vec()
}

#[test]
fn hostile_enrollment_requests_are_refused_without_spending_the_token() {
    let ctl = Controller::start(&[]);
    let (token, _) = ctl.token(&["--uses", "1"]);
    rt().block_on(async {
        let mut c = EnrollmentClient::new(pinned_channel(&ctl).await).max_encoding_message_size(8 * 1024 * 1024);
        let req = |csr_der: Vec<u8>, name: &str, mid: &str| EnrollRequest {
            token: token.clone(),
            csr_der,
            node_name: name.into(),
            machine_id: mid.into(),
            ..Default::default()
        };
        let cases: Vec<(EnrollRequest, tonic::Code, &str)> = vec![
            (req(b"garbage".to_vec(), "h1", "m1"), tonic::Code::InvalidArgument, "not a valid PKCS#10"),
            (req(csr(Some("h1"), vec![], true), "h1", "m1"), tonic::Code::InvalidArgument, "CA status"),
            (
                req(csr(Some("other"), vec![], false), "h1", "m1"),
                tonic::Code::InvalidArgument,
                "asks for the name \"other\"",
            ),
            (
                req(csr(None, vec!["victim".into()], false), "h1", "m1"),
                tonic::Code::InvalidArgument,
                "asks for the name \"victim\"",
            ),
            (req(csr(Some("h1"), vec![], false), "Bad_Name", "m1"), tonic::Code::InvalidArgument, "not valid"),
            (req(csr(Some("h1"), vec![], false), "h1", ""), tonic::Code::InvalidArgument, "machine_id"),
            (req(vec![0x30; 2 * 1024 * 1024], "h1", "m1"), tonic::Code::OutOfRange, "too large"),
            (
                EnrollRequest {
                    labels: [("bad key".to_string(), "x".to_string())].into_iter().collect(),
                    ..req(csr(Some("h1"), vec![], false), "h1", "m1")
                },
                tonic::Code::InvalidArgument,
                "label key",
            ),
        ];
        for (r, code, msg) in cases {
            let st = c.enroll(r).await.expect_err("must be refused");
            assert_eq!(st.code(), code, "{st:?}");
            assert!(st.message().contains(msg), "expected {msg:?} in {:?}", st.message());
        }
        // the token is intact and works for a proper request
        let ok = c.enroll(req(csr(Some("h1"), vec!["h1".into()], false), "h1", "m1")).await.expect("good enrollment");
        assert!(ok.into_inner().certificate_pem.contains("BEGIN CERTIFICATE"));
        // another machine cannot take over h1's name, not even by claiming h1's machine-id
        let (t2, _) = ctl.token(&[]);
        for mid in ["m2", "m1"] {
            let st = c
                .enroll(EnrollRequest {
                    token: t2.clone(),
                    csr_der: csr(Some("h1"), vec![], false),
                    node_name: "h1".into(),
                    machine_id: mid.into(),
                    ..Default::default()
                })
                .await
                .expect_err("name clash");
            assert_eq!(st.code(), tonic::Code::AlreadyExists);
            assert!(st.message().contains("already enrolled"), "{}", st.message());
            assert!(!st.message().contains("m1"), "the owner's machine-id must not be echoed: {}", st.message());
        }
    });
    let (t2, _) = ctl.token(&[]);
    assert_eq!(uses_left(&ctl, &t2), 1);
}

#[test]
fn agent_calls_need_a_current_certificate_from_the_fleet_ca() {
    let ctl = Controller::start(&[]);
    rt().block_on(async {
        // no client certificate at all
        let mut c = AgentClient::new(pinned_channel(&ctl).await);
        let st = c.heartbeat(HeartbeatRequest { agent_time_unix_ms: 1 }).await.expect_err("no cert");
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
        assert!(st.message().contains("client certificate"), "{}", st.message());

        // a certificate for a known node name, but from another CA
        let foreign_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let foreign_ca = ca_params.self_signed(&foreign_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, foreign_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["n1".into()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "n1");
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let _ = foreign_ca;
        let ca_der = CertificateDer::from_pem_slice(ctl.ca_pem().as_bytes()).unwrap();
        let id = ClientIdentity {
            chain: vec![leaf.der().clone()],
            key: PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
        };
        let cfg = dial::client_config(&Trust::Ca(ca_der), Some(id), PinReport::default()).unwrap();
        let refused = match dial::connect(&ctl.addr(), cfg, &DialOptions::default()).await {
            Err(e) => e.to_string(),
            Ok(ch) => {
                let st = AgentClient::new(ch)
                    .heartbeat(HeartbeatRequest { agent_time_unix_ms: 1 })
                    .await
                    .expect_err("foreign CA");
                dial::explain_status(&st)
            }
        };
        assert!(refused.contains("rejected") || refused.contains("closed the connection"), "{refused}");
    });
    // still serving
    let (t, h) = ctl.token(&[]);
    let a = Agent::new("after");
    assert!(a.enroll_with(&ctl.addr(), &t, &h, &[]).status.success());
}

#[test]
fn blobs_and_task_reports_are_only_for_the_nodes_they_belong_to() {
    let ctl = Controller::start(&[]);
    // A bundle on the controller that no cluster uses.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("b");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/kubeadm"), "kubeadm").unwrap();
    let out = std::process::Command::new(bin("controller"))
        .args(["bundle", "build"])
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("b.tar.gz"))
        .args(["--name", "b", "--version", "v1.29.9"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let imported = ctl.admin(&["bundle", "import", dir.path().join("b.tar.gz").to_str().unwrap()]);
    assert!(imported.status.success(), "{}", text(&imported));
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"kubeadm"))
    };
    let a = Agent::new("outsider");
    a.enroll(&ctl);
    let identity = fleetadm_agent::identity::Identity::load(&fleetadm_agent::identity::StateDir::new(a.state_dir()))
        .expect("identity");
    rt().block_on(async {
        let cfg = dial::client_config(
            &Trust::Ca(identity.ca_der().unwrap()),
            Some(identity.tls_identity().unwrap()),
            PinReport::default(),
        )
        .unwrap();
        let mut c = AgentClient::new(dial::connect(&ctl.addr(), cfg, &DialOptions::default()).await.unwrap());
        let req = |sha: &str| fleetadm_proto::FetchBlobRequest {
            bundle: "b".into(),
            sha256: sha.into(),
            offset: 0,
            max_len: 1024,
            peers_ok: false,
        };
        let st = c.fetch_blob(req(&sha)).await.expect_err("not in a cluster using the bundle");
        assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        assert!(st.message().contains("not in a cluster that uses bundle b"), "{}", st.message());
        let st = c.fetch_blob(req("../../etc/passwd")).await.expect_err("bad digest");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        let report = |task_id: &str| fleetadm_proto::TaskReport {
            task_id: task_id.into(),
            attempt: 1,
            state: fleetadm_proto::TaskState::Succeeded as i32,
            output: String::new(),
            changed: false,
            ..Default::default()
        };
        // Another host's task is refused without saying whether it exists.
        let st = c.report_task(report("lab/init/m1/kubeadm-init")).await.expect_err("not its task");
        assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        let st = c.report_task(report("lab/init/outsider/kubeadm-init")).await.expect_err("no such task");
        assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");
        let st = c.report_task(report("not a task id")).await.expect_err("garbage id");
        assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");
    });
    // A bundle nobody uses can be removed; a missing one is reported as such.
    assert!(ctl.admin(&["bundle", "remove", "b"]).status.success());
    let out = ctl.admin(&["bundle", "remove", "b"]);
    assert!(!out.status.success() && text(&out).contains("bundle b not found"), "{}", text(&out));
}
