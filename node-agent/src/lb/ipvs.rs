//! IPVS over generic netlink (family "IPVS", include/uapi/linux/ip_vs.h). No `ipvsadm` needed.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netlink::genl;
use crate::netlink::msg::NLM_F_DUMP;
use crate::netlink::nla::{self, Nla, NlaWriter};
use crate::netlink::{NetlinkError, NlSocket};

pub const FAMILY: &str = "IPVS";
pub const VERSION: u8 = 1;

pub const CMD_NEW_SERVICE: u8 = 1;
pub const CMD_SET_SERVICE: u8 = 2;
pub const CMD_DEL_SERVICE: u8 = 3;
pub const CMD_GET_SERVICE: u8 = 4;
pub const CMD_NEW_DEST: u8 = 5;
pub const CMD_SET_DEST: u8 = 6;
pub const CMD_DEL_DEST: u8 = 7;
pub const CMD_GET_DEST: u8 = 8;

pub const CMD_ATTR_SERVICE: u16 = 1;
pub const CMD_ATTR_DEST: u16 = 2;

pub const SVC_ATTR_AF: u16 = 1;
pub const SVC_ATTR_PROTOCOL: u16 = 2;
pub const SVC_ATTR_ADDR: u16 = 3;
pub const SVC_ATTR_PORT: u16 = 4;
pub const SVC_ATTR_SCHED_NAME: u16 = 6;
pub const SVC_ATTR_FLAGS: u16 = 7;
pub const SVC_ATTR_TIMEOUT: u16 = 8;
pub const SVC_ATTR_NETMASK: u16 = 9;

pub const DEST_ATTR_ADDR: u16 = 1;
pub const DEST_ATTR_PORT: u16 = 2;
pub const DEST_ATTR_FWD_METHOD: u16 = 3;
pub const DEST_ATTR_WEIGHT: u16 = 4;
pub const DEST_ATTR_U_THRESH: u16 = 5;
pub const DEST_ATTR_L_THRESH: u16 = 6;
pub const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const DEST_ATTR_INACT_CONNS: u16 = 8;
pub const DEST_ATTR_ADDR_FAMILY: u16 = 11;

pub const IPPROTO_TCP: u16 = 6;
pub const FWD_MASQ: u32 = 0;
/// Flag the kernel sets on every service it returns; not part of what we configure.
pub const SVC_F_HASHED: u32 = 0x2;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// A virtual service as the kernel reports it (TCP, address-based).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Service {
    pub vip: SocketAddr,
    pub scheduler: String,
    pub flags: u32,
}

/// A real server (destination) of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dest {
    pub addr: SocketAddr,
    pub weight: u32,
    pub forward: u32,
    pub active_conns: u32,
    pub inactive_conns: u32,
}

fn af(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// union nf_inet_addr: 16 bytes, IPv4 in the first four.
fn addr_bytes(ip: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b.copy_from_slice(&v6.octets()),
    }
    b
}

fn parse_addr(family: u16, payload: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => {
            Some(IpAddr::V4(Ipv4Addr::new(*payload.first()?, *payload.get(1)?, *payload.get(2)?, *payload.get(3)?)))
        }
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(payload.get(..16)?).ok()?))),
        _ => None,
    }
}

/// The attributes that identify a service (af, protocol, addr, port).
pub fn service_key(w: &mut NlaWriter, vip: &SocketAddr) {
    w.u16(SVC_ATTR_AF, af(&vip.ip()))
        .u16(SVC_ATTR_PROTOCOL, IPPROTO_TCP)
        .bytes(SVC_ATTR_ADDR, &addr_bytes(&vip.ip()))
        .u16_be(SVC_ATTR_PORT, vip.port());
}

/// A full service entry, as NEW_SERVICE/SET_SERVICE require.
pub fn encode_service(vip: &SocketAddr, scheduler: &str) -> Vec<u8> {
    let mut w = NlaWriter::new();
    w.nested(CMD_ATTR_SERVICE, |s| {
        service_key(s, vip);
        let mut flags = [0u8; 8];
        flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes()); // flags 0, mask all
        s.string(SVC_ATTR_SCHED_NAME, scheduler)
            .bytes(SVC_ATTR_FLAGS, &flags)
            .u32(SVC_ATTR_TIMEOUT, 0)
            .u32(SVC_ATTR_NETMASK, if vip.is_ipv4() { u32::MAX } else { 128 });
    });
    w.buf
}

/// Service key plus a destination; `full` adds what NEW_DEST/SET_DEST require.
pub fn encode_dest(vip: &SocketAddr, rs: &SocketAddr, weight: Option<u32>) -> Vec<u8> {
    let mut w = NlaWriter::new();
    w.nested(CMD_ATTR_SERVICE, |s| service_key(s, vip));
    w.nested(CMD_ATTR_DEST, |d| {
        d.bytes(DEST_ATTR_ADDR, &addr_bytes(&rs.ip())).u16_be(DEST_ATTR_PORT, rs.port());
        if let Some(weight) = weight {
            d.u32(DEST_ATTR_FWD_METHOD, FWD_MASQ)
                .u32(DEST_ATTR_WEIGHT, weight)
                .u32(DEST_ATTR_U_THRESH, 0)
                .u32(DEST_ATTR_L_THRESH, 0)
                .u16(DEST_ATTR_ADDR_FAMILY, af(&rs.ip()));
        }
    });
    w.buf
}

/// Parse a CMD_ATTR_SERVICE reply. Firewall-mark and non-TCP services are skipped (None).
pub fn parse_service(attrs: &[Nla<'_>]) -> Result<Option<Service>, String> {
    let Some(nest) = nla::find(attrs, CMD_ATTR_SERVICE) else { return Ok(None) };
    let s = nest.nested()?;
    let family = nla::find(&s, SVC_ATTR_AF).and_then(|a| a.u16()).ok_or("service without AF")?;
    if nla::find(&s, SVC_ATTR_PROTOCOL).and_then(|a| a.u16()) != Some(IPPROTO_TCP) {
        return Ok(None);
    }
    let Some(addr) = nla::find(&s, SVC_ATTR_ADDR).and_then(|a| parse_addr(family, a.payload)) else { return Ok(None) };
    let port = nla::find(&s, SVC_ATTR_PORT).and_then(|a| a.u16_be()).ok_or("service without port")?;
    let scheduler = nla::find(&s, SVC_ATTR_SCHED_NAME).map(|a| a.string()).unwrap_or_default();
    let flags = nla::find(&s, SVC_ATTR_FLAGS).and_then(|a| a.u32()).unwrap_or(0) & !SVC_F_HASHED;
    Ok(Some(Service { vip: SocketAddr::new(addr, port), scheduler, flags }))
}

/// Parse a CMD_ATTR_DEST reply.
pub fn parse_dest(attrs: &[Nla<'_>], service_family: u16) -> Result<Option<Dest>, String> {
    let Some(nest) = nla::find(attrs, CMD_ATTR_DEST) else { return Ok(None) };
    let d = nest.nested()?;
    let family = nla::find(&d, DEST_ATTR_ADDR_FAMILY).and_then(|a| a.u16()).unwrap_or(service_family);
    let addr =
        nla::find(&d, DEST_ATTR_ADDR).and_then(|a| parse_addr(family, a.payload)).ok_or("dest without address")?;
    let port = nla::find(&d, DEST_ATTR_PORT).and_then(|a| a.u16_be()).ok_or("dest without port")?;
    let get = |k| nla::find(&d, k).and_then(|a| a.u32()).unwrap_or(0);
    Ok(Some(Dest {
        addr: SocketAddr::new(addr, port),
        weight: get(DEST_ATTR_WEIGHT),
        forward: get(DEST_ATTR_FWD_METHOD) & 0x7,
        active_conns: get(DEST_ATTR_ACTIVE_CONNS),
        inactive_conns: get(DEST_ATTR_INACT_CONNS),
    }))
}

/// A connection to the kernel's IPVS family.
pub struct Ipvs {
    sock: NlSocket,
    family: u16,
}

impl Ipvs {
    pub fn open() -> Result<Self, NetlinkError> {
        let sock = NlSocket::open(netlink_sys::protocols::NETLINK_GENERIC)?;
        let family = genl::family_id(&sock, FAMILY)?;
        Ok(Self { sock, family })
    }

    fn call(&self, cmd: u8, flags: u16, attrs: &[u8], what: &str) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.sock.request(self.family, flags, &genl::body(cmd, VERSION, attrs), what)
    }

    pub fn services(&self) -> Result<Vec<Service>, NetlinkError> {
        let mut out = Vec::new();
        for body in self.call(CMD_GET_SERVICE, NLM_F_DUMP, &[], "listing IPVS services")? {
            if let Some(s) = parse_service(&genl::attrs(&body)?).map_err(NetlinkError::Malformed)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    pub fn dests(&self, vip: &SocketAddr) -> Result<Vec<Dest>, NetlinkError> {
        let mut w = NlaWriter::new();
        w.nested(CMD_ATTR_SERVICE, |s| service_key(s, vip));
        let mut out = Vec::new();
        for body in self.call(CMD_GET_DEST, NLM_F_DUMP, &w.buf, "listing IPVS destinations")? {
            if let Some(d) = parse_dest(&genl::attrs(&body)?, af(&vip.ip())).map_err(NetlinkError::Malformed)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn add_service(&self, vip: &SocketAddr, scheduler: &str) -> Result<(), NetlinkError> {
        self.call(CMD_NEW_SERVICE, 0, &encode_service(vip, scheduler), &format!("adding service {vip}")).map(drop)
    }

    pub fn update_service(&self, vip: &SocketAddr, scheduler: &str) -> Result<(), NetlinkError> {
        self.call(CMD_SET_SERVICE, 0, &encode_service(vip, scheduler), &format!("updating service {vip}")).map(drop)
    }

    pub fn del_service(&self, vip: &SocketAddr) -> Result<(), NetlinkError> {
        let mut w = NlaWriter::new();
        w.nested(CMD_ATTR_SERVICE, |s| service_key(s, vip));
        self.call(CMD_DEL_SERVICE, 0, &w.buf, &format!("deleting service {vip}")).map(drop)
    }

    pub fn add_dest(&self, vip: &SocketAddr, rs: &SocketAddr, weight: u32) -> Result<(), NetlinkError> {
        self.call(CMD_NEW_DEST, 0, &encode_dest(vip, rs, Some(weight)), &format!("adding real server {rs} to {vip}"))
            .map(drop)
    }

    pub fn set_dest(&self, vip: &SocketAddr, rs: &SocketAddr, weight: u32) -> Result<(), NetlinkError> {
        self.call(CMD_SET_DEST, 0, &encode_dest(vip, rs, Some(weight)), &format!("setting weight of {rs} on {vip}"))
            .map(drop)
    }

    pub fn del_dest(&self, vip: &SocketAddr, rs: &SocketAddr) -> Result<(), NetlinkError> {
        self.call(CMD_DEL_DEST, 0, &encode_dest(vip, rs, None), &format!("removing real server {rs} from {vip}"))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    #[test]
    fn new_service_matches_the_kernel_layout() {
        let vip: SocketAddr = "10.103.97.2:6443".parse().unwrap();
        let buf = encode_service(&vip, "rr");
        #[rustfmt::skip]
        let inner: Vec<u8> = [
            &n16(6)[..], &n16(SVC_ATTR_AF), &n16(2), &[0, 0],
            &n16(6), &n16(SVC_ATTR_PROTOCOL), &n16(6), &[0, 0],
            &n16(20), &n16(SVC_ATTR_ADDR), &[10, 103, 97, 2], &[0; 12],
            &n16(6), &n16(SVC_ATTR_PORT), &[0x19, 0x2b], &[0, 0],
            &n16(7), &n16(SVC_ATTR_SCHED_NAME), b"rr\0", &[0],
            &n16(12), &n16(SVC_ATTR_FLAGS), &0u32.to_ne_bytes(), &u32::MAX.to_ne_bytes(),
            &n16(8), &n16(SVC_ATTR_TIMEOUT), &0u32.to_ne_bytes(),
            &n16(8), &n16(SVC_ATTR_NETMASK), &u32::MAX.to_ne_bytes(),
        ].concat();
        let mut expected = (4 + inner.len() as u16).to_ne_bytes().to_vec();
        expected.extend_from_slice(&n16(CMD_ATTR_SERVICE | nla::NLA_F_NESTED));
        expected.extend_from_slice(&inner);
        assert_eq!(buf, expected);
    }

    #[test]
    fn dest_round_trips_through_the_parser() {
        let vip: SocketAddr = "10.103.97.2:6443".parse().unwrap();
        let rs: SocketAddr = "192.168.0.11:6443".parse().unwrap();
        let buf = encode_dest(&vip, &rs, Some(3));
        let attrs = nla::parse(&buf).unwrap();
        let d = parse_dest(&attrs, AF_INET).unwrap().unwrap();
        assert_eq!(d.addr, rs);
        assert_eq!(d.weight, 3);
        assert_eq!(d.forward, FWD_MASQ);
        // deletion carries only the address and port
        let del = encode_dest(&vip, &rs, None);
        let attrs = nla::parse(&del).unwrap();
        let dn = nla::find(&attrs, CMD_ATTR_DEST).unwrap().nested().unwrap();
        assert_eq!(dn.len(), 2);
    }

    #[test]
    fn service_reply_parsing_masks_hashed_and_skips_fwmark() {
        let vip: SocketAddr = "[fd00::2]:6443".parse().unwrap();
        let mut w = NlaWriter::new();
        w.nested(CMD_ATTR_SERVICE, |s| {
            service_key(s, &vip);
            s.string(SVC_ATTR_SCHED_NAME, "rr");
            let mut flags = SVC_F_HASHED.to_ne_bytes().to_vec();
            flags.extend_from_slice(&u32::MAX.to_ne_bytes());
            s.bytes(SVC_ATTR_FLAGS, &flags);
        });
        let svc = parse_service(&nla::parse(&w.buf).unwrap()).unwrap().unwrap();
        assert_eq!(svc, Service { vip, scheduler: "rr".into(), flags: 0 });
        let mut fw = NlaWriter::new();
        fw.nested(CMD_ATTR_SERVICE, |s| {
            s.u16(SVC_ATTR_AF, AF_INET).u16(SVC_ATTR_PROTOCOL, IPPROTO_TCP).u32(5, 42);
        });
        assert_eq!(parse_service(&nla::parse(&fw.buf).unwrap()).unwrap(), None);
    }
}
