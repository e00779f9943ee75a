//! A small netlink client: message framing ([`msg`]), attributes ([`nla`]), a request/response
//! socket ([`socket`]) and generic-netlink family lookup ([`genl`]). The IPVS and route users sit
//! on top (see `crate::lb`). Layouts follow `include/uapi/linux/netlink.h` and `genetlink.h`;
//! the unit tests pin them byte for byte.
pub mod genl;
pub mod msg;
pub mod nla;
pub mod socket;

pub use socket::{NetlinkError, NlSocket};
