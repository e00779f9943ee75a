//! Netlink attributes (struct nlattr): u16 length (header + payload, unpadded), u16 type, payload
//! padded to 4 bytes.
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Append-only attribute writer.
#[derive(Debug, Default, Clone)]
pub struct NlaWriter {
    pub buf: Vec<u8>,
}

impl NlaWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bytes(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u16(&mut self, kind: u16, v: u16) -> &mut Self {
        self.bytes(kind, &v.to_ne_bytes())
    }

    /// A u16 in network byte order (ports).
    pub fn u16_be(&mut self, kind: u16, v: u16) -> &mut Self {
        self.bytes(kind, &v.to_be_bytes())
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.bytes(kind, &v.to_ne_bytes())
    }

    /// NUL-terminated string.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut p = s.as_bytes().to_vec();
        p.push(0);
        self.bytes(kind, &p)
    }

    /// A nested attribute built by `f`.
    pub fn nested(&mut self, kind: u16, f: impl FnOnce(&mut NlaWriter)) -> &mut Self {
        let mut inner = NlaWriter::new();
        f(&mut inner);
        self.bytes(kind | NLA_F_NESTED, &inner.buf)
    }
}

/// One parsed attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nla<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

impl<'a> Nla<'a> {
    pub fn u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.payload.get(..2)?.try_into().ok()?))
    }
    pub fn u16_be(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.payload.get(..2)?.try_into().ok()?))
    }
    pub fn u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }
    pub fn string(&self) -> String {
        let end = self.payload.iter().position(|&b| b == 0).unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }
    pub fn nested(&self) -> Result<Vec<Nla<'a>>, String> {
        parse(self.payload)
    }
}

/// Parse a run of attributes. Malformed lengths are an error, never a panic.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Nla<'_>>, String> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(format!("bad attribute length {len} with {} bytes left", buf.len()));
        }
        out.push(Nla { kind, payload: &buf[4..len] });
        let next = align4(len).min(buf.len());
        buf = &buf[next..];
    }
    Ok(out)
}

/// First attribute of a kind.
pub fn find<'a>(attrs: &[Nla<'a>], kind: u16) -> Option<Nla<'a>> {
    attrs.iter().copied().find(|a| a.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_padding_and_nesting() {
        let mut w = NlaWriter::new();
        w.u16(1, 2).string(6, "rr").nested(1, |n| {
            n.u16_be(4, 6443);
        });
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &6u16.to_ne_bytes()[..], &1u16.to_ne_bytes(), &2u16.to_ne_bytes(), &[0, 0],      // AF=2, padded
            &7u16.to_ne_bytes(), &6u16.to_ne_bytes(), b"rr\0", &[0],                         // "rr\0" padded to 4
            &12u16.to_ne_bytes(), &(1u16 | NLA_F_NESTED).to_ne_bytes(),                       // nest header
            &6u16.to_ne_bytes(), &4u16.to_ne_bytes(), &[0x19, 0x2b], &[0, 0],                // port 6443 big-endian
        ].concat();
        assert_eq!(w.buf, expected);
        let attrs = parse(&w.buf).unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0].u16(), Some(2));
        assert_eq!(attrs[1].string(), "rr");
        assert_eq!(attrs[2].kind, 1, "nested flag masked off");
        assert_eq!(attrs[2].nested().unwrap()[0].u16_be(), Some(6443));
    }

    #[test]
    fn malformed_attributes_are_errors() {
        assert!(parse(&[3, 0, 1, 0]).is_err());
        assert!(parse(&[200, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(parse(&[0, 0]).unwrap(), vec![]);
    }
}
