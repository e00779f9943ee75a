//! `Admin` service implementation.
use std::sync::Arc;
use std::time::Duration;

use fleetadm_proto::admin_server::Admin;
use fleetadm_proto::{
    server_event, ClusterRef, ClusterView, ClusterViews, CreateClusterRequest, CreateTokenRequest, Empty, Kubeconfig,
    NodeInfo, NodeList, NodeRef, PlanClusterRequest, PlanClusterResponse, ServerEvent, Shutdown, TokenInfo, TokenList,
    TokenRef,
};
use tonic::{Request, Response, Status};

use crate::enroll::service::{node_status, token_status};
use crate::enroll::TokenRecord;
use crate::nodes::NodeRecord;
use crate::state::Controller;

pub struct AdminService {
    ctl: Arc<Controller>,
}

impl AdminService {
    pub fn new(ctl: Arc<Controller>) -> Self {
        Self { ctl }
    }

    fn token_info(&self, rec: &TokenRecord) -> TokenInfo {
        TokenInfo {
            id: rec.id.clone(),
            token: String::new(),
            description: rec.description.clone(),
            created_at_unix: rec.created_at,
            expires_at_unix: rec.expires_at,
            uses_left: rec.uses_left,
            ca_hash: self.ctl.ca.pin().to_string(),
            command: String::new(),
        }
    }

    fn node_info(&self, rec: &NodeRecord) -> Result<NodeInfo, Status> {
        let facts = self.ctl.nodes.facts(&rec.name).map_err(|e| Status::internal(e.to_string()))?;
        let addresses = facts
            .as_ref()
            .map(|f| crate::nodes::addresses(f).iter().map(|a| a.to_string()).collect())
            .unwrap_or_default();
        let session = self.ctl.sessions.info(&rec.name);
        Ok(NodeInfo {
            name: rec.name.clone(),
            connected: session.is_some() && !rec.revoked,
            last_seen_unix_ms: rec.last_seen_ms,
            addresses,
            facts,
            enrolled_at_unix: rec.enrolled_at,
            cert_not_after_unix: rec.cert_not_after,
            cert_serial: rec.cert_serial.clone(),
            revoked: rec.revoked,
            clock_skew_ms: rec.clock_skew_ms,
            peer_address: session.map(|s| s.peer).unwrap_or_else(|| rec.peer_address.clone()),
        })
    }

    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Controller) -> Result<T, Status> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, Status>> {
        let ctl = self.ctl.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&ctl))
                .await
                .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<TokenInfo>, Status> {
        let r = req.into_inner();
        let (tok, rec) = self
            .blocking(move |ctl| {
                ctl.tokens.create(Duration::from_secs(r.ttl_secs), r.uses, &r.description).map_err(token_status)
            })
            .await?;
        let mut info = self.token_info(&rec);
        info.token = tok.expose();
        info.command = format!(
            "node-agent enroll --controller {} --token {} --ca-hash {}",
            self.ctl.settings.enroll_endpoint, info.token, info.ca_hash
        );
        tracing::info!(token = %rec.id, uses = rec.uses_left, "bootstrap token created");
        Ok(Response::new(info))
    }

    async fn list_tokens(&self, _req: Request<Empty>) -> Result<Response<TokenList>, Status> {
        let recs = self.blocking(|ctl| ctl.tokens.list().map_err(token_status)).await?;
        Ok(Response::new(TokenList { tokens: recs.iter().map(|r| self.token_info(r)).collect() }))
    }

    async fn delete_token(&self, req: Request<TokenRef>) -> Result<Response<Empty>, Status> {
        let id = req.into_inner().id;
        let id2 = id.clone();
        let existed = self.blocking(move |ctl| ctl.tokens.delete(&id2).map_err(token_status)).await?;
        if !existed {
            return Err(Status::not_found(format!("no token with id {id:?} (see `controller token list`)")));
        }
        tracing::info!(token = %id, "bootstrap token deleted");
        Ok(Response::new(Empty {}))
    }

    async fn list_nodes(&self, _req: Request<Empty>) -> Result<Response<NodeList>, Status> {
        let recs = self.blocking(|ctl| ctl.nodes.list().map_err(|e| Status::internal(e.to_string()))).await?;
        let nodes = recs.iter().map(|r| self.node_info(r)).collect::<Result<_, _>>()?;
        Ok(Response::new(NodeList { nodes }))
    }

    async fn get_node(&self, req: Request<NodeRef>) -> Result<Response<NodeInfo>, Status> {
        let name = req.into_inner().name;
        let rec = self.ctl.nodes.get(&name).map_err(|e| Status::internal(e.to_string()))?;
        let rec = rec.ok_or_else(|| node_status(crate::nodes::NodeError::Unknown(name)))?;
        Ok(Response::new(self.node_info(&rec)?))
    }

    async fn revoke_node(&self, req: Request<NodeRef>) -> Result<Response<NodeInfo>, Status> {
        let name = req.into_inner().name;
        let n2 = name.clone();
        let rec = self.blocking(move |ctl| ctl.nodes.revoke(&n2).map_err(node_status)).await?;
        // The revocation is on disk; now cut the node off.
        self.ctl.sessions.terminate(
            &name,
            Some(ServerEvent {
                event: Some(server_event::Event::Shutdown(Shutdown {
                    reason: format!("node {name:?} has been revoked by the operator"),
                    r#final: true,
                })),
            }),
        );
        tracing::warn!(node = %name, "node revoked");
        Ok(Response::new(self.node_info(&rec)?))
    }

    async fn plan_cluster(&self, req: Request<PlanClusterRequest>) -> Result<Response<PlanClusterResponse>, Status> {
        let req = req.into_inner();
        let resp = self.blocking(move |ctl| Ok(crate::plan::resolve::plan(&req, &candidates(ctl)?))).await?;
        Ok(Response::new(resp))
    }

    async fn create_cluster(&self, req: Request<CreateClusterRequest>) -> Result<Response<ClusterView>, Status> {
        let req = req.into_inner();
        let plan_req = req.plan.unwrap_or_default();
        let rollouts = self.ctl.rollouts.clone();
        let view = self
            .blocking(move |ctl| {
                let resolved = crate::plan::resolve::resolve_request(&plan_req, &candidates(ctl)?);
                let Some(shape) = resolved.shape else {
                    return Err(Status::failed_precondition(resolved.response.errors.join("\n")));
                };
                let validity = if req.cert_validity_secs == 0 {
                    crate::pki::kube::DEFAULT_VALIDITY
                } else {
                    Duration::from_secs(req.cert_validity_secs)
                };
                let spec = crate::rollout::record::ClusterSpec {
                    version: plan_req.version.clone(),
                    pod_cidr: plan_req.pod_cidr.clone(),
                    service_cidr: plan_req.service_cidr.clone(),
                    dns_domain: "cluster.local".into(),
                    clusterfile: plan_req.clusterfile.clone(),
                    max_failures: req.max_failures.clone(),
                    cgroup_driver: "systemd".into(),
                    cri_socket: "unix:///run/containerd/containerd.sock".into(),
                    image_repository: "registry.k8s.io".into(),
                };
                let rec = rollouts
                    .create(crate::rollout::driver::NewCluster { shape, spec, validity })
                    .map_err(rollout_status)?;
                cluster_view(ctl, &rec, false)
            })
            .await?;
        Ok(Response::new(view))
    }

    async fn get_cluster(&self, req: Request<ClusterRef>) -> Result<Response<ClusterView>, Status> {
        let r = req.into_inner();
        let view = self
            .blocking(move |ctl| {
                let rec = ctl.rollouts.get(&r.name).map_err(rollout_status)?;
                cluster_view(ctl, &rec, r.with_output)
            })
            .await?;
        Ok(Response::new(view))
    }

    async fn list_clusters(&self, _: Request<Empty>) -> Result<Response<ClusterViews>, Status> {
        let clusters = self
            .blocking(move |ctl| {
                let recs = ctl.rollouts.list().map_err(rollout_status)?;
                recs.iter().map(|rec| cluster_view(ctl, rec, false)).collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(Response::new(ClusterViews { clusters }))
    }

    async fn get_kubeconfig(&self, req: Request<ClusterRef>) -> Result<Response<Kubeconfig>, Status> {
        let r = req.into_inner();
        tracing::info!(cluster = %r.name, "admin kubeconfig handed out");
        let yaml = self
            .blocking(move |ctl| {
                let rec = ctl.rollouts.get(&r.name).map_err(rollout_status)?;
                rec.secrets
                    .pki
                    .shared
                    .iter()
                    .find(|f| f.path == "admin.conf")
                    .map(|f| f.contents.clone())
                    .ok_or_else(|| Status::internal("cluster has no admin kubeconfig"))
            })
            .await?;

        Ok(Response::new(Kubeconfig { yaml }))
    }
}

fn candidates(ctl: &Controller) -> Result<Vec<crate::plan::resolve::Candidate>, Status> {
    let records = ctl.nodes.list().map_err(|e| Status::internal(e.to_string()))?;
    let mut out = Vec::new();
    for record in records {
        let facts = ctl.nodes.facts(&record.name).map_err(|e| Status::internal(e.to_string()))?;
        let connected = ctl.sessions.is_connected(&record.name);
        out.push(crate::plan::resolve::Candidate { record, facts, connected });
    }
    Ok(out)
}

fn cluster_view(
    ctl: &Controller,
    rec: &crate::rollout::record::ClusterRecord,
    with_output: bool,
) -> Result<ClusterView, Status> {
    let tasks = ctl.rollouts.tasks(&rec.name).map_err(rollout_status)?;
    let view = crate::rollout::view::build(rec, &tasks, with_output);
    Ok(ClusterView {
        name: rec.name.clone(),
        json: serde_json::to_string(&view).map_err(|e| Status::internal(e.to_string()))?,
    })
}

fn rollout_status(e: crate::rollout::RolloutError) -> Status {
    use crate::rollout::RolloutError as E;
    match e {
        E::NotFound(_) | E::UnknownTask(_) => Status::not_found(e.to_string()),
        E::Exists { .. } => Status::already_exists(e.to_string()),
        E::Invalid(_) => Status::invalid_argument(e.to_string()),
        E::NotYours { .. } => Status::permission_denied(e.to_string()),
        E::Pki(_) | E::Store(_) => Status::internal(e.to_string()),
    }
}
