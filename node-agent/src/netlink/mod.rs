//! Netlink through the rust-netlink crates: message framing from `netlink-packet-core`, rtnetlink
//! messages (links, addresses, routes) from `netlink-packet-route`, generic netlink from
//! `netlink-packet-generic`, over a `netlink-sys` socket ([`socket`]). The IPVS family's own
//! attribute types sit on top in `crate::lb::ipvs`; family lookup is [`genl`].
pub mod genl;
pub mod socket;

pub use socket::{NetlinkError, NlSocket};
