//! Test harness: real `controller` and `node-agent` processes on loopback, driven through the same
//! command lines and flags an operator uses. Nothing in product code knows it is under test.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of a workspace binary (built by `cargo build --workspace` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} not found: run `cargo build --workspace` first", p.display());
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Poll `f` until it returns Some, or panic with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` over plain HTTP/1.1 from `addr` (HOST:PORT); the whole response, headers included
/// (empty when nothing answers).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of the first sample in Prometheus text `text` whose line starts with `prefix`
/// (a metric name, or a name and the start of its labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A controller daemon in its own data directory.
pub struct Controller {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl Controller {
    pub fn start(extra: &[&str]) -> Self {
        let mut c = Controller {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        c.spawn();
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .expect("log");
        let child = Command::new(bin("controller"))
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr())
            .args(&self.extra)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn controller");
        self.child = Some(child);
        let sock = self.data_dir().join("admin.sock");
        let port = self.port;
        wait_for(Duration::from_secs(20), "controller to listen", || {
            (sock.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).then_some(())
        });
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no graceful shutdown, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    /// Run an admin subcommand (`controller ARGS --data-dir DIR`).
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin("controller"))
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .output()
            .expect("run controller admin command")
    }

    pub fn admin_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.admin(&a);
        assert!(out.status.success(), "controller {args:?} failed: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {}", text(&out)))
    }

    /// Create a token; returns (token, ca_hash).
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut a = vec!["token", "create"];
        a.extend(extra);
        let v = self.admin_json(&a);
        (v["token"].as_str().expect("token").to_string(), v["ca_hash"].as_str().expect("ca_hash").to_string())
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.admin_json(&["nodes", "list"]).as_array().cloned().unwrap_or_default()
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.nodes().into_iter().find(|n| n["name"] == name)
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("pki/ca.crt")).expect("ca.crt")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node agent with its own state directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub name: String,
    child: Option<Child>,
}

impl Agent {
    pub fn new(name: &str) -> Self {
        Agent { dir: tempfile::tempdir().expect("tempdir"), name: name.to_string(), child: None }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn enroll_with(&self, controller: &str, token: &str, ca_hash: &str, extra: &[&str]) -> Output {
        Command::new(bin("node-agent"))
            .args([
                "enroll",
                "--controller",
                controller,
                "--token",
                token,
                "--ca-hash",
                ca_hash,
                "--node-name",
                &self.name,
            ])
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--timeout", "5s"])
            .args(extra)
            .output()
            .expect("run node-agent enroll")
    }

    pub fn enroll(&self, ctl: &Controller) {
        let (token, hash) = ctl.token(&[]);
        let out = self.enroll_with(&ctl.addr(), &token, &hash, &[]);
        assert!(out.status.success(), "enroll {} failed: {}", self.name, text(&out));
    }

    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log");
        let child = Command::new(bin("node-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--backoff-initial", "200ms", "--backoff-max", "1s", "--inventory-interval", "1s"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn node-agent");
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Exit status if the agent process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn status_json(&self) -> Value {
        let out = Command::new(bin("node-agent"))
            .args(["status", "-o", "json", "--state-dir"])
            .arg(self.state_dir())
            .output()
            .expect("node-agent status");
        assert!(out.status.success(), "status failed: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.state_dir().join(name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Mode bits of a file.
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

/// A single-threaded runtime for in-test gRPC clients (crypto provider installed).
pub fn rt() -> tokio::runtime::Runtime {
    fleetadm_common::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A channel to `ctl` with its CA pinned and no client certificate (what an enrolling host has).
pub async fn pinned_channel(ctl: &Controller) -> tonic::transport::Channel {
    use fleetadm_common::dial::{self, DialOptions, PinReport, Trust};
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ctl.ca_pem().as_bytes()).expect("CA PEM");
    let pin = fleetadm_common::pin::CaPin::of_cert_der(&der).expect("CA pin");
    let cfg = dial::client_config(&Trust::Pinned(pin), None, PinReport::default()).expect("TLS config");
    dial::connect(&ctl.addr(), cfg, &DialOptions::default()).await.expect("connect")
}

/// Wait until the controller reports `name` connected (or not).
pub fn wait_connected(ctl: &Controller, name: &str, connected: bool, timeout: Duration) -> Value {
    wait_for(timeout, &format!("node {name} connected={connected}"), || {
        ctl.node(name).filter(|n| n["connected"].as_bool() == Some(connected))
    })
}
pub mod bench;
pub mod lab;
pub mod vm;
