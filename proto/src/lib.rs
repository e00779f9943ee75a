//! fleetadm's gRPC API: wire types and service stubs generated from `proto/fleetadm.proto`.
#![forbid(unsafe_code)]
#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("fleetadm.v1");
}

pub use v1::*;

/// Largest message either side accepts. Enrollment and reports are small; bundles travel in chunks.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
