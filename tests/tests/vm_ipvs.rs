//! IPVS on a real kernel: node-agent's `lb apply|guard|show|clean` inside a VM running Debian's
//! kernel, with three HTTPS "masters" in network namespaces. The script (tests/vm/ipvs.sh) checks
//! the kernel with `ipvsadm -Ln` and real TCP through the VIP; it also prints the failover
//! benchmark.
use fleetadm_tests::vm;

#[test]
fn ipvs_load_balancer_on_a_real_kernel() {
    let (ok, console) = vm::run_script("ipvs.sh", 900);
    println!("{console}");
    let failed = vm::failures(&console);
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    assert!(console.contains("ok - traffic via VIP reached rs3"), "traffic check did not run");
    assert!(ok, "VM script failed");
    for line in console.lines().filter(|l| l.starts_with("BENCH")) {
        eprintln!("{line}");
    }
}
