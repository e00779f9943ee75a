//! IPVS over generic netlink (family "IPVS", include/uapi/linux/ip_vs.h). No `ipvsadm` needed.
//! Framing and the generic netlink header come from `netlink-packet-core` /
//! `netlink-packet-generic`; the IPVS attributes are typed here ([`SvcAttr`], [`DestAttr`],
//! [`IpvsAttr`]), as the kernel defines them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    parse_string, parse_u16, parse_u16_be, parse_u32, DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized, NLA_F_NESTED, NLM_F_DUMP,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use crate::netlink::genl;
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
fn addr_bytes(ip: &IpAddr) -> Vec<u8> {
    let mut b = vec![0u8; 16];
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

/// Attributes of a service nest (IPVS_SVC_ATTR_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvcAttr {
    Af(u16),
    Protocol(u16),
    /// nf_inet_addr (interpreted with the AF).
    Addr(Vec<u8>),
    /// Host order here; network order on the wire.
    Port(u16),
    SchedName(String),
    Flags {
        flags: u32,
        mask: u32,
    },
    Timeout(u32),
    Netmask(u32),
    Other(DefaultNla),
}

/// Attributes of a destination nest (IPVS_DEST_ATTR_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAttr {
    Addr(Vec<u8>),
    Port(u16),
    FwdMethod(u32),
    Weight(u32),
    UThresh(u32),
    LThresh(u32),
    ActiveConns(u32),
    InactConns(u32),
    AddrFamily(u16),
    Other(DefaultNla),
}

/// Top-level attributes of an IPVS command (IPVS_CMD_ATTR_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsAttr {
    Service(Vec<SvcAttr>),
    Dest(Vec<DestAttr>),
    Other(DefaultNla),
}

fn u16_value(b: &[u8]) -> Result<u16, DecodeError> {
    parse_u16(b)
}

impl Nla for SvcAttr {
    fn value_len(&self) -> usize {
        match self {
            SvcAttr::Af(_) | SvcAttr::Protocol(_) | SvcAttr::Port(_) => 2,
            SvcAttr::Addr(a) => a.len(),
            SvcAttr::SchedName(s) => s.len() + 1,
            SvcAttr::Flags { .. } => 8,
            SvcAttr::Timeout(_) | SvcAttr::Netmask(_) => 4,
            SvcAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            SvcAttr::Af(_) => SVC_ATTR_AF,
            SvcAttr::Protocol(_) => SVC_ATTR_PROTOCOL,
            SvcAttr::Addr(_) => SVC_ATTR_ADDR,
            SvcAttr::Port(_) => SVC_ATTR_PORT,
            SvcAttr::SchedName(_) => SVC_ATTR_SCHED_NAME,
            SvcAttr::Flags { .. } => SVC_ATTR_FLAGS,
            SvcAttr::Timeout(_) => SVC_ATTR_TIMEOUT,
            SvcAttr::Netmask(_) => SVC_ATTR_NETMASK,
            SvcAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, b: &mut [u8]) {
        match self {
            SvcAttr::Af(v) | SvcAttr::Protocol(v) => b[..2].copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Port(p) => b[..2].copy_from_slice(&p.to_be_bytes()),
            SvcAttr::Addr(a) => b[..a.len()].copy_from_slice(a),
            SvcAttr::SchedName(s) => {
                b[..s.len()].copy_from_slice(s.as_bytes());
                b[s.len()] = 0;
            }
            SvcAttr::Flags { flags, mask } => {
                b[..4].copy_from_slice(&flags.to_ne_bytes());
                b[4..8].copy_from_slice(&mask.to_ne_bytes());
            }
            SvcAttr::Timeout(v) | SvcAttr::Netmask(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Other(n) => n.emit_value(b),
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&T>> for SvcAttr {
    fn parse(buf: &NlaBuffer<&T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            SVC_ATTR_AF => SvcAttr::Af(u16_value(v)?),
            SVC_ATTR_PROTOCOL => SvcAttr::Protocol(u16_value(v)?),
            SVC_ATTR_ADDR => SvcAttr::Addr(v.to_vec()),
            SVC_ATTR_PORT => SvcAttr::Port(parse_u16_be(v)?),
            SVC_ATTR_SCHED_NAME => SvcAttr::SchedName(parse_string(v)?),
            SVC_ATTR_FLAGS if v.len() >= 8 => SvcAttr::Flags { flags: parse_u32(&v[..4])?, mask: parse_u32(&v[4..8])? },
            SVC_ATTR_TIMEOUT => SvcAttr::Timeout(parse_u32(v)?),
            SVC_ATTR_NETMASK => SvcAttr::Netmask(parse_u32(v)?),
            _ => SvcAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Port(_) | DestAttr::AddrFamily(_) => 2,
            DestAttr::Addr(a) => a.len(),
            DestAttr::Other(n) => n.value_len(),
            _ => 4,
        }
    }
    fn kind(&self) -> u16 {
        match self {
            DestAttr::Addr(_) => DEST_ATTR_ADDR,
            DestAttr::Port(_) => DEST_ATTR_PORT,
            DestAttr::FwdMethod(_) => DEST_ATTR_FWD_METHOD,
            DestAttr::Weight(_) => DEST_ATTR_WEIGHT,
            DestAttr::UThresh(_) => DEST_ATTR_U_THRESH,
            DestAttr::LThresh(_) => DEST_ATTR_L_THRESH,
            DestAttr::ActiveConns(_) => DEST_ATTR_ACTIVE_CONNS,
            DestAttr::InactConns(_) => DEST_ATTR_INACT_CONNS,
            DestAttr::AddrFamily(_) => DEST_ATTR_ADDR_FAMILY,
            DestAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, b: &mut [u8]) {
        match self {
            DestAttr::Addr(a) => b[..a.len()].copy_from_slice(a),
            DestAttr::Port(p) => b[..2].copy_from_slice(&p.to_be_bytes()),
            DestAttr::AddrFamily(v) => b[..2].copy_from_slice(&v.to_ne_bytes()),
            DestAttr::FwdMethod(v)
            | DestAttr::Weight(v)
            | DestAttr::UThresh(v)
            | DestAttr::LThresh(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactConns(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            DestAttr::Other(n) => n.emit_value(b),
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            DEST_ATTR_ADDR => DestAttr::Addr(v.to_vec()),
            DEST_ATTR_PORT => DestAttr::Port(parse_u16_be(v)?),
            DEST_ATTR_FWD_METHOD => DestAttr::FwdMethod(parse_u32(v)?),
            DEST_ATTR_WEIGHT => DestAttr::Weight(parse_u32(v)?),
            DEST_ATTR_U_THRESH => DestAttr::UThresh(parse_u32(v)?),
            DEST_ATTR_L_THRESH => DestAttr::LThresh(parse_u32(v)?),
            DEST_ATTR_ACTIVE_CONNS => DestAttr::ActiveConns(parse_u32(v)?),
            DEST_ATTR_INACT_CONNS => DestAttr::InactConns(parse_u32(v)?),
            DEST_ATTR_ADDR_FAMILY => DestAttr::AddrFamily(u16_value(v)?),
            _ => DestAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

fn parse_nested<A, T>(v: &T) -> Result<Vec<A>, DecodeError>
where
    T: AsRef<[u8]> + ?Sized,
    A: for<'b> Parseable<NlaBuffer<&'b [u8]>>,
{
    NlasIterator::new(v.as_ref()).map(|nla| nla.and_then(|n| A::parse(&n))).collect()
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            IpvsAttr::Service(a) => a.as_slice().buffer_len(),
            IpvsAttr::Dest(a) => a.as_slice().buffer_len(),
            IpvsAttr::Other(n) => n.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            IpvsAttr::Service(_) => CMD_ATTR_SERVICE | NLA_F_NESTED,
            IpvsAttr::Dest(_) => CMD_ATTR_DEST | NLA_F_NESTED,
            IpvsAttr::Other(n) => n.kind(),
        }
    }
    fn emit_value(&self, b: &mut [u8]) {
        match self {
            IpvsAttr::Service(a) => a.as_slice().emit(b),
            IpvsAttr::Dest(a) => a.as_slice().emit(b),
            IpvsAttr::Other(n) => n.emit_value(b),
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&T>> for IpvsAttr {
    fn parse(buf: &NlaBuffer<&T>) -> Result<Self, DecodeError> {
        Ok(match buf.kind() {
            CMD_ATTR_SERVICE => IpvsAttr::Service(parse_nested(buf.value())?),
            CMD_ATTR_DEST => IpvsAttr::Dest(parse_nested(buf.value())?),
            _ => IpvsAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One IPVS generic netlink message: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMsg {
    pub cmd: u8,
    pub attrs: Vec<IpvsAttr>,
}

impl GenlFamily for IpvsMsg {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for IpvsMsg {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self { cmd: header.cmd, attrs: parse_nested(buf)? })
    }
}

/// The attributes that identify a service (af, protocol, addr, port).
pub fn service_key(vip: &SocketAddr) -> Vec<SvcAttr> {
    vec![
        SvcAttr::Af(af(&vip.ip())),
        SvcAttr::Protocol(IPPROTO_TCP),
        SvcAttr::Addr(addr_bytes(&vip.ip())),
        SvcAttr::Port(vip.port()),
    ]
}

/// A full service entry, as NEW_SERVICE/SET_SERVICE require.
pub fn encode_service(vip: &SocketAddr, scheduler: &str) -> Vec<IpvsAttr> {
    let mut s = service_key(vip);
    s.extend([
        SvcAttr::SchedName(scheduler.to_string()),
        SvcAttr::Flags { flags: 0, mask: u32::MAX },
        SvcAttr::Timeout(0),
        SvcAttr::Netmask(if vip.is_ipv4() { u32::MAX } else { 128 }),
    ]);
    vec![IpvsAttr::Service(s)]
}

/// Service key plus a destination; with a weight, everything NEW_DEST/SET_DEST require.
pub fn encode_dest(vip: &SocketAddr, rs: &SocketAddr, weight: Option<u32>) -> Vec<IpvsAttr> {
    let mut d = vec![DestAttr::Addr(addr_bytes(&rs.ip())), DestAttr::Port(rs.port())];
    if let Some(weight) = weight {
        d.extend([
            DestAttr::FwdMethod(FWD_MASQ),
            DestAttr::Weight(weight),
            DestAttr::UThresh(0),
            DestAttr::LThresh(0),
            DestAttr::AddrFamily(af(&rs.ip())),
        ]);
    }
    vec![IpvsAttr::Service(service_key(vip)), IpvsAttr::Dest(d)]
}

/// A service from a GET_SERVICE reply. Firewall-mark and non-TCP services are skipped (None).
pub fn parse_service(attrs: &[IpvsAttr]) -> Option<Service> {
    let s = attrs.iter().find_map(|a| match a {
        IpvsAttr::Service(s) => Some(s),
        _ => None,
    })?;
    let (mut family, mut proto, mut addr, mut port, mut scheduler, mut flags) = (None, None, None, None, None, 0);
    for a in s {
        match a {
            SvcAttr::Af(v) => family = Some(*v),
            SvcAttr::Protocol(v) => proto = Some(*v),
            SvcAttr::Addr(v) => addr = Some(v.as_slice()),
            SvcAttr::Port(v) => port = Some(*v),
            SvcAttr::SchedName(v) => scheduler = Some(v.clone()),
            SvcAttr::Flags { flags: f, .. } => flags = *f & !SVC_F_HASHED,
            _ => {}
        }
    }
    if proto != Some(IPPROTO_TCP) {
        return None;
    }
    let ip = parse_addr(family?, addr?)?;
    Some(Service { vip: SocketAddr::new(ip, port?), scheduler: scheduler.unwrap_or_default(), flags })
}

/// A destination from a GET_DEST reply.
pub fn parse_dest(attrs: &[IpvsAttr], service_family: u16) -> Option<Dest> {
    let d = attrs.iter().find_map(|a| match a {
        IpvsAttr::Dest(d) => Some(d),
        _ => None,
    })?;
    let mut out = Dest {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        weight: 0,
        forward: 0,
        active_conns: 0,
        inactive_conns: 0,
    };
    let (mut family, mut addr, mut port) = (service_family, None, None);
    for a in d {
        match a {
            DestAttr::Addr(v) => addr = Some(v.as_slice()),
            DestAttr::Port(v) => port = Some(*v),
            DestAttr::AddrFamily(v) => family = *v,
            DestAttr::Weight(v) => out.weight = *v,
            DestAttr::FwdMethod(v) => out.forward = *v & 0x7,
            DestAttr::ActiveConns(v) => out.active_conns = *v,
            DestAttr::InactConns(v) => out.inactive_conns = *v,
            _ => {}
        }
    }
    out.addr = SocketAddr::new(parse_addr(family, addr?)?, port?);
    Some(out)
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

    fn call(&self, cmd: u8, flags: u16, attrs: Vec<IpvsAttr>, what: &str) -> Result<Vec<IpvsMsg>, NetlinkError> {
        let mut msg = GenlMessage::from_payload(IpvsMsg { cmd, attrs });
        msg.set_resolved_family_id(self.family);
        Ok(self.sock.request(msg, flags, what)?.into_iter().map(|m| m.payload).collect())
    }

    pub fn services(&self) -> Result<Vec<Service>, NetlinkError> {
        let replies = self.call(CMD_GET_SERVICE, NLM_F_DUMP, vec![], "listing IPVS services")?;
        Ok(replies.iter().filter_map(|m| parse_service(&m.attrs)).collect())
    }

    pub fn dests(&self, vip: &SocketAddr) -> Result<Vec<Dest>, NetlinkError> {
        let attrs = vec![IpvsAttr::Service(service_key(vip))];
        let replies = self.call(CMD_GET_DEST, NLM_F_DUMP, attrs, "listing IPVS destinations")?;
        Ok(replies.iter().filter_map(|m| parse_dest(&m.attrs, af(&vip.ip()))).collect())
    }

    pub fn add_service(&self, vip: &SocketAddr, scheduler: &str) -> Result<(), NetlinkError> {
        self.call(CMD_NEW_SERVICE, 0, encode_service(vip, scheduler), &format!("adding service {vip}")).map(drop)
    }

    pub fn update_service(&self, vip: &SocketAddr, scheduler: &str) -> Result<(), NetlinkError> {
        self.call(CMD_SET_SERVICE, 0, encode_service(vip, scheduler), &format!("updating service {vip}")).map(drop)
    }

    pub fn del_service(&self, vip: &SocketAddr) -> Result<(), NetlinkError> {
        let attrs = vec![IpvsAttr::Service(service_key(vip))];
        self.call(CMD_DEL_SERVICE, 0, attrs, &format!("deleting service {vip}")).map(drop)
    }

    pub fn add_dest(&self, vip: &SocketAddr, rs: &SocketAddr, weight: u32) -> Result<(), NetlinkError> {
        self.call(CMD_NEW_DEST, 0, encode_dest(vip, rs, Some(weight)), &format!("adding real server {rs} to {vip}"))
            .map(drop)
    }

    pub fn set_dest(&self, vip: &SocketAddr, rs: &SocketAddr, weight: u32) -> Result<(), NetlinkError> {
        self.call(CMD_SET_DEST, 0, encode_dest(vip, rs, Some(weight)), &format!("setting weight of {rs} on {vip}"))
            .map(drop)
    }

    pub fn del_dest(&self, vip: &SocketAddr, rs: &SocketAddr) -> Result<(), NetlinkError> {
        self.call(CMD_DEL_DEST, 0, encode_dest(vip, rs, None), &format!("removing real server {rs} from {vip}"))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    fn emit(attrs: &[IpvsAttr]) -> Vec<u8> {
        let mut buf = vec![0u8; attrs.buffer_len()];
        attrs.emit(&mut buf);
        buf
    }

    #[test]
    fn new_service_matches_the_kernel_layout() {
        let vip: SocketAddr = "10.103.97.2:6443".parse().unwrap();
        let buf = emit(&encode_service(&vip, "rr"));
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
        expected.extend_from_slice(&n16(CMD_ATTR_SERVICE | NLA_F_NESTED));
        expected.extend_from_slice(&inner);
        assert_eq!(buf, expected);
    }

    fn parse(buf: &[u8]) -> Vec<IpvsAttr> {
        parse_nested(buf).unwrap()
    }

    #[test]
    fn dest_round_trips_through_the_parser() {
        let vip: SocketAddr = "10.103.97.2:6443".parse().unwrap();
        let rs: SocketAddr = "192.168.0.11:6443".parse().unwrap();
        let attrs = parse(&emit(&encode_dest(&vip, &rs, Some(3))));
        let d = parse_dest(&attrs, AF_INET).unwrap();
        assert_eq!(d.addr, rs);
        assert_eq!(d.weight, 3);
        assert_eq!(d.forward, FWD_MASQ);
        // deletion carries only the address and port
        let del = encode_dest(&vip, &rs, None);
        let IpvsAttr::Dest(dn) = &del[1] else { panic!("{del:?}") };
        assert_eq!(dn.len(), 2);
        // a whole generic netlink message parses back to what was sent
        let msg = IpvsMsg { cmd: CMD_NEW_DEST, attrs: encode_dest(&vip, &rs, Some(3)) };
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        let back = IpvsMsg::parse_with_param(&buf, GenlHeader { cmd: CMD_NEW_DEST, version: VERSION }).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn service_reply_parsing_masks_hashed_and_skips_fwmark() {
        let vip: SocketAddr = "[fd00::2]:6443".parse().unwrap();
        let mut s = service_key(&vip);
        s.push(SvcAttr::SchedName("rr".into()));
        s.push(SvcAttr::Flags { flags: SVC_F_HASHED, mask: u32::MAX });
        let svc = parse_service(&parse(&emit(&[IpvsAttr::Service(s)]))).unwrap();
        assert_eq!(svc, Service { vip, scheduler: "rr".into(), flags: 0 });
        let fw = vec![IpvsAttr::Service(vec![
            SvcAttr::Af(AF_INET),
            SvcAttr::Protocol(IPPROTO_TCP),
            SvcAttr::Other(DefaultNla::new(5, 42u32.to_ne_bytes().to_vec())),
        ])];
        assert_eq!(parse_service(&parse(&emit(&fw))), None);
    }
}
