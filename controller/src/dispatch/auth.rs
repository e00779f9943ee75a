//! Node identity comes from the verified client certificate, never from a request body.
//! rustls has already checked the chain against the fleet CA and the validity period; here the
//! certificate is matched against the node's record (revocation, superseded serials).
use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::nodes::{NodeRecord, Nodes};

#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub serial: String,
    pub record: NodeRecord,
}

pub fn authenticate<T>(req: &Request<T>, nodes: &Nodes) -> Result<NodeIdentity, Status> {
    let certs = req.peer_certs();
    let leaf = certs.as_ref().and_then(|c| c.first()).ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a client certificate issued by the fleet CA; enroll the node first with `node-agent enroll`",
        )
    })?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Status::unauthenticated("the client certificate has no node name (CN)"))?
        .to_string();
    let serial = hex::encode(cert.raw_serial());
    let record = nodes.get(&name).map_err(|e| Status::internal(format!("state store: {e}")))?.ok_or_else(|| {
        Status::permission_denied(format!("node {name:?} is not enrolled; enroll it again with a new token"))
    })?;
    if record.revoked {
        return Err(Status::permission_denied(format!(
            "node {name:?} has been revoked; to re-admit it, create a token and run `node-agent enroll --force`"
        )));
    }
    if serial != record.cert_serial && record.previous_serial.as_deref() != Some(serial.as_str()) {
        return Err(Status::permission_denied(format!(
            "this certificate for node {name:?} (serial {serial}) has been superseded by a newer enrollment"
        )));
    }
    Ok(NodeIdentity { name, serial, record })
}
