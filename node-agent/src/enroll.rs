//! `node-agent enroll`: key generated here, CA pin checked before the token leaves the host, CSR
//! exchanged for a certificate, identity saved.
use std::time::Duration;

use fleetadm_common::clock::now_unix;
use fleetadm_common::dial::{self, DialOptions, PinReport, Trust};
use fleetadm_common::pin::CaPin;
use fleetadm_common::token::BootstrapToken;
use fleetadm_proto::enrollment_client::EnrollmentClient;
use fleetadm_proto::EnrollRequest;
use rustls::pki_types::pem::PemObject;
use thiserror::Error;

use crate::identity::{cert_matches_key, new_key_and_csr, AgentConfig, Identity, IdentityError, StateDir};
use crate::inventory;

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("this host is already enrolled with {controller} as {node}; pass --force to enroll again (the old identity is replaced only if the new enrollment succeeds)")]
    AlreadyEnrolled { controller: String, node: String },
    #[error(transparent)]
    Pin(#[from] fleetadm_common::pin::PinError),
    #[error(transparent)]
    Token(#[from] fleetadm_common::token::MalformedToken),
    #[error("cannot connect to the controller at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the controller refused the enrollment: {0}")]
    Refused(String),
    #[error("the controller's answer is inconsistent: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub controller: String,
    pub token: String,
    pub ca_hash: String,
    pub node_name: String,
    pub force: bool,
    pub timeout: Duration,
    /// `--proxy` (or the config file's `proxy`); `None`: `HTTPS_PROXY`/`NO_PROXY` decide.
    pub proxy: Option<String>,
    /// `--labels`: asked for; the controller checks them.
    pub labels: std::collections::BTreeMap<String, String>,
}

pub async fn enroll(dir: &StateDir, opts: &EnrollOptions) -> Result<AgentConfig, EnrollError> {
    let pin = CaPin::parse(&opts.ca_hash)?;
    BootstrapToken::parse(&opts.token)?;
    dial::split_host_port(&opts.controller)
        .map_err(|e| EnrollError::Connect { addr: opts.controller.clone(), reason: e.to_string() })?;
    if dir.is_enrolled() && !opts.force {
        let id = Identity::load(dir)?;
        return Err(EnrollError::AlreadyEnrolled { controller: id.config.controller, node: id.config.node_name });
    }
    // Re-enrolling an enrolled name needs proof that this host holds the name's key: present
    // the current certificate, if it is for this name, from this fleet CA, and still valid.
    let proof = dir.is_enrolled().then(|| Identity::load(dir).ok()).flatten().and_then(|id| {
        let same_ca = id.ca_der().map(|der| pin.matches_cert_der(&der)).unwrap_or(false);
        (id.config.node_name == opts.node_name && same_ca && !id.expired()).then(|| id.tls_identity().ok()).flatten()
    });
    dir.ensure()?;
    let src = inventory::Sources { root: "/".into(), fallback_machine_id: dir.machine_id() };
    let machine_id = inventory::machine_id(&src);
    let kc = new_key_and_csr(&opts.node_name)?;

    let report = PinReport::default();
    let connect_err = |reason: String| EnrollError::Connect { addr: opts.controller.clone(), reason };
    let config = dial::client_config(&Trust::Pinned(pin.clone()), proof, report.clone())
        .map_err(|e| connect_err(e.to_string()))?;
    let (host, _) = dial::split_host_port(&opts.controller)
        .map_err(|e| EnrollError::Connect { addr: opts.controller.clone(), reason: e.to_string() })?;
    let proxy =
        fleetadm_common::proxy::Proxy::choose(opts.proxy.as_deref(), &host).map_err(|e| connect_err(e.to_string()))?;
    let dial_opts = DialOptions { connect_timeout: opts.timeout, proxy, ..DialOptions::default() };
    let channel = match dial::connect(&opts.controller, config, &dial_opts).await {
        Ok(c) => c,
        Err(e) => {
            // A pin mismatch is the most important thing to say plainly.
            return Err(match report.take() {
                Some(msg) => connect_err(msg),
                None => match e {
                    dial::DialError::Unreachable { reason, .. } => connect_err(reason),
                    other => connect_err(other.to_string()),
                },
            });
        }
    };
    let mut client = EnrollmentClient::new(channel)
        .max_decoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(EnrollRequest {
        token: opts.token.clone(),
        csr_der: kc.csr_der.clone(),
        node_name: opts.node_name.clone(),
        machine_id,
        labels: opts.labels.clone().into_iter().collect(),
    });
    req.set_timeout(opts.timeout);
    let resp = client.enroll(req).await.map_err(|st| match report.take() {
        Some(msg) => connect_err(msg),
        None if st.code() == tonic::Code::Unavailable || st.code() == tonic::Code::Unknown => {
            connect_err(dial::explain_status(&st))
        }
        None => EnrollError::Refused(st.message().to_string()),
    })?;
    let resp = resp.into_inner();

    // Belt and braces: the CA we store must be the pinned one, the certificate must be for our key.
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(resp.ca_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("CA is not PEM: {e}")))?;
    if !pin.matches_cert_der(&ca_der) {
        return Err(EnrollError::BadAnswer("the returned CA does not match the pin".into()));
    }
    if !cert_matches_key(&resp.certificate_pem, &kc.key) {
        return Err(EnrollError::BadAnswer("the certificate is not for this node's key".into()));
    }
    let config = AgentConfig {
        controller: opts.controller.clone(),
        node_name: resp.node_name,
        enrolled_at: now_unix(),
        proxy: opts.proxy.clone().filter(|p| !p.is_empty()),
    };
    Identity::save(dir, &config, &kc.key.serialize_pem(), &resp.certificate_pem, &resp.ca_pem)?;
    let _ = std::fs::remove_file(dir.session());
    Ok(config)
}
