//! The VIP's home: a dummy interface holding the VIP as a /32 (or /128), via rtnetlink
//! (`netlink-packet-route` messages). Locally originated packets to the VIP then route locally,
//! where IPVS picks them up; the VIP's local route gets the node's address as preferred source,
//! so replies from the real servers come back to this host.
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::netlink::{NetlinkError, NlSocket};

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// An interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub up: bool,
    /// `IFLA_INFO_KIND` ("dummy", "veth", ...), empty for physical links.
    pub kind: String,
}

pub struct Links {
    sock: NlSocket,
}

fn link_message(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

fn address_message(index: u32, ip: &IpAddr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(ip);
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes = vec![AddressAttribute::Local(*ip), AddressAttribute::Address(*ip)];
    m
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other}").to_lowercase(),
    }
}

impl Links {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self { sock: NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE)? })
    }

    fn call(&self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sock.request(msg, flags, what)
    }

    /// The interface called `name`, if it exists.
    pub fn get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut req = link_message(0);
        req.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.call(RouteNetlinkMessage::GetLink(req), 0, &format!("looking up interface {name}")) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in replies {
            let RouteNetlinkMessage::NewLink(l) = r else { continue };
            let kind = l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(kind_name(k)),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or_default();
            return Ok(Some(Link { index: l.header.index, up: l.header.flags.contains(LinkFlags::Up), kind }));
        }
        Ok(None)
    }

    /// Create the dummy interface `name` unless it exists, and bring it up. Returns whether
    /// anything changed.
    pub fn ensure_dummy(&self, name: &str) -> Result<(Link, bool), NetlinkError> {
        let mut changed = false;
        let link = match self.get(name)? {
            Some(l) => l,
            None => {
                let mut req = link_message(0);
                req.attributes.push(LinkAttribute::IfName(name.to_string()));
                req.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]));
                self.call(
                    RouteNetlinkMessage::NewLink(req),
                    NLM_F_CREATE | NLM_F_EXCL,
                    &format!("creating dummy interface {name}"),
                )?;
                changed = true;
                self.get(name)?.ok_or_else(|| NetlinkError::Kernel {
                    what: format!("finding {name} after creating it"),
                    errno: libc::ENODEV,
                })?
            }
        };
        if !link.up {
            let mut req = link_message(link.index);
            req.header.flags = LinkFlags::Up;
            req.header.change_mask = LinkFlags::Up;
            self.call(RouteNetlinkMessage::SetLink(req), 0, &format!("bringing {name} up"))?;
            changed = true;
        }
        Ok((Link { up: true, ..link }, changed))
    }

    pub fn delete(&self, index: u32) -> Result<(), NetlinkError> {
        self.call(RouteNetlinkMessage::DelLink(link_message(index)), 0, "deleting interface").map(drop)
    }

    /// Addresses (with prefix length) on interface `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let mut out = Vec::new();
        let replies =
            self.call(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP, "listing addresses")?;
        for r in replies {
            let RouteNetlinkMessage::NewAddress(a) = r else { continue };
            if a.header.index != index {
                continue;
            }
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                out.push((ip, a.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// The preferred source address the kernel picks for traffic to `dst`.
    pub fn source_for(&self, dst: &IpAddr) -> Result<Option<IpAddr>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family(dst);
        req.header.destination_prefix_length = host_prefix(dst);
        req.attributes.push(RouteAttribute::Destination(RouteAddress::from(*dst)));
        let replies = self.call(RouteNetlinkMessage::GetRoute(req), 0, &format!("looking up the route to {dst}"))?;
        for r in replies {
            let RouteNetlinkMessage::NewRoute(route) = r else { continue };
            for a in &route.attributes {
                if let RouteAttribute::PrefSource(src) = a {
                    return Ok(match src {
                        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                        _ => None,
                    });
                }
            }
        }
        Ok(None)
    }

    /// Make the kernel's local route for `vip` (on interface `index`) prefer `src` as source
    /// address. Returns whether it changed.
    pub fn ensure_local_source(&self, index: u32, vip: &IpAddr, src: &IpAddr) -> Result<bool, NetlinkError> {
        if self.source_for(vip)?.as_ref() == Some(src) {
            return Ok(false);
        }
        let mut req = RouteMessage::default();
        req.header.address_family = family(vip);
        req.header.destination_prefix_length = host_prefix(vip);
        req.header.table = RT_TABLE_LOCAL;
        req.header.protocol = RouteProtocol::Kernel;
        req.header.scope = RouteScope::Host;
        req.header.kind = RouteType::Local;
        req.attributes = vec![
            RouteAttribute::Destination(RouteAddress::from(*vip)),
            RouteAttribute::Oif(index),
            RouteAttribute::PrefSource(RouteAddress::from(*src)),
            RouteAttribute::Table(u32::from(RT_TABLE_LOCAL)),
        ];
        self.call(
            RouteNetlinkMessage::NewRoute(req),
            NLM_F_CREATE | NLM_F_REPLACE,
            &format!("setting the source address for {vip} to {src}"),
        )?;
        Ok(true)
    }

    /// Add `ip` as a host address on interface `index` unless it is there. Returns whether it
    /// changed.
    pub fn ensure_address(&self, index: u32, ip: &IpAddr) -> Result<bool, NetlinkError> {
        if self.addresses(index)?.iter().any(|(a, _)| a == ip) {
            return Ok(false);
        }
        let req = address_message(index, ip, host_prefix(ip));
        self.call(RouteNetlinkMessage::NewAddress(req), NLM_F_CREATE | NLM_F_REPLACE, &format!("adding address {ip}"))?;
        Ok(true)
    }

    /// Remove `ip` from interface `index` if it is there. Returns whether it changed.
    pub fn remove_address(&self, index: u32, ip: &IpAddr) -> Result<bool, NetlinkError> {
        let Some((_, prefix)) = self.addresses(index)?.into_iter().find(|(a, _)| a == ip) else { return Ok(false) };
        let req = address_message(index, ip, prefix);
        self.call(RouteNetlinkMessage::DelAddress(req), 0, &format!("removing address {ip}"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_visible_through_real_rtnetlink() {
        let links = Links::open().unwrap();
        let lo = links.get("lo").unwrap().expect("lo exists");
        assert!(lo.index > 0 && lo.up);
        let addrs = links.addresses(lo.index).unwrap();
        assert!(addrs.contains(&("127.0.0.1".parse().unwrap(), 8)), "{addrs:?}");
        assert_eq!(links.get("no-such-if0").unwrap(), None);
        assert_eq!(links.source_for(&"127.0.0.1".parse().unwrap()).unwrap(), Some("127.0.0.1".parse().unwrap()));
    }

    /// In a fresh network namespace: the dummy interface, its address and the preferred-source
    /// route are created once, then recognised as in place. Needs root and a kernel with dummy
    /// interfaces, so tests/vm/ipvs.sh runs it inside the VM (Debian's kernel).
    #[test]
    #[ignore = "needs a kernel with dummy interfaces: tests/vm/ipvs.sh runs it in the VM"]
    fn dummy_vip_address_and_source_route_in_a_private_namespace() {
        let result = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            let links = Links::open().unwrap();
            let lo = links.get("lo").unwrap().expect("lo");
            if !lo.up {
                let mut req = link_message(lo.index);
                req.header.flags = LinkFlags::Up;
                req.header.change_mask = LinkFlags::Up;
                links.call(RouteNetlinkMessage::SetLink(req), 0, "lo up").unwrap();
            }
            let (dummy, created) = links.ensure_dummy("fleetadm-t0").unwrap();
            assert!(created && dummy.up && dummy.kind == "dummy", "{dummy:?}");
            assert!(!links.ensure_dummy("fleetadm-t0").unwrap().1, "second time: no change");
            let node: IpAddr = "10.250.0.5".parse().unwrap();
            let vip: IpAddr = "10.103.97.2".parse().unwrap();
            assert!(links.ensure_address(dummy.index, &node).unwrap());
            assert!(links.ensure_address(dummy.index, &vip).unwrap());
            assert!(!links.ensure_address(dummy.index, &vip).unwrap());
            assert!(links.addresses(dummy.index).unwrap().contains(&(vip, 32)));
            assert!(links.ensure_local_source(dummy.index, &vip, &node).unwrap());
            assert_eq!(links.source_for(&vip).unwrap(), Some(node));
            assert!(!links.ensure_local_source(dummy.index, &vip, &node).unwrap());
            assert!(links.remove_address(dummy.index, &vip).unwrap());
            assert!(!links.remove_address(dummy.index, &vip).unwrap());
            links.delete(dummy.index).unwrap();
            assert_eq!(links.get("fleetadm-t0").unwrap(), None);
        })
        .join();
        assert!(result.is_ok(), "namespace test panicked");
    }
}
