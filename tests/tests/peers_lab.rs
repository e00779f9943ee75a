//! Peer-to-peer bundle distribution on a lab fleet (hosts in network namespaces, real agents
//! with `--peer-listen`, real mTLS between them): the controller sends about one copy, the hosts
//! fetch the rest from each other, every host ends with the verified blobs; and a peer serves
//! nobody without a ticket the controller signed for that requester and blob.
use std::time::{Duration, Instant};

use fleetadm_proto::{PeerChunkRequest, PeerTicket};
use fleetadm_tests::lab::{Lab, ONE_LAB};
use sha2::Digest;

fn scrape(addr: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics listener");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[test]
fn hosts_fetch_a_bundle_from_each_other_and_serve_only_ticket_holders() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = fleetadm_tests::bin("controller");
    let metrics = format!("127.0.0.1:{}", fleetadm_tests::free_port());
    let lab = Lab::up_env("peers", 5, bin.parent().expect("bin dir"), &[("LAB_PEERS", "1"), ("LAB_METRICS", &metrics)]);
    // A bundle with one 24 MiB file (random: nothing compresses or deduplicates it).
    let dir = lab.dir.join("bundle.d");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let payload: Vec<u8> = {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        (0..24 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    std::fs::write(dir.join("images/payload.tar"), &payload).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&payload));
    let out = lab.dir.join("b.tar.gz");
    let (ok, text) = lab.ctl(&[
        "bundle",
        "build",
        &dir.display().to_string(),
        "-o",
        &out.display().to_string(),
        "--name",
        "p2p",
        "--version",
        "v1.29.9",
    ]);
    assert!(ok, "{text}");
    let (ok, text) = lab.ctl(&["bundle", "import", &dir.display().to_string()]);
    assert!(ok, "{text}");
    let sent_before = scrape(&metrics, "fleetadm_blob_bytes_sent_total");
    let (ok, text) = lab.ctl(&[
        "cluster",
        "create",
        "p2p",
        "--masters",
        "h1",
        "--nodes",
        "h2,h3,h4,h5",
        "--bundle",
        "p2p",
        "--detach",
    ]);
    assert!(ok, "{text}");
    let blob = |h: &str| lab.host(h).join("state/blobs").join(&sha);
    let t0 = Instant::now();
    while !["h1", "h2", "h3", "h4", "h5"].iter().all(|h| blob(h).exists()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "not every host holds the payload: {}", {
            let (_, s) = lab.ctl(&["cluster", "status", "p2p"]);
            s
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    for h in ["h1", "h2", "h3", "h4", "h5"] {
        let got = hex::encode(sha2::Sha256::digest(std::fs::read(blob(h)).unwrap()));
        assert_eq!(got, sha, "{h}'s copy is the payload");
    }
    // The controller sent about one copy (the payload, the lab's few MiB of binaries, and the
    // chunks requested before the first answer pointed elsewhere), not five.
    let sent = scrape(&metrics, "fleetadm_blob_bytes_sent_total") - sent_before;
    let redirects = scrape(&metrics, "fleetadm_blob_peer_redirects_total");
    assert!(sent < 2 * payload.len() as u64, "the controller sent {sent} bytes for a {} byte payload", payload.len());
    assert!(redirects >= 4, "every host but the first was sent to a peer for the payload: {redirects}");
    let from_peer = ["h1", "h2", "h3", "h4", "h5"]
        .iter()
        .filter(|h| {
            std::fs::read_to_string(lab.host(h).join("agent.log"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("fetching from a peer") && l.contains(&sha))
        })
        .count();
    assert_eq!(from_peer, 4, "four hosts fetched the payload from a peer");

    // The peer port: h2's own identity, but no ticket / a forged one / one for another requester.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let h2 = fleetadm_agent::identity::StateDir::new(lab.host("h2").join("state"));
        let mut c = fleetadm_agent::peer::dial(&h2, "h1", "10.78.0.11:7451").await.expect("h2 reaches h1's peer port");
        let req = |ticket: Option<PeerTicket>| PeerChunkRequest {
            ticket,
            sha256: sha.clone(),
            offset: 0,
            max_len: 1024,
            size: payload.len() as u64,
        };
        let st = c.peer_chunk(req(None)).await.expect_err("no ticket");
        assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        let forged = PeerTicket {
            requester: "h2".into(),
            holder: "h1".into(),
            sha256: sha.clone(),
            expires_unix_ms: u64::MAX,
            mac: vec![0; 32],
        };
        let st = c.peer_chunk(req(Some(forged.clone()))).await.expect_err("forged");
        assert!(st.message().contains("not signed"), "{st:?}");
        let theirs = PeerTicket { requester: "h3".into(), ..forged };
        let st = c.peer_chunk(req(Some(theirs))).await.expect_err("someone else's");
        assert!(st.message().contains("this is h2"), "{st:?}");
        // The right name matters: h1's port does not pass for h3's.
        let err = match fleetadm_agent::peer::dial(&h2, "h3", "10.78.0.11:7451").await {
            Ok(mut c) => c.peer_chunk(req(None)).await.expect_err("wrong peer").to_string(),
            Err(e) => e,
        };
        assert!(err.contains("h3") || err.contains("certificate"), "{err}");
    });
}
