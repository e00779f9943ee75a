//! Certificates the controller owns. Today: the fleet CA that identifies agents and the controller.
//! The per-cluster Kubernetes PKI will live beside it.
mod fleet_ca;
pub mod kube;

pub use fleet_ca::{FleetCa, IssuedCert, PkiError, ServerCert, SERVER_VALIDITY};
