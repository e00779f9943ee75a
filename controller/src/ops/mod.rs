//! Fleet-wide operations besides cluster rollouts. [`exec`]: `controller exec`.
pub mod control;
pub mod exec;
