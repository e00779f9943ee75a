//! Hosts behind a bastion, with workers, on a real kernel: tests/lab/bastion-e2e.sh inside the
//! VM runs a 3-host lab whose hosts reach only a bastion namespace (IP forwarding off), once
//! through Debian's tinyproxy (HTTP CONNECT) and once through `controller relay`: enrollment,
//! the bundle transfer and a `cluster create` of 1 master and 2 workers (joined through their
//! IPVS load balancer), with the proxy or relay restarted while the workers join.
use fleetadm_tests::vm;

#[test]
fn a_cluster_with_workers_behind_a_bastion_through_a_proxy_and_a_relay() {
    let (ok, console) = vm::run_script("tests/lab/bastion-e2e.sh", 600);
    println!("{console}");
    let failed = vm::failures(&console);
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    for mode in ["proxy", "relay"] {
        assert!(
            console.contains(&format!(
                "ok - {mode}: the rollout completes through the restarted {mode} (1 master, 2 workers)"
            )),
            "the {mode} run did not complete"
        );
        assert!(
            console.contains(&format!("ok - {mode}: all 3 agents reconnected through the new {mode} (")),
            "the {mode} run did not check the agents came back through the new {mode}"
        );
    }
    assert!(console.contains("bastion-e2e: "), "the script did not reach its end");
    assert!(ok, "VM script failed");
}
