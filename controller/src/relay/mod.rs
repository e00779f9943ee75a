//! Relays for hosts behind a bastion. The relay ([`forward`], `controller relay` on the bastion)
//! forwards agents' TCP connections to the controller and puts a signed header ([`header`]) in
//! front of each one, carrying the agent's real source address; TLS runs end to end through it.
//! The controller ([`registry`]) believes that address only from a registered relay's key
//! ([`keys`]), so address-based host resolution keeps working behind a relay.
pub mod forward;
pub mod header;
pub mod keys;
pub mod registry;

use std::path::PathBuf;

use thiserror::Error;

pub use registry::{Refusal, RelayRecord, Relays, Vouched};

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("relay key file {}", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay key file {} is not an Ed25519 PKCS#8 key ({why}); move it away to have a new one made", path.display())]
    BadKey { path: PathBuf, why: String },
    #[error("the system random number generator failed")]
    Random,
    #[error("invalid relay public key: {0}")]
    BadPublicKey(String),
    #[error("relay name {0:?} is not valid (lowercase letters, digits, '-', '.', at most 63)")]
    BadName(String),
    #[error("no relay named {0:?} is registered")]
    UnknownRelay(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}
