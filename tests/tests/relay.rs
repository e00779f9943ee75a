//! Relays (docs/security.md, "Relays"): a real `controller relay` process between agents and a
//! real controller on loopback. On loopback every source address is 127.0.0.1, so the ports
//! tell the connections apart: the controller must record the agent's own connection to the
//! relay (seen with ss), not the relay's connection to the controller. It does only when a
//! registered relay's signature vouches for it; unregistered, forged, unsigned and
//! replayed headers are refused before TLS, and a removed relay is refused from the next
//! connection on. The relay survives a controller restart and is itself restartable.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetadm_controller::relay::header;
use fleetadm_controller::relay::keys::SigningKey;
use fleetadm_tests::{bin, free_port, text, wait_connected, wait_for, Agent, Controller};

const T: Duration = Duration::from_secs(30);

struct Relay {
    dir: tempfile::TempDir,
    port: u16,
    metrics: u16,
    upstream: String,
    child: Option<Child>,
}

impl Relay {
    fn start(upstream: &str) -> Self {
        let mut r = Relay {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            metrics: free_port(),
            upstream: upstream.to_string(),
            child: None,
        };
        r.spawn();
        r
    }
    fn key(&self) -> std::path::PathBuf {
        self.dir.path().join("keys/relay.key")
    }
    fn addr(&self) -> String {
        format!("127.0.0.3:{}", self.port)
    }
    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("relay.log")).expect("log");
        let child = Command::new(bin("controller"))
            .args(["relay", "--name", "bst", "--listen", &self.addr(), "--upstream", &self.upstream])
            .arg("--key-file")
            .arg(self.key())
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics)])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn relay");
        self.child = Some(child);
        let port = self.port;
        wait_for(T, "the relay to listen", || TcpStream::connect(("127.0.0.3", port)).ok().map(|_| ()));
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn public_key(&self) -> String {
        let out = Command::new(bin("controller"))
            .args(["relay", "--print-public-key", "--key-file"])
            .arg(self.key())
            .output()
            .expect("relay --print-public-key");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
    fn scrape(&self) -> String {
        fleetadm_tests::http_get(&format!("127.0.0.1:{}", self.metrics), "/metrics")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Local addresses of established TCP connections to `dst`.
fn sources_to(dst: &str) -> Vec<String> {
    let out = Command::new("ss").args(["-tnH", "state", "established", "dst", dst]).output().expect("ss");
    // Columns: Recv-Q Send-Q Local Peer
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect()
}

/// The node's recorded peer is its own connection to the relay, not the relay's to the controller.
fn assert_vouched(n: &serde_json::Value, relay: &Relay, ctl: &Controller) {
    let peer = n["peer_address"].as_str().unwrap_or_default().to_string();
    let agent_side = sources_to(&relay.addr());
    let relay_side = sources_to(&ctl.addr());
    assert!(
        agent_side.contains(&peer) && !relay_side.contains(&peer),
        "the controller records the agent's own address ({agent_side:?}), vouched for by the relay, not the relay's ({relay_side:?}): {n}"
    );
}

/// How often the controller refused a connection from the unregistered relay "bst".
fn unregistered(ctl: &Controller) -> usize {
    ctl.log().matches("relay \"bst\" is not registered").count()
}

fn enroll_via(a: &Agent, ctl: &Controller, via: &str) -> std::process::Output {
    let (token, hash) = ctl.token(&[]);
    a.enroll_with(via, &token, &hash, &[])
}

/// Send `bytes` to the controller's agent port, then wait for it to close the connection.
fn send_raw(ctl: &Controller, bytes: &[u8]) {
    let mut s = TcpStream::connect(ctl.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

fn signed_header(key: &SigningKey, name: &str, claimed: &str, nonce: [u8; 16]) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    header::encode(claimed.parse().expect("addr"), "127.0.0.1:9443".parse().expect("addr"), name, now, nonce, |m| {
        key.sign(m)
    })
    .expect("header")
}

#[test]
fn a_registered_relay_vouches_for_agents_addresses_and_nothing_else_is_believed() {
    let mut ctl = Controller::start(&["--advertise-address", "127.0.0.1", "--advertise-address", "127.0.0.3"]);
    let mut relay = Relay::start(&ctl.addr());
    let key = relay.public_key();
    assert!(key.starts_with("ed25519:"), "{key}");
    assert_eq!(fleetadm_tests::mode(&relay.key()), 0o600, "the relay key is private");

    // Unregistered: refused before TLS, with the command that fixes it in the controller's log.
    let a = Agent::new("r1");
    let out = enroll_via(&a, &ctl, &relay.addr());
    assert!(!out.status.success(), "an unregistered relay's connections are refused: {}", text(&out));
    assert!(unregistered(&ctl) > 0, "{}", ctl.log());

    // Registered: enrollment and the session go through it; the controller sees 127.0.0.3.
    let reg = ctl.admin(&["relays", "add", "bst", "--public-key", &key]);
    assert!(reg.status.success(), "{}", text(&reg));
    let bad = ctl.admin(&["relays", "add", "bad", "--public-key", "ed25519:AAAA"]);
    assert!(!bad.status.success() && text(&bad).contains("not 32 bytes"), "{}", text(&bad));
    let out = enroll_via(&a, &ctl, &relay.addr());
    assert!(out.status.success(), "enroll through the relay: {}", text(&out));
    let mut a = a;
    a.run();
    let n = wait_connected(&ctl, "r1", true, T);
    assert_vouched(&n, &relay, &ctl);

    // Forged (another key under the relay's name), unsigned (HAProxy-style) and replayed
    // headers are refused; none of them is believed.
    let dir = tempfile::tempdir().expect("tempdir");
    let (evil, _) = SigningKey::load_or_create(&dir.path().join("evil")).expect("key");
    send_raw(&ctl, &signed_header(&evil, "bst", "10.9.9.9:1000", [1; 16]));
    assert!(ctl.log().contains("does not verify"), "{}", ctl.log());
    let mut unsigned = header::MAGIC.to_vec();
    unsigned.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 9, 9, 9, 127, 0, 0, 1, 3, 232, 36, 235]);
    send_raw(&ctl, &unsigned);
    assert!(ctl.log().contains("carries no fleetadm relay signature"), "{}", ctl.log());
    let reg = ctl.admin(&["relays", "add", "test", "--public-key", &evil.public()]);
    assert!(reg.status.success(), "{}", text(&reg));
    let once = signed_header(&evil, "test", "10.9.9.9:1000", [2; 16]);
    send_raw(&ctl, &once);
    assert!(!ctl.log().contains("seen before"), "{}", ctl.log());
    send_raw(&ctl, &once);
    assert!(ctl.log().contains("this header was seen before (a replay)"), "{}", ctl.log());
    let listed = ctl.admin_json(&["relays", "list"]);
    assert_eq!(listed.as_array().map(|a| a.len()), Some(2), "{listed}");

    // The relay survives a controller restart (each connection dials the upstream afresh)...
    ctl.restart();
    let n = wait_connected(&ctl, "r1", true, T);
    assert!(relay.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).is_none(), "the relay kept running");
    assert_vouched(&n, &relay, &ctl);
    // ... and a restarted relay is reconnected through.
    relay.kill();
    wait_connected(&ctl, "r1", false, T);
    relay.spawn();
    wait_connected(&ctl, "r1", true, T);
    let m = relay.scrape();
    let count = fleetadm_tests::metric(&m, "fleetadm_relay_connections{");
    assert_eq!(count, Some(1.0), "the relay reports the one agent it forwards now: {m}");

    // Removed: the next connection is refused, for good.
    let rm = ctl.admin(&["relays", "remove", "bst"]);
    assert!(rm.status.success(), "{}", text(&rm));
    let before = unregistered(&ctl);
    a.kill();
    a.run();
    wait_for(T, "the removed relay's connection to be refused", || (unregistered(&ctl) > before).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ctl.node("r1").expect("r1")["connected"], false, "no session through a removed relay");
    let events = ctl.admin(&["events", "-o", "json"]);
    assert!(text(&events).contains("relay.add") && text(&events).contains("relay.remove"), "{}", text(&events));
}
