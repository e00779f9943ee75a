//! Node tasks: one module per kind, each idempotent and reporting what it changed.
//! (The controller-assigned task stream that drives them is built on the session; see the
//! cluster-create work.)
pub mod hosts;
