//! Dispatch: the agents' side of the controller. Authenticates every call from the client
//! certificate, keeps one work stream per connected node, and takes their reports.
pub mod admission;
pub mod auth;
pub mod events;
pub mod peers;
pub mod service;
pub mod sessions;

pub use events::{ReportRejected, TaskEvents};
pub use service::AgentService;
pub use sessions::Sessions;
