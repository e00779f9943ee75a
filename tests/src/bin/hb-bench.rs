//! Heartbeat latency under load: N agents connected to a real controller process on loopback (each
//! with its own key, certificate and mTLS connection), heartbeating every second, while a cluster
//! rollout runs and a bundle of SIZE GiB is fetched by FETCHERS of them. Prints the heartbeat
//! round-trip p50/p99/max idle and during the rollout, and how long the rollout took. Asserts
//! nothing.
//!
//! The agents are protocol clients of this tree (enrolled by the node-agent library's own enroll);
//! they answer every task at once, except `fetch-bundle`, for which they really pull every chunk
//! of the bundle through `FetchBlob`. They decode only what every protocol-1 controller and the
//! pre-protocol one share (task ids, attempts), so the same bench runs against the controller of
//! an older commit for a before/after comparison (`tests/bench/heartbeat-latency.sh`).
//!
//!   hb-bench CONTROLLER_BIN [AGENTS] [FETCHERS] [GIB]
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetadm_agent::enroll::{enroll, EnrollOptions};
use fleetadm_agent::identity::{Identity, StateDir};
use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::{server_event, ConnectRequest, FetchBlobRequest, Interface, Inventory, TaskReport};
use sha2::Digest;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

struct Ctl(Child);

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin(bin: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin).args(args).arg("--data-dir").arg(data).output().expect("run controller CLI")
}

/// What the samples were taken during.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Idle,
    Rollout,
}

#[derive(Default)]
struct Samples {
    phase: Option<Phase>,
    rtt_us: BTreeMap<Phase, Vec<u64>>,
    errors: BTreeMap<Phase, usize>,
}

/// A bundle directory with one big pseudo-random `bin/kubeadm`; returns the blob's (sha256, size).
fn make_bundle(dir: &Path, gib: f64) -> (String, u64) {
    std::fs::create_dir_all(dir.join("bin")).expect("bundle dir");
    let size = (gib * (1u64 << 30) as f64) as u64;
    let mut f =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("bin/kubeadm")).expect("file"));
    let mut h = sha2::Sha256::new();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush().expect("flush");
    let sha = hex::encode(h.finalize());
    let manifest = format!(
        "name: bench\nkubernetesVersion: v1.29.9\narch: amd64\nfiles:\n- path: bin/kubeadm\n  size: {size}\n  mode: 493\n  sha256: {sha}\n"
    );
    std::fs::write(dir.join("bundle.yaml"), manifest).expect("manifest");
    (sha, size)
}

fn inventory(name: &str, i: usize) -> Inventory {
    Inventory {
        hostname: name.to_string(),
        machine_id: format!("{:032x}", i + 1),
        interfaces: vec![Interface {
            name: "eth0".into(),
            addresses: vec![format!("10.{}.{}.{}/16", 200 + i / 65536, (i / 256) % 256, i % 256 + 1)],
        }],
        kernel: "6.1.0".into(),
        arch: "x86_64".into(),
        cpus: 4,
        memory_bytes: 8 << 30,
        swap_enabled: false,
        cgroup_version: 2,
        ..Default::default()
    }
}

/// Pull the whole blob, four chunks in flight (as the agent does).
async fn fetch(client: &AgentClient<Channel>, sha: &str, size: u64) -> anyhow::Result<u64> {
    const CHUNK: u64 = 768 * 1024;
    let mut offset = 0;
    let mut got = 0;
    let mut inflight = std::collections::VecDeque::new();
    while offset < size || !inflight.is_empty() {
        while inflight.len() < 4 && offset < size {
            let mut c = client.clone();
            let req = FetchBlobRequest {
                bundle: "bench".into(),
                sha256: sha.into(),
                offset,
                max_len: CHUNK.min(size - offset) as u32,
                peers_ok: false,
            };
            inflight.push_back(tokio::spawn(async move { c.fetch_blob(req).await }));
            offset += CHUNK;
        }
        if let Some(j) = inflight.pop_front() {
            got += j.await??.into_inner().data.len() as u64;
        }
    }
    Ok(got)
}

/// One agent: a session that answers tasks, and a heartbeat every `every`.
async fn agent(
    i: usize,
    dir: StateDir,
    addr: String,
    blob: (String, u64),
    samples: Arc<Mutex<Samples>>,
    every: Duration,
) -> anyhow::Result<()> {
    let identity = Identity::load(&dir)?;
    let name = identity.config.node_name.clone();
    let client = fleetadm_tests::bench::connect(&identity, &addr).await?;
    let req = ConnectRequest {
        inventory: Some(inventory(&name, i)),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        protocol: fleetadm_proto::PROTOCOL_VERSION,
        capabilities: fleetadm_proto::TaskKind::all_capabilities(),
        peer_port: 0,
    };
    let mut stream = client.clone().open_session(req).await?.into_inner();
    let tasks_client = client.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            let Some(server_event::Event::Task(a)) = ev.event else { continue };
            let mut c = tasks_client.clone();
            let blob = blob.clone();
            tokio::spawn(async move {
                let report = |state: fleetadm_proto::TaskState, output: String| TaskReport {
                    task_id: a.task_id.clone(),
                    attempt: a.attempt,
                    state: state as i32,
                    output,
                    changed: false,
                    ..Default::default()
                };
                let outcome = if a.task_id.ends_with("/fetch-bundle") {
                    let _ = c.report_task(report(fleetadm_proto::TaskState::Running, String::new())).await;
                    match fetch(&c, &blob.0, blob.1).await {
                        Ok(n) => report(fleetadm_proto::TaskState::Succeeded, format!("fetched {n} bytes")),
                        Err(e) => report(fleetadm_proto::TaskState::Failed, e.to_string()),
                    }
                } else {
                    report(fleetadm_proto::TaskState::Succeeded, "bench agent: done".into())
                };
                let _ = c.report_task(outcome).await;
            });
        }
    });
    // Spread the heartbeats over the interval.
    let delay = every.mul_f64((i % 1000) as f64 / 1000.0);
    fleetadm_tests::bench::heartbeats(client, every, delay, |r| {
        let mut s = samples.lock().expect("samples");
        if let Some(p) = s.phase {
            match r {
                Some(us) => s.rtt_us.entry(p).or_default().push(us),
                None => *s.errors.entry(p).or_default() += 1,
            }
        }
    })
    .await;
    Ok(())
}

fn report(samples: &Mutex<Samples>, phase: Phase, label: &str) {
    let mut s = samples.lock().expect("samples");
    let errors = s.errors.get(&phase).copied().unwrap_or(0);
    let v = s.rtt_us.entry(phase).or_default();
    v.sort_unstable();
    println!(
        "heartbeat {label:<8} n={:<6} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>8.2} ms   errors {errors}",
        v.len(),
        fleetadm_tests::bench::percentile(v, 0.5),
        fleetadm_tests::bench::percentile(v, 0.99),
        v.last().map(|m| *m as f64 / 1000.0).unwrap_or(f64::NAN),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    fleetadm_common::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let ctl_bin = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("target/release/controller"));
    let agents: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let fetchers: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10).clamp(1, agents);
    let gib: f64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    anyhow::ensure!(ctl_bin.exists(), "{} missing", ctl_bin.display());
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("ctl");
    let port = fleetadm_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(&ctl_bin)
        .args(["serve", "--listen", &addr, "--heartbeat-interval", "15s", "--config", "/dev/null", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ctl = Ctl(child);
    let t = Instant::now();
    while !(data.join("admin.sock").exists() && std::net::TcpStream::connect(&addr).is_ok()) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "controller did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("hb-bench: {agents} agents, {fetchers} fetch a {gib} GiB bundle; controller {}", ctl_bin.display());

    let bundle_dir = tmp.path().join("bundle");
    let blob = tokio::task::spawn_blocking(move || {
        let b = make_bundle(&bundle_dir, gib);
        (b, bundle_dir)
    })
    .await?;
    let (blob, bundle_dir) = blob;
    let out = admin(&ctl_bin, &data, &["bundle", "import", bundle_dir.to_str().unwrap_or_default()]);
    anyhow::ensure!(out.status.success(), "bundle import: {}", String::from_utf8_lossy(&out.stderr));

    let out = admin(&ctl_bin, &data, &["token", "create", "-o", "json", "--uses", &agents.to_string()]);
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (token, hash) = (
        tok["token"].as_str().unwrap_or_default().to_string(),
        tok["ca_hash"].as_str().unwrap_or_default().to_string(),
    );
    let sem = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (sem, addr, token, hash) = (sem.clone(), addr.clone(), token.clone(), hash.clone());
        let dir = StateDir::new(tmp.path().join(format!("a{i}")));
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            let opts = EnrollOptions {
                controller: addr,
                token,
                ca_hash: hash,
                node_name: format!("a{i}"),
                force: false,
                timeout: Duration::from_secs(60),
                proxy: Some(String::new()),
                labels: Default::default(),
            };
            enroll(&dir, &opts).await?;
            anyhow::Ok(dir)
        }));
    }
    let mut dirs = Vec::new();
    for t in tasks {
        dirs.push(t.await??);
    }
    let samples = Arc::new(Mutex::new(Samples::default()));
    for (i, dir) in dirs.into_iter().enumerate() {
        let (addr, blob, samples) = (addr.clone(), blob.clone(), samples.clone());
        tokio::spawn(async move {
            if let Err(e) = agent(i, dir, addr, blob, samples, Duration::from_secs(1)).await {
                eprintln!("agent a{i}: {e}");
            }
        });
    }
    // Wait until everyone is connected, then sample idle heartbeats.
    let t = Instant::now();
    loop {
        let out = admin(&ctl_bin, &data, &["nodes", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n = v.as_array().map(|a| a.iter().filter(|n| n["connected"] == true).count()).unwrap_or(0);
        if n == agents {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "only {n} of {agents} connected");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    samples.lock().expect("samples").phase = Some(Phase::Idle);
    tokio::time::sleep(Duration::from_secs(15)).await;

    // The rollout: 3 masters and the other fetchers as workers, all fetching the bundle.
    samples.lock().expect("samples").phase = Some(Phase::Rollout);
    let masters = "a0,a1,a2".to_string();
    let workers: Vec<String> = (3..fetchers.max(4)).map(|i| format!("a{i}")).collect();
    let t_roll = Instant::now();
    let out = admin(
        &ctl_bin,
        &data,
        &[
            "cluster",
            "create",
            "bench",
            "--masters",
            &masters,
            "--nodes",
            &workers.join(","),
            "--bundle",
            "bench",
            "--max-parallel",
            "100%",
            "--detach",
        ],
    );
    anyhow::ensure!(
        out.status.success(),
        "cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let state = loop {
        let out = admin(&ctl_bin, &data, &["cluster", "status", "bench", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let st = v["state"].as_str().unwrap_or_default().to_string();
        if st == "succeeded" || st == "failed" || t_roll.elapsed() > Duration::from_secs(900) {
            break format!("{st}: {}", v["message"].as_str().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let roll = t_roll.elapsed();
    samples.lock().expect("samples").phase = None;
    let rss = std::fs::read_to_string(format!("/proc/{}/status", ctl.0.id()))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_default();
    report(&samples, Phase::Idle, "idle");
    report(&samples, Phase::Rollout, "rollout");
    println!(
        "rollout   {:.1}s ({state}); {} agents fetched {:.1} GiB each ({:.1} GiB served); controller RSS {} MiB",
        roll.as_secs_f64(),
        workers.len() + 3,
        blob.1 as f64 / (1u64 << 30) as f64,
        blob.1 as f64 * (workers.len() + 3) as f64 / (1u64 << 30) as f64,
        rss.parse::<u64>().unwrap_or(0) / 1024
    );
    drop(ctl);
    Ok(())
}
