//! Generic netlink family lookup through the `nlctrl` family (netlink-packet-generic's
//! [`GenlCtrl`]).
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;

use super::socket::{NetlinkError, NlSocket};

/// Resolve a generic netlink family name to its id.
pub fn family_id(sock: &NlSocket, name: &str) -> Result<u16, NetlinkError> {
    let req = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
    });
    let replies = match sock.request(req, 0, &format!("looking up generic netlink family {name}")) {
        Ok(r) => r,
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {
            return Err(NetlinkError::NoFamily(name.into()))
        }
        Err(e) => return Err(e),
    };
    replies
        .iter()
        .flat_map(|r| r.payload.nlas.iter())
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| NetlinkError::NoFamily(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_nlctrl_itself_on_the_real_kernel() {
        // nlctrl is always present, so this exercises the real socket and reply parsing.
        let sock = NlSocket::open(netlink_sys::protocols::NETLINK_GENERIC).unwrap();
        assert_eq!(family_id(&sock, "nlctrl").unwrap(), netlink_packet_generic::constants::GENL_ID_CTRL);
        let err = family_id(&sock, "no-such-family-x").unwrap_err();
        assert!(matches!(err, NetlinkError::NoFamily(_)), "{err}");
    }
}
