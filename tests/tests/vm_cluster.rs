//! The main job end to end on a real kernel: tests/lab/e2e.sh inside the VM builds a 6-host lab
//! fleet (network + mount + UTS namespaces, node-agent per host, kubeadm simulator), imports an
//! offline bundle (and refuses bad ones), runs `controller cluster create --bundle` with 3
//! masters and 2 workers, kills the controller mid-rollout, and checks the bootstrap on every
//! host (and that a second run changes nothing), hosts files, PKI modes, joins through the
//! workers' IPVS VIP, the CLI views, a day-2 `cluster add` of the sixth host as a worker (with a
//! token of its own, the other hosts untouched), its `cluster remove --drain` (Node object
//! deleted on every member, host reset) and re-add, an upgrade v1.29.9 -> v1.30.5 with the
//! controller killed during the worker waves, the agent's guard, and an apiserver restart
//! measured through the VIP (no client request may fail).
use fleetadm_tests::vm;

#[test]
fn cluster_create_end_to_end_on_a_real_kernel() {
    let (ok, console) = vm::run_script("tests/lab/e2e.sh", 900);
    println!("{console}");
    let failed = vm::failures(&console);
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    assert!(console.contains("ok - workers h4, h5 joined through the VIP"), "join checks did not run");
    assert!(console.contains("ok - an agent restart keeps the rules"), "script did not reach its end");
    assert!(console.contains("ok - cluster add joins h6 (exit 0)"), "day-2 add checks did not run");
    assert!(console.contains("ok - cluster remove takes h6 out (exit 0)"), "day-2 remove checks did not run");
    assert!(
        console.contains("ok - no client request failed during the apiserver restart"),
        "the restart measurement did not run"
    );
    assert!(console.contains("ok - bootstrap again on a host: reports no changes"), "bundle checks did not run");
    assert!(
        console.contains("ok - every node's kubelet reports v1.30.5, all schedulable again"),
        "the upgrade checks did not run"
    );
    assert!(ok, "VM script failed");
}
