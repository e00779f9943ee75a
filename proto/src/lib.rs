//! fleetadm's gRPC API: wire types and service stubs generated from `proto/fleetadm.proto`, the
//! protocol generation and the capability names that version skew is negotiated with.
#![forbid(unsafe_code)]
#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("fleetadm.v1");
}

mod kinds;
#[cfg(feature = "skew-probe")]
pub mod skew;

pub use kinds::{TaskKind, UnknownTask};
pub use v1::*;

/// Largest message either side accepts. Enrollment and reports are small; bundles travel in chunks.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest enrollment request (token, node name, machine-id, CSR: a few hundred bytes).
pub const MAX_ENROLL_BYTES: usize = 16 * 1024;

/// Response metadata key the controller sets on a refusal that is for good.
pub const REFUSAL_METADATA: &str = "fleetadm-refusal";
/// Its value for a revoked node: the only refusal that ends an agent (over mTLS to the fleet CA,
/// so it is the controller's word, not the network's).
pub const REFUSAL_REVOKED: &str = "revoked";
/// Response metadata key on a `RESOURCE_EXHAUSTED` refusal of a busy controller: milliseconds
/// until the agent should try again (the controller spreads the herd over future slots).
pub const RETRY_AFTER_METADATA: &str = "fleetadm-retry-after-ms";

/// The wire protocol generation this build speaks. It changes only for a break that field
/// additions and capabilities cannot express (docs/compatibility.md); both sides refuse a
/// generation they do not speak, with an error that names both.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest generation this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The encoded `FileDescriptorSet` of `fleetadm.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fleetadm_descriptor");
