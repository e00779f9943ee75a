//! The `Agent` service: sessions, heartbeats, inventory, task and load-balancer reports, bundle
//! blobs, and certificate renewal.
use std::sync::Arc;

use fleetadm_common::clock::now_unix_ms;
use fleetadm_proto::agent_server::Agent;
use fleetadm_proto::{
    server_event, Ack, BlobChunk, ConnectRequest, FetchBlobRequest, HeartbeatRequest, HeartbeatResponse, Inventory,
    LbStatus, RenewRequest, RenewResponse, ServerEvent, TaskReport, Welcome,
};
use tonic::{Request, Response, Status};

use super::auth::authenticate;
use super::sessions::SessionStream;
use crate::enroll::csr;
use crate::enroll::service::node_status;
use crate::state::Controller;

/// Largest blob chunk per call (under the 1 MiB message limit).
pub const CHUNK_MAX: usize = 768 * 1024;

pub struct AgentService {
    ctl: Arc<Controller>,
    /// (node, bundle, blob) -> when a membership check last passed. A transfer asks for hundreds
    /// of chunks; the check (cluster records, bundle manifest) runs once per blob every
    /// [`GRANT_TTL`]. Identity and revocation are still checked on every call.
    grants: std::sync::Mutex<std::collections::HashMap<(String, String, String), std::time::Instant>>,
}

const GRANT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl AgentService {
    pub fn new(ctl: Arc<Controller>) -> Self {
        Self { ctl, grants: Default::default() }
    }

    fn granted(&self, key: &(String, String, String)) -> bool {
        self.grants.lock().map(|g| g.get(key).is_some_and(|t| t.elapsed() < GRANT_TTL)).unwrap_or(false)
    }

    fn grant(&self, key: (String, String, String)) {
        if let Ok(mut g) = self.grants.lock() {
            if g.len() > 100_000 {
                g.retain(|_, t| t.elapsed() < GRANT_TTL);
            }
            g.insert(key, std::time::Instant::now());
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("state store: {e}"))
}

#[tonic::async_trait]
impl Agent for AgentService {
    type OpenSessionStream = SessionStream;

    async fn open_session(&self, req: Request<ConnectRequest>) -> Result<Response<SessionStream>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let body = req.into_inner();
        let now = now_unix_ms();
        if let Some(inv) = &body.inventory {
            self.ctl.nodes.set_facts(&id.name, inv).map_err(store_err)?;
        }
        self.ctl.nodes.touch(&id.name, now, None, Some(&peer)).map_err(store_err)?;
        let (session_id, tx, stream) = self.ctl.sessions.open(&id.name, peer.clone(), now, 16);
        let welcome = ServerEvent {
            event: Some(server_event::Event::Welcome(Welcome {
                node_name: id.name.clone(),
                session_id: session_id.to_string(),
                server_time_unix_ms: now,
                heartbeat_interval_secs: self.ctl.settings.heartbeat_interval.as_secs().max(1) as u32,
            })),
        };
        tx.send(Ok(welcome)).await.map_err(|_| Status::unavailable("session closed while opening"))?;
        tracing::info!(node = %id.name, %peer, session = session_id, agent_version = %body.agent_version, "session opened");
        // A rollout may be waiting for this node (or have work to re-send after a reconnect).
        self.ctl.rollouts.poke();
        Ok(Response::new(stream))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let now = now_unix_ms();
        let agent_time = req.get_ref().agent_time_unix_ms;
        let skew = (agent_time > 0).then(|| agent_time as i64 - now as i64);
        self.ctl.nodes.touch(&id.name, now, skew, None).map_err(store_err)?;
        Ok(Response::new(HeartbeatResponse { server_time_unix_ms: now }))
    }

    async fn report_inventory(&self, req: Request<Inventory>) -> Result<Response<Ack>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        self.ctl.nodes.set_facts(&id.name, req.get_ref()).map_err(store_err)?;
        self.ctl.nodes.touch(&id.name, now_unix_ms(), None, None).map_err(store_err)?;
        tracing::debug!(node = %id.name, "inventory updated");
        Ok(Response::new(Ack {}))
    }

    async fn report_task(&self, req: Request<TaskReport>) -> Result<Response<Ack>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let report = req.into_inner();
        let ctl = self.ctl.clone();
        tokio::task::spawn_blocking(move || ctl.rollouts.report(&id.name, &report))
            .await
            .map_err(|e| Status::internal(format!("report task failed: {e}")))?
            .map_err(|e| {
                use crate::rollout::RolloutError as E;
                match e {
                    E::UnknownTask(_) | E::NotFound(_) => Status::not_found(e.to_string()),
                    E::NotYours { .. } => {
                        tracing::warn!(error = %e, "agent reported on a task that is not its own");
                        Status::permission_denied(e.to_string())
                    }
                    E::Invalid(_) => Status::invalid_argument(e.to_string()),
                    _ => Status::internal(e.to_string()),
                }
            })?;
        Ok(Response::new(Ack {}))
    }

    async fn report_lb_status(&self, req: Request<LbStatus>) -> Result<Response<Ack>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let st = req.into_inner();
        if st.servers.len() > 1024 {
            return Err(Status::invalid_argument("too many real servers in one status"));
        }
        self.ctl.nodes.set_lb_status(&id.name, &st).map_err(store_err)?;
        let unhealthy: Vec<&str> = st.servers.iter().filter(|s| !s.healthy).map(|s| s.address.as_str()).collect();
        if unhealthy.is_empty() {
            tracing::info!(node = %id.name, vip = %st.vip, "load balancer: all real servers healthy");
        } else {
            tracing::warn!(node = %id.name, vip = %st.vip, unhealthy = ?unhealthy, all_failing = st.all_failing, "load balancer: unhealthy real servers");
        }
        Ok(Response::new(Ack {}))
    }

    async fn fetch_blob(&self, req: Request<FetchBlobRequest>) -> Result<Response<BlobChunk>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let r = req.into_inner();
        if !fleetadm_common::tasks::is_sha256_hex(&r.sha256) {
            return Err(Status::invalid_argument("sha256 must be 64 lowercase hex digits"));
        }
        let key = (id.name.clone(), r.bundle.clone(), r.sha256.clone());
        let allowed = self.granted(&key) || {
            let ctl = self.ctl.clone();
            let (node, bundle, sha) = key.clone();
            let ok = tokio::task::spawn_blocking(move || {
                ctl.rollouts.node_uses_bundle(&node, &bundle) && ctl.bundles.holds(&bundle, &sha)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            if ok {
                self.grant(key);
            }
            ok
        };
        if !allowed {
            tracing::warn!(node = %id.name, bundle = %r.bundle, blob = %r.sha256, "blob request refused");
            return Err(Status::permission_denied(format!(
                "node {} is not in a cluster that uses bundle {} with blob {}",
                id.name, r.bundle, r.sha256
            )));
        }
        let _permit =
            self.ctl.transfers.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let max = (r.max_len as usize).clamp(1, CHUNK_MAX);
        let ctl = self.ctl.clone();
        let (data, size) = tokio::task::spawn_blocking(move || ctl.bundles.blobs.read_chunk(&r.sha256, r.offset, max))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(BlobChunk { data, size }))
    }

    async fn renew_certificate(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = authenticate(&req, &self.ctl.nodes)?;
        let der = req.into_inner().csr_der;
        let ctl = self.ctl.clone();
        let resp = tokio::task::spawn_blocking(move || {
            let csr = csr::vet(&der, &id.name).map_err(|e| Status::invalid_argument(format!("rejected CSR: {e}")))?;
            let issued = ctl
                .ca
                .sign_node(csr, &id.name, ctl.settings.node_cert_validity)
                .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
            ctl.nodes.record_renewal(&id.name, &issued.serial, issued.not_after_unix).map_err(node_status)?;
            tracing::info!(node = %id.name, serial = %issued.serial, "certificate renewed");
            Ok::<_, Status>(RenewResponse { certificate_pem: issued.pem, ca_pem: ctl.ca.cert_pem().to_string() })
        })
        .await
        .map_err(|e| Status::internal(format!("renewal task failed: {e}")))??;
        Ok(Response::new(resp))
    }
}
