//! `Enrollment.Enroll`: the one RPC served without a client certificate.
//! Order matters: everything is validated before the token is spent, and the node record is
//! flushed before the certificate is returned.
use std::sync::Arc;

use fleetadm_proto::enrollment_server::Enrollment;
use fleetadm_proto::{EnrollRequest, EnrollResponse};
use tonic::{Request, Response, Status};

use super::csr::{self, validate_node_name};
use super::tokens::TokenError;
use crate::nodes::{Claim, NodeError};
use crate::state::Controller;
use x509_parser::prelude::FromDer;

pub struct EnrollmentService {
    ctl: Arc<Controller>,
    failures: Arc<super::limit::FailureLimit>,
}

impl EnrollmentService {
    pub fn new(ctl: Arc<Controller>) -> Self {
        Self { ctl, failures: Default::default() }
    }
}

pub fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Malformed(_) | TokenError::BadRequest(_) => Status::invalid_argument(e.to_string()),
        TokenError::NotValid(_) | TokenError::Expired { .. } | TokenError::Exhausted(_) => {
            Status::permission_denied(e.to_string())
        }
        TokenError::Store(_) => Status::internal(format!("state store: {e}")),
    }
}

pub fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::NameTaken { .. } => Status::already_exists(e.to_string()),
        NodeError::Revoked { .. } | NodeError::NotRevoked { .. } => Status::failed_precondition(e.to_string()),
        NodeError::Unknown(_) => Status::not_found(e.to_string()),
        NodeError::TooManyLabels { .. } => Status::invalid_argument(e.to_string()),
        NodeError::Store(_) => Status::internal(format!("state store: {e}")),
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let source = req.remote_addr().map(|a| a.ip());
        if let Some(ip) = source {
            if let Err(wait) = self.failures.check(ip, std::time::Instant::now()) {
                crate::metrics::metrics().enrollment("rate_limited");
                return Err(Status::resource_exhausted(format!(
                    "too many failed enrollment attempts from {ip}; retry in {}s",
                    wait.as_secs().max(1)
                )));
            }
        }
        // A client certificate (verified against the fleet CA by rustls) is the proof that the
        // asker holds a node's current key: the only way to re-enroll an enrolled name.
        let holder = req.peer_certs().and_then(|c| c.first().and_then(|leaf| cert_name_and_serial(leaf.as_ref())));
        let r = req.into_inner();
        let ctl = self.ctl.clone();
        // Signing and sled flushes block: keep them off the async workers.
        let result = tokio::task::spawn_blocking(move || enroll(&ctl, r, holder))
            .await
            .map_err(|e| Status::internal(format!("enrollment task failed: {e}")))?;
        match &result {
            Ok(resp) => {
                crate::metrics::metrics().enrollment("ok");
                tracing::info!(node = %resp.node_name, %peer, "node enrolled")
            }
            Err(st) => {
                crate::metrics::metrics().enrollment("refused");
                tracing::warn!(%peer, error = %st.message(), "enrollment refused");
                if let (Some(ip), false) = (source, st.code() == tonic::Code::Internal) {
                    self.failures.failed(ip, std::time::Instant::now());
                }
            }
        }
        result.map(Response::new)
    }
}

/// The node name (CN) and serial of a client certificate.
fn cert_name_and_serial(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some((name, hex::encode(cert.raw_serial())))
}

fn enroll(ctl: &Controller, r: EnrollRequest, holder: Option<(String, String)>) -> Result<EnrollResponse, Status> {
    validate_node_name(&r.node_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let labels: std::collections::BTreeMap<String, String> = r.labels.clone().into_iter().collect();
    crate::plan::select::check_all(&labels).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if r.machine_id.is_empty() || r.machine_id.len() > 128 {
        return Err(Status::invalid_argument("machine_id must be 1-128 characters"));
    }
    ctl.tokens.check(&r.token).map_err(token_status)?;
    let csr = csr::vet(&r.csr_der, &r.node_name).map_err(|e| Status::invalid_argument(format!("rejected CSR: {e}")))?;
    // A certificate for another name proves nothing about this one.
    let claim = match &holder {
        Some((name, serial)) if *name == r.node_name => Claim::Holder(serial),
        _ => Claim::Newcomer,
    };
    ctl.nodes.check_claim(&r.node_name, claim).map_err(node_status)?;
    let issued = ctl
        .ca
        .sign_node(csr, &r.node_name, ctl.settings.node_cert_validity)
        .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
    ctl.tokens.consume(&r.token).map_err(token_status)?;
    ctl.nodes
        .record_enrollment(&r.node_name, &r.machine_id, claim, &issued.serial, issued.not_after_unix, &labels)
        .map_err(node_status)?;
    // A re-enrollment supersedes the old certificate: end any session it still holds.
    ctl.sessions.terminate(&r.node_name, None);
    Ok(EnrollResponse { node_name: r.node_name, certificate_pem: issued.pem, ca_pem: ctl.ca.cert_pem().to_string() })
}
