//! The header a relay puts in front of each forwarded connection: a PROXY protocol v2 header
//! (HAProxy's binary format: the agent's source address and the address it dialled) carrying one
//! custom TLV, type 0xE0, with the relay's name, a timestamp, a random nonce and an Ed25519
//! signature over all of it. The controller believes the source address only when the signature
//! verifies with a registered relay's public key (see [`super::registry`]); an unsigned PROXY
//! header, or one from an unknown relay, is refused.
//!
//! ```text
//! magic (12) | 0x21 | family (0x11 TCP4, 0x21 TCP6) | length (u16 BE) | addresses | TLV
//! addresses: src ip | dst ip | src port | dst port          (12 bytes for IPv4, 36 for IPv6)
//! TLV:       0xE0 | length (u16 BE) | version 1 | name length | name | unix ms (u64 BE)
//!            | nonce (16) | signature (64)
//! signed:    "fleetadm-relay-v1\0" | family | addresses | name length | name | unix ms | nonce
//! ```
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

pub const MAGIC: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Bytes before the variable part: magic, version/command, family, length.
pub const PREFIX_LEN: usize = 16;
/// The longest variable part accepted (an IPv6 header with a 63-byte name is 195).
pub const MAX_BODY: usize = 256;
const TLV_SIGNED: u8 = 0xE0;
const TLV_VERSION: u8 = 1;
const DOMAIN: &[u8] = b"fleetadm-relay-v1\0";
pub const NONCE_LEN: usize = 16;
pub const SIG_LEN: usize = 64;
pub const MAX_NAME: usize = 63;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a PROXY protocol v2 header")]
    NotProxy,
    #[error("PROXY header version/command {0:#04x} is not v2 PROXY")]
    Command(u8),
    #[error("PROXY header family {0:#04x} is not TCP over IPv4 or IPv6")]
    Family(u8),
    #[error("PROXY header length {0} is over the limit of {MAX_BODY}")]
    TooLong(usize),
    #[error("PROXY header is truncated")]
    Truncated,
    #[error(
        "PROXY header carries no fleetadm relay signature (only signed headers from registered relays are trusted)"
    )]
    Unsigned,
    #[error("relay signature TLV version {0} is not supported")]
    Version(u8),
    #[error("relay name is empty or longer than {MAX_NAME} bytes, or not UTF-8")]
    Name,
}

/// A decoded header. `signed` is the message the signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub relay: String,
    pub time_ms: u64,
    pub nonce: [u8; NONCE_LEN],
    pub signature: [u8; SIG_LEN],
    pub signed: Vec<u8>,
}

fn family_and_addresses(source: SocketAddr, destination: SocketAddr) -> (u8, Vec<u8>) {
    let (s, d) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let mut a = Vec::with_capacity(36);
    let fam = match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            a.extend_from_slice(&s.octets());
            a.extend_from_slice(&d.octets());
            0x11
        }
        _ => {
            let six = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            a.extend_from_slice(&six(s).octets());
            a.extend_from_slice(&six(d).octets());
            0x21
        }
    };
    a.extend_from_slice(&source.port().to_be_bytes());
    a.extend_from_slice(&destination.port().to_be_bytes());
    (fam, a)
}

fn signed_message(fam: u8, addresses: &[u8], name: &[u8], time_ms: u64, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 1 + addresses.len() + 1 + name.len() + 8 + NONCE_LEN);
    m.extend_from_slice(DOMAIN);
    m.push(fam);
    m.extend_from_slice(addresses);
    m.push(name.len() as u8);
    m.extend_from_slice(name);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m.extend_from_slice(nonce);
    m
}

/// Build a signed header; `sign` signs the message it is given.
pub fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    relay: &str,
    time_ms: u64,
    nonce: [u8; NONCE_LEN],
    sign: impl FnOnce(&[u8]) -> [u8; SIG_LEN],
) -> Result<Vec<u8>, HeaderError> {
    if relay.is_empty() || relay.len() > MAX_NAME {
        return Err(HeaderError::Name);
    }
    let (fam, addresses) = family_and_addresses(source, destination);
    let msg = signed_message(fam, &addresses, relay.as_bytes(), time_ms, &nonce);
    let sig = sign(&msg);
    let mut tlv = vec![TLV_VERSION, relay.len() as u8];
    tlv.extend_from_slice(relay.as_bytes());
    tlv.extend_from_slice(&time_ms.to_be_bytes());
    tlv.extend_from_slice(&nonce);
    tlv.extend_from_slice(&sig);
    let body_len = addresses.len() + 3 + tlv.len();
    let mut out = Vec::with_capacity(PREFIX_LEN + body_len);
    out.extend_from_slice(&MAGIC);
    out.push(0x21);
    out.push(fam);
    out.extend_from_slice(&(body_len as u16).to_be_bytes());
    out.extend_from_slice(&addresses);
    out.push(TLV_SIGNED);
    out.extend_from_slice(&(tlv.len() as u16).to_be_bytes());
    out.extend_from_slice(&tlv);
    Ok(out)
}

/// The length of the variable part announced by a 16-byte prefix.
pub fn body_len(prefix: &[u8; PREFIX_LEN]) -> Result<usize, HeaderError> {
    if prefix[..12] != MAGIC {
        return Err(HeaderError::NotProxy);
    }
    if prefix[12] != 0x21 {
        return Err(HeaderError::Command(prefix[12]));
    }
    if prefix[13] != 0x11 && prefix[13] != 0x21 {
        return Err(HeaderError::Family(prefix[13]));
    }
    let len = u16::from_be_bytes([prefix[14], prefix[15]]) as usize;
    if len > MAX_BODY {
        return Err(HeaderError::TooLong(len));
    }
    Ok(len)
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], HeaderError> {
    if b.len() < n {
        return Err(HeaderError::Truncated);
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

/// Decode a prefix and its body (as announced by [`body_len`]). Unknown TLVs are skipped; the
/// signed TLV must be present.
pub fn decode(prefix: &[u8; PREFIX_LEN], body: &[u8]) -> Result<Header, HeaderError> {
    let len = body_len(prefix)?;
    if body.len() != len {
        return Err(HeaderError::Truncated);
    }
    let fam = prefix[13];
    let mut b = body;
    let (source, destination, addresses) = if fam == 0x11 {
        let a = take(&mut b, 12)?;
        let ip = |o: &[u8]| IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]));
        let port = |o: &[u8]| u16::from_be_bytes([o[0], o[1]]);
        (SocketAddr::new(ip(&a[0..4]), port(&a[8..10])), SocketAddr::new(ip(&a[4..8]), port(&a[10..12])), a)
    } else {
        let a = take(&mut b, 36)?;
        let ip = |o: &[u8]| {
            let mut x = [0u8; 16];
            x.copy_from_slice(o);
            IpAddr::V6(Ipv6Addr::from(x)).to_canonical()
        };
        let port = |o: &[u8]| u16::from_be_bytes([o[0], o[1]]);
        (SocketAddr::new(ip(&a[0..16]), port(&a[32..34])), SocketAddr::new(ip(&a[16..32]), port(&a[34..36])), a)
    };
    while !b.is_empty() {
        let t = take(&mut b, 3)?;
        let tlen = u16::from_be_bytes([t[1], t[2]]) as usize;
        let mut v = take(&mut b, tlen)?;
        if t[0] != TLV_SIGNED {
            continue;
        }
        let ver = take(&mut v, 1)?[0];
        if ver != TLV_VERSION {
            return Err(HeaderError::Version(ver));
        }
        let nlen = take(&mut v, 1)?[0] as usize;
        let name = take(&mut v, nlen)?;
        let relay = std::str::from_utf8(name).map_err(|_| HeaderError::Name)?.to_string();
        if relay.is_empty() || relay.len() > MAX_NAME {
            return Err(HeaderError::Name);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(take(&mut v, 8)?);
        let time_ms = u64::from_be_bytes(ts);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(take(&mut v, NONCE_LEN)?);
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(take(&mut v, SIG_LEN)?);
        if !v.is_empty() {
            return Err(HeaderError::Truncated);
        }
        let signed = signed_message(fam, addresses, name, time_ms, &nonce);
        return Ok(Header { source, destination, relay, time_ms, nonce, signature, signed });
    }
    Err(HeaderError::Unsigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(h: &[u8]) -> ([u8; PREFIX_LEN], Vec<u8>) {
        let mut p = [0u8; PREFIX_LEN];
        p.copy_from_slice(&h[..PREFIX_LEN]);
        (p, h[PREFIX_LEN..].to_vec())
    }

    #[test]
    fn round_trips_ipv4_and_ipv6_and_signs_what_it_carries() {
        for (s, d) in [
            ("10.78.0.11:40000", "10.78.0.254:9443"),
            ("[2001:db8::11]:40000", "[2001:db8::254]:9443"),
            ("10.78.0.11:1", "[2001:db8::254]:9443"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let mut seen = Vec::new();
            let h = encode(s, d, "bastion-a", 42, [7; 16], |m| {
                seen = m.to_vec();
                [9; 64]
            })
            .unwrap();
            let (p, b) = split(&h);
            assert_eq!(body_len(&p).unwrap(), b.len());
            let got = decode(&p, &b).unwrap();
            assert_eq!((got.source, got.destination), (s, d));
            assert_eq!(
                (got.relay.as_str(), got.time_ms, got.nonce, got.signature),
                ("bastion-a", 42, [7; 16], [9; 64])
            );
            assert_eq!(got.signed, seen, "the controller verifies exactly what the relay signed");
        }
    }

    #[test]
    fn a_changed_address_changes_the_signed_message() {
        let (s, d): (SocketAddr, SocketAddr) = ("10.0.0.1:5".parse().unwrap(), "10.0.0.2:6".parse().unwrap());
        let h = encode(s, d, "r", 1, [0; 16], |_| [0; 64]).unwrap();
        let (p, mut b) = split(&h);
        let before = decode(&p, &b).unwrap().signed;
        b[3] ^= 1; // the source address's last octet
        let after = decode(&p, &b).unwrap();
        assert_eq!(after.source.ip().to_string(), "10.0.0.0");
        assert_ne!(after.signed, before);
    }

    #[test]
    fn refuses_what_is_not_a_signed_v2_header() {
        let mut p = [0u8; PREFIX_LEN];
        p[0] = 0x16; // a TLS ClientHello
        assert_eq!(body_len(&p), Err(HeaderError::NotProxy));
        p[..12].copy_from_slice(&MAGIC);
        p[12] = 0x20; // LOCAL
        assert_eq!(body_len(&p), Err(HeaderError::Command(0x20)));
        p[12] = 0x21;
        p[13] = 0x12; // UDP
        assert_eq!(body_len(&p), Err(HeaderError::Family(0x12)));
        p[13] = 0x11;
        p[14..16].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(body_len(&p), Err(HeaderError::TooLong(1000)));
        // Addresses only, as HAProxy sends them: no signature.
        p[14..16].copy_from_slice(&12u16.to_be_bytes());
        assert_eq!(decode(&p, &[0; 12]), Err(HeaderError::Unsigned));
        assert_eq!(decode(&p, &[0; 11]), Err(HeaderError::Truncated));
        assert_eq!(
            encode("1.1.1.1:1".parse().unwrap(), "1.1.1.1:1".parse().unwrap(), "", 0, [0; 16], |_| [0; 64]),
            Err(HeaderError::Name)
        );
    }
}
