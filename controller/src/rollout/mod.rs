//! Executing a plan.
//!
//! - [`engine`]: creates, resumes and deletes clusters; one actor per running cluster; routes
//!   each agent report to its cluster's actor.
//! - [`actor`]: holds one cluster's record and tasks in memory, walks its phases and steps, and
//!   hands tasks to connected agents that can run them.
//! - [`decide`]: what to do next with a task, as a pure function.
//! - [`report`]: applying an agent's report to a task record.
//! - [`specs`]: the typed task message each planned task carries to its host.
//! - [`token`]: one short-lived join token per operation.
//! - [`certs`]: what a certificate operation reissues and which static pods it restarts.
//! - [`record`]: the cluster and task records persisted in the store; [`view`]: what the admin
//!   API shows (never the secrets).
//!
//! Every state change is flushed before it is acted on or acknowledged, so a controller killed at
//! any point resumes where it was: finished tasks stay finished, running ones are re-sent to their
//! agents (which answer from their journal instead of running them twice).
pub mod actor;
pub mod certs;
pub mod decide;
pub mod engine;
pub mod record;
pub mod report;
pub mod specs;
pub mod token;
pub mod view;

pub use engine::{NewCluster, RolloutError, RolloutSettings, Rollouts, UpgradeTo, Waves};
