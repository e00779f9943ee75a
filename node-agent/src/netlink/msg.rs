//! Netlink message framing: struct nlmsghdr (16 bytes: len u32, type u16, flags u16, seq u32,
//! pid u32), followed by a family header and attributes, padded to 4 bytes.
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_DUMP: u16 = 0x300;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const HDR_LEN: usize = 16;

/// Build one message: header + `body` (family header and attributes).
pub fn build(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = HDR_LEN + body.len();
    let mut out = Vec::with_capacity(super::nla::align4(len));
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out.resize(super::nla::align4(out.len()), 0);
    out
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

/// Split a datagram into messages.
pub fn split(mut buf: &[u8]) -> Result<Vec<Message<'_>>, String> {
    let mut out = Vec::new();
    while buf.len() >= HDR_LEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < HDR_LEN || len > buf.len() {
            return Err(format!("bad netlink message length {len} with {} bytes left", buf.len()));
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            body: &buf[HDR_LEN..len],
        });
        buf = &buf[super::nla::align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The errno of an NLMSG_ERROR body (0 = ACK).
pub fn error_code(body: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(body.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_nlmsghdr() {
        let m = build(0x1c, NLM_F_REQUEST | NLM_F_ACK, 7, &[1, 2, 3]);
        assert_eq!(m.len(), 20);
        assert_eq!(&m[0..4], &19u32.to_ne_bytes());
        assert_eq!(&m[4..6], &0x1cu16.to_ne_bytes());
        assert_eq!(&m[6..8], &5u16.to_ne_bytes());
        assert_eq!(&m[8..12], &7u32.to_ne_bytes());
        assert_eq!(&m[12..16], &[0, 0, 0, 0]);
        assert_eq!(&m[16..], &[1, 2, 3, 0]);
        let parsed = split(&m).unwrap();
        assert_eq!(parsed, vec![Message { kind: 0x1c, flags: 5, seq: 7, body: &[1, 2, 3] }]);
    }

    #[test]
    fn error_messages_and_garbage() {
        let mut body = (-17i32).to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; 16]);
        let m = build(NLMSG_ERROR, 0, 1, &body);
        let parsed = split(&m).unwrap();
        assert_eq!(error_code(parsed[0].body), Some(-17));
        assert!(split(&[255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
