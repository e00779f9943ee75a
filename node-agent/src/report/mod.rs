//! What the agent tells the controller: the outcome and progress of each task ([`task`], from
//! [`crate::execute`]), and changes of the node's load balancer ([`lb`]). The session delivers both.
pub mod lb;
pub mod task;
