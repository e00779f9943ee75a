//! Node identity comes from the verified client certificate, never from a request body.
//! [`layer`] runs before any Agent handler (and before the request body is decoded): a call
//! without a current fleet certificate never reaches one. Handlers read the identity it
//! established with [`caller`], which fails closed when the layer is missing.
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
        Status::permission_denied(format!(
            "node {name:?} is not enrolled on this controller (was its state restored from an older backup?); the agent keeps retrying; to re-admit it, run `node-agent enroll --force` with a new token on the host"
        ))
    })?;
    if record.revoked {
        return Err(revoked(&name));
    }
    if !record.holds(&serial) {
        return Err(Status::permission_denied(format!(
            "this certificate for node {name:?} (serial {serial}) has been superseded by a newer enrollment"
        )));
    }
    Ok(NodeIdentity { name, serial, record })
}

/// The interceptor for the Agent service: authenticates every call from its headers and TLS
/// connection info, and attaches the [`NodeIdentity`] for the handler.
pub fn layer(
    nodes: std::sync::Arc<Nodes>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let id = authenticate(&req, &nodes)?;
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// The caller [`layer`] authenticated.
pub fn caller<T>(req: &Request<T>) -> Result<NodeIdentity, Status> {
    req.extensions()
        .get::<NodeIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this call was not authenticated (the controller is misconfigured)"))
}

/// The refusal that tells an agent to stop for good (see `fleetadm_proto::REFUSAL_METADATA`).
pub fn revoked(name: &str) -> Status {
    let mut st = Status::permission_denied(format!(
        "node {name:?} has been revoked; to put this host back, an operator runs `controller nodes forget {name}` and the host enrolls again with a new token"
    ));
    st.metadata_mut().insert(
        fleetadm_proto::REFUSAL_METADATA,
        tonic::metadata::MetadataValue::from_static(fleetadm_proto::REFUSAL_REVOKED),
    );
    st
}
