//! The agent port (docs/security.md): the serving certificate renews while the controller runs,
//! calls are authenticated before their bodies are read, and idle, slow or surplus connections
//! do not starve real agents.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::enrollment_client::EnrollmentClient;
use fleetadm_proto::{EnrollRequest, Inventory};
use fleetadm_tests::{pinned_channel, rt, text, wait_connected, wait_for, Agent, Controller};

const T: Duration = Duration::from_secs(30);

/// (serial, notAfter) of the certificate the controller serves right now (a new handshake).
fn served_cert(addr: &str) -> Option<(String, SystemTime)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -alpn h2 </dev/null 2>/dev/null | openssl x509 -outform DER 2>/dev/null"
        ))
        .output()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&out.stdout).ok()?;
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    Some((hex::encode(cert.raw_serial()), not_after))
}

#[test]
fn the_serving_certificate_renews_while_the_controller_runs() {
    let ctl = Controller::start(&["--heartbeat-interval", "1s", "--server-cert-validity", "30s"]);
    let (first, first_end) = served_cert(&ctl.addr()).expect("served certificate");
    let mut a = Agent::new("s1");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "s1", true, T);
    // Reissued with a third of its life left (~20 s in), without a restart.
    let (_, second_end) = wait_for(Duration::from_secs(40), "a renewed serving certificate", || {
        served_cert(&ctl.addr()).filter(|(s, _)| *s != first)
    });
    assert!(second_end > first_end, "the new certificate outlives the old one");
    // Past the first certificate's expiry, new handshakes still work: a restarted agent
    // reconnects and a new host enrolls.
    let now = SystemTime::now();
    if first_end > now {
        std::thread::sleep(first_end.duration_since(now).unwrap() + Duration::from_secs(1));
    }
    let (serving, end) = served_cert(&ctl.addr()).unwrap();
    assert!(end > SystemTime::now(), "the controller serves an expired certificate ({serving})");
    a.kill();
    a.run();
    let n = wait_connected(&ctl, "s1", true, T);
    assert_eq!(n["revoked"], false);
    Agent::new("s2").enroll(&ctl);
    assert!(a.exited().is_none(), "{}", a.log());
    assert!(ctl.log().contains("serving certificate renewed while running"), "{}", ctl.log());
}

#[test]
fn calls_are_authenticated_before_their_bodies_are_read() {
    let ctl = Controller::start(&[]);
    rt().block_on(async {
        let ch = pinned_channel(&ctl).await;
        // A large body without a client certificate: refused as unauthenticated, not decoded
        // (decoding would have answered "message too large").
        let big = Inventory { hostname: "x".repeat(2 * 1024 * 1024), ..Default::default() };
        let st = AgentClient::new(ch.clone())
            .max_encoding_message_size(8 * 1024 * 1024)
            .report_inventory(big)
            .await
            .expect_err("no certificate");
        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
        // Enrollment bodies are small: a 64 KiB "CSR" is refused by size.
        let (token, _) = ctl.token(&[]);
        let st = EnrollmentClient::new(ch)
            .max_encoding_message_size(8 * 1024 * 1024)
            .enroll(EnrollRequest {
                token,
                csr_der: vec![0x30; 64 * 1024],
                node_name: "big".into(),
                machine_id: "m".into(),
                ..Default::default()
            })
            .await
            .expect_err("oversized enrollment");
        assert_eq!(st.code(), tonic::Code::OutOfRange, "{st:?}");
    });
}

#[test]
fn failed_enrollments_from_one_source_are_told_to_wait() {
    let ctl = Controller::start(&[]);
    let (good, _) = ctl.token(&["--uses", "1"]);
    let bad = format!("{}.0000000000000000", good.split('.').next().unwrap());
    rt().block_on(async {
        let mut c = EnrollmentClient::new(pinned_channel(&ctl).await);
        let req = |token: &str| EnrollRequest {
            token: token.into(),
            csr_der: vec![1],
            node_name: "g1".into(),
            machine_id: "m".into(),
            ..Default::default()
        };
        let mut limited = None;
        for i in 0..40 {
            let st = c.enroll(req(&bad)).await.expect_err("bad token");
            if st.code() == tonic::Code::ResourceExhausted {
                limited = Some((i, st.message().to_string()));
                break;
            }
            assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        }
        let (i, msg) = limited.expect("a flood of bad tokens must be slowed down");
        assert!(i >= 20, "the limit must allow honest mistakes: limited after {i}");
        assert!(msg.contains("retry in") && msg.contains("127.0.0.1"), "{msg}");
        // While limited, even a good token waits (nothing is spent), then works.
        let st = c.enroll(req(&good)).await.expect_err("still limited");
        assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    });
    std::thread::sleep(Duration::from_millis(1500));
    let a = Agent::new("g1");
    let (_, hash) = ctl.token(&[]);
    let out = a.enroll_with(&ctl.addr(), &good, &hash, &[]);
    assert!(out.status.success(), "{}", text(&out));
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard);
    }
}

/// Does the server close this socket within `within`?
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 512];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_slow_connections_do_not_starve_agents() {
    raise_fd_limit();
    let ctl = Controller::start(&["--heartbeat-interval", "1s"]);
    let pid = ctl.pid().unwrap();
    let mut a = Agent::new("live");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "live", true, T);
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(pid);

    // 1,000 connections that send nothing, 1,000 that send the first bytes of a ClientHello and
    // stall.
    let mut idle = Vec::new();
    for i in 0..2000 {
        let mut s = TcpStream::connect(ctl.addr()).expect("connect");
        if i % 2 == 1 {
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
        }
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_during = rss_kib(pid);

    // A new host enrolls and the running agent keeps reporting, each within 5 s.
    let t = Instant::now();
    let newcomer = Agent::new("new");
    let (token, hash) = ctl.token(&[]);
    let out = newcomer.enroll_with(&ctl.addr(), &token, &hash, &[]);
    let enroll_took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(enroll_took < Duration::from_secs(5), "enrollment took {enroll_took:?}");
    let seen = |n: &serde_json::Value| n["last_seen"].as_str().map(str::to_string);
    let before = seen(&ctl.node("live").unwrap());
    let t = Instant::now();
    wait_for(Duration::from_secs(5), "a heartbeat from the running agent", || {
        let now = seen(&ctl.node("live")?);
        (now != before).then_some(())
    });
    let report_took = t.elapsed();
    let mut newcomer = newcomer;
    let t = Instant::now();
    newcomer.run();
    wait_connected(&ctl, "new", true, Duration::from_secs(5));
    let connect_took = t.elapsed();

    // The stalled handshakes lose their slots at the handshake deadline (10 s).
    let sample: Vec<usize> = (0..2000).step_by(97).collect();
    let t = Instant::now();
    let closed = sample.iter().filter(|&&i| closed_by_server(&mut idle[i], Duration::from_secs(15))).count();
    let closed_after = t.elapsed();
    drop(idle);
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid);
    println!(
        "2000 idle/slow connections: enroll {enroll_took:?}, heartbeat seen {report_took:?}, new session {connect_took:?}; \
         controller RSS {rss_before} KiB before, {rss_during} KiB with them open ({} B per connection), {rss_after} KiB after; \
         {closed}/{} sampled stalled connections closed by the server within {closed_after:?}",
        (rss_during.saturating_sub(rss_before) * 1024) / 2000,
        sample.len()
    );
    assert_eq!(closed, sample.len(), "stalled handshakes must be closed by the server");
    assert!(rss_during.saturating_sub(rss_before) < 200 * 1024, "memory must stay bounded");
    assert!(a.exited().is_none());
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    raise_fd_limit();
    let ctl = Controller::start(&["--max-connections", "20"]);
    // 30 silent connections against a limit of 20: at least the 10 over it are closed at once
    // (the harness's readiness probe may still hold a slot for a moment), and never more than
    // 20 stay open.
    let mut held: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(ctl.addr()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let closed = held.iter_mut().map(|s| closed_by_server(s, Duration::from_millis(300))).filter(|c| *c).count();
    assert!(closed >= 10, "connections over the limit must be closed: {closed} of 30 closed");
    assert!(30 - closed <= 20, "at most 20 stay open: {}", 30 - closed);
    // Slots come back when connections close.
    drop(held);
    let a = Agent::new("after");
    wait_for(T, "a slot to free up", || {
        let (t, h) = ctl.token(&[]);
        a.enroll_with(&ctl.addr(), &t, &h, &[]).status.success().then_some(())
    });
}
