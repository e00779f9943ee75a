//! Fleet-scale benchmark: one real controller process and N real agents (the node-agent library's
//! own enroll and session code, each with its own key, certificate and mTLS connection) in this
//! process, on loopback. Prints numbers; asserts nothing:
//!
//! - enrollment rate, all sessions up, controller RSS per agent;
//! - the fleet-wide no-op task (`controller agent ping -l bench=yes` through the admin API, every
//!   agent at once), then a fleet-wide command (`controller exec -l bench=yes -- true`, each agent
//!   spawning a process): when each agent's first report (task received and started) and its
//!   result reached the controller, p50/p99/all, and the CPU used (the `true` processes too);
//! - reconnection after the controller is SIGKILLed and restarted;
//! - heartbeat round trips throughout, from a few probe agents (protocol clients with their own
//!   identities that heartbeat every second and answer their tasks at once), per phase.
//!
//!   cargo run --release -p fleetadm-tests --bin fleet-bench -- [AGENTS] [ENROLL_CONCURRENCY] [TASK_PARALLEL]
//!
//! TASK_PARALLEL (default: every agent) bounds the exec's `--max-parallel`: all agents share this
//! process and its open-file limit, and each running `true` holds pipes. The ping always goes to
//! every agent at once.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetadm_agent::enroll::{enroll, EnrollOptions};
use fleetadm_agent::identity::{Identity, StateDir};
use fleetadm_agent::session::{self, RunOptions};
use fleetadm_proto::{server_event, ConnectRequest, TaskReport};
use fleetadm_tests::bench::percentile;
use tokio::sync::{watch, Semaphore};

/// Heartbeat round trips (µs) and failures by phase, from the probe agents.
#[derive(Default)]
struct Beats {
    phase: &'static str,
    rtt_us: BTreeMap<&'static str, Vec<u64>>,
    errors: BTreeMap<&'static str, usize>,
}

impl Beats {
    fn set(beats: &Mutex<Beats>, phase: &'static str) {
        if let Ok(mut b) = beats.lock() {
            b.phase = phase;
        }
    }
}

/// A probe agent: its own session (answering every task at once) and a heartbeat every second,
/// recorded under the phase of the moment. Reconnects when the controller goes away.
async fn probe(dir: StateDir, addr: String, i: usize, beats: Arc<Mutex<Beats>>) {
    loop {
        let run = async {
            let identity = Identity::load(&dir)?;
            let client = fleetadm_tests::bench::connect(&identity, &addr).await?;
            let req = ConnectRequest {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                protocol: fleetadm_proto::PROTOCOL_VERSION,
                capabilities: fleetadm_proto::TaskKind::all_capabilities(),
                ..Default::default()
            };
            let mut stream = client.clone().open_session(req).await?.into_inner();
            let mut tasks = client.clone();
            let hb = {
                let beats = beats.clone();
                tokio::spawn(fleetadm_tests::bench::heartbeats(
                    client,
                    Duration::from_secs(1),
                    Duration::from_millis((i as u64 * 37) % 1000),
                    move |r| {
                        let Ok(mut b) = beats.lock() else { return };
                        let p = b.phase;
                        match r {
                            Some(us) => b.rtt_us.entry(p).or_default().push(us),
                            None => *b.errors.entry(p).or_default() += 1,
                        }
                    },
                ))
            };
            while let Ok(Some(ev)) = stream.message().await {
                let Some(server_event::Event::Task(a)) = ev.event else { continue };
                let done = TaskReport {
                    task_id: a.task_id,
                    attempt: a.attempt,
                    state: fleetadm_proto::TaskState::Succeeded as i32,
                    output: "probe: done".into(),
                    ..Default::default()
                };
                let _ = tasks.report_task(done).await;
            }
            hb.abort();
            anyhow::Ok(())
        };
        let _ = run.await;
        tokio::time::sleep(Duration::from_millis(500 + (i as u64 * 97) % 1500)).await;
    }
}

fn print_beats(beats: &Mutex<Beats>) {
    let Ok(mut b) = beats.lock() else { return };
    let phases: Vec<&'static str> = b.rtt_us.keys().copied().collect();
    for p in phases {
        let errors = b.errors.get(p).copied().unwrap_or(0);
        let v = b.rtt_us.entry(p).or_default();
        v.sort_unstable();
        println!(
            "heartbeat: {p:<10} n={:<6} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  failed {errors}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().map(|m| *m as f64 / 1000.0).unwrap_or(f64::NAN)
        );
    }
}

/// What a fleet-wide task measured: per host, when its agent's first report (it received the
/// task and started it) and its result reached the controller (µs from the start).
struct TaskTimes {
    /// When the operation's first event (hosts chosen, operation started) arrived.
    started: Duration,
    received: Vec<u64>,
    results: Vec<u64>,
    failed: BTreeMap<String, usize>,
    all: Duration,
}

/// A fleet-wide task on every `bench=yes` agent through the admin API: the ping (no argv) or
/// `exec -- ARGV`.
async fn fleet_task(data: &Path, agents: usize, parallel: usize, argv: &[&str]) -> anyhow::Result<TaskTimes> {
    let mut admin = fleetadm_controller::admin::client::connect(data).await?;
    let req = fleetadm_proto::ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        selector: "bench=yes".into(),
        max_parallel: parallel.clamp(1, 10_000) as u32,
        timeout_secs: 300,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut events =
        if argv.is_empty() { admin.ping_agents(req).await?.into_inner() } else { admin.exec(req).await?.into_inner() };
    let (mut acks, mut failed) = (Vec::with_capacity(agents), BTreeMap::new());
    let mut received = Vec::with_capacity(agents);
    let mut seen = std::collections::HashSet::with_capacity(agents);
    let mut started = None;
    while let Some(ev) = events.message().await? {
        started.get_or_insert_with(|| t0.elapsed());
        if !ev.host.is_empty() && seen.insert(ev.host.clone()) {
            received.push(t0.elapsed().as_micros() as u64);
        }
        if ev.done && !ev.host.is_empty() {
            acks.push(t0.elapsed().as_micros() as u64);
            if !ev.success {
                *failed.entry(ev.error.chars().take(120).collect::<String>()).or_insert(0) += 1;
            }
        }
    }
    Ok(TaskTimes { started: started.unwrap_or_default(), received, results: acks, failed, all: t0.elapsed() })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    stat_ticks(pid, 11) as f64 / 100.0
}

/// CPU seconds (user + system) the reaped children of process `pid` used so far.
fn children_cpu_secs(pid: u32) -> f64 {
    stat_ticks(pid, 13) as f64 / 100.0
}

/// The sum of /proc/PID/stat's two fields from `first` (counted after the command's ')').
fn stat_ticks(pid: u32, first: usize) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command (which may hold spaces) start after the last ')'.
            let rest = s.rsplit_once(')')?.1.split_whitespace().map(String::from).collect::<Vec<_>>();
            Some(rest.get(first)?.parse::<u64>().ok()? + rest.get(first + 1)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Run one fleet-wide task and print what it measured.
async fn measure_task(
    label: &'static str,
    data: &Path,
    ctl: u32,
    agents: usize,
    parallel: usize,
    argv: &[&str],
    beats: &Mutex<Beats>,
) {
    Beats::set(beats, label);
    let me = std::process::id();
    let (ctl0, me0, kids0, t0) = (cpu_secs(ctl), cpu_secs(me), children_cpu_secs(me), Instant::now());
    let task = fleet_task(data, agents, parallel, argv).await;
    let what = if argv.is_empty() {
        "ping (the no-op task) to every agent at once".to_string()
    } else {
        format!("exec `{}` on every agent (--max-parallel {parallel})", argv.join(" "))
    };
    println!("{label}: {what}");
    println!(
        "  cpu:     {:.1}s: controller {:.1} CPU-s, the agents' process {:.1} CPU-s, the processes they ran {:.1} CPU-s (2 cores: {:.1} available)",
        t0.elapsed().as_secs_f64(),
        cpu_secs(ctl) - ctl0,
        cpu_secs(me) - me0,
        children_cpu_secs(me) - kids0,
        2.0 * t0.elapsed().as_secs_f64()
    );
    match task {
        Ok(TaskTimes { started, mut received, results: mut acks, failed, all }) => {
            acks.sort_unstable();
            received.sort_unstable();
            println!("  started: the operation (hosts chosen) after {:.0} ms", started.as_secs_f64() * 1000.0);
            println!(
                "  acked:   received and acknowledged by {} agents: p50 {:.0} ms, p99 {:.0} ms, all {:.2}s",
                received.len(),
                percentile(&received, 0.5),
                percentile(&received, 0.99),
                received.last().copied().unwrap_or(0) as f64 / 1e6
            );
            println!(
                "  results: {} ({} failed): p50 {:.0} ms, p99 {:.0} ms, all {:.2}s",
                acks.len(),
                failed.values().sum::<usize>(),
                percentile(&acks, 0.5),
                percentile(&acks, 0.99),
                all.as_secs_f64()
            );
            for (why, n) in failed.iter().take(5) {
                println!("           {n} failed: {why}");
            }
        }
        Err(e) => println!("  the fleet-wide task failed: {e:#}"),
    }
}

/// The controller process; killed and reaped when dropped.
struct Ctl(Child);

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_controller(bin: &Path, data: &Path, addr: &str, metrics: &str) -> Ctl {
    let child = Command::new(bin)
        .args(["serve", "--listen", addr, "--heartbeat-interval", "15s", "--config", "/dev/null"])
        .args(["--metrics-listen", metrics, "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn controller");
    let sock = data.join("admin.sock");
    let start = Instant::now();
    while !(sock.exists() && std::net::TcpStream::connect(addr).is_ok()) {
        assert!(start.elapsed() < Duration::from_secs(20), "controller did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ctl(child)
}

/// Agents with an open session, from the controller's /metrics (cheap for the controller, unlike
/// listing 10,000 nodes every poll, which slowed what it measured).
fn connected(metrics: &str) -> usize {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(metrics) else { return 0 };
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return 0;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix("fleetadm_agents_connected "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_connected(metrics: &str, n: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if connected(metrics) >= n {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    fleetadm_common::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let agents: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let conc: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    let task_parallel: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(agents);
    let bin_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).expect("bin dir");
    let ctl_bin = bin_dir.join("controller");
    anyhow::ensure!(ctl_bin.exists(), "{} missing: cargo build --release -p controller", ctl_bin.display());

    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("ctl");
    let port = fleetadm_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", fleetadm_tests::free_port());
    let mut ctl = spawn_controller(&ctl_bin, &data, &addr, &metrics);
    let out = Command::new(&ctl_bin)
        .args(["token", "create", "-o", "json", "--uses", &agents.to_string(), "--data-dir"])
        .arg(&data)
        .output()?;
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (token, hash) = (
        tok["token"].as_str().unwrap_or_default().to_string(),
        tok["ca_hash"].as_str().unwrap_or_default().to_string(),
    );
    println!("fleet-bench: {agents} agents, enrollment concurrency {conc}, controller {}", ctl_bin.display());

    // Enrollment: key generation, pinned TLS, CSR signing, durable token and node records.
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(conc));
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (sem, addr, token, hash) = (sem.clone(), addr.clone(), token.clone(), hash.clone());
        let dir = StateDir::new(tmp.path().join(format!("a{i}")));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let opts = EnrollOptions {
                controller: addr,
                token,
                ca_hash: hash,
                node_name: format!("bench-{i}"),
                force: false,
                timeout: Duration::from_secs(60),
                proxy: Some(String::new()),
                labels: [("bench".to_string(), "yes".to_string())].into(),
            };
            enroll(&dir, &opts).await.map(|_| dir)
        }));
    }
    let mut dirs = Vec::new();
    for t in tasks {
        dirs.push(t.await??);
    }
    let enroll_time = t0.elapsed();
    println!(
        "enroll:    {agents} agents in {:.2}s ({:.0}/s, each durable before acknowledged)",
        enroll_time.as_secs_f64(),
        agents as f64 / enroll_time.as_secs_f64()
    );

    // Sessions: the real agent loop, one mTLS connection each; a few of them are heartbeat probes.
    let (stop_tx, stop_rx) = watch::channel(false);
    let beats = Arc::new(Mutex::new(Beats { phase: "connect", ..Default::default() }));
    let probes = (agents / 100).clamp(1, 50);
    let t1 = Instant::now();
    for (i, dir) in dirs.drain(agents - probes..).enumerate() {
        tokio::spawn(probe(dir, addr.clone(), i, beats.clone()));
    }
    for dir in dirs {
        let mut rx = stop_rx.clone();
        let opts = RunOptions {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            inventory_interval: Duration::from_secs(600),
            ..RunOptions::default()
        };
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let _ = session::run(&dir, &opts, stop).await;
        });
    }
    let metrics2 = metrics.clone();
    let up = tokio::task::spawn_blocking(move || wait_connected(&metrics2, agents, Duration::from_secs(300))).await?;
    match up {
        Some(_) => println!("sessions:  {agents} connected in {:.2}s", t1.elapsed().as_secs_f64()),
        None => println!("sessions:  only {} of {agents} connected after 300s", connected(&metrics)),
    }
    Beats::set(&beats, "idle");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ctl_rss = rss_kib(ctl.0.id());
    println!(
        "memory:    controller RSS {} MiB ({:.1} KiB per connected agent); this process (all agents) {} MiB",
        ctl_rss / 1024,
        ctl_rss as f64 / agents as f64,
        rss_kib(std::process::id()) / 1024
    );

    // The no-op task, then a command: when did each agent acknowledge it, and its result arrive?
    measure_task("ping", &data, ctl.0.id(), agents, agents, &[], &beats).await;
    Beats::set(&beats, "idle-between");
    tokio::time::sleep(Duration::from_secs(3)).await;
    measure_task("exec", &data, ctl.0.id(), agents, task_parallel, &["true"], &beats).await;
    println!("memory:    controller RSS after the tasks {} MiB", rss_kib(ctl.0.id()) / 1024);
    Beats::set(&beats, "idle-after");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Crash and restart: every agent reconnects by itself, spread by full-jitter backoff.
    Beats::set(&beats, "restart");
    drop(ctl);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = Instant::now();
    let me_cpu0 = cpu_secs(std::process::id());
    ctl = spawn_controller(&ctl_bin, &data, &addr, &metrics);
    let metrics3 = metrics.clone();
    let back = tokio::task::spawn_blocking(move || wait_connected(&metrics3, agents, Duration::from_secs(300))).await?;
    println!(
        "cpu:       during the reconnect ({:.1}s): controller {:.1} CPU-s, the agents' process {:.1} CPU-s",
        t2.elapsed().as_secs_f64(),
        cpu_secs(ctl.0.id()),
        cpu_secs(std::process::id()) - me_cpu0
    );
    match back {
        Some(_) => println!(
            "restart:   controller SIGKILLed; all {agents} agents back {:.2}s after it restarted (backoff 1s..10s, full jitter)",
            t2.elapsed().as_secs_f64()
        ),
        None => println!("restart:   only {} of {agents} back after 300s", connected(&metrics)),
    }
    Beats::set(&beats, "after");
    tokio::time::sleep(Duration::from_secs(3)).await;
    print_beats(&beats);
    let _ = stop_tx.send(true);
    drop(ctl);
    Ok(())
}
