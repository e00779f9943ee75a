//! Join tokens: one short-lived bootstrap token per operation that joins hosts. It is made when
//! the operation starts (carried by the init configuration on a new cluster, and created by the
//! `join-token` task on master0), replaced when a failed or long-stopped rollout is resumed, and
//! deleted with every token it replaced by the `drop-token` task at the end. A week-old failed
//! rollout resumes with a token made for the resume, not with one that expired days ago.
use std::time::Duration;

use fleetadm_common::token::BootstrapToken;

use super::record::ClusterSecrets;

/// How long a join token lives. An operation longer than this is resumed with a new one (see
/// [`stale`]).
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(2 * 3600);
/// The same, as kubeadm's InitConfiguration writes a duration.
pub const JOIN_TOKEN_TTL_TEXT: &str = "2h0m0s";
/// Replaced tokens remembered for deletion (older ones have long expired).
const MAX_RETIRED: usize = 16;

/// The public id of a token ("abcdef" of "abcdef.0123456789abcdef").
pub fn id_of(token: &str) -> &str {
    token.split_once('.').map(|(id, _)| id).unwrap_or(token)
}

/// Start an operation with a new token; the current one is retired (deleted at the end).
pub fn mint(secrets: &mut ClusterSecrets, now_ms: u64) {
    let old = id_of(&secrets.bootstrap_token).to_string();
    if !old.is_empty() && !secrets.retired_token_ids.contains(&old) {
        secrets.retired_token_ids.push(old);
    }
    let excess = secrets.retired_token_ids.len().saturating_sub(MAX_RETIRED);
    secrets.retired_token_ids.drain(..excess);
    secrets.bootstrap_token = BootstrapToken::generate().expose();
    secrets.token_minted_ms = now_ms;
}

/// Has the current token used up half its life (or is its age unknown)? A rollout resumed after
/// that gets a new one, so joins never race the expiry.
pub fn stale(secrets: &ClusterSecrets, now_ms: u64) -> bool {
    let half = JOIN_TOKEN_TTL.as_millis() as u64 / 2;
    secrets.token_minted_ms == 0 || now_ms.saturating_sub(secrets.token_minted_ms) > half
}

/// Every token id the end of the operation deletes: the current one and those it replaced.
pub fn all_ids(secrets: &ClusterSecrets) -> Vec<String> {
    let mut ids = secrets.retired_token_ids.clone();
    let current = id_of(&secrets.bootstrap_token).to_string();
    if !ids.contains(&current) {
        ids.push(current);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::kube::KubePki;

    fn secrets() -> ClusterSecrets {
        ClusterSecrets {
            pki: KubePki::default(),
            bootstrap_token: "abcdef.0123456789abcdef".into(),
            ca_cert_hash: String::new(),
            token_minted_ms: 1_000,
            retired_token_ids: vec![],
        }
    }

    #[test]
    fn a_new_token_per_operation_and_the_old_ones_deleted_at_the_end() {
        let mut s = secrets();
        assert!(!stale(&s, 1_000 + 3_600_000), "an hour old: still good");
        assert!(stale(&s, 1_000 + 3_600_001), "past half its life");
        mint(&mut s, 5_000);
        assert_ne!(s.bootstrap_token, "abcdef.0123456789abcdef");
        BootstrapToken::parse(&s.bootstrap_token).expect("kubeadm format");
        assert_eq!((s.token_minted_ms, s.retired_token_ids.clone()), (5_000, vec!["abcdef".to_string()]));
        let ids = all_ids(&s);
        assert_eq!(ids, vec!["abcdef".to_string(), id_of(&s.bootstrap_token).to_string()]);
        for i in 0..40 {
            mint(&mut s, 6_000 + i);
        }
        assert_eq!(s.retired_token_ids.len(), MAX_RETIRED, "bounded");
        assert!(stale(&ClusterSecrets { token_minted_ms: 0, ..secrets() }, 1), "unknown age (older records)");
    }
}
