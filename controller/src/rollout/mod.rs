//! Executing a plan: the cluster and task records persisted in the store ([`record`]), the
//! parameters each task carries to its host ([`specs`]), the driver that walks the phases and hands
//! tasks to connected agents ([`driver`]), and what the admin CLI shows ([`view`]).
//!
//! Every state change is flushed before it is acted on or acknowledged, so a controller killed at
//! any point resumes where it was: finished tasks stay finished, running ones are re-sent to their
//! agents (which answer from their journal instead of running them twice).
pub mod driver;
pub mod record;
pub mod specs;
pub mod view;

pub use driver::{RolloutError, Rollouts};
