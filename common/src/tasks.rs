//! Helpers around the task messages of the protocol (`fleetadm_proto::TaskAssignment`): the
//! persisted form of bundle files, the task digest, and path/hash checks both sides apply.
use fleetadm_proto::task_assignment::Task;
use serde::{Deserialize, Serialize};

/// One file of an offline bundle: where it goes inside the bundle, and the content-addressed blob
/// that holds it. Persisted by the controller (bundle manifests, cluster records); sent to agents
/// as [`fleetadm_proto::BundleFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Relative path inside the bundle (`bin/kubeadm`, `conf/kubelet.service`, ...).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

impl From<&BundleFile> for fleetadm_proto::BundleFile {
    fn from(f: &BundleFile) -> Self {
        fleetadm_proto::BundleFile { path: f.path.clone(), size: f.size, mode: f.mode, sha256: f.sha256.clone() }
    }
}

impl From<&fleetadm_proto::BundleFile> for BundleFile {
    fn from(f: &fleetadm_proto::BundleFile) -> Self {
        BundleFile { path: f.path.clone(), size: f.size, mode: f.mode, sha256: f.sha256.clone() }
    }
}

/// SHA-256 over the task's protobuf encoding: the agent's journal keys results by task id and
/// digest, so a task re-sent with different parameters is run again rather than answered from
/// memory. (Fields the agent does not know are dropped when it decodes, so they do not count.)
pub fn digest(task: &Task) -> String {
    use sha2::{Digest, Sha256};
    let mut buf = Vec::with_capacity(256);
    task.encode(&mut buf);
    hex::encode(Sha256::digest(&buf))
}

#[cfg(test)]
#[allow(clippy::needless_update)]
mod tests {
    use super::*;
    use fleetadm_proto::{KubeadmJoinTask, TaskAssignment, TaskKind};
    use prost::Message;

    #[allow(clippy::needless_update)]
    fn join(config: &str) -> Task {
        Task::KubeadmJoin(KubeadmJoinTask { config: config.into(), control_plane: true, ..Default::default() })
    }

    #[test]
    fn round_trips_and_digests_differ_by_parameters() {
        let a = TaskAssignment {
            task_id: "c/p/h/s".into(),
            attempt: 1,
            timeout_secs: 5,
            task: Some(join("x")),
            ..Default::default()
        };
        let back = TaskAssignment::decode(a.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, a);
        assert_eq!(TaskKind::of_assignment(&back), Ok(TaskKind::KubeadmJoin));
        assert_eq!(digest(&join("x")), digest(&join("x")));
        assert_ne!(digest(&join("x")), digest(&join("y")));
    }

    #[test]
    fn unknown_fields_and_kinds_are_ignored_not_fatal() {
        // A newer sender's extra field inside the task message (4001, a string) is skipped.
        let a = TaskAssignment { task_id: "t".into(), attempt: 2, task: Some(join("x")), ..Default::default() };
        let mut bytes = a.encode_to_vec();
        let task_start = bytes.len() - join_len("x");
        // Rewrite: assignment fields, then task field 14 with the extra field appended inside it.
        let mut inner = bytes.split_off(task_start);
        inner.drain(..2); // tag + length of field 14 (small message)
        inner.extend_from_slice(&[0x8a, 0xfa, 0x01, 0x03, b'n', b'e', b'w']); // field 4001, "new"
        bytes.extend_from_slice(&[0x72, inner.len() as u8]);
        bytes.extend_from_slice(&inner);
        let back = TaskAssignment::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, a, "the unknown field is dropped, the rest kept");
        // A oneof member this build does not know (field 99) leaves no task: the agent says so.
        let mut unknown = TaskAssignment { task_id: "t".into(), attempt: 2, ..Default::default() }.encode_to_vec();
        unknown.extend_from_slice(&[0x9a, 0x06, 0x00]);
        let back = TaskAssignment::decode(unknown.as_slice()).unwrap();
        assert_eq!(back.task_id, "t");
        assert!(TaskKind::of_assignment(&back).is_err());
    }

    /// Encoded length of the `kubeadm_join` member (tag, length, body).
    fn join_len(config: &str) -> usize {
        let Task::KubeadmJoin(t) = join(config) else { unreachable!() };
        2 + t.encoded_len()
    }
}

/// Is `p` a safe relative path inside a bundle: no absolute path, no `..`, no empty or `.`
/// components, no NUL, not too long.
pub fn safe_bundle_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Is `s` a lowercase hex SHA-256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn bundle_paths() {
        for ok in ["bin/kubeadm", "conf/10-kubeadm.conf", "images/a.tar"] {
            assert!(safe_bundle_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "bin/../../x", "bin//x", "./bin/x", "bin/.", "a\0b"] {
            assert!(!safe_bundle_path(bad), "{bad}");
        }
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex(&"AB".repeat(32)) && !is_sha256_hex("ab"));
    }
}

/// The bytes a peer ticket's MAC covers: the controller signs them, the holder verifies them
/// (one definition, so the two sides cannot drift apart).
pub fn peer_ticket_message(t: &fleetadm_proto::PeerTicket) -> Vec<u8> {
    format!("{}\0{}\0{}\0{}", t.requester, t.holder, t.sha256, t.expires_unix_ms).into_bytes()
}
