//! Fleet-scale benchmark: one real controller process and N real agents (the node-agent library's
//! own enroll and session code, each with its own key, certificate and mTLS connection) in this
//! process, on loopback. Prints numbers; asserts nothing.
//!
//!   cargo run --release -p fleetadm-tests --bin fleet-bench -- [AGENTS] [ENROLL_CONCURRENCY]
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetadm_agent::enroll::{enroll, EnrollOptions};
use fleetadm_agent::identity::StateDir;
use fleetadm_agent::session::{self, RunOptions};
use tokio::sync::{watch, Semaphore};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The controller process; killed and reaped when dropped.
struct Ctl(Child);

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_controller(bin: &Path, data: &Path, addr: &str) -> Ctl {
    let child = Command::new(bin)
        .args(["serve", "--listen", addr, "--heartbeat-interval", "15s", "--config", "/dev/null", "--data-dir"])
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

fn connected(bin: &Path, data: &Path) -> usize {
    let out =
        Command::new(bin).args(["nodes", "list", "-o", "json", "--data-dir"]).arg(data).output().expect("nodes list");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().map(|a| a.iter().filter(|n| n["connected"] == true).count()).unwrap_or(0)
}

fn wait_connected(bin: &Path, data: &Path, n: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if connected(bin, data) >= n {
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
    let bin_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).expect("bin dir");
    let ctl_bin = bin_dir.join("controller");
    anyhow::ensure!(ctl_bin.exists(), "{} missing: cargo build --release -p controller", ctl_bin.display());

    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("ctl");
    let port = fleetadm_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut ctl = spawn_controller(&ctl_bin, &data, &addr);
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
                labels: Default::default(),
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

    // Sessions: the real agent loop, one mTLS connection each.
    let (stop_tx, stop_rx) = watch::channel(false);
    let t1 = Instant::now();
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
    let ctl_bin2 = ctl_bin.clone();
    let data2 = data.clone();
    let up = tokio::task::spawn_blocking(move || wait_connected(&ctl_bin2, &data2, agents, Duration::from_secs(300)))
        .await?;
    match up {
        Some(_) => println!("sessions:  {agents} connected in {:.2}s", t1.elapsed().as_secs_f64()),
        None => println!("sessions:  only {} of {agents} connected after 300s", connected(&ctl_bin, &data)),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ctl_rss = rss_kib(ctl.0.id());
    println!(
        "memory:    controller RSS {} MiB ({:.1} KiB per connected agent); this process (all agents) {} MiB",
        ctl_rss / 1024,
        ctl_rss as f64 / agents as f64,
        rss_kib(std::process::id()) / 1024
    );

    // Crash and restart: every agent reconnects by itself, spread by full-jitter backoff.
    drop(ctl);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = Instant::now();
    ctl = spawn_controller(&ctl_bin, &data, &addr);
    let (ctl_bin3, data3) = (ctl_bin.clone(), data.clone());
    let back = tokio::task::spawn_blocking(move || wait_connected(&ctl_bin3, &data3, agents, Duration::from_secs(300)))
        .await?;
    match back {
        Some(_) => println!(
            "restart:   controller SIGKILLed; all {agents} agents back {:.2}s after it restarted (backoff 1s..10s, full jitter)",
            t2.elapsed().as_secs_f64()
        ),
        None => println!("restart:   only {} of {agents} back after 300s", connected(&ctl_bin, &data)),
    }
    let _ = stop_tx.send(true);
    drop(ctl);
    Ok(())
}
