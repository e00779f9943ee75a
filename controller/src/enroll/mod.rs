//! Enrollment: bootstrap tokens, the CSR policy, and the `Enrollment` gRPC service that turns a
//! token + CSR into a node certificate.
pub mod csr;
pub mod limit;
pub mod service;
pub mod tokens;

pub use service::EnrollmentService;
pub use tokens::{TokenError, TokenRecord, Tokens};
