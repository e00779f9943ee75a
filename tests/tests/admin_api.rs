//! The Admin API is typed and self-describing: a Python client with no generated code (grpcio,
//! descriptors fetched by gRPC server reflection on the admin socket) lists nodes, reads a node's
//! agent version and capabilities, and gets a typed plan.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fleetadm_tests::vm::repo_root;
use fleetadm_tests::{text, wait_connected, Agent, Controller};

/// A virtualenv with grpcio, grpcio-reflection and protobuf (created on first use).
fn python() -> PathBuf {
    let venv = repo_root().join("tests/.cache/pyvenv");
    let py = venv.join("bin/python3");
    let ready = venv.join(".ready");
    if !ready.exists() {
        let out = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().expect("python3 -m venv");
        assert!(out.status.success(), "creating {}: {}", venv.display(), text(&out));
        let out = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "grpcio==1.*", "grpcio-reflection==1.*", "protobuf"])
            .output()
            .expect("pip install");
        assert!(out.status.success(), "pip install grpcio grpcio-reflection protobuf: {}", text(&out));
        std::fs::write(&ready, "").expect("mark venv ready");
    }
    py
}

#[test]
fn a_python_client_uses_the_admin_api_through_reflection() {
    let py = python();
    let ctl = Controller::start(&[]);
    let mut a = Agent::new("py1");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "py1", true, Duration::from_secs(30));
    let sock = ctl.data_dir().join("admin.sock");
    let out = Command::new(&py)
        .arg(repo_root().join("tests/clients/admin_reflection.py"))
        .arg(&sock)
        .arg("py1")
        .output()
        .expect("run the python client");
    assert!(out.status.success(), "python client: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let services: Vec<&str> = v["services"].as_array().expect("services").iter().filter_map(|s| s.as_str()).collect();
    assert!(services.contains(&"fleetadm.v1.Admin"), "{services:?}");
    assert!(services.iter().any(|s| s.starts_with("grpc.reflection.")), "{services:?}");
    let methods = v["methods"].to_string();
    for m in ["GetCluster", "PlanCluster", "ListBundles", "DeleteCluster"] {
        assert!(methods.contains(m), "{methods}");
    }
    let node = &v["node"];
    assert_eq!(node["name"], "py1", "{node}");
    assert_eq!(node["connected"], true, "{node}");
    assert_eq!(node["agent_version"], env!("CARGO_PKG_VERSION"), "{node}");
    assert_eq!(node["protocol"], 1, "{node}");
    let caps = node["capabilities"].to_string();
    assert!(caps.contains("bootstrap-v1") && caps.contains("kubeadm-join-v1"), "{caps}");
    assert!(v["nodes"]["nodes"].as_array().is_some_and(|n| n.len() == 1), "{}", v["nodes"]);
    // The plan comes back as typed phases and tasks, not a JSON string.
    let phases = v["plan"]["plan"]["phases"].as_array().unwrap_or_else(|| panic!("typed plan: {}", v["plan"]));
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names.first(), Some(&"preflight"), "{names:?}");
    assert!(names.contains(&"init-master0"), "{names:?}");
    let init = phases.iter().find(|p| p["name"] == "init-master0").expect("init phase");
    let task = &init["steps"][1]["tasks"][0];
    assert_eq!((task["host"].as_str(), task["kind"].as_str()), (Some("py1"), Some("kubeadm-init")), "{init}");
    assert_eq!(task["id"], "py/init/py1/kubeadm-init");
}
