//! Generic netlink: struct genlmsghdr (cmd u8, version u8, reserved u16) and family-id lookup
//! through the `nlctrl` family.
use super::nla::{self, NlaWriter};
use super::socket::{NetlinkError, NlSocket};

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// genlmsghdr followed by attributes.
pub fn body(cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let mut b = vec![cmd, version, 0, 0];
    b.extend_from_slice(attrs);
    b
}

/// Attributes after the genlmsghdr of a reply body.
pub fn attrs(body: &[u8]) -> Result<Vec<nla::Nla<'_>>, NetlinkError> {
    let rest = body.get(4..).ok_or_else(|| NetlinkError::Malformed("short generic netlink header".into()))?;
    nla::parse(rest).map_err(NetlinkError::Malformed)
}

/// Resolve a generic netlink family name to its id.
pub fn family_id(sock: &NlSocket, name: &str) -> Result<u16, NetlinkError> {
    let mut w = NlaWriter::new();
    w.string(CTRL_ATTR_FAMILY_NAME, name);
    let replies = match sock.request(GENL_ID_CTRL, 0, &body(CTRL_CMD_GETFAMILY, 1, &w.buf), "family lookup") {
        Ok(r) => r,
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {
            return Err(NetlinkError::NoFamily(name.into()))
        }
        Err(e) => return Err(e),
    };
    for r in &replies {
        if let Some(id) = nla::find(&attrs(r)?, CTRL_ATTR_FAMILY_ID).and_then(|a| a.u16()) {
            return Ok(id);
        }
    }
    Err(NetlinkError::NoFamily(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genl_header_layout() {
        assert_eq!(body(3, 1, &[9, 9, 9, 9]), vec![3, 1, 0, 0, 9, 9, 9, 9]);
    }

    #[test]
    fn resolves_nlctrl_itself_on_the_real_kernel() {
        // nlctrl is always present, so this exercises the real socket and reply parsing.
        let sock = NlSocket::open(netlink_sys::protocols::NETLINK_GENERIC).unwrap();
        assert_eq!(family_id(&sock, "nlctrl").unwrap(), GENL_ID_CTRL);
        let err = family_id(&sock, "no-such-family-x").unwrap_err();
        assert!(matches!(err, NetlinkError::NoFamily(_)), "{err}");
    }
}
