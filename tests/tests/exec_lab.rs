//! `controller exec` on a lab fleet (hosts in network/mount/UTS namespaces, real agents): output
//! per host as it comes, failures with their reason, the exit status, host selection, bad input,
//! timeouts and the audit log.
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetadm_tests::lab::{Lab, ONE_LAB};

/// `controller VERB.. ARGS` against the lab (the data dir comes from the environment), stdout and
/// stderr apart: (exit success, stdout, stderr).
fn verb(lab: &Lab, verb: &[&str], args: &[&str]) -> (bool, String, String) {
    let o = Command::new(fleetadm_tests::bin("controller"))
        .args(verb)
        .args(args)
        .env("FLEETADM_DATA_DIR", lab.dir.join("controller"))
        .output()
        .expect("run controller");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `controller exec ARGS` (everything after `--` is the command).
fn exec(lab: &Lab, args: &[&str]) -> (bool, String, String) {
    verb(lab, &["exec"], args)
}

/// `controller agent ping ARGS`.
fn ping(lab: &Lab, args: &[&str]) -> (bool, String, String) {
    verb(lab, &["agent", "ping"], args)
}

/// The process id in `host`'s answer to a ping
/// (`h1 | pong: node-agent 0.1.0 (protocol 3), pid 123, up 0h00m05s (1.2 ms)`).
fn pong_pid(out: &str, host: &str) -> u32 {
    let prefix = format!("{host} | pong: node-agent {} (protocol ", env!("CARGO_PKG_VERSION"));
    let line = out.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no answer from {host}: {out}"));
    assert!(line.ends_with(" ms)"), "the round trip is shown: {line}");
    line.split(", pid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

#[test]
fn exec_runs_on_the_chosen_hosts_streams_their_output_and_fails_if_any_host_fails() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("exec");

    let script = r#"echo out-$(hostname); echo err-$(hostname) >&2; [ "$(hostname)" != h2 ]"#;
    let (ok, out, err) = exec(&lab, &["--nodes", "h1,h2,h3", "--", "sh", "-c", script]);
    assert!(!ok, "h2 failed, so exec fails: {out}{err}");
    for h in ["h1", "h2", "h3"] {
        assert!(out.contains(&format!("{h} | out-{h}\n")), "{h}'s stdout, prefixed: {out}");
        assert!(out.contains(&format!("{h} | err-{h}\n")), "{h}'s stderr, prefixed: {out}");
    }
    assert!(out.contains("h2 | ! sh failed (exit 1)"), "why h2 failed: {out}");
    assert!(!out.contains("h1 | !") && !out.contains("h3 | !"), "{out}");
    assert!(err.contains("exec: 3 hosts, 2 succeeded, 1 failed") && err.contains("failed on h2"), "{err}");
    assert!(!out.contains("h4 |"), "only the chosen hosts: {out}");

    // A failure budget: one at a time, none tolerated; h1 fails, so h2 and h3 never start.
    let (ok, out, err) = exec(
        &lab,
        &[
            "--nodes",
            "h1,h2,h3",
            "--max-parallel",
            "1",
            "--max-failures",
            "0",
            "--",
            "sh",
            "-c",
            "echo ran-$(hostname); false",
        ],
    );
    assert!(!ok && out.contains("h1 | ran-h1") && !out.contains("ran-h2") && !out.contains("ran-h3"), "{out}{err}");
    assert!(err.contains("1 failed, 2 skipped") && err.contains("not started on h2, h3"), "{err}");
    let (ok, _, err) = exec(&lab, &["--nodes", "h1", "--max-failures", "lots", "--", "true"]);
    assert!(!ok && err.contains("--max-failures"), "{err}");
    // --max-parallel as a share of the chosen hosts.
    let (ok, out, err) = exec(&lab, &["--nodes", "h1,h2", "--max-parallel", "50%", "--", "hostname"]);
    assert!(ok && out.contains("h1 | h1\n") && out.contains("h2 | h2\n"), "{out}{err}");
    let (ok, _, err) = exec(&lab, &["--nodes", "h1", "--max-parallel", "0%", "--", "true"]);
    assert!(!ok && err.contains("expected 1-10000 hosts or 1-100%"), "{err}");

    let (ok, out, err) = exec(&lab, &["--nodes", "h1,nosuch", "--", "true"]);
    assert!(!ok && err.contains("unknown nodes: nosuch"), "{out}{err}");
    let (ok, _, err) = exec(&lab, &["--nodes", "h1"]);
    assert!(!ok && err.contains("required"), "a command is required: {err}");
    let (ok, _, err) = exec(&lab, &["--role", "master", "--nodes", "h1", "--", "true"]);
    assert!(!ok && err.contains("--cluster"), "--role needs --cluster: {err}");

    // Per-host timeout: the command's process group is killed, the host reported as failed.
    let t0 = Instant::now();
    let (ok, out, _) = exec(&lab, &["--nodes", "h1", "--timeout", "2s", "--", "sleep", "30"]);
    assert!(!ok && out.contains("h1 | !") && out.contains("timed out after 2s"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(20), "stopped at the timeout, not at the end of sleep");

    // A host whose agent is down fails at once, with the reason.
    let _ = lab.run(&["stop-agent", "h3"]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out, _) = exec(&lab, &["--nodes", "h3", "--", "true"]);
    assert!(!ok && out.contains("h3 | ! h3 is not connected"), "{out}");

    // The no-op task: every chosen agent answers with what runs (its own process), h3 cannot.
    let (ok, out, err) = ping(&lab, &["-l", "lab=yes"]);
    assert!(!ok && out.contains("h3 | ! h3 is not connected") && err.contains("the ping failed on h3"), "{out}{err}");
    let mut pids = std::collections::BTreeSet::new();
    for h in ["h1", "h2", "h4"] {
        let pid = pong_pid(&out, h);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "node-agent", "{h}'s answer names its running agent: {out}");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 3, "each host answered for itself: {out}");
    let _ = lab.run(&["start-agent", "h3"]);
    let back = Instant::now();
    let (ok, out, err) = loop {
        let r = ping(&lab, &["--nodes", "h3", "--timeout", "5s"]);
        if r.0 || back.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(ok && err.contains("agent ping: 1 hosts, 1 succeeded"), "h3 answers once its agent is back: {out}{err}");
    assert!(!pids.contains(&pong_pid(&out, "h3")), "{out}");
    let (ok, _, err) = ping(&lab, &["--nodes", "h1", "--", "true"]);
    assert!(!ok && err.contains("unexpected argument"), "a ping runs no command: {err}");
    let (ok, _, err) = ping(&lab, &["--nodes", "nosuch"]);
    assert!(!ok && err.contains("unknown nodes: nosuch"), "{err}");

    // Output arrives while the command runs, not at its end.
    let mut child = Command::new(fleetadm_tests::bin("controller"))
        .args(["exec", "--nodes", "h1", "--", "sh", "-c", "echo first; sleep 3; echo second"])
        .env("FLEETADM_DATA_DIR", lab.dir.join("controller"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let first_at = Instant::now();
    let second = lines.next().expect("a line").expect("utf-8");
    let gap = first_at.elapsed();
    assert_eq!((first.as_str(), second.as_str()), ("h1 | first", "h1 | second"));
    assert!(gap > Duration::from_secs(2), "the first line came {gap:?} before the second: streamed");
    assert!(child.wait().expect("wait").success());

    // Labels: from enrollment (lab.sh enrolls with --labels lab=yes,index=N) and set by the
    // operator; selectors choose hosts for exec and nodes list.
    let (ok, out) = lab.ctl(&["nodes", "list", "-l", "lab=yes,index!=4", "-o", "json"]);
    assert!(ok, "{out}");
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .expect("json")
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["h1", "h2", "h3"], "labels given at enrollment select: {out}");
    for (h, l) in [("h1", "zone=a"), ("h2", "zone=b"), ("h3", "zone=b")] {
        let (ok, out) = lab.ctl(&["nodes", "label", h, l]);
        assert!(ok, "{out}");
    }
    let (ok, out) = lab.ctl(&["nodes", "label", "h2", "role=gpu", "index-"]);
    assert!(ok && out.contains("node h2 labels: lab=yes,role=gpu,zone=b"), "set and removed: {out}");
    let (ok, out, err) = exec(&lab, &["-l", "zone=b,role!=gpu", "--", "hostname"]);
    assert!(ok && out == "h3 | h3\n", "only h3 matches: {out}{err}");
    let (ok, out, err) = exec(&lab, &["--nodes", "h1,h2,h3", "-l", "zone=b", "--", "hostname"]);
    assert!(ok && out.contains("h2 | h2") && out.contains("h3 | h3") && !out.contains("h1 |"), "{out}{err}");
    let (ok, _, err) = exec(&lab, &["-l", "zone=b;rm -rf", "--", "hostname"]);
    assert!(!ok && err.contains("selector"), "{err}");
    let (ok, out) = lab.ctl(&["nodes", "label", "h1", "bad key=x"]);
    assert!(!ok && out.contains("label key"), "{out}");
    let (ok, out) = lab.ctl(&["nodes", "label", "nosuch", "a=b"]);
    assert!(!ok && out.contains("no node named"), "{out}");

    // A cluster's hosts, by role.
    let (ok, out) = lab.ctl(&["cluster", "create", "c", "--masters", "h4"]);
    assert!(ok, "{out}");
    let (ok, out, err) = exec(&lab, &["--cluster", "c", "--role", "master", "--", "hostname"]);
    assert!(ok && out == "h4 | h4\n", "{out}{err}");
    let (ok, _, err) = exec(&lab, &["--cluster", "c", "--role", "node", "--", "hostname"]);
    assert!(!ok && err.contains("no hosts match"), "{err}");
    let (ok, _, err) = exec(&lab, &["--cluster", "nosuch", "--", "hostname"]);
    assert!(!ok && err.contains("cluster nosuch not found"), "{err}");

    // Audited: who ran what where, and how it went; each host's outcome too.
    let (ok, events) = lab.ctl(&["events", "-o", "json", "--limit", "10000"]);
    assert!(ok, "{events}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&events).expect("json");
    assert!(
        events.iter().any(|e| e["actor"] == "uid:0"
            && e["action"] == "exec"
            && e["result"] == "3 hosts: 2 succeeded, 1 failed (h2)"
            && e["detail"].as_str().is_some_and(|d| d.starts_with("on h1,h2,h3"))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "exec" && e["result"].as_str().is_some_and(|r| r.contains("unknown nodes"))),
        "refusals are audited too"
    );
    assert!(!events.iter().any(|e| e["action"] == "ping"), "a ping changes nothing and is not audited: {events:?}");
    assert!(events.iter().any(|e| e["action"] == "exec"), "(the audit log was read)");
}

/// `controller exec ARGS` started in the background, its stderr read line by line.
struct Background {
    child: std::process::Child,
    stderr: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Background {
    fn start(lab: &Lab, args: &[&str]) -> Self {
        let mut child = Command::new(fleetadm_tests::bin("controller"))
            .arg("exec")
            .args(args)
            .env("FLEETADM_DATA_DIR", lab.dir.join("controller"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("controller exec");
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Background { child, stderr: rx, seen: String::new() }
    }

    /// Wait for a stderr line containing `what`; returns it.
    fn wait_line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(l) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                self.seen.push_str(&l);
                self.seen.push('\n');
                if l.contains(what) {
                    return l;
                }
            }
        }
        panic!("no {what:?} from exec: {}", self.seen)
    }

    fn finish(mut self) -> (bool, String, String) {
        let out = self.child.wait_with_output().expect("wait");
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            self.seen.push_str(&l);
            self.seen.push('\n');
        }
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), self.seen)
    }
}

fn op_id(line: &str) -> String {
    line.split_whitespace().nth(2).expect("exec: operation ID ...").to_string()
}

#[test]
fn a_canary_pauses_an_exec_until_it_is_resumed_and_an_abort_skips_the_rest() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("canary");
    let script = "echo ran-$(hostname)";
    let ctl = |args: &[&str]| lab.ctl(args);

    // Canary of one: h1 runs, then the exec waits; op list shows it paused; resume runs the rest.
    let mut bg = Background::start(&lab, &["--nodes", "h1,h2,h3", "--canary", "1", "--", "sh", "-c", script]);
    let id = op_id(&bg.wait_line("exec: operation"));
    bg.wait_line("the canary (1 hosts) passed");
    let (ok, list) = ctl(&["op", "list", "-o", "json"]);
    assert!(ok, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    let op = list.as_array().and_then(|a| a.iter().find(|o| o["id"] == id.as_str())).cloned().expect("listed");
    assert_eq!(
        (op["state"].as_str(), op["done"].as_u64(), op["hosts"].as_u64()),
        (Some("paused"), Some(1), Some(3)),
        "{op}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(bg.child.try_wait().expect("try_wait").is_none(), "still waiting for a resume");
    let (ok, out) = ctl(&["op", "resume", &id]);
    assert!(ok && out.contains("running"), "{out}");
    let (ok, out, err) = bg.finish();
    assert!(ok, "{out}{err}");
    for h in ["h1", "h2", "h3"] {
        assert!(out.contains(&format!("{h} | ran-{h}")), "{out}");
    }
    assert!(err.contains("promoted: starting the other 2 hosts"), "{err}");
    let (_, list) = ctl(&["op", "list", "-o", "json"]);
    assert!(!list.contains(&id), "a finished exec leaves the list: {list}");

    // Aborted after the canary: the others never start, and exec fails naming them.
    let mut bg = Background::start(&lab, &["--nodes", "h1,h2,h3", "--canary", "1", "--", "sh", "-c", script]);
    let id = op_id(&bg.wait_line("exec: operation"));
    bg.wait_line("passed");
    let (ok, out) = ctl(&["op", "abort", &id]);
    assert!(ok, "{out}");
    let (ok, out, err) = bg.finish();
    assert!(!ok && out.contains("h1 | ran-h1") && !out.contains("ran-h2") && !out.contains("ran-h3"), "{out}{err}");
    assert!(err.contains("not started on h2, h3"), "{err}");
    let (ok, out) = ctl(&["op", "resume", &id]);
    assert!(!ok && out.contains("no running operation"), "{out}");
    // The finished exec is still there for `op status`: aborted, h1 done, the others skipped.
    let (ok, st) = ctl(&["op", "status", &id, "-o", "json"]);
    assert!(ok, "{st}");
    let st: serde_json::Value = serde_json::from_str(&st).expect("json");
    assert_eq!(st["state"], "aborted", "{st}");
    let state_of =
        |h: &str| st["hosts"].as_array().and_then(|a| a.iter().find(|x| x["host"] == h)).map(|x| x["state"].clone());
    assert_eq!(
        (state_of("h1"), state_of("h2"), state_of("h3")),
        (Some("succeeded".into()), Some("skipped".into()), Some("skipped".into())),
        "{st}"
    );

    // A failing canary stops the rest; `op status` names the failed host with its error and the
    // tail of its output, `op logs` shows it; --auto-promote continues by itself.
    let (ok, out, err) = exec(
        &lab,
        &["--nodes", "h2,h1", "--canary", "1", "--", "sh", "-c", "echo boom-$(hostname); [ $(hostname) != h2 ]"],
    );
    assert!(!ok && err.contains("not started on h1"), "{out}{err}");
    let id = op_id(err.lines().find(|l| l.contains("exec: operation")).expect("the operation id is printed"));
    let (ok, st) = ctl(&["op", "status", &id]);
    assert!(ok && st.contains("state: failed") && st.contains("1 failed"), "{st}");
    let failed_row = st.lines().find(|l| l.starts_with("h2 ")).unwrap_or_default();
    assert!(failed_row.contains("failed") && failed_row.contains("exit"), "{st}");
    assert!(st.contains("--- h2 (last lines of its output)") && st.contains("  boom-h2"), "{st}");
    let (ok, logs) = ctl(&["op", "logs", &id, "--host", "h2"]);
    assert!(ok && logs.lines().any(|l| l == "h2 | boom-h2") && !logs.contains("h1 |"), "{logs}");
    let (ok, out) = ctl(&["op", "logs", &id, "--host", "h9"]);
    assert!(!ok && out.contains("no host \"h9\""), "{out}");
    let (ok, out) = ctl(&["op", "status", "nosuch"]);
    assert!(!ok && out.contains("no operation \"nosuch\""), "{out}");
    let (ok, out, err) =
        exec(&lab, &["--nodes", "h1,h2,h3", "--canary", "2", "--auto-promote", "1s", "--", "sh", "-c", script]);
    assert!(ok && out.contains("h3 | ran-h3") && err.contains("start in 1s"), "{out}{err}");
    // Bad input.
    let (ok, _, err) = exec(&lab, &["--nodes", "h1", "--auto-promote", "1s", "--", "true"]);
    assert!(!ok && err.contains("--canary"), "{err}");
    let (ok, out) = ctl(&["op", "pause", "cluster/none"]);
    assert!(!ok && out.contains("cluster none not found"), "{out}");
    let (ok, out) = ctl(&["op", "pause", "nosuch"]);
    assert!(!ok && out.contains("no running operation"), "{out}");
}

/// `controller agent upgrade` where it cannot work: lab agents run from target/, not from a
/// package, so each says so; with one at a time and no failure tolerated, the first host's
/// refusal stops the rest. Bad input is refused before anything starts.
#[test]
fn agent_upgrade_refuses_unpackaged_agents_and_stops_at_the_failure_budget() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("agentup");
    let dir = lab.dir.join("agents.d");
    std::fs::create_dir_all(dir.join("packages")).unwrap();
    std::fs::write(dir.join("packages/node-agent_9.9.9-1_amd64.deb"), b"not really a package").unwrap();
    let bundle = |name: &str, src: &std::path::Path| {
        let out = lab.dir.join(format!("{name}.tar.gz"));
        let (ok, text) = lab.ctl(&[
            "bundle",
            "build",
            &src.display().to_string(),
            "-o",
            &out.display().to_string(),
            "--name",
            name,
            "--version",
            "v1.29.9",
        ]);
        assert!(ok, "{text}");
        let (ok, text) = lab.ctl(&["bundle", "import", &out.display().to_string()]);
        assert!(ok, "{text}");
    };
    bundle("agents", &dir);
    let bare = lab.dir.join("bare.d");
    std::fs::create_dir_all(bare.join("conf")).unwrap();
    std::fs::write(bare.join("conf/x"), b"x").unwrap();
    bundle("bare", &bare);
    let upgrade = |args: &[&str]| {
        let mut a = vec!["agent", "upgrade"];
        a.extend_from_slice(args);
        lab.ctl(&a)
    };

    // Dry run: the package, the canary and the order; nothing starts.
    let (ok, out) = upgrade(&["--bundle", "agents", "--nodes", "h1,h2,h3", "--canary", "1", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("node-agent 9.9.9-1 from bundle agents on 3 hosts"), "{out}");
    assert!(out.contains("canary: h1") && out.contains("h2, h3") && out.contains("nothing was started"), "{out}");
    let (_, events) = lab.ctl(&["events", "-o", "json"]);
    assert!(!events.contains("agent-upgrade"), "a dry run is not an operation: {events}");

    let (ok, out) = upgrade(&["--bundle", "bare", "--nodes", "h1"]);
    assert!(!ok && out.contains("carries no node-agent package"), "{out}");
    let (ok, out) = upgrade(&["--bundle", "nosuch", "--nodes", "h1"]);
    assert!(!ok && out.contains("nosuch"), "{out}");
    let (ok, out) = upgrade(&["--bundle", "agents", "--nodes", "h1,ghost"]);
    assert!(!ok && out.contains("unknown nodes: ghost"), "{out}");

    // One at a time, no failure tolerated: h1 refuses (not from a package), h2/h3 never start.
    let (ok, out) =
        upgrade(&["--bundle", "agents", "--nodes", "h1,h2,h3", "--max-parallel", "1", "--max-failures", "0"]);
    assert!(!ok, "{out}");
    assert!(out.contains("h1 | ! node-agent at") && out.contains("is not installed from a package"), "{out}");
    assert!(out.contains("1 failed, 2 skipped") && out.contains("not started on h2, h3"), "{out}");
    assert!(!out.contains("h2 | !") && !out.contains("h3 | !"), "{out}");
    // Audited with its outcome.
    let (ok, events) = lab.ctl(&["events", "-o", "json"]);
    assert!(ok, "{events}");
    let ev: serde_json::Value = serde_json::from_str(&events).expect("json");
    let up = ev
        .as_array()
        .and_then(|a| a.iter().rev().find(|e| e["action"] == "agent-upgrade"))
        .cloned()
        .expect("an agent-upgrade event");
    assert_eq!(up["result"], "3 hosts: 0 succeeded, 1 failed (h1), 2 skipped over the failure budget", "{up}");
    // Every agent is still connected and running the build it ran before.
    let (ok, nodes) = lab.ctl(&["nodes", "list", "-o", "json"]);
    assert!(ok, "{nodes}");
    let nodes: serde_json::Value = serde_json::from_str(&nodes).expect("json");
    let connected = nodes.as_array().map(|a| a.iter().filter(|n| n["connected"] == true).count()).unwrap_or(0);
    assert_eq!(connected, 4, "{nodes}");
}
