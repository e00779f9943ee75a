//! Property tests for the agent's parsers of untrusted input: the /etc/hosts block editor,
//! IPVS netlink messages, inventory files, the health-probe response, file paths and task
//! messages from the controller. They run under `cargo test`; failures proptest finds are saved
//! in `proptest-regressions/` and replayed first on every run.
use std::path::Path;

use netlink_packet_core::{NetlinkDeserializable, NetlinkMessage, ParseableParametrized};
use netlink_packet_generic::{GenlHeader, GenlMessage};
use proptest::prelude::*;
use prost::Message;

use crate::execute::{files, hosts};
use crate::inventory::parse;
use crate::lb::{ipvs, probe};

/// Arbitrary /etc/hosts-like text: ordinary lines, maybe a managed block, odd endings.
fn hosts_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "[0-9.: a-z#\\t-]{0,30}",
        Just(hosts::BEGIN.to_string()),
        Just(hosts::END.to_string()),
        "\\PC{0,20}",
    ];
    (proptest::collection::vec(line, 0..12), any::<bool>()).prop_map(|(lines, trailing)| {
        let mut s = lines.join("\n");
        if trailing {
            s.push('\n');
        }
        s
    })
}

proptest! {

    #[test]
    fn every_line_outside_the_managed_block_survives(original in hosts_text(), ips in proptest::collection::vec(any::<[u8; 4]>(), 0..3)) {
        let entries: Vec<hosts::Entry> = ips
            .iter()
            .map(|b| hosts::Entry { ip: std::net::IpAddr::from(*b), names: vec!["apiserver.cluster.local".into()] })
            .collect();
        let block = hosts::render_block(&entries).unwrap();
        let Ok(out) = hosts::with_block(&original, &block, "/etc/hosts") else {
            // Refused only for an unterminated block: nothing is written then.
            prop_assert!(original.contains(hosts::BEGIN));
            return Ok(());
        };
        let outside = |text: &str| -> Vec<String> {
            let mut keep = Vec::new();
            let mut inside = false;
            for l in text.split_inclusive('\n') {
                match l.trim_end() {
                    t if t == hosts::BEGIN && !inside => inside = true,
                    t if t == hosts::END && inside => inside = false,
                    _ if !inside => keep.push(l.trim_end_matches('\n').to_string()),
                    _ => {}
                }
            }
            keep
        };
        // Lines before and after the first managed block, byte for byte, in order.
        let before = outside(&original);
        let after = outside(&out);
        let mut it = after.iter();
        for l in before.iter().filter(|l| !l.is_empty()) {
            prop_assert!(it.any(|a| a == l), "line {:?} lost:\n{:?}\n=>\n{:?}", l, original, out);
        }
        // Idempotent: applying the same block again changes nothing.
        prop_assert_eq!(hosts::with_block(&out, &block, "/etc/hosts").unwrap(), out.clone());
        if !block.is_empty() {
            prop_assert!(out.contains(&block));
        }
    }

    #[test]
    fn ipvs_netlink_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), cmd in any::<u8>()) {
        if let Ok(m) = ipvs::IpvsMsg::parse_with_param(&bytes[..], GenlHeader { cmd, version: 1 }) {
            for a in &m.attrs {
                if let ipvs::IpvsAttr::Service(s) = a {
                    let _ = s.len();
                }
            }
            let _ = ipvs::parse_service(&m.attrs);
            let _ = ipvs::parse_dest(&m.attrs, libc::AF_INET as u16);
        }
        let _ = NetlinkMessage::<GenlMessage<ipvs::IpvsMsg>>::deserialize(&bytes);
        let _ = <GenlMessage<ipvs::IpvsMsg> as NetlinkDeserializable>::deserialize(
            &netlink_packet_core::NetlinkHeader::default(),
            &bytes,
        );
    }

    #[test]
    fn ipvs_messages_round_trip(a in any::<[u8; 4]>(), port in 1u16.., b in any::<[u8; 4]>(), rport in 1u16.., w in 0u32..1000) {
        use netlink_packet_core::Emitable;
        let vip = std::net::SocketAddr::from((a, port));
        let rs = std::net::SocketAddr::from((b, rport));
        let msg = ipvs::IpvsMsg { cmd: 1, attrs: ipvs::encode_dest(&vip, &rs, Some(w)) };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let back = ipvs::IpvsMsg::parse_with_param(&buf[..], GenlHeader { cmd: 1, version: 1 }).unwrap();
        prop_assert_eq!(back.attrs, msg.attrs);
    }

    #[test]
    fn inventory_files_never_panic(text in "\\PC{0,300}") {
        let _ = parse::os_release(&text);
        let _ = parse::cpu_count(&text);
        let _ = parse::mem_total_bytes(&text);
        let _ = parse::swap_enabled(&text);
    }

    #[test]
    fn probe_responses_are_healthy_only_for_200(head in proptest::collection::vec(any::<u8>(), 0..512)) {
        if probe::judge_response(&head).is_ok() {
            let text = String::from_utf8_lossy(&head);
            let first = text.lines().next().unwrap_or_default();
            prop_assert!(first.starts_with("HTTP/1.") && first.split_whitespace().nth(1) == Some("200"));
        }
    }

    #[test]
    fn controller_file_paths_never_leave_the_kubernetes_tree(parts in proptest::collection::vec("(\\.\\.|\\.|[a-z]{1,4}|)", 0..6), abs in any::<bool>()) {
        let p = format!("{}etc/kubernetes/{}", if abs { "/" } else { "" }, parts.join("/"));
        if let Ok(t) = files::target(Path::new("/root-of-test"), &p) {
            prop_assert!(fleetadm_common::fsutil::is_below(Path::new("/root-of-test/etc/kubernetes"), &t), "{} -> {:?}", p, t);
        }
    }

    #[test]
    fn task_messages_decode_totally(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(a) = fleetadm_proto::TaskAssignment::decode(&bytes[..]) {
            if let Ok(kind) = fleetadm_proto::TaskKind::of_assignment(&a) {
                let _ = kind.capability();
            }
            if let Some(task) = &a.task {
                let _ = fleetadm_common::tasks::digest(task);
            }
        }
    }
}
