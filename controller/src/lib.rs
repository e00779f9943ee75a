//! fleetadm controller.
//!
//! The flow through the modules:
//! - [`listen`]: the agent port: connection limits, TLS handshake deadline, serving certificate.
//! - [`relay`]: relays on bastions, and the signed source addresses they vouch for.
//! - [`enroll`]: bootstrap tokens + CSR policy -> node certificates signed by the [`pki`] fleet CA.
//! - [`dispatch`]: authenticated agent sessions (work stream down, reports up).
//! - [`nodes`]: the inventory of enrolled nodes and their facts.
//! - [`plan`]: operator input -> hosts matched to nodes -> phases of per-host tasks.
//! - [`rollout`]: executes a plan: persisted task state, dispatch over sessions, reports, resume.
//! - [`ops`]: fleet-wide operations besides rollouts (`controller exec`).
//! - [`admin`]: the operator API on the local admin socket; [`cli`] is its client.
//! - [`audit`]: who did what, and every task outcome (`controller events`).
//! - [`metrics`]: Prometheus text metrics (`serve --metrics-listen`).
//! - [`store`]: all durable state (sled), behind a small interface.
#![forbid(unsafe_code)]
// Protocol messages are built with `..Default::default()` even when every field is named: a
// field added to a message (the next protocol revision, or the test-only `skew-probe` build)
// must not break the code that builds it.
#![allow(clippy::needless_update)]

pub mod admin;
pub mod audit;
pub mod bundle;
pub mod cli;
pub mod daemon;
pub mod dispatch;
pub mod enroll;
pub mod listen;
pub mod metrics;
pub mod nodes;
pub mod ops;
pub mod pki;
pub mod plan;
#[cfg(test)]
mod props;
pub mod relay;
pub mod rollout;
pub mod state;
pub mod store;

/// Version with the git revision it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FLEETADM_GIT_REV"), ")");
