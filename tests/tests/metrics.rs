//! `controller serve --metrics-listen`: Prometheus text on a real socket, with numbers that move
//! when the fleet does (enrollments, connected agents, RPC errors by code).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::Inventory;
use fleetadm_tests::{pinned_channel, rt, wait_connected, wait_for, Agent, Controller};

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default())
}

/// The value of the sample `name{labels}` (exactly that series), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn metrics_are_served_in_prometheus_text_and_follow_the_fleet() {
    let port = fleetadm_tests::free_port();
    let ctl = Controller::start(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    let (code, text) = get(port, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("# TYPE fleetadm_agents_connected gauge"), "{text}");
    assert_eq!(sample(&text, "fleetadm_agents_connected"), Some(0.0), "{text}");
    assert_eq!(get(port, "/other").0, 404);

    // A refused enrollment, an unauthenticated call, then a real agent.
    let bad = Agent::new("bad").enroll_with(&ctl.addr(), "abcdef.0123456789abcdef", &ctl.token(&[]).1, &[]);
    assert!(!bad.status.success());
    rt().block_on(async {
        let ch = pinned_channel(&ctl).await;
        let st = AgentClient::new(ch).report_inventory(Inventory::default()).await.expect_err("no certificate");
        assert_eq!(st.code(), tonic::Code::Unauthenticated);
    });
    let mut a = Agent::new("m1");
    a.enroll(&ctl);
    a.run();
    wait_connected(&ctl, "m1", true, Duration::from_secs(30));
    let text = wait_for(Duration::from_secs(10), "metrics to show the agent", || {
        let (_, t) = get(port, "/metrics");
        (sample(&t, "fleetadm_agents_connected") == Some(1.0)).then_some(t)
    });
    assert_eq!(sample(&text, r#"fleetadm_enrollments_total{result="ok"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"fleetadm_enrollments_total{result="refused"}"#), Some(1.0), "{text}");
    assert!(
        sample(&text, r#"fleetadm_agent_rpc_errors_total{code="Unauthenticated"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(sample(&text, r#"fleetadm_nodes{revoked="false"}"#), Some(1.0), "{text}");
    // Every sample line is NAME{LABELS} VALUE or a comment.
    for l in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
        assert!(series.starts_with("fleetadm_") && value.parse::<f64>().is_ok(), "bad line {l:?}");
    }
    a.kill();
}
