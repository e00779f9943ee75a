//! The VIP's home: a dummy interface holding the VIP as a /32 (or /128), via rtnetlink.
//! Locally originated packets to the VIP then route locally, where IPVS picks them up.
use std::net::IpAddr;

use crate::netlink::msg::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};
use crate::netlink::nla::{self, NlaWriter};
use crate::netlink::{NetlinkError, NlSocket};

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;

pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_GETROUTE: u16 = 26;
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_PREFSRC: u16 = 7;
pub const RTA_TABLE: u16 = 15;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_KERNEL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFF_UP: u32 = 1;

/// struct ifinfomsg: family u8, pad u8, type u16, index i32, flags u32, change u32.
pub fn ifinfomsg(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8, 0];
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

/// struct ifaddrmsg: family u8, prefixlen u8, flags u8, scope u8, index u32.
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
pub fn rtmsg(family: u8, dst_len: u8, table: u8, protocol: u8, scope: u8, kind: u8) -> Vec<u8> {
    let mut b = vec![family, dst_len, 0, 0, table, protocol, scope, kind];
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}

pub fn ifaddrmsg(family: u8, prefix: u8, index: u32) -> Vec<u8> {
    let mut b = vec![family, prefix, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub up: bool,
    pub kind: String,
}

pub struct Links {
    sock: NlSocket,
}

impl Links {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self { sock: NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE)? })
    }

    pub fn get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut body = ifinfomsg(0, 0, 0);
        let mut w = NlaWriter::new();
        w.string(IFLA_IFNAME, name);
        body.extend_from_slice(&w.buf);
        let replies = match self.sock.request(RTM_GETLINK, 0, &body, &format!("looking up interface {name}")) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            if r.len() < 16 {
                continue;
            }
            let index = i32::from_ne_bytes([r[4], r[5], r[6], r[7]]);
            let flags = u32::from_ne_bytes([r[8], r[9], r[10], r[11]]);
            let attrs = nla::parse(&r[16..]).map_err(NetlinkError::Malformed)?;
            let kind = nla::find(&attrs, IFLA_LINKINFO)
                .and_then(|li| li.nested().ok())
                .and_then(|li| nla::find(&li, IFLA_INFO_KIND).map(|k| k.string()))
                .unwrap_or_default();
            return Ok(Some(Link { index, up: flags & IFF_UP != 0, kind }));
        }
        Ok(None)
    }

    /// Create the dummy interface if missing and bring it up. Returns (link, changed).
    pub fn ensure_dummy(&self, name: &str) -> Result<(Link, bool), NetlinkError> {
        let mut changed = false;
        let link = match self.get(name)? {
            Some(l) => l,
            None => {
                let mut body = ifinfomsg(0, 0, 0);
                let mut w = NlaWriter::new();
                w.string(IFLA_IFNAME, name).nested(IFLA_LINKINFO, |li| {
                    li.string(IFLA_INFO_KIND, "dummy");
                });
                body.extend_from_slice(&w.buf);
                self.sock.request(
                    RTM_NEWLINK,
                    NLM_F_CREATE | NLM_F_EXCL,
                    &body,
                    &format!("creating dummy interface {name}"),
                )?;
                changed = true;
                self.get(name)?.ok_or_else(|| NetlinkError::Malformed(format!("{name} vanished after creation")))?
            }
        };
        if !link.up {
            self.sock.request(
                RTM_NEWLINK,
                0,
                &ifinfomsg(link.index, IFF_UP, IFF_UP),
                &format!("bringing {name} up"),
            )?;
            changed = true;
        }
        Ok((Link { up: true, ..link }, changed))
    }

    pub fn delete(&self, index: i32) -> Result<(), NetlinkError> {
        self.sock.request(RTM_DELLINK, 0, &ifinfomsg(index, 0, 0), "deleting interface").map(drop)
    }

    /// Addresses on an interface.
    pub fn addresses(&self, index: i32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let mut out = Vec::new();
        for r in self.sock.request(RTM_GETADDR, NLM_F_DUMP, &ifaddrmsg(0, 0, 0), "listing addresses")? {
            if r.len() < 8 {
                continue;
            }
            let (fam, prefix) = (r[0], r[1]);
            let idx = u32::from_ne_bytes([r[4], r[5], r[6], r[7]]) as i32;
            if idx != index {
                continue;
            }
            let attrs = nla::parse(&r[8..]).map_err(NetlinkError::Malformed)?;
            let raw = nla::find(&attrs, IFA_LOCAL).or_else(|| nla::find(&attrs, IFA_ADDRESS));
            let ip = raw.and_then(|a| match (fam as i32, a.payload.len()) {
                (libc::AF_INET, 4) => <[u8; 4]>::try_from(a.payload).ok().map(IpAddr::from),
                (libc::AF_INET6, 16) => <[u8; 16]>::try_from(a.payload).ok().map(IpAddr::from),
                _ => None,
            });
            if let Some(ip) = ip {
                out.push((ip, prefix));
            }
        }
        Ok(out)
    }

    /// Put `ip` (host prefix) on the interface unless it is already there. Returns changed.
    /// The source address the kernel picks for a connection to `dst` (RTM_GETROUTE).
    pub fn source_for(&self, dst: &IpAddr) -> Result<Option<IpAddr>, NetlinkError> {
        let mut body = rtmsg(family(dst), host_prefix(dst), 0, 0, 0, 0);
        let mut w = NlaWriter::new();
        w.bytes(RTA_DST, &ip_bytes(dst));
        body.extend_from_slice(&w.buf);
        for r in self.sock.request(RTM_GETROUTE, 0, &body, &format!("looking up the route to {dst}"))? {
            if r.len() < 12 {
                continue;
            }
            let attrs = nla::parse(&r[12..]).map_err(NetlinkError::Malformed)?;
            if let Some(a) = nla::find(&attrs, RTA_PREFSRC) {
                return Ok(match a.payload.len() {
                    4 => <[u8; 4]>::try_from(a.payload).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(a.payload).ok().map(IpAddr::from),
                    _ => None,
                });
            }
        }
        Ok(None)
    }

    /// Make connections this host opens to `vip` (a local address on interface `index`) leave
    /// from `src` instead of from the VIP itself: the kernel's local route for the VIP gets `src`
    /// as its preferred source. Without this, IPVS would forward them to a real server with the
    /// VIP as source address, and the real server's reply would go to whichever host its routes
    /// say holds the VIP, not back here. Returns whether anything changed.
    pub fn ensure_local_source(&self, index: i32, vip: &IpAddr, src: &IpAddr) -> Result<bool, NetlinkError> {
        if self.source_for(vip)?.as_ref() == Some(src) {
            return Ok(false);
        }
        let mut body = rtmsg(family(vip), host_prefix(vip), RT_TABLE_LOCAL, RTPROT_KERNEL, RT_SCOPE_HOST, RTN_LOCAL);
        let mut w = NlaWriter::new();
        w.bytes(RTA_DST, &ip_bytes(vip))
            .bytes(RTA_OIF, &index.to_ne_bytes())
            .bytes(RTA_PREFSRC, &ip_bytes(src))
            .bytes(RTA_TABLE, &u32::from(RT_TABLE_LOCAL).to_ne_bytes());
        body.extend_from_slice(&w.buf);
        self.sock.request(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            &body,
            &format!("setting the source address for {vip} to {src}"),
        )?;
        Ok(true)
    }

    pub fn ensure_address(&self, index: i32, ip: &IpAddr) -> Result<bool, NetlinkError> {
        if self.addresses(index)?.iter().any(|(a, _)| a == ip) {
            return Ok(false);
        }
        let mut body = ifaddrmsg(family(ip), host_prefix(ip), index as u32);
        let mut w = NlaWriter::new();
        w.bytes(IFA_LOCAL, &ip_bytes(ip)).bytes(IFA_ADDRESS, &ip_bytes(ip));
        body.extend_from_slice(&w.buf);
        self.sock.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &body, &format!("adding address {ip}"))?;
        Ok(true)
    }

    pub fn remove_address(&self, index: i32, ip: &IpAddr) -> Result<bool, NetlinkError> {
        let Some((_, prefix)) = self.addresses(index)?.into_iter().find(|(a, _)| a == ip) else { return Ok(false) };
        let mut body = ifaddrmsg(family(ip), prefix, index as u32);
        let mut w = NlaWriter::new();
        w.bytes(IFA_LOCAL, &ip_bytes(ip)).bytes(IFA_ADDRESS, &ip_bytes(ip));
        body.extend_from_slice(&w.buf);
        self.sock.request(RTM_DELADDR, 0, &body, &format!("removing address {ip}"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_headers_match_kernel_structs() {
        let i = ifinfomsg(7, IFF_UP, IFF_UP);
        assert_eq!(i.len(), 16);
        assert_eq!(&i[4..8], &7i32.to_ne_bytes());
        assert_eq!(&i[8..12], &1u32.to_ne_bytes());
        let a = ifaddrmsg(2, 32, 9);
        assert_eq!(a, [&[2u8, 32, 0, 0][..], &9u32.to_ne_bytes()].concat());
    }

    #[test]
    fn loopback_is_visible_through_real_rtnetlink() {
        let links = Links::open().unwrap();
        let lo = links.get("lo").unwrap().expect("lo exists");
        assert!(lo.index > 0);
        let addrs = links.addresses(lo.index).unwrap();
        assert!(addrs.contains(&("127.0.0.1".parse().unwrap(), 8)), "{addrs:?}");
        assert_eq!(links.get("no-such-if0").unwrap(), None);
    }
}
