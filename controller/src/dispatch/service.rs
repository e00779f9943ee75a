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

use super::admission::Admission;
use super::auth::caller;
use super::events::{ReportRejected, TaskEvents};
use super::sessions::{SessionMeta, SessionStream};
use crate::enroll::csr;
use crate::enroll::service::node_status;
use crate::listen::log_budget::{LogBudget, Verdict};
use crate::state::Controller;
use crate::store;

/// Largest blob chunk per call (under the 1 MiB message limit).
pub const CHUNK_MAX: usize = 768 * 1024;

pub struct AgentService {
    ctl: Arc<Controller>,
    /// Where reports and session changes go (the rollout engine).
    events: Arc<dyn TaskEvents>,
    /// (node, bundle, blob) -> when a membership check last passed. A transfer asks for hundreds
    /// of chunks; the check (cluster records, bundle manifest) runs once per blob every
    /// [`GRANT_TTL`]. Identity and revocation are still checked on every call.
    grants: std::sync::Mutex<std::collections::HashMap<(String, String, String), std::time::Instant>>,
    /// Session opens admitted at a steady rate; the rest are told when to come back.
    admission: Admission,
}

/// Session opens admitted per second unless the operator chooses (`serve --session-rate`).
pub const DEFAULT_SESSION_RATE: u32 = 2000;

/// Shedding is logged at most once every 10 s (with the count), not once per refused agent.
static SHED_LOG: LogBudget = LogBudget::new(1, std::time::Duration::from_secs(10));

const GRANT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl AgentService {
    pub fn new(ctl: Arc<Controller>, events: Arc<dyn TaskEvents>) -> Self {
        Self::with_session_rate(ctl, events, DEFAULT_SESSION_RATE)
    }

    pub fn with_session_rate(ctl: Arc<Controller>, events: Arc<dyn TaskEvents>, per_sec: u32) -> Self {
        Self { ctl, events, grants: Default::default(), admission: Admission::new(per_sec) }
    }

    /// Admit a session open now, or refuse it politely: `RESOURCE_EXHAUSTED` with the time to
    /// come back in `fleetadm-retry-after-ms`.
    fn admit(&self, node: &str) -> Result<(), Status> {
        let Err(wait) = self.admission.admit() else { return Ok(()) };
        crate::metrics::metrics().session_shed();
        let ms = wait.as_millis().max(1) as u64;
        if let Verdict::Log { suppressed } = SHED_LOG.check() {
            tracing::warn!(%node, retry_in_ms = ms, also_shed = suppressed, "busy: shedding session opens; agents are told when to retry");
        }
        let mut st = Status::resource_exhausted(format!("the controller is busy opening sessions; retry in {ms} ms"));
        if let Ok(v) = ms.to_string().parse() {
            st.metadata_mut().insert(fleetadm_proto::RETRY_AFTER_METADATA, v);
        }
        Err(st)
    }

    /// A chunk of a backup's snapshot, for a master of the cluster while that cluster is being
    /// restored from that backup (and only that content). Checked on every call: a restore is rare
    /// and its chunks few.
    async fn fetch_backup(&self, node: &str, source: &str, r: FetchBlobRequest) -> Result<Response<BlobChunk>, Status> {
        use crate::rollout::record::{ClusterState, Operation};
        let refused = || {
            tracing::warn!(node, source, blob = %r.sha256, "backup request refused");
            Status::permission_denied(format!(
                "node {node} is not a master of a cluster being restored from backup {source} with blob {}",
                r.sha256
            ))
        };
        let (cluster, backup) = source.split_once('/').ok_or_else(refused)?;
        let ctl = self.ctl.clone();
        let (cluster, backup, node_name, sha) =
            (cluster.to_string(), backup.to_string(), node.to_string(), r.sha256.clone());
        let allowed = tokio::task::spawn_blocking(move || {
            let Ok(rec) = ctl.rollouts.get(&cluster) else { return false };
            rec.state == ClusterState::Running
                && rec.shape.masters.iter().any(|m| m.node == node_name)
                && matches!(&rec.operation, Operation::Restore { backup: b, sha256, .. } if *b == backup && *sha256 == sha)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if !allowed {
            return Err(refused());
        }
        let max = (r.max_len as usize).clamp(1, CHUNK_MAX);
        let ctl = self.ctl.clone();
        let (data, size) = tokio::task::spawn_blocking(move || ctl.backups.read_chunk(&r.sha256, r.offset, max))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(fleetadm_common::error_chain(&e)))?;
        crate::metrics::metrics().blob_bytes(data.len() as u64);
        Ok(Response::new(BlobChunk { data, size, peer: None }))
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

/// The protocol generation for a session, or a refusal that names both sides' versions.
fn negotiate(agent_protocol: u32, agent_version: &str) -> Result<u32, Status> {
    use fleetadm_proto::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    if agent_protocol < MIN_PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "node-agent {agent_version} speaks protocol {agent_protocol}; this controller ({}) speaks {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}: upgrade node-agent",
            env!("CARGO_PKG_VERSION")
        )));
    }
    // A newer agent speaks our generation too (it keeps the previous one): use ours.
    Ok(agent_protocol.min(PROTOCOL_VERSION))
}

fn store_err(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("state store: {e}"))
}

#[tonic::async_trait]
impl Agent for AgentService {
    type OpenSessionStream = SessionStream;

    async fn open_session(&self, req: Request<ConnectRequest>) -> Result<Response<SessionStream>, Status> {
        let id = caller(&req)?;
        self.admit(&id.name)?;
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let body = req.into_inner();
        let protocol = negotiate(body.protocol, &body.agent_version)?;
        let now = now_unix_ms();
        if id.record.previous_serial.is_some() && id.serial == id.record.cert_serial {
            // The renewed certificate is in use: the one it replaced stops working now.
            let (nodes, name, serial) = (self.ctl.nodes.clone(), id.name.clone(), id.serial.clone());
            store::off_thread(move || nodes.seen_in_use(&name, &serial)).await.map_err(node_status)?;
        }
        if let Some(inv) = &body.inventory {
            self.ctl.nodes.set_facts(&id.name, inv).map_err(store_err)?;
            warn_expiring(&id.name, inv);
        }
        self.ctl.nodes.touch(&id.name, now, None, Some(&peer)).map_err(store_err)?;
        if body.capabilities.len() > 1024 || body.capabilities.iter().any(|c| c.len() > 128) {
            return Err(Status::invalid_argument("too many or too long capabilities"));
        }
        let meta = SessionMeta {
            peer: peer.clone(),
            agent_version: body.agent_version.chars().take(64).collect(),
            protocol,
            capabilities: body.capabilities.iter().cloned().collect(),
            peer_port: u16::try_from(body.peer_port).unwrap_or(0),
        };
        let (session_id, tx, stream) = self.ctl.sessions.open(&id.name, meta, now, 16);
        let welcome = ServerEvent {
            event: Some(server_event::Event::Welcome(Welcome {
                node_name: id.name.clone(),
                session_id: session_id.to_string(),
                server_time_unix_ms: now,
                heartbeat_interval_secs: self.ctl.settings.heartbeat_interval.as_secs().max(1) as u32,
                protocol,
                controller_version: env!("CARGO_PKG_VERSION").to_string(),
                peer_key: if body.peer_port > 0 { self.ctl.swarm.peer_key(&id.name) } else { Vec::new() },
            })),
        };
        tx.send(Ok(welcome)).await.map_err(|_| Status::unavailable("session closed while opening"))?;
        tracing::info!(node = %id.name, %peer, session = session_id, agent_version = %body.agent_version, protocol, "session opened");
        // A rollout may be waiting for this node (or have work to re-send after a reconnect).
        self.events.session_opened(&id.name);
        Ok(Response::new(stream))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let id = caller(&req)?;
        let now = now_unix_ms();
        let agent_time = req.get_ref().agent_time_unix_ms;
        let skew = (agent_time > 0).then(|| agent_time as i64 - now as i64);
        self.ctl.nodes.touch(&id.name, now, skew, None).map_err(store_err)?;
        Ok(Response::new(HeartbeatResponse { server_time_unix_ms: now }))
    }

    async fn report_inventory(&self, req: Request<Inventory>) -> Result<Response<Ack>, Status> {
        let id = caller(&req)?;
        self.ctl.nodes.set_facts(&id.name, req.get_ref()).map_err(store_err)?;
        warn_expiring(&id.name, req.get_ref());
        self.ctl.nodes.touch(&id.name, now_unix_ms(), None, None).map_err(store_err)?;
        tracing::debug!(node = %id.name, "inventory updated");
        Ok(Response::new(Ack {}))
    }

    async fn report_task(&self, req: Request<TaskReport>) -> Result<Response<Ack>, Status> {
        let id = caller(&req)?;
        let report = req.into_inner();
        self.events.task_report(&id.name, report).await.map_err(|e| match e {
            ReportRejected::UnknownTask(_) => Status::not_found(e.to_string()),
            ReportRejected::NotYours { .. } => {
                tracing::warn!(node = %id.name, error = %e, "agent reported on a task that is not its own");
                Status::permission_denied(e.to_string())
            }
            ReportRejected::Invalid(_) => Status::invalid_argument(e.to_string()),
            ReportRejected::Internal(_) => {
                let msg = fleetadm_common::error_chain(&e);
                tracing::error!(node = %id.name, error = %msg, "task report not recorded");
                Status::internal(msg)
            }
        })?;
        Ok(Response::new(Ack {}))
    }

    async fn upload_snapshot(
        &self,
        req: Request<fleetadm_proto::SnapshotChunk>,
    ) -> Result<Response<fleetadm_proto::SnapshotAck>, Status> {
        use crate::ops::backup::UploadRejected as U;
        let id = caller(&req)?;
        let chunk = req.into_inner();
        let backups = self.ctl.backups.clone();
        let node = id.name.clone();
        // (a chunk appended and, at the end, hashed: file I/O off the async threads)
        let r = tokio::task::spawn_blocking(move || backups.accept(&node, &chunk))
            .await
            .map_err(|e| Status::internal(format!("upload worker: {e}")))?;
        match r {
            Ok(received) => Ok(Response::new(fleetadm_proto::SnapshotAck { received })),
            Err(e @ U::Unexpected(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ U::NotYours { .. }) => {
                tracing::warn!(node = %id.name, error = %e, "agent uploaded for a task that is not its own");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e @ (U::Invalid(_) | U::Corrupt(_))) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ U::Internal(_)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn report_lb_status(&self, req: Request<LbStatus>) -> Result<Response<Ack>, Status> {
        let id = caller(&req)?;
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
        let id = caller(&req)?;
        let r = req.into_inner();
        if !fleetadm_common::tasks::is_sha256_hex(&r.sha256) {
            return Err(Status::invalid_argument("sha256 must be 64 lowercase hex digits"));
        }
        if let Some(rest) = r.bundle.strip_prefix("backup:").map(str::to_string) {
            return self.fetch_backup(&id.name, &rest, r).await;
        }
        let key = (id.name.clone(), r.bundle.clone(), r.sha256.clone());
        let allowed = self.granted(&key) || {
            let (ctl, events) = (self.ctl.clone(), self.events.clone());
            let (node, bundle, sha) = key.clone();
            let ok = tokio::task::spawn_blocking(move || {
                Ok::<_, Status>(
                    events
                        .node_uses_bundle(&node, &bundle)
                        .map_err(|e| store_err(fleetadm_common::error_chain(&*e)))?
                        && ctl.bundles.holds(&bundle, &sha).map_err(|e| store_err(fleetadm_common::error_chain(&e)))?,
                )
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
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
        // An agent that serves peers may be sent to one that holds (or is fetching) the blob.
        let serves = self.ctl.sessions.info(&id.name).is_some_and(|i| i.meta.peer_port > 0);
        if serves {
            let sessions = &self.ctl.sessions;
            let reachable = |n: &str| {
                let i = sessions.info(n).filter(|i| i.meta.peer_port > 0)?;
                let ip = crate::plan::resolve::peer_ip(&i.peer)?;
                Some(std::net::SocketAddr::new(ip, i.meta.peer_port).to_string())
            };
            let now = now_unix_ms();
            if let Some(src) = self.ctl.swarm.route(&id.name, &r.sha256, r.peers_ok, serves, now, reachable) {
                tracing::debug!(node = %id.name, blob = %r.sha256, peer = %src.node, "blob from a peer");
                crate::metrics::metrics().peer_redirect();
                return Ok(Response::new(BlobChunk { data: Vec::new(), size: 0, peer: Some(src) }));
            }
        }
        // A node queues on its own few slots before it may take one of the shared ones: one node
        // (or a misbehaving agent) never holds every transfer slot.
        let own = self.ctl.node_transfers(&id.name);
        let _own = own.acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let _permit =
            self.ctl.transfers.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let max = (r.max_len as usize).clamp(1, CHUNK_MAX);
        let ctl = self.ctl.clone();
        let (data, size) = tokio::task::spawn_blocking(move || ctl.bundles.blobs.read_chunk(&r.sha256, r.offset, max))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        crate::metrics::metrics().blob_bytes(data.len() as u64);
        Ok(Response::new(BlobChunk { data, size, peer: None }))
    }

    async fn renew_certificate(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = caller(&req)?;
        let der = req.into_inner().csr_der;
        let ctl = self.ctl.clone();
        let resp = tokio::task::spawn_blocking(move || {
            let csr = csr::vet(&der, &id.name).map_err(|e| Status::invalid_argument(format!("rejected CSR: {e}")))?;
            let issued = ctl
                .ca
                .sign_node(csr, &id.name, ctl.settings.node_cert_validity)
                .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
            ctl.nodes
                .record_renewal(&id.name, &id.serial, &issued.serial, issued.not_after_unix)
                .map_err(node_status)?;
            tracing::info!(node = %id.name, serial = %issued.serial, "certificate renewed");
            Ok::<_, Status>(RenewResponse { certificate_pem: issued.pem, ca_pem: ctl.ca.cert_pem().to_string() })
        })
        .await
        .map_err(|e| Status::internal(format!("renewal task failed: {e}")))??;
        Ok(Response::new(resp))
    }
}

/// The agent's warning that certificates on its host expire soon (or have), passed on to the
/// operator's log; `nodes show` and `cluster certs` have the details.
fn warn_expiring(node: &str, inv: &Inventory) {
    if inv.expiring_certs.is_empty() {
        return;
    }
    let now = now_unix_ms() / 1000;
    let list: Vec<String> = inv
        .expiring_certs
        .iter()
        .take(20)
        .map(|c| match c.not_after_unix.checked_sub(now) {
            Some(left) => format!("{} in {}d", c.name, left / 86400),
            None => format!("{} EXPIRED", c.name),
        })
        .collect();
    tracing::warn!(node, certificates = %list.join(", "), "certificates expire within 30 days: renew them (controller cluster certs NAME --renew all)");
}
