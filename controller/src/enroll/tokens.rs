//! Bootstrap tokens: created by the operator, spent by agents. Only SHA-256 of the secret is
//! stored; expiry and remaining uses are enforced atomically and flushed before enrollment answers.
use std::sync::Arc;
use std::time::Duration;

use fleetadm_common::clock::{now_unix, rfc3339};
use fleetadm_common::token::BootstrapToken;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::store::{self, Durability, Store, StoreError, Table, Update};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub description: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub uses_left: u32,
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error(transparent)]
    Malformed(#[from] fleetadm_common::token::MalformedToken),
    #[error(
        "bootstrap token {0:?} is not valid (unknown id or wrong secret); create one with `controller token create`"
    )]
    NotValid(String),
    #[error("bootstrap token {id:?} expired at {}; create a new one with `controller token create`", rfc3339(*.expires_at))]
    Expired { id: String, expires_at: u64 },
    #[error("bootstrap token {0:?} has no uses left; create a new one with `controller token create`")]
    Exhausted(String),
    #[error("invalid token request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Tokens {
    store: Arc<dyn Store>,
}

const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_USES: u32 = 100_000;

impl Tokens {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Create a token. Returns the secret token (shown once) and its stored record.
    pub fn create(
        &self,
        ttl: Duration,
        uses: u32,
        description: &str,
    ) -> Result<(BootstrapToken, TokenRecord), TokenError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::BadRequest(format!(
                "ttl must be between 1s and {}",
                humantime::format_duration(MAX_TTL)
            )));
        }
        if uses == 0 || uses > MAX_USES {
            return Err(TokenError::BadRequest(format!("uses must be between 1 and {MAX_USES}")));
        }
        if description.len() > 256 {
            return Err(TokenError::BadRequest("description is longer than 256 bytes".into()));
        }
        loop {
            let token = BootstrapToken::generate();
            let now = now_unix();
            let rec = TokenRecord {
                id: token.id.clone(),
                secret_sha256: token.secret_hash(),
                description: description.to_string(),
                created_at: now,
                expires_at: now + ttl.as_secs(),
                uses_left: uses,
            };
            let bytes =
                serde_json::to_vec(&rec).map_err(|e| StoreError::Io { table: "tokens", source: Box::new(e) })?;
            // Never overwrite an existing id (36^6 ids, so a clash is rare but possible).
            if self.store.compare_and_swap(Table::Tokens, &rec.id, None, Some(bytes), Durability::Flush)? {
                return Ok((token, rec));
            }
        }
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        Ok(store::list_json(&*self.store, Table::Tokens)?)
    }

    pub fn delete(&self, id: &str) -> Result<bool, TokenError> {
        Ok(self.store.remove(Table::Tokens, id, Durability::Flush)?)
    }

    fn validate(rec: Option<TokenRecord>, token: &BootstrapToken, now: u64) -> Result<TokenRecord, TokenError> {
        let rec = rec.ok_or_else(|| TokenError::NotValid(token.id.clone()))?;
        let ok: bool = rec.secret_sha256.as_bytes().ct_eq(token.secret_hash().as_bytes()).into();
        if !ok {
            return Err(TokenError::NotValid(token.id.clone()));
        }
        if now >= rec.expires_at {
            return Err(TokenError::Expired { id: rec.id, expires_at: rec.expires_at });
        }
        if rec.uses_left == 0 {
            return Err(TokenError::Exhausted(rec.id));
        }
        Ok(rec)
    }

    /// Check a token without spending it.
    pub fn check(&self, text: &str) -> Result<TokenRecord, TokenError> {
        let token = BootstrapToken::parse(text)?;
        let rec = store::get_json(&*self.store, Table::Tokens, &token.id)?;
        Self::validate(rec, &token, now_unix())
    }

    /// Spend one use of a token, atomically and durably.
    pub fn consume(&self, text: &str) -> Result<TokenRecord, TokenError> {
        let token = BootstrapToken::parse(text)?;
        let now = now_unix();
        let out = store::update_json(
            &*self.store,
            Table::Tokens,
            &token.id,
            Durability::Flush,
            |cur: Option<TokenRecord>| {
                let mut rec = Self::validate(cur, &token, now)?;
                rec.uses_left -= 1;
                Ok::<_, TokenError>(Update::Put(rec))
            },
        )?;
        out?.ok_or_else(|| TokenError::NotValid(token.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn tokens() -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        (dir, Tokens::new(store))
    }

    #[test]
    fn token_is_stored_hashed_and_spent_once() {
        let (_d, t) = tokens();
        let (tok, rec) = t.create(Duration::from_secs(60), 1, "test").unwrap();
        let secret = tok.expose();
        let listed = t.list().unwrap();
        assert_eq!(listed, vec![rec.clone()]);
        assert!(!serde_json::to_string(&listed).unwrap().contains(secret.split('.').nth(1).unwrap()));
        t.check(&secret).unwrap();
        assert_eq!(t.consume(&secret).unwrap().uses_left, 0);
        assert!(matches!(t.consume(&secret), Err(TokenError::Exhausted(_))));
    }

    #[test]
    fn wrong_secret_unknown_and_malformed_tokens_fail() {
        let (_d, t) = tokens();
        let (tok, _) = t.create(Duration::from_secs(60), 3, "").unwrap();
        let wrong = format!("{}.{}", tok.id, "0000000000000000");
        assert!(matches!(t.consume(&wrong), Err(TokenError::NotValid(_))));
        assert!(matches!(t.consume("zzzzzz.0000000000000000"), Err(TokenError::NotValid(_))));
        assert!(matches!(t.consume("nope"), Err(TokenError::Malformed(_))));
        // failed attempts did not spend anything
        assert_eq!(t.check(&tok.expose()).unwrap().uses_left, 3);
    }

    #[test]
    fn expired_token_is_refused() {
        let (_d, t) = tokens();
        let (tok, mut rec) = t.create(Duration::from_secs(60), 1, "").unwrap();
        rec.expires_at = now_unix() - 1;
        store::put_json(&*t.store, Table::Tokens, &rec.id, &rec, Durability::Flush).unwrap();
        let err = t.consume(&tok.expose()).unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }));
        assert!(err.to_string().contains("expired at"));
    }

    #[test]
    fn limits_are_enforced() {
        let (_d, t) = tokens();
        assert!(t.create(Duration::ZERO, 1, "").is_err());
        assert!(t.create(Duration::from_secs(60), 0, "").is_err());
        assert!(t.delete("abcdef").is_ok());
    }
}
