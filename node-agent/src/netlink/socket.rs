//! A blocking request/response netlink socket. Each request carries a fresh sequence number;
//! replies are collected until the ACK, NLMSG_DONE, or an error. A socket belongs to the network
//! namespace of the thread that opened it; callers on an async runtime use it from a blocking
//! thread.
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_MULTIPART, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Io(#[from] std::io::Error),
    #[error("kernel refused {what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { what: String, errno: i32 },
    #[error("malformed netlink reply to {what}")]
    Malformed {
        what: String,
        #[source]
        source: netlink_packet_core::DecodeError,
    },
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

    /// Send `msg` and return every reply message (for a dump: one per object). `flags` adds to
    /// NLM_F_REQUEST (and NLM_F_ACK, unless it is a dump). `what` names the operation in errors.
    pub fn request<T>(&self, msg: T, flags: u16, what: &str) -> Result<Vec<T>, NetlinkError>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let malformed = |source| NetlinkError::Malformed { what: what.to_string(), source };
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            if buf.is_empty() {
                return Err(malformed("empty datagram".into()));
            }
            let mut offset = 0;
            while offset < buf.len() {
                let m = NetlinkMessage::<T>::deserialize(&buf[offset..]).map_err(malformed)?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(malformed("zero-length message".into()));
                }
                offset += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                let multipart = m.header.flags & NLM_F_MULTIPART != 0;
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Kernel { what: what.to_string(), errno: -code.get() }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Noop => {}
                    NetlinkPayload::Overrun(_) => return Err(malformed("the kernel reports an overrun".into())),
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        // A plain reply without an ACK requested ends the exchange; dumps and
                        // ACKed requests end with DONE or the ACK.
                        if !dump && !multipart && header.flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
