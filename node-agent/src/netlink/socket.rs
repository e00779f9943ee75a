//! A blocking request/response netlink socket. Each request carries a fresh sequence number;
//! replies are collected until the ACK, NLMSG_DONE, or an error. A socket belongs to the network
//! namespace of the thread that opened it.
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

use super::msg::{self, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST};

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Io(#[from] std::io::Error),
    #[error("kernel refused {what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { what: String, errno: i32 },
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    #[error("generic netlink family {0:?} is not available (is its kernel module loaded?)")]
    NoFamily(String),
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub struct NlSocket {
    sock: Socket,
    seq: AtomicU32,
}

impl NlSocket {
    pub fn open(protocol: isize) -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        let _ = sock.set_ext_ack(true);
        Ok(Self { sock, seq: AtomicU32::new(1) })
    }

    /// Send one request and return the bodies of every reply message (for a dump: one per
    /// object). `what` names the operation in errors.
    pub fn request(&self, kind: u16, flags: u16, body: &[u8], what: &str) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = flags | NLM_F_REQUEST | if dump { 0 } else { NLM_F_ACK };
        self.sock.send(&msg::build(kind, flags, seq, body), 0)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let msgs = msg::split(&buf).map_err(NetlinkError::Malformed)?;
            if msgs.is_empty() {
                return Err(NetlinkError::Malformed("empty datagram".into()));
            }
            for m in msgs {
                if m.seq != seq {
                    continue; // a late reply to an earlier request
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let code =
                            msg::error_code(m.body).ok_or_else(|| NetlinkError::Malformed("short error".into()))?;
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(NetlinkError::Kernel { what: what.to_string(), errno: -code });
                    }
                    NLMSG_DONE => return Ok(out),
                    NLMSG_NOOP => {}
                    _ => {
                        out.push(m.body.to_vec());
                        if !dump && m.flags & NLM_F_MULTI == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}
