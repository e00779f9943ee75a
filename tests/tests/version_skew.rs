//! Version skew, for real: the controller and the agent of a pinned commit of this repository
//! (`tests/skew/baseline`: the previous release, or the first protocol-1 commit until there is
//! one), built here from a git worktree, run against this tree's in both directions on a lab
//! fleet: enroll, open sessions, and create a cluster (preflight, hosts, PKI files, kubeadm init).
//!
//! "A field the newer side adds" is played by this tree built with the test-only `skew-probe`
//! feature, which adds a field to every task message and sets it when sending (the controller in
//! each task, the agent in each report); a probe agent also says in its task output what value
//! it received. So the test shows: an older agent ignores a field it does not know and runs the
//! task; an older controller ignores the newer agent's extra report field; and the field really
//! travels when both sides know it (so the first two prove something).
//! The compatibility promise this checks is docs/compatibility.md.
use std::path::{Path, PathBuf};
use std::process::Command;

use fleetadm_tests::lab::{Lab, ONE_LAB};
use fleetadm_tests::vm::repo_root;

fn pin() -> String {
    let p = repo_root().join("tests/skew/baseline");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let pin = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or_default();
    assert!(pin.len() == 40 && pin.bytes().all(|b| b.is_ascii_hexdigit()), "{}: {pin:?} is not a commit", p.display());
    pin.to_string()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Build `controller` and `node-agent` from the workspace at `src` into the shared skew target
/// directory (dependencies are compiled once for every build there) and copy them to `out`.
fn build(src: &Path, features: &[&str], out: &Path) {
    let target = repo_root().join("target/skew");
    let mut cmd = Command::new(cargo());
    cmd.current_dir(src)
        .args(["build", "--locked", "-p", "controller", "-p", "node-agent", "--bins"])
        .env("CARGO_TARGET_DIR", &target);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    run(&mut cmd, &format!("building {} {features:?}", src.display()));
    std::fs::create_dir_all(out).expect("bin dir");
    for b in ["controller", "node-agent"] {
        std::fs::copy(target.join("debug").join(b), out.join(b)).unwrap_or_else(|e| panic!("copying {b}: {e}"));
    }
}

/// The pinned commit's binaries, built from a git worktree (removed again afterwards).
fn build_pinned(pin: &str, out: &Path) {
    let root = repo_root();
    let wt = root.join("target/skew/worktree");
    let _ = Command::new("git").arg("-C").arg(&root).args(["worktree", "remove", "--force"]).arg(&wt).output();
    let _ = std::fs::remove_dir_all(&wt);
    let _ = Command::new("git").arg("-C").arg(&root).args(["worktree", "prune"]).output();
    let have = Command::new("git").arg("-C").arg(&root).args(["cat-file", "-e", &format!("{pin}^{{commit}}")]).status();
    assert!(
        have.map(|s| s.success()).unwrap_or(false),
        "the pinned commit {pin} is not in this clone (a shallow clone? run `git fetch --unshallow`)"
    );
    run(
        Command::new("git").arg("-C").arg(&root).args(["worktree", "add", "--detach", "--force"]).arg(&wt).arg(pin),
        "git worktree add",
    );
    build(&wt, &[], out);
    run(
        Command::new("git").arg("-C").arg(&root).args(["worktree", "remove", "--force"]).arg(&wt),
        "git worktree remove",
    );
}

/// The binaries `tests/skew/prebuild.sh` made (tests/run.sh runs it and sets
/// FLEETADM_SKEW_PREBUILT), if they are of this pin and this commit.
fn prebuilt(pin: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(std::env::var_os("FLEETADM_SKEW_PREBUILT")?);
    let (old, probe) = (dir.join("pinned"), dir.join("probe"));
    let read = |p: PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let head = Command::new("git").arg("-C").arg(repo_root()).args(["rev-parse", "HEAD"]).output().ok()?;
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(
        read(old.join(".pin")) == pin && read(probe.join(".rev")) == head,
        "FLEETADM_SKEW_PREBUILT={} is not of pin {pin} and HEAD {head}: run tests/skew/prebuild.sh again",
        dir.display()
    );
    Some((old, probe))
}

/// A bin dir for the lab: this controller, this agent, and this tree's kubeadm simulator.
fn mix(dir: &Path, controller: &Path, agent: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("mix dir");
    let sim = fleetadm_tests::bin("kubeadm-sim");
    for (name, target) in [("controller", controller), ("node-agent", agent), ("kubeadm-sim", sim.as_path())] {
        std::os::unix::fs::symlink(target, dir.join(name)).expect("symlink");
    }
    dir.to_path_buf()
}

/// Enroll one host with `controller` and create a one-master cluster on it with `agent`; returns
/// the lab (still up) and the cluster's task logs.
fn create_cluster(tag: &str, bins: &Path) -> (Lab, String) {
    let lab = Lab::up_with(tag, 1, bins);
    let (ok, nodes) = lab.ctl(&["nodes", "list", "-o", "json"]);
    assert!(ok && nodes.contains("\"connected\": true"), "{tag}: the agent enrolled and opened a session: {nodes}");
    let (ok, out) = lab.ctl(&["cluster", "create", "skew", "--masters", "h1"]);
    assert!(ok, "{tag}: cluster create across versions: {out}");
    let st = lab.status("skew");
    assert_eq!(st["state"], "succeeded", "{tag}: {st}");
    let kinds: Vec<&str> =
        st["hosts"][0]["tasks"].as_array().expect("tasks").iter().filter_map(|t| t["kind"].as_str()).collect();
    for k in ["preflight", "hosts", "pki", "kubeadm-init"] {
        assert!(kinds.contains(&k), "{tag}: {k} ran: {kinds:?}");
    }
    assert!(lab.host("h1").join("etc-kubernetes/admin.conf").exists(), "{tag}: kubeadm init ran on the host");
    let (ok, logs) = lab.ctl(&["cluster", "logs", "skew"]);
    assert!(ok, "{tag}: {logs}");
    (lab, logs)
}

#[test]
fn pinned_and_current_builds_work_together_both_ways() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let pin = pin();
    let root = repo_root();
    let work = root.join("target/skew");
    let (old, probe) = match prebuilt(&pin) {
        Some(dirs) => dirs,
        None => {
            let (old, probe) = (work.join("bin-pinned"), work.join("bin-probe"));
            build_pinned(&pin, &old);
            build(&root, &["controller/skew-probe", "node-agent/skew-probe"], &probe);
            (old, probe)
        }
    };
    let current = fleetadm_tests::bin("controller").parent().expect("bin dir").to_path_buf();
    let probe_seen = |logs: &str, value: &str| logs.contains(&format!("skew-probe: the task carried \"{value}\""));

    // This tree's controller and the pinned agent, and the reverse.
    let (lab, logs) =
        create_cluster("skew-new-ctl", &mix(&work.join("mix1"), &current.join("controller"), &old.join("node-agent")));
    assert!(!logs.contains("skew-probe"), "{logs}");
    // A task kind newer than the agent is not sent to it; the operator is told why.
    let (ok, out) = lab.ctl(&["agent", "ping", "--nodes", "h1"]);
    assert!(!ok && out.contains("h1 | ! agent 0.1.0 on h1 cannot run ping-v1; upgrade node-agent"), "{out}");
    drop(lab);
    create_cluster("skew-new-agent", &mix(&work.join("mix2"), &old.join("controller"), &current.join("node-agent")));

    // Newer controller with an extra field in every task -> older agent: ignored, tasks run.
    let (_, logs) = create_cluster(
        "skew-field-to-old",
        &mix(&work.join("mix3"), &probe.join("controller"), &old.join("node-agent")),
    );
    assert!(!logs.contains("skew-probe"), "the pinned agent knows nothing of the field: {logs}");
    // Older controller -> newer agent (whose reports carry an extra field the controller ignores):
    // the field is simply absent.
    let (_, logs) = create_cluster(
        "skew-field-from-new",
        &mix(&work.join("mix4"), &old.join("controller"), &probe.join("node-agent")),
    );
    assert!(probe_seen(&logs, ""), "the newer agent saw no value from the older controller: {logs}");
    // Both sides know it: the field really travels (so the two runs above tested something).
    let (lab, logs) = create_cluster(
        "skew-field-both",
        &mix(&work.join("mix5"), &probe.join("controller"), &probe.join("node-agent")),
    );
    assert!(probe_seen(&logs, "from-a-newer-controller"), "{logs}");
    let (ok, out) = lab.ctl(&["agent", "ping", "--nodes", "h1"]);
    assert!(ok && out.contains("h1 | pong: node-agent 0.1.0"), "the same ping between current builds: {out}");
}
