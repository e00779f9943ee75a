//! fleetadm node agent.
//!
//! - [`enroll`]: token + CA pin + CSR -> identity ([`identity`]), key generated and kept here.
//! - [`session`]: the pull loop: one mTLS session, heartbeats, reports, renewal, reconnects.
//! - [`execute`]: the tasks the controller assigns (hosts, pki, kubeadm, lb, ...), one handler per
//!   kind, with a journal and one runner for every external command.
//! - [`report`]: what goes back: task outcomes and load balancer changes.
//! - [`inventory`]: host facts.
//! - [`lb`]: the node-local apiserver load balancer (IPVS + dummy VIP + health guard), over
//!   [`netlink`].
#![forbid(unsafe_code)]
// Protocol messages are built with `..Default::default()` even when every field is named: a
// field added to a message (the next protocol revision, or the test-only `skew-probe` build)
// must not break the code that builds it.
#![allow(clippy::needless_update)]

pub mod cli;
pub mod config;
pub mod enroll;
pub mod execute;
pub mod identity;
pub mod inventory;
pub mod lb;
pub mod lb_cli;
pub mod peer;
pub mod report;
pub mod service;
pub mod session;

/// Version with the git revision it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FLEETADM_GIT_REV"), ")");
pub mod netlink;
#[cfg(test)]
mod props;
