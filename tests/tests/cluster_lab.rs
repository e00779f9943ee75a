//! Rollout failure paths on a lab fleet in network/mount namespaces on this host (control-plane
//! only, so no IPVS is needed): a host whose kubeadm fails, the failure report, a retry that keeps
//! finished work, hosts claimed by two clusters, and an agent killed in the middle of a task.
use std::path::Path;
use std::time::{Duration, Instant};

use fleetadm_tests::lab::{Lab, ONE_LAB};

fn task<'a>(st: &'a serde_json::Value, id_suffix: &str) -> &'a serde_json::Value {
    st["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["tasks"].as_array().into_iter().flatten())
        .find(|t| t["id"].as_str().is_some_and(|id| id.ends_with(id_suffix)))
        .unwrap_or_else(|| panic!("no task *{id_suffix} in {st}"))
}

fn set_kubeadm(lab: &Lab, wrapper: Option<&str>) {
    let link = lab.dir.join("bin/kubeadm");
    let _ = std::fs::remove_file(&link);
    let real = fleetadm_tests::bin("kubeadm-sim");
    match wrapper {
        None => std::os::unix::fs::symlink(&real, &link).expect("symlink"),
        Some(body) => {
            std::fs::write(&link, format!("#!/bin/sh\n{body}\nexec {} \"$@\"\n", real.display())).expect("wrapper");
            std::fs::set_permissions(&link, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
    }
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn failed_joins_are_reported_retried_and_resumed() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("test");

    // kubeadm join fails on every host: the rollout stops after the retries, says where and why.
    set_kubeadm(
        &lab,
        Some(r#"if [ "$1" = join ]; then echo "simulated join failure: etcd cluster is unhealthy" >&2; exit 1; fi"#),
    );
    let (ok, out) = lab.ctl(&["cluster", "create", "lab", "--masters", "h1,h2,h3"]);
    assert!(!ok, "create must fail: {out}");
    assert!(out.contains("h2: kubeadm-join failed after 3 attempt(s)"), "{out}");
    assert!(out.contains("simulated join failure"), "{out}");
    assert!(out.contains("controller cluster logs lab"), "points at the logs: {out}");
    let st = lab.status("lab");
    assert_eq!(st["state"], "failed");
    assert_eq!(task(&st, "init/h1/kubeadm-init")["state"], "succeeded");
    assert_eq!(task(&st, "join-masters/h2/kubeadm-join")["attempt"], 3);
    assert_eq!(task(&st, "join-masters/h3/kubeadm-join")["state"], "pending", "h3 never started");
    let (_, logs) = lab.ctl(&["cluster", "logs", "lab", "--host", "h2"]);
    assert!(logs.contains("etcd cluster is unhealthy"), "{logs}");

    // A host can only be in one cluster.
    let (ok, out) = lab.ctl(&["cluster", "create", "other", "--masters", "h3"]);
    assert!(!ok && out.contains("hosts already belong to cluster lab: h3"), "{out}");
    // Retrying with different hosts is refused; with the same hosts it resumes.
    let (ok, out) = lab.ctl(&["cluster", "create", "lab", "--masters", "h1,h2"]);
    assert!(!ok && out.contains("same hosts"), "{out}");
    // A week later the operation's join token has long expired (the simulated apiserver keeps
    // kubeadm's expiry; here the week passes by rewriting it). The retry is a new operation with
    // its own token.
    let tokens = lab.host("h1").join("etc-kubernetes/sim/tokens");
    let first = std::fs::read_to_string(&tokens).expect("h1's tokens");
    let first_id = first.split('.').next().expect("a token").to_string();
    assert_eq!(first.lines().count(), 1, "{first}");
    let expired: String = first.lines().map(|l| format!("{} 1\n", l.split(' ').next().unwrap_or(""))).collect();
    std::fs::write(&tokens, expired).expect("expire the token");
    set_kubeadm(&lab, None);
    let (ok, out) = lab.ctl(&["cluster", "create", "lab", "--masters", "h1,h2,h3"]);
    assert!(ok, "retry must succeed: {out}");
    let st = lab.status("lab");
    assert_eq!(st["state"], "succeeded");
    assert_eq!(task(&st, "init/h1/kubeadm-init")["attempt"], 1, "finished work is not redone");
    assert_eq!(task(&st, "join-masters/h2/kubeadm-join")["attempt"], 4);
    assert_eq!(task(&st, "join-token/h1/join-token")["attempt"], 2, "a new token for the retry: {st}");
    assert!(lab.host("h3").join("etc-kubernetes/manifests/kube-apiserver.yaml").exists());
    let join =
        std::fs::read_to_string(lab.host("h2").join("etc-kubernetes/fleetadm/kubeadm-join.yaml")).expect("h2 join");
    assert!(!join.contains(&format!("token: {first_id}.")), "the retry joined with a new token: {join}");
    let (_, logs) = lab.ctl(&["cluster", "logs", "lab", "--host", "h1"]);
    assert!(logs.contains(&format!("token {first_id} deleted")), "the expired token is deleted: {logs}");
    // Deleted at the end on every member (the simulator replicates like etcd): no token is left.
    for h in ["h1", "h2", "h3"] {
        let left = std::fs::read_to_string(lab.host(h).join("etc-kubernetes/sim/tokens")).expect("tokens");
        assert_eq!(left.trim(), "", "{h}: join tokens left after the operation: {left}");
    }

    // Narrow, short-lived kubeconfigs: CN=user, O=group, signed by the cluster CA, an hour.
    let (ok, out) = lab.ctl(&["cluster", "kubeconfig", "lab", "--user", "alice", "--group", "dev", "--ttl", "1h"]);
    assert!(ok && out.contains("valid until"), "{out}");
    let data = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-certificate-data: "))
        .unwrap_or_else(|| panic!("no client certificate in {out}"))
        .to_string();
    let subject = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo {data} | base64 -d | openssl x509 -noout -subject"))
        .output()
        .expect("openssl");
    let subject = String::from_utf8_lossy(&subject.stdout).into_owned();
    assert!(subject.contains("CN = alice") && subject.contains("O = dev"), "{subject}");
    let (ok, admin) = lab.ctl(&["cluster", "kubeconfig", "lab"]);
    assert!(ok && !admin.contains(&data), "the admin kubeconfig is another certificate");
    let (ok, out) = lab.ctl(&["cluster", "kubeconfig", "lab", "--user", "bob", "--ttl", "99999h"]);
    assert!(!ok && out.contains("--ttl must be between"), "{out}");

    // An agent killed while its task runs: after its restart the rollout still completes, and
    // kubeadm init is not run twice over a finished control plane.
    set_kubeadm(&lab, Some(r#"[ "$1" = init ] && sleep 2"#));
    // This one comes from a sealos Clusterfile with a kubeadm override merged over the defaults.
    let cf = lab.dir.join("Clusterfile");
    std::fs::write(
        &cf,
        "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata:\n  name: solo\nspec:\n  hosts:\n  - ips: [10.78.0.14:22]\n    roles: [master, amd64]\n---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\nnetworking:\n  podSubnet: 10.244.0.0/16\n",
    )
    .expect("Clusterfile");
    let (ok, out) = lab.ctl(&["cluster", "create", "-f", cf.to_str().expect("utf-8 path"), "--detach"]);
    assert!(ok, "{out}");
    wait("h4's kubeadm init to start", 60, || task(&lab.status("solo"), "init/h4/kubeadm-init")["state"] == "running");
    let _ = lab.run(&["stop-agent", "h4"]);
    std::thread::sleep(Duration::from_millis(2500));
    let _ = lab.run(&["start-agent", "h4"]);
    let (ok, out) = lab.ctl(&["cluster", "status", "solo", "--watch"]);
    assert!(ok, "rollout completes after the agent restart: {out}");
    let journal = std::fs::read_dir(lab.host("h4").join("state/tasks")).expect("agent task journal").count();
    assert!(journal >= 4, "the agent journals its tasks ({journal})");
    let (_, logs) = lab.ctl(&["cluster", "logs", "solo", "--host", "h4"]);
    assert!(
        logs.contains("kubeadm init already finished") || logs.contains("initialized successfully"),
        "kubeadm init ran once or was recognised as done: {logs}"
    );
    assert!(Path::new(&lab.host("h4").join("etc-kubernetes/admin.conf")).exists());
    let rendered = std::fs::read_to_string(lab.host("h4").join("etc-kubernetes/fleetadm/kubeadm-init.yaml"))
        .expect("kubeadm config written 0600 by the agent");
    assert!(rendered.contains("podSubnet: 10.244.0.0/16"), "Clusterfile override applied: {rendered}");
    assert!(rendered.contains("serviceSubnet: 10.96.0.0/22"), "defaults kept: {rendered}");
}

#[test]
fn worker_failure_budget_and_delete() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("budget");
    // Workers cannot join (on a kernel without IPVS their load balancer fails first; with IPVS the
    // join itself fails): within the budget the cluster still comes up without them.
    set_kubeadm(
        &lab,
        Some(
            r#"if [ "$1" = join ] && [ "$(hostname)" != h2 ]; then echo "simulated worker join failure" >&2; exit 1; fi"#,
        ),
    );
    let (ok, out) =
        lab.ctl(&["cluster", "create", "edge", "--masters", "h1", "--nodes", "h3,h4", "--max-failures", "100%"]);
    assert!(ok, "within the failure budget: {out}");
    assert!(out.contains("2 workers failed: h3, h4") || out.contains("2 workers failed: h4, h3"), "{out}");
    let st = lab.status("edge");
    assert_eq!(st["failed_workers"].as_array().map(|a| a.len()), Some(2), "{st}");
    assert_eq!(task(&st, "sync-ipvs/h3/lb")["state"], "skipped");
    // A second, healthy cluster on the remaining host (deleted with --force below), with an etcd
    // backup schedule from the start (a bad one refused first, nothing recorded).
    let (ok, out) = lab.ctl(&["cluster", "create", "tight", "--masters", "h2", "--backup-every", "10s"]);
    assert!(!ok && out.contains("--backup-every must be at least 1m"), "{out}");
    let (_, list) = lab.ctl(&["cluster", "list", "-o", "json"]);
    assert!(!list.contains("\"tight\""), "a refused create records nothing: {list}");
    let (ok, out) = lab.ctl(&["cluster", "create", "tight", "--masters", "h2", "--backup-every", "6h", "--keep", "3"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["cluster", "backups", "tight"]);
    assert!(ok && out.contains("schedule: every 6h, keeping 3"), "{out}");

    // Delete: every host is reset and the cluster is forgotten.
    assert!(lab.host("h1").join("etc-kubernetes/manifests/kube-apiserver.yaml").exists());
    let (ok, out) = lab.ctl(&["cluster", "delete", "edge"]);
    assert!(ok, "delete: {out}");
    assert!(out.contains("cluster edge deleted"), "{out}");
    assert!(!lab.host("h1").join("etc-kubernetes/manifests/kube-apiserver.yaml").exists(), "kubeadm reset ran");
    assert!(!lab.host("h1").join("etc-kubernetes/fleetadm").exists());
    let hosts = std::fs::read_to_string(lab.host("h1").join("hosts")).expect("hosts");
    assert!(!hosts.contains("fleetadm managed block") && hosts.contains("localhost"), "{hosts}");
    let (_, list) = lab.ctl(&["cluster", "list", "-o", "json"]);
    assert!(!list.contains("\"edge\""), "{list}");
    let (ok, out) = lab.ctl(&["cluster", "status", "edge"]);
    assert!(!ok && out.contains("not found"), "{out}");
    // The hosts are free again. Over the budget (the default allows no failed worker), the
    // rollout stops and names the worker.
    let (ok, out) = lab.ctl(&["cluster", "create", "over", "--masters", "h3", "--nodes", "h4"]);
    assert!(!ok, "over the failure budget: {out}");
    assert!(out.contains("1 workers failed (h4), more than --max-failures allows (0)"), "{out}");
    assert_eq!(lab.status("over")["state"], "failed");
    let (ok, out) = lab.ctl(&["cluster", "delete", "over"]);
    assert!(ok, "delete a failed cluster: {out}");
    set_kubeadm(&lab, None);
    let (ok, out) = lab.ctl(&["cluster", "create", "again", "--masters", "h1"]);
    assert!(ok, "{out}");
    // --force forgets without touching the hosts.
    let (ok, out) = lab.ctl(&["cluster", "delete", "tight", "--force"]);
    assert!(ok && out.contains("forgotten"), "{out}");
    assert!(lab.host("h2").join("etc-kubernetes/manifests/kube-apiserver.yaml").exists());

    // The audit log: who did what (the admin socket peer's uid, from the kernel), with what
    // result, and every task outcome, with the host that reported it.
    let (ok, _) = lab.ctl(&["cluster", "delete", "nosuch"]);
    assert!(!ok);
    let sock_dir = lab.dir.join("controller");
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m));
    mode(&sock_dir, 0o711).expect("chmod");
    mode(&sock_dir.join("admin.sock"), 0o666).expect("chmod");
    let other = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(fleetadm_tests::bin("controller"))
        .args(["token", "create", "--description", "from nobody", "--data-dir"])
        .arg(&sock_dir)
        .output()
        .expect("setpriv");
    mode(&sock_dir, 0o700).expect("chmod");
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let events = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut a = vec!["events", "-o", "json", "--limit", "10000"];
        a.extend_from_slice(args);
        let (ok, out) = lab.ctl(&a);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let has = |evs: &[serde_json::Value], actor: &str, action: &str, target: &str, result: &str| {
        evs.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["target"].as_str().is_some_and(|t| t.ends_with(target))
                && e["result"].as_str().is_some_and(|r| r.starts_with(result))
        })
    };
    let edge = events(&["--cluster", "edge"]);
    assert!(has(&edge, "uid:0", "cluster.create", "edge", "ok"), "{edge:?}");
    // (this kernel has no IPVS: the workers' load balancer step is the one that fails)
    assert!(has(&edge, "node:h3", "task", "join-workers/h3/lb", "failed (attempt 3)"), "{edge:?}");
    assert!(has(&edge, "node:h1", "task", "init/h1/kubeadm-init", "succeeded (attempt 1)"), "{edge:?}");
    assert!(has(&edge, "uid:0", "cluster.delete", "edge", "ok"), "{edge:?}");
    assert!(edge.iter().all(|e| e["cluster"] == "edge"), "filtered by cluster");
    let all = events(&["--since", "1h"]);
    assert!(has(&all, "uid:0", "cluster.delete", "nosuch", "error: cluster nosuch not found"), "{all:?}");
    assert!(has(&all, "uid:65534", "token.create", "", "ok"), "the caller's real uid: {all:?}");
    assert!(has(&all, "uid:0", "cluster.delete --force", "tight", "ok"), "{all:?}");
    let seqs: Vec<u64> = all.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() == all.len(), "in order");
    let (ok, table) = lab.ctl(&["events", "--limit", "3"]);
    assert!(ok && table.starts_with("TIME") && table.lines().count() == 4, "{table}");
}

#[test]
fn a_failed_kubeadm_attempt_is_reset_and_retried_not_taken_for_success() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("retry");
    // The first init on h1 and the first control-plane join on h2 write their manifests,
    // kubeconfigs and etcd data, then fail the way kubeadm does when the control plane never comes
    // up. Their files look like success; only kubeadm's exit status says otherwise.
    let once = lab.dir.join("failed-once");
    std::fs::create_dir_all(&once).expect("dir");
    set_kubeadm(
        &lab,
        Some(&format!(
            r#"if [ "$1" = init ] || [ "$1" = join ]; then f={}/$(hostname); [ -e "$f" ] || {{ touch "$f"; export KUBEADM_SIM_FAIL=wait-control-plane; }}; fi"#,
            once.display()
        )),
    );
    let (ok, out) = lab.ctl(&["cluster", "create", "again", "--masters", "h1,h2"]);
    assert!(ok, "the retries succeed: {out}");
    let st = lab.status("again");
    assert_eq!(task(&st, "init/h1/kubeadm-init")["attempt"], 2, "{st}");
    assert_eq!(task(&st, "join-masters/h2/kubeadm-join")["attempt"], 2, "{st}");
    assert_eq!(std::fs::read_dir(&once).expect("dir").count(), 2, "one injected failure per host");
    for h in ["h1", "h2"] {
        let (_, logs) = lab.ctl(&["cluster", "logs", "again", "--host", h]);
        assert!(logs.contains("cleaning up a failed attempt first"), "{h}: the retry reset first: {logs}");
        assert!(logs.contains("[reset] done"), "{h}: kubeadm reset ran: {logs}");
        assert!(!logs.contains("already finished"), "{h}: a failed attempt is never success: {logs}");
        // The retry really ran kubeadm to the end: its control plane answers (the stand-in
        // apiserver runs), and the controller's PKI survived the reset.
        let pid = std::fs::read_to_string(lab.host(h).join("etc-kubernetes/sim/apiserver.pid"))
            .unwrap_or_else(|e| panic!("{h}: no apiserver: {e}"));
        assert!(Path::new(&format!("/proc/{}", pid.trim())).exists(), "{h}: apiserver {pid} is running");
        let key = lab.host(h).join("etc-kubernetes/pki/ca.key");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).expect("ca.key kept").permissions());
        assert_eq!(mode & 0o777, 0o600, "{h}: ca.key restored 0600");
        assert!(lab
            .host(h)
            .join("etc-kubernetes/fleetadm")
            .read_dir()
            .expect("markers")
            .any(|e| e.map(|e| e.file_name().to_string_lossy().ends_with(".done")).unwrap_or(false)));
    }
}

#[test]
fn a_paused_rollout_stays_paused_across_a_controller_restart_and_resumes() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("pause");
    let (ok, out) = lab.ctl(&["cluster", "create", "p", "--masters", "h1,h2", "--detach"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["op", "pause", "cluster/p"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out) = lab.ctl(&["op", "pause", "cluster/p"]);
    assert!(!ok && out.contains("paused already"), "{out}");
    // Whatever was running finishes; the next task waits, unsent.
    let held = |st: &serde_json::Value| -> Option<String> {
        st["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|h| h["tasks"].as_array().into_iter().flatten())
            .find(|t| {
                t["state"] == "pending" && t["waiting"].as_str().is_some_and(|w| w.contains("op resume cluster/p"))
            })
            .and_then(|t| t["id"].as_str().map(str::to_string))
    };
    wait("a task held by the pause", 60, || held(&lab.status("p")).is_some());
    let id = held(&lab.status("p")).expect("held task");
    let st = lab.status("p");
    assert_eq!(st["paused"], true, "{st}");
    assert_eq!(st["state"], "running");
    let (_, text) = lab.ctl(&["cluster", "status", "p"]);
    assert!(text.contains("state running (paused)"), "{text}");
    let (_, ops) = lab.ctl(&["op", "list"]);
    assert!(ops.lines().any(|l| l.contains("cluster/p") && l.contains("paused")), "{ops}");

    // The controller is killed and started again: the rollout is resumed, still paused.
    let _ = lab.run(&["kill-controller"]);
    let _ = lab.run(&["start-controller"]);
    let connected = |h: &str| {
        let (_, v) = lab.ctl(&["nodes", "show", h, "-o", "json"]);
        v.contains("\"connected\": true")
    };
    wait("the agents to reconnect", 60, || connected("h1") && connected("h2"));
    // Several of the rollout's rounds (a second each) with both hosts connected.
    std::thread::sleep(Duration::from_secs(3));
    let st = lab.status("p");
    assert_eq!(st["paused"], true, "paused across the restart: {st}");
    let t = task(&st, &id);
    assert_eq!((t["state"].as_str(), t["attempt"].as_u64()), (Some("pending"), Some(0)), "{t}");

    let (ok, out) = lab.ctl(&["op", "resume", "cluster/p"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["cluster", "status", "p", "--watch"]);
    assert!(ok, "the rollout finishes once resumed: {out}");
    let st = lab.status("p");
    assert_eq!(st["state"], "succeeded", "{st}");
    assert!(st.get("paused").is_none_or(|p| p == false), "{st}");
    let (ok, out) = lab.ctl(&["op", "resume", "cluster/p"]);
    assert!(!ok && out.contains("not running"), "{out}");
    let (ok, out) = lab.ctl(&["events", "-o", "json"]);
    assert!(ok && out.contains("op.pause") && out.contains("op.resume"), "audited: {out}");
}

#[test]
fn master0_can_leave_and_the_next_master_takes_over_but_the_last_one_stays() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("master0");
    let peers = |h: &str| std::fs::read_to_string(lab.host(h).join("etc-kubernetes/sim/peers")).unwrap_or_default();
    let (ok, out) = lab.ctl(&["cluster", "create", "m", "--masters", "h1,h2"]);
    assert!(ok, "{out}");
    assert_eq!(peers("h2").lines().count(), 2, "{}", peers("h2"));
    // h3 joins as a third master: etcd grows on every member, h1's certificate covers it.
    let (ok, out) = lab.ctl(&["cluster", "add", "m", "--masters", "h3"]);
    assert!(ok && out.contains("add masters h3 done"), "{out}");
    for h in ["h1", "h2", "h3"] {
        assert_eq!(peers(h).lines().count(), 3, "{h}: {}", peers(h));
    }
    // master0 (h1) leaves: it leaves etcd during its reset, h2 deletes its Node object.
    let (ok, out) = lab.ctl(&["cluster", "remove", "m", "--masters", "h1"]);
    assert!(ok && out.contains("remove masters h1 done"), "{out}");
    for h in ["h2", "h3"] {
        assert!(!peers(h).contains("10.78.0.11") && peers(h).lines().count() == 2, "{h}: {}", peers(h));
        let nodes = std::fs::read_to_string(lab.host(h).join("etc-kubernetes/sim/nodes")).unwrap_or_default();
        assert!(!nodes.lines().any(|l| l.starts_with("h1 ")), "{h}: {nodes}");
    }
    assert!(!lab.host("h1").join("etc-kubernetes/manifests/kube-apiserver.yaml").exists(), "h1 reset");
    let st = lab.status("m");
    assert_eq!(st["masters"], serde_json::json!(["h2", "h3"]), "{st}");
    // h2 is the reference now: the next host joins with h2's token (no IPVS on this machine's
    // kernel, so a master: workers are in the VM lab).
    let (ok, out) = lab.ctl(&["cluster", "add", "m", "--masters", "h4"]);
    assert!(ok && out.contains("add masters h4 done"), "{out}");
    let st = lab.status("m");
    assert!(task(&st, "join-token/h2/join-token")["state"] == "succeeded", "{st}");
    assert_eq!(peers("h3").lines().count(), 3, "{}", peers("h3"));
    // The last master cannot go; a host of no cluster is refused as a master to remove.
    let (ok, out) = lab.ctl(&["cluster", "remove", "m", "--masters", "h2,h3,h4"]);
    assert!(!ok && out.contains("no master left"), "{out}");
    let (ok, out) = lab.ctl(&["cluster", "remove", "m", "--masters", "h1"]);
    assert!(!ok && out.contains("h1 is not a master of cluster m"), "{out}");
}

#[test]
fn agents_warn_before_certificates_expire_and_a_renewal_keeps_the_validity() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let metrics = format!("127.0.0.1:{}", fleetadm_tests::free_port());
    let lab = Lab::up_env(
        "certwarn",
        2,
        bin.parent().expect("bin dir"),
        &[("LAB_INVENTORY_INTERVAL", "1s"), ("LAB_METRICS", &metrics)],
    );
    let (ok, out) = lab.ctl(&["cluster", "create", "short", "--masters", "h1", "--cert-validity", "20days"]);
    assert!(ok, "{out}");
    // The agent's inventory carries the warning; the controller shows it and logs it.
    wait("h1's agent to report expiring certificates", 60, || {
        let (_, v) = lab.ctl(&["nodes", "show", "h1", "-o", "json"]);
        v.contains("\"expiring_certificates\"") && v.contains("\"name\": \"apiserver\"")
    });
    let (_, list) = lab.ctl(&["nodes", "list"]);
    assert!(list.contains("warning: h1:") && list.contains("expire within 30 days"), "{list}");
    assert!(!list.contains("warning: h2:"), "h2 holds no cluster certificates: {list}");
    let log = std::fs::read_to_string(lab.dir.join("controller.log")).unwrap_or_default();
    assert!(log.contains("certificates expire within 30 days"), "controller log warns");
    let scrape = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    let gauge = scrape.lines().find(|l| l.starts_with("fleetadm_node_certs_expiring{node=\"h1\"}"));
    let count: u32 = gauge.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(count >= 10, "every certificate of h1 expires within 30 days: {gauge:?}");
    assert!(!scrape.contains("node=\"h2\""), "{scrape}");
    let (ok, certs) = lab.ctl(&["cluster", "certs", "short"]);
    assert!(ok, "{certs}");
    assert!(certs.contains("expires soon") && certs.contains("warning:"), "{certs}");
    let residual = |text: &str, name: &str| -> String {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(residual(&certs, "apiserver"), "19d", "{certs}");
    let before = std::fs::read_to_string(lab.host("h1").join("etc-kubernetes/pki/apiserver.crt")).expect("cert");
    // A renewal keeps the cluster's validity (20 days, not kubeadm's one year).
    let (ok, out) = lab.ctl(&["cluster", "certs", "short", "--renew", "apiserver"]);
    assert!(ok && out.contains("renew apiserver on 1 masters"), "{out}");
    let after = std::fs::read_to_string(lab.host("h1").join("etc-kubernetes/pki/apiserver.crt")).expect("cert");
    assert_ne!(before, after, "a new certificate was installed");
    let (_, certs) = lab.ctl(&["cluster", "certs", "short", "-o", "json"]);
    // (the JSON on stdout, then the expiry warning on stderr)
    let doc: serde_json::Value = serde_json::Deserializer::from_str(&certs)
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON: {certs}"));
    assert!(certs.contains("certificates expire within 30d"), "still expiring within 30 days, and said so: {certs}");
    let api = doc["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "apiserver")
        .unwrap_or_else(|| panic!("{certs}"));
    let left = api["residual_secs"].as_i64().unwrap_or(0);
    assert!((19 * 86400..=20 * 86400).contains(&left), "renewed for 20 days: {left}s");
    assert_eq!(doc["validity_secs"], 20 * 86400);
    // A host that does not answer makes the check fail, naming it.
    let _ = lab.run(&["stop-agent", "h1"]);
    let (ok, out) = lab.ctl(&["cluster", "certs", "short"]);
    assert!(!ok && out.contains("h1") && out.contains("did not answer"), "{out}");
}

#[test]
fn etcd_backups_are_taken_verified_kept_on_schedule_and_pruned() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let lab = Lab::up_env("backup", 2, bin.parent().expect("bin dir"), &[("LAB_BACKUP_ROUND", "1")]);
    let (ok, out) = lab.ctl(&["cluster", "backup", "nosuch"]);
    assert!(!ok && out.contains("cluster nosuch not found"), "{out}");
    let (ok, out) = lab.ctl(&["cluster", "create", "b", "--masters", "h1,h2"]);
    assert!(ok, "{out}");
    let (ok, out) = lab.ctl(&["cluster", "backup", "b"]);
    assert!(ok && out.contains("taken on h1"), "{out}");
    let list = |lab: &Lab| -> Vec<serde_json::Value> {
        let (ok, text) = lab.ctl(&["cluster", "backups", "b", "-o", "json"]);
        assert!(ok, "{text}");
        serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let first = list(&lab);
    assert_eq!(first.len(), 1, "{first:?}");
    let sha = first[0]["sha256"].as_str().expect("sha").to_string();
    // The stored snapshot is the member's keyspace, intact (etcdutl checks its hash).
    let stored = lab.dir.join("controller/backups/sha256").join(&sha[..2]).join(&sha);
    let text = std::fs::read_to_string(&stored).unwrap_or_else(|e| panic!("{}: {e}", stored.display()));
    assert!(text.contains("h1 control-plane") && text.contains("h2 control-plane"), "{text}");
    let etcdutl = lab.dir.join("bin/etcdutl");
    let st = std::process::Command::new(&etcdutl)
        .args(["snapshot", "status", &stored.to_string_lossy(), "--write-out=json"])
        .output()
        .expect("etcdutl");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let sum: serde_json::Value = serde_json::from_slice(&st.stdout).expect("json");
    assert_eq!(sum["revision"], first[0]["revision"], "{sum} vs {}", first[0]);
    assert_eq!(sum["totalSize"], first[0]["size"]);
    // master0's agent is down: the next master takes it.
    let _ = lab.run(&["stop-agent", "h1"]);
    let (ok, out) = lab.ctl(&["cluster", "backup", "b"]);
    assert!(ok && out.contains("taken on h2"), "{out}");
    let _ = lab.run(&["stop-agent", "h2"]);
    let (ok, out) = lab.ctl(&["cluster", "backup", "b"]);
    assert!(!ok && out.contains("h1 is not connected") && out.contains("h2 is not connected"), "{out}");
    let _ = lab.run(&["start-agent", "h1"]);
    let _ = lab.run(&["start-agent", "h2"]);
    let connected = |h: &str| lab.ctl(&["nodes", "show", h, "-o", "json"]).1.contains("\"connected\": true");
    wait("the agents to come back", 60, || connected("h1") && connected("h2"));
    // A schedule: refused nonsense first; then the newest backup is older than the interval
    // (1 minute) only after a minute, so the schedule's first backup waits; with --keep 2 the
    // next manual backup drops the oldest.
    let (ok, out) = lab.ctl(&["cluster", "set", "b", "--backup-every", "10s", "--keep", "2"]);
    assert!(!ok && out.contains("at least 1m"), "{out}");
    let (ok, out) = lab.ctl(&["cluster", "set", "b", "--backup-every", "1m", "--keep", "2"]);
    assert!(ok && out.contains("every 1m, keeping 2"), "{out}");
    let (ok, out) = lab.ctl(&["cluster", "backup", "b"]);
    assert!(ok, "{out}");
    let now = list(&lab);
    assert_eq!(now.len(), 2, "retention keeps 2: {now:?}");
    assert!(now.iter().all(|b| b["id"] != first[0]["id"]), "the oldest went: {now:?}");
    // The records survive a controller restart (flushed before they are listed).
    let _ = lab.run(&["kill-controller"]);
    let _ = lab.run(&["start-controller"]);
    assert_eq!(list(&lab).len(), 2);
    // After the interval the schedule takes one by itself (and the retention still holds).
    wait("a scheduled backup", 120, || list(&lab).iter().any(|b| b["scheduled"] == true));
    assert_eq!(list(&lab).len(), 2);
    let (_, text) = lab.ctl(&["cluster", "backups", "b"]);
    assert!(text.contains("schedule") && text.contains("every 1m, keeping 2"), "{text}");

    // Damage and restore: h2's Node object deleted, then etcd restored on both masters from the
    // newest backup (which has it).
    let (ok, _) = lab.ctl(&["cluster", "set", "b", "--backup-every", "0", "--keep", "2"]);
    assert!(ok, "schedule off");
    let newest = list(&lab).last().and_then(|b| b["id"].as_str().map(str::to_string)).expect("a backup");
    let nodes = |h: &str| std::fs::read_to_string(lab.host(h).join("etc-kubernetes/sim/nodes")).unwrap_or_default();
    let out = lab.run(&["on", "h1", "kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf", "delete", "node", "h2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!nodes("h1").contains("h2 control-plane") && !nodes("h2").contains("h2 control-plane"), "damaged");
    let (ok, out) = lab.ctl(&["cluster", "restore", "b", "--snapshot", "etcd-0"]);
    assert!(!ok && out.contains("has no backup \"etcd-0\""), "{out}");
    let (ok, plan) = lab.ctl(&["cluster", "restore", "b", "--snapshot", &newest, "--dry-run"]);
    assert!(ok && plan.contains("etcd-stop") && plan.contains("apiserver-start"), "{plan}");
    let (ok, out) = lab.ctl(&["cluster", "restore", "b", "--snapshot", &newest]);
    assert!(ok && out.contains(&format!("restore etcd from {newest} on 2 masters")), "{out}");
    for h in ["h1", "h2"] {
        assert!(nodes(h).contains("h2 control-plane"), "{h}: the Node object is back: {}", nodes(h));
        let kept = std::fs::read_dir(lab.host(h).join("var-lib-etcd"))
            .expect("etcd dir")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".member.before-restore-"));
        assert!(kept, "{h}: the old etcd data is kept");
        assert!(lab.host(h).join("etc-kubernetes/manifests/kube-apiserver.yaml").exists(), "{h}: started again");
    }
    // The control plane answers again: a backup works.
    let (ok, out) = lab.ctl(&["cluster", "backup", "b"]);
    assert!(ok, "{out}");
}
