//! Property tests for the controller's parsers of untrusted input: CSRs, bundle manifests and
//! archives (with the import budget), Clusterfiles and the kubeadm configs rendered from them,
//! peer addresses, and relays' PROXY v2 headers. They run under `cargo test`; failures proptest finds are saved in
//! `proptest-regressions/` and replayed first on every run.
use std::io::Write;

use proptest::prelude::*;

use crate::bundle::archive::{self, Budget};
use crate::bundle::manifest::{Manifest, MANIFEST};
use crate::enroll::csr;
use crate::plan::clusterfile;
use crate::plan::kubeadm::{self, ClusterInputs, HostInputs, HostRole};
use crate::relay::header as relay_header;

fn cluster_inputs() -> ClusterInputs {
    ClusterInputs {
        cluster_name: "lab".into(),
        version: "v1.29.9".into(),
        pod_cidr: "100.64.0.0/10".into(),
        service_cidr: "10.96.0.0/22".into(),
        dns_domain: "cluster.local".into(),
        vip: "10.103.97.2".parse().unwrap(),
        cert_sans: vec![],
        bootstrap_token: "abcdef.0123456789abcdef".into(),
        ca_cert_hash: format!("sha256:{}", "ab".repeat(32)),
        cgroup_driver: "systemd".into(),
        cri_socket: "unix:///run/containerd/containerd.sock".into(),
        image_repository: "registry.k8s.io".into(),
    }
}

/// A small valid bundle archive (manifest first, one file), as bytes.
fn valid_archive() -> Vec<u8> {
    use sha2::Digest;
    let body = b"#!/bin/sh\necho kubeadm\n";
    let m = format!(
        "name: p\nkubernetesVersion: v1.29.9\narch: amd64\nfiles:\n- path: bin/kubeadm\n  size: {}\n  mode: 493\n  sha256: {}\n",
        body.len(),
        hex::encode(sha2::Sha256::digest(body))
    );
    let mut t = tar::Builder::new(Vec::new());
    for (path, data) in [(MANIFEST, m.as_bytes()), ("bin/kubeadm", &body[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, path, data).unwrap();
    }
    t.into_inner().unwrap()
}

fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => bytes_under(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

proptest! {

    #[test]
    fn csr_vetting_never_panics(der in proptest::collection::vec(any::<u8>(), 0..600), name in "[a-z0-9.-]{0,20}") {
        let _ = csr::vet(&der, &name);
    }

    #[test]
    fn csr_vetting_survives_corrupted_real_csrs(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8)) {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["h1".into()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "h1");
        let mut der = p.serialize_request(&kp).unwrap().der().to_vec();
        for (i, b) in flips {
            let n = der.len();
            der[i % n] ^= b;
        }
        if let Ok(params) = csr::vet(&der, "h1") {
            // Whatever survives asks for nothing but the name.
            prop_assert!(params.params.subject_alt_names.len() <= 1);
        }
    }

    #[test]
    fn manifest_parsing_never_panics(text in "\\PC{0,300}") {
        let _ = Manifest::parse(&text);
    }

    #[test]
    fn archive_unpacking_is_total_and_stays_in_budget(
        flips in proptest::collection::vec((0usize..4096, any::<u8>()), 0..12),
        cut in 0usize..4096,
        gz in any::<bool>(),
    ) {
        let mut raw = valid_archive();
        for (i, b) in flips {
            let n = raw.len();
            raw[i % n] ^= b;
        }
        raw.truncate(cut.max(1).min(raw.len()));
        let raw = if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&raw).unwrap();
            e.finish().unwrap()
        } else {
            raw
        };
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("in.tar");
        std::fs::write(&src, &raw).unwrap();
        let dest = d.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let budget = Budget { max_total_bytes: 4096, max_files: 4, max_file_bytes: 2048, max_manifest_bytes: 2048 };
        let r = archive::unpack(&src, &dest, &budget);
        prop_assert!(bytes_under(&dest) <= 4096 + 2048, "wrote more than the budget");
        if let Ok(m) = r {
            prop_assert!(budget.check(&m).is_ok());
            for f in &m.files {
                prop_assert!(dest.join(&f.path).exists());
            }
        }
    }

    #[test]
    fn clusterfile_parsing_never_panics(text in "\\PC{0,400}") {
        let _ = clusterfile::parse(&text);
        let _ = clusterfile::without_ssh(&text);
    }

    #[test]
    fn dropping_ssh_keeps_the_cluster(
        host in "10\\.0\\.[0-9]{1,2}\\.[0-9]{1,2}", pw in "[a-zA-Z0-9]{1,16}", user in "[a-z]{1,8}",
    ) {
        let text = format!(
            "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {{name: c}}\nspec:\n  hosts:\n  - ips: [{host}]\n    roles: [master]\n    ssh: {{user: {user}, passwd: {pw}x}}\n  ssh: {{user: {user}, passwd: {pw}y}}\n"
        );
        let (clean, dropped) = clusterfile::without_ssh(&text).unwrap();
        prop_assert_eq!(dropped, 2);
        let (px, py) = (format!("{pw}x"), format!("{pw}y"));
        prop_assert!(!clean.contains(&px) && !clean.contains(&py));
        let (a, b) = (clusterfile::parse(&text).unwrap(), clusterfile::parse(&clean).unwrap());
        prop_assert_eq!(a.hosts.len(), b.hosts.len());
    }

    #[test]
    fn kubeadm_overrides_render_to_valid_yaml(key in "[a-zA-Z]{1,12}", value in "\\PC{0,30}", sub in "[0-9.]{0,18}") {
        let text = format!(
            "apiVersion: apps.sealos.io/v1beta1\nkind: Cluster\nmetadata: {{name: c}}\nspec:\n  hosts:\n  - {{ips: [10.0.0.2], roles: [master]}}\n---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\nnetworking: {{podSubnet: {:?}}}\n{}: {:?}\n",
            sub, key, value
        );
        if let Ok(cf) = clusterfile::parse(&text) {
            let h = HostInputs { name: "m1".into(), ip: "10.0.0.2".parse().unwrap(), role: HostRole::FirstMaster };
            if let Ok(out) = kubeadm::render(&cluster_inputs(), &h, Some(&cf)) {
                for doc in serde_yaml::Deserializer::from_str(&out) {
                    let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc);
                    prop_assert!(v.is_ok(), "rendered config is not YAML: {}", out);
                }
            }
        }
    }

    #[test]
    fn peer_addresses_never_panic(s in "\\PC{0,60}") {
        let _ = crate::plan::resolve::peer_ip(&s);
    }

    #[test]
    fn relay_headers_never_panic(prefix in proptest::array::uniform16(any::<u8>()), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = relay_header::body_len(&prefix);
        let _ = relay_header::decode(&prefix, &body);
    }

    #[test]
    fn relay_headers_round_trip_and_any_changed_byte_is_caught(
        src in any::<std::net::SocketAddr>(),
        dst in any::<std::net::SocketAddr>(),
        name in "[a-z0-9][a-z0-9.-]{0,62}",
        time_ms in any::<u64>(),
        nonce in proptest::array::uniform16(any::<u8>()),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = relay_key();
        let bytes = relay_header::encode(src, dst, &name, time_ms, nonce, |m| key.sign(m)).unwrap();
        let split = |b: &[u8]| {
            let mut p = [0u8; relay_header::PREFIX_LEN];
            p.copy_from_slice(&b[..relay_header::PREFIX_LEN]);
            (p, b[relay_header::PREFIX_LEN..].to_vec())
        };
        let (p, body) = split(&bytes);
        prop_assert_eq!(relay_header::body_len(&p).unwrap(), body.len());
        let h = relay_header::decode(&p, &body).unwrap();
        let canon = |a: std::net::SocketAddr| std::net::SocketAddr::new(a.ip().to_canonical(), a.port());
        prop_assert_eq!(h.source, canon(src));
        prop_assert_eq!(h.destination, canon(dst));
        prop_assert_eq!(&h.relay, &name);
        prop_assert_eq!((h.time_ms, h.nonce), (time_ms, nonce));
        prop_assert!(public_key(key).verify(&h.signed, &h.signature));
        // One flipped bit anywhere: refused as a header, or its signature no longer verifies
        // for what it now says.
        let mut bad = bytes.clone();
        bad[flip.index(bytes.len())] ^= 1 << bit;
        let (p, body) = split(&bad);
        if let Ok(h2) = relay_header::decode(&p, &body) {
            let pk = public_key(key);
            prop_assert!(!pk.verify(&h2.signed, &h2.signature) || h2 == h, "a changed header still verifies: {:?}", h2);
        }
    }
}

fn relay_key() -> &'static crate::relay::keys::SigningKey {
    static KEY: std::sync::OnceLock<crate::relay::keys::SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        crate::relay::keys::SigningKey::load_or_create(&dir.path().join("k")).unwrap().0
    })
}

fn public_key(k: &crate::relay::keys::SigningKey) -> crate::relay::keys::PublicKey {
    crate::relay::keys::PublicKey::parse(&k.public()).unwrap()
}
