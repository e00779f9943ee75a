//! `Admin` service implementation.
use std::sync::Arc;
use std::time::Duration;

use fleetadm_proto::admin_server::Admin;
use fleetadm_proto::{
    server_event, BundlePath, BundleRef, BundleView, BundleViews, ClusterRef, ClusterView, ClusterViews,
    CreateClusterRequest, CreateTokenRequest, DeleteClusterRequest, Empty, Kubeconfig, NodeInfo, NodeList, NodeRef,
    PlanClusterRequest, PlanClusterResponse, ServerEvent, Shutdown, TokenInfo, TokenList, TokenRef,
};
use tonic::{Request, Response, Status};

use crate::audit::NewEvent;
use crate::enroll::service::{node_status, token_status};
use crate::enroll::TokenRecord;
use crate::nodes::NodeRecord;
use crate::state::Controller;
use crate::store::Durability;

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
            peer_address: session.as_ref().map(|s| s.peer.clone()).unwrap_or_else(|| rec.peer_address.clone()),
            lb: self.ctl.nodes.lb_status(&rec.name).map_err(|e| Status::internal(e.to_string()))?,
            agent_version: session.as_ref().map(|s| s.meta.agent_version.clone()).unwrap_or_default(),
            protocol: session.as_ref().map(|s| s.meta.protocol).unwrap_or_default(),
            capabilities: session.as_ref().map(|s| s.meta.capabilities.iter().cloned().collect()).unwrap_or_default(),
            labels: rec.labels.clone().into_iter().collect(),
        })
    }

    async fn revoke(&self, name: String) -> Result<Response<NodeInfo>, Status> {
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

    async fn create(&self, req: CreateClusterRequest) -> Result<Response<ClusterView>, Status> {
        let plan_req = req.plan.unwrap_or_default();
        let rollouts = self.ctl.rollouts.clone();
        let view = self
            .blocking(move |ctl| {
                let (resolved, bundle, plan_req) = resolve_with_bundle(ctl, plan_req)?;
                let Some(shape) = resolved.shape else {
                    return Err(Status::failed_precondition(resolved.response.errors.join("\n")));
                };
                let validity = if req.cert_validity_secs == 0 {
                    crate::pki::kube::DEFAULT_VALIDITY
                } else {
                    Duration::from_secs(req.cert_validity_secs)
                };
                crate::rollout::engine::check_schedule(Duration::from_secs(req.backup_every_secs), req.backup_keep)
                    .map_err(rollout_status)?;
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
                    cert_validity_secs: validity.as_secs(),
                    extra_sans: vec![],
                    backup_every_secs: req.backup_every_secs,
                    backup_keep: if req.backup_every_secs > 0 { req.backup_keep } else { 0 },
                };
                let canary =
                    canary_of(plan_req.canary, plan_req.auto_promote_secs).map_err(Status::invalid_argument)?;
                let rec = rollouts
                    .create(crate::rollout::NewCluster {
                        shape,
                        spec,
                        validity,
                        bundle_files: bundle.map(|b| b.files).unwrap_or_default(),
                        auto_promote_secs: canary.auto_promote_secs,
                    })
                    .map_err(rollout_status)?;
                cluster_view(ctl, &rec, false)
            })
            .await?;
        Ok(Response::new(view))
    }

    /// Run an admin operation and write it to the audit log (flushed) before answering.
    async fn audited<T>(
        &self,
        who: String,
        action: &str,
        target: String,
        cluster: String,
        op: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let r = op.await;
        let result = match &r {
            Ok(_) => "ok".to_string(),
            Err(st) => format!("error: {}", st.message()),
        };
        let e = NewEvent::new(who, action, target).cluster(cluster).result(result);
        audit_write(self.ctl.rollouts.audit().clone(), e).await;
        r
    }

    /// A cluster change (add, remove, certs, restore): the errors of its plan refuse it unless it
    /// is a dry run; a real one is written to the audit log, a dry run (which changes nothing)
    /// is not.
    async fn change(
        &self,
        who: String,
        action: &str,
        target: String,
        cluster: String,
        dry_run: bool,
        resp: impl std::future::Future<Output = Result<fleetadm_proto::ChangeClusterResponse, Status>>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let op = async {
            let resp = resp.await?;
            let errors = resp.plan.as_ref().map(|p| p.errors.clone()).unwrap_or_default();
            if !dry_run && !errors.is_empty() {
                return Err(Status::failed_precondition(errors.join("\n")));
            }
            Ok(Response::new(resp))
        };
        if dry_run {
            return op.await;
        }
        self.audited(who, action, target, cluster, op).await
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
    type ExecStream = tokio_stream::wrappers::ReceiverStream<Result<fleetadm_proto::ExecEvent, Status>>;

    async fn exec(&self, req: Request<fleetadm_proto::ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let what = r.argv.join(" ");
        let cluster = r.cluster.clone();
        let spec = match self.exec_spec(r).await {
            Ok(s) => s,
            Err(st) => {
                let e = NewEvent::new(who, "exec", what).cluster(cluster).result(format!("error: {}", st.message()));
                audit_write(self.ctl.rollouts.audit().clone(), e).await;
                return Err(st);
            }
        };
        Ok(Response::new(self.run_fleet(who, "exec", what, cluster, spec)))
    }

    type PingAgentsStream = tokio_stream::wrappers::ReceiverStream<Result<fleetadm_proto::ExecEvent, Status>>;

    /// Read-only (nothing changes on any host): not audited.
    async fn ping_agents(
        &self,
        req: Request<fleetadm_proto::ExecRequest>,
    ) -> Result<Response<Self::PingAgentsStream>, Status> {
        let r = req.into_inner();
        if !r.argv.is_empty() {
            return Err(Status::invalid_argument("a ping runs no command (see `controller exec`)"));
        }
        let spec = self.fleet_spec(r, crate::ops::exec::Work::Ping, "ping").await?;
        Ok(Response::new(self.start_fleet(spec).0))
    }

    type UpgradeAgentsStream = tokio_stream::wrappers::ReceiverStream<Result<fleetadm_proto::ExecEvent, Status>>;

    async fn upgrade_agents(
        &self,
        req: Request<fleetadm_proto::UpgradeAgentsRequest>,
    ) -> Result<Response<Self::UpgradeAgentsStream>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let mut hosts = r.hosts.unwrap_or_default();
        let what = format!("node-agent from bundle {}", r.bundle);
        let cluster = hosts.cluster.clone();
        let dry_run = r.dry_run;
        let spec = async {
            if r.bundle.is_empty() {
                return Err(Status::invalid_argument("--bundle NAME is required (see `controller bundle list`)"));
            }
            if !hosts.argv.is_empty() {
                return Err(Status::invalid_argument("an agent upgrade runs no command"));
            }
            let (version, packages) = self.agent_packages(r.bundle.clone()).await?;
            let work = crate::ops::exec::Work::AgentUpgrade { bundle: r.bundle.clone(), version, packages };
            hosts.argv.clear();
            self.fleet_spec(hosts, work, "agent-upgrade").await
        }
        .await;
        let spec = match spec {
            Ok(s) => s,
            Err(st) => {
                if !dry_run {
                    let e = NewEvent::new(who, "agent-upgrade", what)
                        .cluster(cluster)
                        .result(format!("error: {}", st.message()));
                    audit_write(self.ctl.rollouts.audit().clone(), e).await;
                }
                return Err(st);
            }
        };
        if dry_run {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let notice = |text: String| fleetadm_proto::ExecEvent { notice: text, ..Default::default() };
            for line in crate::ops::exec::describe_waves(&spec) {
                let _ = tx.send(Ok(notice(line))).await;
            }
            return Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        }
        let what = spec.work.describe().1;
        Ok(Response::new(self.run_fleet(who, "agent-upgrade", what, cluster, spec)))
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<TokenInfo>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let made = self
            .blocking(move |ctl| {
                ctl.tokens.create(Duration::from_secs(r.ttl_secs), r.uses, &r.description).map_err(token_status)
            })
            .await;
        let target = made.as_ref().map(|(_, rec)| rec.id.clone()).unwrap_or_else(|_| "(new token)".into());
        let (tok, rec) = self.audited(who, "token.create", target, String::new(), async { made }).await?;
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
        let who = who(&req);
        let id = req.into_inner().id;
        self.audited(who, "token.delete", id.clone(), String::new(), async {
            let id2 = id.clone();
            let existed = self.blocking(move |ctl| ctl.tokens.delete(&id2).map_err(token_status)).await?;
            if !existed {
                return Err(Status::not_found(format!("no token with id {id:?} (see `controller token list`)")));
            }
            tracing::info!(token = %id, "bootstrap token deleted");
            Ok(Response::new(Empty {}))
        })
        .await
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
        let who = who(&req);
        let name = req.into_inner().name;
        self.audited(who, "node.revoke", name.clone(), String::new(), self.revoke(name)).await
    }

    async fn label_node(&self, req: Request<fleetadm_proto::LabelNodeRequest>) -> Result<Response<NodeInfo>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let mut change: Vec<String> = r.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        change.extend(r.remove.iter().map(|k| format!("{k}-")));
        self.audited(who, "node.label", format!("{} {}", r.name, change.join(" ")), String::new(), async {
            let (set, remove) =
                crate::plan::select::parse_changes(&change).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let name = r.name.clone();
            let rec = self.blocking(move |ctl| ctl.nodes.label(&name, &set, &remove).map_err(node_status)).await?;
            Ok(Response::new(self.node_info(&rec)?))
        })
        .await
    }

    async fn forget_node(&self, req: Request<NodeRef>) -> Result<Response<NodeInfo>, Status> {
        let who = who(&req);
        let name = req.into_inner().name;
        self.audited(who, "node.forget", name.clone(), String::new(), async {
            let n2 = name.clone();
            let rec = self.blocking(move |ctl| ctl.nodes.forget(&n2).map_err(node_status)).await?;
            tracing::warn!(node = %name, "revoked node forgotten; its name is free");
            Ok(Response::new(self.node_info(&rec)?))
        })
        .await
    }

    async fn plan_cluster(&self, req: Request<PlanClusterRequest>) -> Result<Response<PlanClusterResponse>, Status> {
        let req = req.into_inner();
        let resp = self.blocking(move |ctl| Ok(resolve_with_bundle(ctl, req)?.0.response)).await?;
        Ok(Response::new(resp))
    }

    async fn create_cluster(&self, req: Request<CreateClusterRequest>) -> Result<Response<ClusterView>, Status> {
        let who = who(&req);
        let req = req.into_inner();
        let name = req.plan.as_ref().map(|p| p.name.clone()).unwrap_or_default();
        self.audited(who, "cluster.create", name.clone(), name, self.create(req)).await
    }

    async fn delete_cluster(&self, req: Request<DeleteClusterRequest>) -> Result<Response<ClusterView>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let action = if r.force { "cluster.delete --force" } else { "cluster.delete" };
        let rollouts = self.ctl.rollouts.clone();
        self.audited(who, action, r.name.clone(), r.name.clone(), async {
            let view = self
                .blocking(move |ctl| match rollouts.delete(&r.name, r.force).map_err(rollout_status)? {
                    Some(rec) => cluster_view(ctl, &rec, false),
                    None => Ok(ClusterView::default()),
                })
                .await?;
            Ok(Response::new(view))
        })
        .await
    }

    async fn add_cluster_hosts(
        &self,
        req: Request<fleetadm_proto::ChangeClusterRequest>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let target = match (r.nodes.is_empty(), r.node_selector.is_empty()) {
            (false, _) => format!("{} +{}", r.cluster, r.nodes.join(",")),
            (true, false) => format!("{} +{}", r.cluster, r.node_selector),
            (true, true) => r.cluster.clone(),
        };
        let cluster = r.cluster.clone();
        let rollouts = self.ctl.rollouts.clone();
        let resp = self.blocking(move |ctl| add_hosts(ctl, &rollouts, r));
        self.change(who, "cluster.add", target, cluster, dry_run, resp).await
    }

    async fn remove_cluster_hosts(
        &self,
        req: Request<fleetadm_proto::ChangeClusterRequest>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let target = format!("{} -{}", r.cluster, r.nodes.join(","));
        let cluster = r.cluster.clone();
        let rollouts = self.ctl.rollouts.clone();
        let resp = self.blocking(move |ctl| remove_hosts(ctl, &rollouts, r));
        self.change(who, "cluster.remove", target, cluster, dry_run, resp).await
    }

    async fn check_cluster_certs(
        &self,
        req: Request<fleetadm_proto::ClusterRef>,
    ) -> Result<Response<fleetadm_proto::ClusterCertsReport>, Status> {
        use fleetadm_proto::{CertsCheckTask, HostCerts, HostRole};
        let name = req.into_inner().name;
        let n2 = name.clone();
        let rec = self.blocking(move |ctl| ctl.rollouts.get(&n2).map_err(rollout_status)).await?;
        let hosts: Vec<(String, HostRole)> = rec
            .shape
            .masters
            .iter()
            .map(|m| (m.node.clone(), HostRole::Master))
            .chain(rec.shape.workers.iter().map(|w| (w.node.clone(), HostRole::Worker)))
            .collect();
        let execs = self.ctl.rollouts.execs().clone();
        let n = EXEC_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let op = format!("certs-{:x}-{n}", fleetadm_common::clock::now_unix_ms());
        // Every host at once, up to a bound: a read of a few files each.
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut asks = tokio::task::JoinSet::new();
        for (i, (host, role)) in hosts.into_iter().enumerate() {
            let (execs, op, sem) = (execs.clone(), op.clone(), sem.clone());
            asks.spawn(async move {
                let _slot = sem.acquire_owned().await;
                let task = fleetadm_proto::task_assignment::Task::CertsCheck(CertsCheckTask::default());
                let r = execs.ask(&op, &host, task, Duration::from_secs(60)).await;
                let (certs, error) = match r {
                    Ok(rep) => (rep.certs, String::new()),
                    Err(e) => (vec![], e),
                };
                (i, HostCerts { host, role: role as i32, error, certs })
            });
        }
        let mut out = Vec::new();
        while let Some(r) = asks.join_next().await {
            out.push(r.map_err(|e| Status::internal(format!("certs check failed: {e}")))?);
        }
        out.sort_by_key(|(i, _)| *i);
        let validity = crate::rollout::certs::validity(&rec);
        Ok(Response::new(fleetadm_proto::ClusterCertsReport {
            cluster: name,
            hosts: out.into_iter().map(|(_, h)| h).collect(),
            validity_secs: validity.as_secs(),
        }))
    }

    async fn renew_cluster_certs(
        &self,
        req: Request<fleetadm_proto::RenewCertsRequest>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let target = format!("{} renew={} add-san={}", r.cluster, r.renew.join(","), r.add_sans.join(","));
        let cluster = r.cluster.clone();
        let resp = self.blocking(move |ctl| {
            let mut plan = PlanClusterResponse::default();
            let (p, started) = match ctl.rollouts.renew_certs(&r.cluster, &r.renew, &r.add_sans, r.dry_run) {
                Ok(x) => x,
                Err(e @ (crate::rollout::RolloutError::Invalid(_) | crate::rollout::RolloutError::Pki(_))) => {
                    plan.errors.push(fleetadm_common::error_chain(&e));
                    return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
                }
                Err(e) => return Err(rollout_status(e)),
            };
            plan.plan_text = p.render();
            plan.plan = Some(p.view());
            let cluster = match started {
                Some(rec) => Some(cluster_view(ctl, &rec, false)?),
                None => None,
            };
            Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster })
        });
        self.change(who, "cluster.certs", target, cluster, dry_run, resp).await
    }

    async fn backup_cluster(
        &self,
        req: Request<fleetadm_proto::ClusterRef>,
    ) -> Result<Response<fleetadm_proto::BackupInfo>, Status> {
        let who = who(&req);
        let name = req.into_inner().name;
        let (backups, rollouts) = (self.ctl.backups.clone(), self.ctl.rollouts.clone());
        let execs = rollouts.execs().clone();
        self.audited(who, "cluster.backup", name.clone(), name.clone(), async {
            let b = backups.take(&rollouts, &execs, &name, false).await.map_err(backup_status)?;
            Ok(Response::new(backup_info(&b)))
        })
        .await
    }

    async fn list_backups(
        &self,
        req: Request<fleetadm_proto::ClusterRef>,
    ) -> Result<Response<fleetadm_proto::BackupList>, Status> {
        let name = req.into_inner().name;
        let list = self
            .blocking(move |ctl| {
                let rec = ctl.rollouts.get(&name).map_err(rollout_status)?;
                backup_list(ctl, &rec)
            })
            .await?;
        Ok(Response::new(list))
    }

    async fn set_cluster(
        &self,
        req: Request<fleetadm_proto::SetClusterRequest>,
    ) -> Result<Response<fleetadm_proto::BackupList>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let target = format!("{} backup-every={}s keep={}", r.cluster, r.backup_every_secs, r.backup_keep);
        let cluster = r.cluster.clone();
        self.audited(who, "cluster.set", target, cluster, async {
            if !r.set_backup {
                return Err(Status::invalid_argument("nothing to set (--backup-every, --keep)"));
            }
            let list = self
                .blocking(move |ctl| {
                    let rec = ctl
                        .rollouts
                        .set_backup_schedule(&r.cluster, Duration::from_secs(r.backup_every_secs), r.backup_keep)
                        .map_err(rollout_status)?;
                    backup_list(ctl, &rec)
                })
                .await?;
            Ok(Response::new(list))
        })
        .await
    }

    async fn restore_cluster(
        &self,
        req: Request<fleetadm_proto::RestoreClusterRequest>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let target = format!("{} from {}", r.cluster, r.backup);
        let cluster = r.cluster.clone();
        let resp = self.blocking(move |ctl| {
            let mut plan = PlanClusterResponse::default();
            let backups = ctl.backups.list(&r.cluster).map_err(|e| Status::internal(e.to_string()))?;
            let Some(b) = backups.iter().find(|b| b.id == r.backup) else {
                plan.errors.push(format!(
                    "cluster {} has no backup {:?} (see `controller cluster backups {}`)",
                    r.cluster, r.backup, r.cluster
                ));
                return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
            };
            if !ctl.backups.holds(b) {
                plan.errors.push(format!("backup {} is recorded but its snapshot is missing or damaged", b.id));
                return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
            }
            let (p, started) = match ctl.rollouts.restore(&r.cluster, &b.id, &b.sha256, b.size, r.dry_run) {
                Ok(x) => x,
                Err(e @ crate::rollout::RolloutError::Invalid(_)) => {
                    plan.errors.push(fleetadm_common::error_chain(&e));
                    return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
                }
                Err(e) => return Err(rollout_status(e)),
            };
            plan.warnings.push(format!(
                "every apiserver of cluster {} is stopped while etcd is restored to revision {} ({})",
                r.cluster, b.revision, b.id
            ));
            plan.plan_text = p.render();
            plan.plan = Some(p.view());
            let cluster = match started {
                Some(rec) => Some(cluster_view(ctl, &rec, false)?),
                None => None,
            };
            Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster })
        });
        self.change(who, "cluster.restore", target, cluster, dry_run, resp).await
    }

    async fn upgrade_cluster(
        &self,
        req: Request<fleetadm_proto::UpgradeClusterRequest>,
    ) -> Result<Response<fleetadm_proto::ChangeClusterResponse>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let dry_run = r.dry_run;
        let target = format!("{} to {}", r.cluster, r.version);
        let cluster = r.cluster.clone();
        let resp = self.blocking(move |ctl| upgrade_plan(ctl, r));
        self.change(who, "cluster.upgrade", target, cluster, dry_run, resp).await
    }

    async fn add_relay(
        &self,
        req: Request<fleetadm_proto::AddRelayRequest>,
    ) -> Result<Response<fleetadm_proto::RelayInfo>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        self.audited(who, "relay.add", r.name.clone(), String::new(), async {
            let rec = self
                .blocking(move |ctl| {
                    ctl.relays.add(&r.name, &r.public_key, fleetadm_common::clock::now_unix_ms()).map_err(relay_status)
                })
                .await?;
            tracing::info!(relay = %rec.name, key = %rec.public_key, "relay registered");
            Ok(Response::new(relay_info(&rec)))
        })
        .await
    }

    async fn list_relays(&self, _req: Request<Empty>) -> Result<Response<fleetadm_proto::RelayList>, Status> {
        let recs = self.blocking(|ctl| ctl.relays.list().map_err(|e| Status::internal(e.to_string()))).await?;
        Ok(Response::new(fleetadm_proto::RelayList {
            relays: recs.iter().map(relay_info).collect(),
            ..Default::default()
        }))
    }

    async fn remove_relay(
        &self,
        req: Request<fleetadm_proto::RelayRef>,
    ) -> Result<Response<fleetadm_proto::RelayInfo>, Status> {
        let who = who(&req);
        let name = req.into_inner().name;
        self.audited(who, "relay.remove", name.clone(), String::new(), async {
            let rec = self.blocking(move |ctl| ctl.relays.remove(&name).map_err(relay_status)).await?;
            tracing::warn!(relay = %rec.name, "relay removed; its connections are refused from now on");
            Ok(Response::new(relay_info(&rec)))
        })
        .await
    }

    async fn list_events(
        &self,
        req: Request<fleetadm_proto::ListEventsRequest>,
    ) -> Result<Response<fleetadm_proto::EventList>, Status> {
        let r = req.into_inner();
        let q = crate::audit::Query {
            cluster: (!r.cluster.is_empty()).then_some(r.cluster),
            since_ms: r.since_unix_ms,
            limit: if r.limit == 0 { 200 } else { r.limit as usize },
        };
        let audit = self.ctl.rollouts.audit().clone();
        let events = tokio::task::spawn_blocking(move || audit.query(&q))
            .await
            .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
            .map_err(|e| Status::internal(fleetadm_common::error_chain(&e)))?;
        let events = events
            .into_iter()
            .map(|e| fleetadm_proto::AuditEvent {
                seq: e.seq,
                time_unix_ms: e.time_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                cluster: e.cluster,
                result: e.result,
                detail: e.detail,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(fleetadm_proto::EventList { events, ..Default::default() }))
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

    async fn list_ops(&self, _: Request<Empty>) -> Result<Response<fleetadm_proto::OpList>, Status> {
        let mut ops: Vec<fleetadm_proto::OpInfo> =
            self.ctl.rollouts.execs().ops().list().iter().map(|op| op_info(op)).collect();
        let clusters = self.blocking(|ctl| ctl.rollouts.list().map_err(rollout_status)).await?;
        ops.extend(clusters.iter().map(cluster_op_info));
        Ok(Response::new(fleetadm_proto::OpList { ops }))
    }

    async fn get_op(&self, req: Request<fleetadm_proto::OpRef>) -> Result<Response<fleetadm_proto::OpStatus>, Status> {
        let id = req.into_inner().id;
        if let Some(name) = id.strip_prefix("cluster/").map(str::to_string) {
            let status = self
                .blocking(move |ctl| {
                    let rec = ctl.rollouts.get(&name).map_err(rollout_status)?;
                    let tasks = ctl.rollouts.tasks(&name).map_err(rollout_status)?;
                    Ok(cluster_op_status(&rec, &tasks))
                })
                .await?;
            return Ok(Response::new(status));
        }
        let op = self.ctl.rollouts.execs().ops().get(&id).ok_or_else(|| {
            Status::not_found(format!(
                "no operation {id:?}: not running and not among the newest finished (see `controller op list`; finished execs are kept until the controller restarts, and `controller events` has every outcome)"
            ))
        })?;
        let hosts = op
            .hosts_log()
            .into_iter()
            .map(|(host, h)| fleetadm_proto::OpHost { host, state: h.state, error: h.error, output: h.output })
            .collect();
        Ok(Response::new(fleetadm_proto::OpStatus { info: Some(op_info(&op)), hosts }))
    }

    async fn control_op(
        &self,
        req: Request<fleetadm_proto::OpControlRequest>,
    ) -> Result<Response<fleetadm_proto::OpInfo>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        // Only the known actions name the audit entry (the request is the caller's text).
        let action = match r.action.as_str() {
            a @ ("pause" | "resume" | "abort") => format!("op.{a}"),
            _ => "op.unknown-action".to_string(),
        };
        let ops = self.ctl.rollouts.execs().ops().clone();
        let rollouts = self.ctl.rollouts.clone();
        self.audited(who, &action, r.id.clone(), String::new(), async move {
            if let Some(name) = r.id.strip_prefix("cluster/") {
                use crate::rollout::actor::Control;
                let control = match r.action.as_str() {
                    "pause" => Control::Pause,
                    "resume" => Control::Resume,
                    "abort" => Control::Abort,
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "unknown action {other:?}: pause, resume or abort"
                        )))
                    }
                };
                let rec = rollouts.control(name, control).await.map_err(rollout_status)?;
                tracing::info!(op = %r.id, action = %r.action, "cluster rollout steered");
                let mut info = cluster_op_info(&rec);
                if control == Control::Abort {
                    info.state = "aborting".into();
                    info.reason = "stops at its next turn; tasks already running finish".into();
                }
                return Ok(Response::new(info));
            }
            let op = ops.control(&r.id, &r.action).map_err(|e| match e {
                crate::ops::control::OpError::Unknown(_) => Status::not_found(e.to_string()),
                crate::ops::control::OpError::Action(_) => Status::invalid_argument(e.to_string()),
                crate::ops::control::OpError::Aborted(_) => Status::failed_precondition(e.to_string()),
            })?;
            tracing::info!(op = %op.id, action = %r.action, "operation steered");
            Ok(Response::new(op_info(&op)))
        })
        .await
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

    async fn import_bundle(&self, req: Request<BundlePath>) -> Result<Response<BundleView>, Status> {
        let who = who(&req);
        let path = std::path::PathBuf::from(req.into_inner().path);
        self.audited(who, "bundle.import", path.display().to_string(), String::new(), async {
            if !path.is_absolute() {
                return Err(Status::invalid_argument("bundle path must be absolute (the daemon resolves it)"));
            }
            let view = self
                .blocking(move |ctl| ctl.bundles.import(&path).map(|r| bundle_view(&r)).map_err(bundle_status))
                .await?;
            Ok(Response::new(view))
        })
        .await
    }

    async fn list_bundles(&self, _: Request<Empty>) -> Result<Response<BundleViews>, Status> {
        let bundles = self
            .blocking(move |ctl| ctl.bundles.list().map(|l| l.iter().map(bundle_view).collect()).map_err(bundle_status))
            .await?;
        Ok(Response::new(BundleViews { bundles }))
    }

    async fn remove_bundle(&self, req: Request<BundleRef>) -> Result<Response<BundleView>, Status> {
        let who = who(&req);
        let name = req.into_inner().name;
        self.audited(who, "bundle.remove", name.clone(), String::new(), self.remove_bundle_named(name)).await
    }

    async fn get_kubeconfig(&self, req: Request<ClusterRef>) -> Result<Response<Kubeconfig>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let name = r.name.clone();
        self.audited(who, "cluster.kubeconfig admin", name.clone(), name, self.admin_kubeconfig(r)).await
    }

    async fn issue_kubeconfig(
        &self,
        req: Request<fleetadm_proto::IssueKubeconfigRequest>,
    ) -> Result<Response<Kubeconfig>, Status> {
        let who = who(&req);
        let r = req.into_inner();
        let target = format!("user {} groups [{}] ttl {}s", r.user, r.groups.join(","), r.ttl_secs);
        let cluster = r.cluster.clone();
        self.audited(who, "cluster.kubeconfig user", target, cluster, self.user_kubeconfig(r)).await
    }
}

/// Append to the audit log (flushed) off the async threads. A failure is logged: the operation
/// it describes has already happened.
async fn audit_write(audit: crate::audit::Audit, e: NewEvent) {
    match tokio::task::spawn_blocking(move || audit.record(e, Durability::Flush)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::error!(error = %fleetadm_common::error_chain(&err), "cannot write the audit log"),
        Err(err) => tracing::error!(error = %err, "cannot write the audit log"),
    }
}

/// Exec ids: unique within the process, ordered.
static EXEC_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl AdminService {
    /// Check an exec request and choose its hosts: a cluster's (one role of it), or named nodes.
    async fn exec_spec(&self, mut r: fleetadm_proto::ExecRequest) -> Result<crate::ops::exec::ExecSpec, Status> {
        if r.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(Status::invalid_argument("no command given: controller exec ... -- CMD ARGS"));
        }
        if r.argv.len() > 1024 || r.argv.iter().map(String::len).sum::<usize>() > 64 * 1024 {
            return Err(Status::invalid_argument("the command is too long (at most 1024 arguments, 64 KiB)"));
        }
        let work = crate::ops::exec::Work::Command(std::mem::take(&mut r.argv));
        self.fleet_spec(r, work, "exec").await
    }

    /// Start a fleet operation: its events go to the returned stream (a client that went away
    /// does not stop it), its outcome to the audit log.
    fn run_fleet(
        &self,
        who: String,
        action: &'static str,
        what: String,
        cluster: String,
        spec: crate::ops::exec::ExecSpec,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<fleetadm_proto::ExecEvent, Status>> {
        let audit = self.ctl.rollouts.audit().clone();
        let hosts = spec.hosts.join(",");
        tracing::info!(who = %who, what = %what, hosts = %hosts, "{action}");
        let (stream, ran) = self.start_fleet(spec);
        tokio::spawn(async move {
            let summary = match ran.await {
                Ok(s) => s,
                Err(e) => crate::ops::exec::Summary {
                    failed: vec![("(internal)".into(), format!("the operation's task failed: {e}"))],
                    ..Default::default()
                },
            };
            let mut detail = format!("on {hosts}");
            for (h, why) in &summary.failed {
                detail.push_str(&format!("; {h}: {why}"));
            }
            if !summary.skipped.is_empty() {
                detail.push_str(&format!("; skipped over the failure budget: {}", summary.skipped.join(",")));
            }
            let e = NewEvent::new(who, action, what).cluster(cluster).result(summary.line()).detail(detail);
            audit_write(audit, e).await;
        });
        stream
    }

    /// Run a fleet operation in the background: its events go to the returned stream (a client
    /// that went away does not stop it); the handle ends with its summary.
    fn start_fleet(
        &self,
        spec: crate::ops::exec::ExecSpec,
    ) -> (
        tokio_stream::wrappers::ReceiverStream<Result<fleetadm_proto::ExecEvent, Status>>,
        tokio::task::JoinHandle<crate::ops::exec::Summary>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                let _ = tx.send(Ok(e)).await;
            }
        });
        let execs = self.ctl.rollouts.execs().clone();
        let ran = tokio::spawn(async move { execs.run(spec, events_tx).await });
        (tokio_stream::wrappers::ReceiverStream::new(rx), ran)
    }

    /// The node-agent packages of bundle `name` and the version they carry.
    async fn agent_packages(&self, name: String) -> Result<(String, Vec<fleetadm_proto::BundleFile>), Status> {
        let b = self.blocking(move |ctl| ctl.bundles.get(&name).map_err(bundle_status)).await?;
        let packages: Vec<fleetadm_proto::BundleFile> = b
            .manifest
            .files
            .iter()
            .filter(|f| crate::ops::exec::agent_package_version(&f.path).is_some())
            .map(Into::into)
            .collect();
        let Some(version) = packages.iter().find_map(|f| crate::ops::exec::agent_package_version(&f.path)) else {
            return Err(Status::failed_precondition(format!(
                "bundle {} carries no node-agent package: put node-agent_VERSION_ARCH.deb and/or node-agent-VERSION.ARCH.rpm (packaging/build.sh makes them) in the bundle directory's packages/ and build it again",
                b.manifest.name
            )));
        };
        Ok((version, packages))
    }

    /// Hosts and strategy of a fleet operation (`exec`, `agent upgrade`) from the request's choice.
    async fn fleet_spec(
        &self,
        r: fleetadm_proto::ExecRequest,
        work: crate::ops::exec::Work,
        prefix: &str,
    ) -> Result<crate::ops::exec::ExecSpec, Status> {
        let timeout = match r.timeout_secs {
            0 => work.default_timeout(),
            s if s <= 24 * 3600 => Duration::from_secs(u64::from(s)),
            _ => return Err(Status::invalid_argument("--timeout must be at most 24h")),
        };
        let selector =
            crate::plan::select::Selector::parse(&r.selector).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let by_label = r.cluster.is_empty() && r.nodes.is_empty() && !r.selector.is_empty();
        let hosts = match (r.cluster.is_empty(), r.nodes.is_empty()) {
            (true, true) if by_label => Vec::new(),
            (false, true) => {
                let (name, role) = (r.cluster.clone(), r.role.clone());
                self.blocking(move |ctl| {
                    let rec = ctl.rollouts.get(&name).map_err(rollout_status)?;
                    let pick =
                        |hs: &[crate::plan::phases::PlannedHost]| hs.iter().map(|h| h.node.clone()).collect::<Vec<_>>();
                    Ok(match role.as_str() {
                        "" => [pick(&rec.shape.masters), pick(&rec.shape.workers)].concat(),
                        "master" => pick(&rec.shape.masters),
                        "node" => pick(&rec.shape.workers),
                        other => {
                            return Err(Status::invalid_argument(format!("--role {other:?}: expected master or node")))
                        }
                    })
                })
                .await?
            }
            (true, false) => {
                if !r.role.is_empty() {
                    return Err(Status::invalid_argument("--role goes with --cluster"));
                }
                let names = r.nodes.clone();
                self.blocking(move |ctl| {
                    let mut unknown = Vec::new();
                    for n in &names {
                        if ctl.nodes.get(n).map_err(|e| Status::internal(e.to_string()))?.is_none() {
                            unknown.push(n.clone());
                        }
                    }
                    if !unknown.is_empty() {
                        return Err(Status::not_found(format!(
                            "unknown nodes: {} (see `controller nodes list`)",
                            unknown.join(", ")
                        )));
                    }
                    Ok(names)
                })
                .await?
            }
            _ => return Err(Status::invalid_argument("choose the hosts with either --cluster NAME or --nodes H,...")),
        };
        // Narrow by labels: every enrolled node when no other choice was made.
        let hosts = if r.selector.is_empty() {
            hosts
        } else {
            let chosen = hosts;
            self.blocking(move |ctl| {
                let all = ctl.nodes.list().map_err(|e| Status::internal(e.to_string()))?;
                Ok(all
                    .into_iter()
                    .filter(|n| !n.revoked && selector.matches(&n.labels))
                    .map(|n| n.name)
                    .filter(|n| by_label || chosen.contains(n))
                    .collect::<Vec<_>>())
            })
            .await?
        };
        let mut hosts = hosts;
        hosts.dedup();
        if hosts.is_empty() {
            return Err(Status::failed_precondition("no hosts match"));
        }
        let max_parallel = parallelism(&r, &work, hosts.len())?;
        let max_failures = if r.max_failures.trim().is_empty() {
            None
        } else {
            Some(
                crate::rollout::record::failure_budget(&r.max_failures, hosts.len())
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            )
        };
        if r.auto_promote_secs > 0 && r.canary == 0 {
            return Err(Status::invalid_argument("--auto-promote goes with --canary N"));
        }
        if r.auto_promote_secs > 7 * 24 * 3600 {
            return Err(Status::invalid_argument("--auto-promote must be at most 168h"));
        }
        let auto_promote = (r.auto_promote_secs > 0).then(|| Duration::from_secs(u64::from(r.auto_promote_secs)));
        let n = EXEC_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{prefix}-{:x}-{n}", fleetadm_common::clock::now_unix_ms());
        Ok(crate::ops::exec::ExecSpec {
            id,
            hosts,
            work,
            timeout,
            max_parallel,
            max_failures,
            canary: r.canary as usize,
            auto_promote,
        })
    }

    async fn remove_bundle_named(&self, name: String) -> Result<Response<BundleView>, Status> {
        let view = self
            .blocking(move |ctl| {
                if let Some(cluster) = ctl.rollouts.cluster_using(&name).map_err(rollout_status)? {
                    return Err(bundle_status(crate::bundle::BundleError::InUse { name, cluster }));
                }
                ctl.bundles.remove(&name).map(|r| bundle_view(&r)).map_err(bundle_status)
            })
            .await?;
        Ok(Response::new(view))
    }

    async fn admin_kubeconfig(&self, r: ClusterRef) -> Result<Response<Kubeconfig>, Status> {
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

        Ok(Response::new(Kubeconfig { yaml, ..Default::default() }))
    }

    async fn user_kubeconfig(&self, r: fleetadm_proto::IssueKubeconfigRequest) -> Result<Response<Kubeconfig>, Status> {
        let ttl = Duration::from_secs(r.ttl_secs);
        let (cluster, user, groups) = (r.cluster.clone(), r.user.clone(), r.groups.clone());
        let (yaml, serial) = self
            .blocking(move |ctl| {
                let rec = ctl.rollouts.get(&cluster).map_err(rollout_status)?;
                crate::pki::kube::user_kubeconfig(&rec.secrets.pki, &cluster, &user, &groups, ttl).map_err(
                    |e| match e {
                        crate::pki::kube::KubePkiError::BadRequest(_) => Status::invalid_argument(e.to_string()),
                        _ => Status::internal(e.to_string()),
                    },
                )
            })
            .await?;
        let not_after_unix = fleetadm_common::clock::now_unix() + r.ttl_secs;
        // The audit trail: who got what, until when.
        tracing::warn!(cluster = %r.cluster, user = %r.user, groups = ?r.groups, ttl = ?ttl, %serial, "kubeconfig issued");
        Ok(Response::new(Kubeconfig { yaml, serial, not_after_unix }))
    }
}

/// Who is calling: the admin socket peer's uid (the kernel's SO_PEERCRED, not the caller's word).
fn relay_info(r: &crate::relay::RelayRecord) -> fleetadm_proto::RelayInfo {
    fleetadm_proto::RelayInfo {
        name: r.name.clone(),
        public_key: r.public_key.clone(),
        added_unix_ms: r.added_ms,
        ..Default::default()
    }
}

fn relay_status(e: crate::relay::RelayError) -> Status {
    use crate::relay::RelayError as E;
    match e {
        E::BadPublicKey(_) | E::BadName(_) => Status::invalid_argument(e.to_string()),
        E::UnknownRelay(_) => Status::not_found(e.to_string()),
        E::Store(_) | E::KeyFile { .. } | E::BadKey { .. } | E::Random => {
            Status::internal(fleetadm_common::error_chain(&e))
        }
    }
}

fn who<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| format!("uid:{}", c.uid()))
        .unwrap_or_else(|| "uid:unknown".into())
}

/// Resolve a request, with its bundle (if any): the bundle must exist, its Kubernetes version
/// is the cluster's (unless the request names the same one), and every host's architecture must
/// match it.
#[allow(clippy::type_complexity)]
fn resolve_with_bundle(
    ctl: &Controller,
    mut req: PlanClusterRequest,
) -> Result<(crate::plan::resolve::Resolved, Option<crate::bundle::manifest::Manifest>, PlanClusterRequest), Status> {
    let mut errors = Vec::new();
    let bundle = if req.bundle.is_empty() {
        if req.version.is_empty() {
            req.version = DEFAULT_KUBERNETES_VERSION.into();
        }
        None
    } else {
        match ctl.bundles.get(&req.bundle) {
            Ok(b) => {
                if req.version.is_empty() {
                    req.version = b.manifest.kubernetes_version.clone();
                } else if req.version != b.manifest.kubernetes_version {
                    errors.push(format!(
                        "--version {} but bundle {} carries Kubernetes {}",
                        req.version, req.bundle, b.manifest.kubernetes_version
                    ));
                }
                Some(b.manifest)
            }
            Err(e) => {
                errors.push(e.to_string());
                req.version = DEFAULT_KUBERNETES_VERSION.into();
                None
            }
        }
    };
    // sealos Clusterfiles carry SSH credentials (root passwords): never stored, never shown.
    let mut warnings = Vec::new();
    if !req.clusterfile.trim().is_empty() {
        if let Ok((text, dropped)) = crate::plan::clusterfile::without_ssh(&req.clusterfile) {
            if dropped > 0 {
                warnings.push(format!(
                    "the Clusterfile's ssh settings ({dropped} block(s), e.g. root passwords) were dropped: fleetadm never uses SSH and does not store them"
                ));
                req.clusterfile = text;
            }
        }
    }
    let nodes = candidates(ctl)?;
    errors.extend(expand_selectors(&mut req, &nodes));
    let mut resolved = crate::plan::resolve::resolve_request(&req, &nodes);
    resolved.response.warnings.splice(0..0, warnings);
    if let (Some(b), Some(shape)) = (&bundle, &resolved.shape) {
        for h in shape.masters.iter().chain(shape.workers.iter()) {
            let arch = nodes
                .iter()
                .find(|c| c.record.name == h.node)
                .and_then(|c| c.facts.as_ref())
                .map(|f| debian_arch(&f.arch))
                .unwrap_or_default();
            if !arch.is_empty() && arch != b.arch {
                errors.push(format!(
                    "{}: host architecture {arch} does not match bundle {} ({})",
                    h.node, b.name, b.arch
                ));
            }
        }
    }
    if !errors.is_empty() {
        resolved.response.errors.extend(errors);
        resolved.shape = None;
    }
    Ok((resolved, bundle, req))
}

const DEFAULT_KUBERNETES_VERSION: &str = "v1.29.9";

/// Kernel machine name -> Debian architecture.
fn debian_arch(machine: &str) -> String {
    match machine {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "ppc64le" => "ppc64el",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
    .to_string()
}

fn bundle_view(r: &crate::bundle::BundleRecord) -> BundleView {
    BundleView {
        name: r.manifest.name.clone(),
        kubernetes_version: r.manifest.kubernetes_version.clone(),
        arch: r.manifest.arch.clone(),
        files: r.manifest.files.len() as u32,
        total_bytes: r.manifest.total_bytes(),
        new_bytes: r.new_bytes,
        imported_at_unix_ms: r.imported_ms,
    }
}

fn bundle_status(e: crate::bundle::BundleError) -> Status {
    use crate::bundle::BundleError as E;
    match e {
        E::NotFound(_) => Status::not_found(e.to_string()),
        E::InUse { .. } | E::Conflict(_) => Status::failed_precondition(e.to_string()),
        E::Io { .. } => {
            let mut msg = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {src}"));
            }
            Status::invalid_argument(msg)
        }
        E::Store(_) => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// Replace `--master-selector` / `--node-selector` by the names of the enrolled, unrevoked nodes
/// they match (sorted; a chosen master is never also a worker). Returns the errors: a bad
/// selector, one that matches nothing, or selectors next to a Clusterfile or a host list.
/// `cluster add`: resolve the new workers, plan, and (unless a dry run) start the operation.
fn add_hosts(
    ctl: &Controller,
    rollouts: &crate::rollout::Rollouts,
    mut r: fleetadm_proto::ChangeClusterRequest,
) -> Result<fleetadm_proto::ChangeClusterResponse, Status> {
    use crate::plan::select::Selector;
    let rec = rollouts.get(&r.cluster).map_err(rollout_status)?;
    let nodes = candidates(ctl)?;
    let mut plan = PlanClusterResponse::default();
    if !r.node_selector.is_empty() {
        if !r.nodes.is_empty() {
            plan.errors.push("--node-selector and --nodes both choose the workers: give one".into());
        }
        match Selector::parse(&r.node_selector) {
            Err(e) => plan.errors.push(format!("--node-selector: {e}")),
            Ok(sel) => {
                let clusters = rollouts.list().map_err(rollout_status)?;
                let in_a_cluster = |n: &str| {
                    clusters.iter().any(|c| c.shape.masters.iter().chain(c.shape.workers.iter()).any(|h| h.node == n))
                };
                let mut names: Vec<String> = nodes
                    .iter()
                    .filter(|c| !c.record.revoked && sel.matches(&c.record.labels) && !in_a_cluster(&c.record.name))
                    .map(|c| c.record.name.clone())
                    .collect();
                names.sort();
                if names.is_empty() {
                    plan.errors.push(format!(
                        "--node-selector {:?} matches no enrolled node outside a cluster",
                        r.node_selector
                    ));
                }
                r.nodes = names;
            }
        }
    }
    let all_refs: Vec<String> = r.masters.iter().chain(r.nodes.iter()).cloned().collect();
    let (picked, errors, warnings) = crate::plan::resolve::resolve_additions(
        &all_refs,
        &nodes,
        &rec.shape,
        &rec.spec.pod_cidr,
        &rec.spec.service_cidr,
    );
    plan.errors.extend(errors);
    plan.warnings.extend(warnings);
    // Resolved in the order named, masters first (only used when every reference resolved).
    let (masters, hosts): (Vec<_>, Vec<_>) = picked.into_iter().enumerate().partition(|(i, _)| *i < r.masters.len());
    let masters: Vec<_> = masters.into_iter().map(|(_, h)| h).collect();
    let hosts: Vec<_> = hosts.into_iter().map(|(_, h)| h).collect();
    let spec = if r.max_parallel.is_empty() { "10" } else { r.max_parallel.as_str() };
    let wave = match crate::plan::phases::wave_size(spec, hosts.len()) {
        Ok(w) => w,
        Err(e) => {
            plan.errors.push(e.to_string());
            1
        }
    };
    let canary = match canary_of(r.canary, r.auto_promote_secs) {
        Ok(c) => c,
        Err(e) => {
            plan.errors.push(e);
            Default::default()
        }
    };
    if !plan.errors.is_empty() {
        return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
    }
    let waves = crate::rollout::Waves { size: wave, canary };
    let (p, started) = match rollouts.add_masters(&r.cluster, masters, hosts, waves, r.dry_run) {
        Ok(x) => x,
        Err(e @ crate::rollout::RolloutError::Invalid(_)) => {
            plan.errors.push(fleetadm_common::error_chain(&e));
            return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
        }
        Err(e) => return Err(rollout_status(e)),
    };
    plan.plan_text = p.render();
    plan.plan = Some(p.view());
    let cluster = match started {
        Some(rec) => Some(cluster_view(ctl, &rec, false)?),
        None => None,
    };
    Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster })
}

fn remove_hosts(
    ctl: &Controller,
    rollouts: &crate::rollout::Rollouts,
    r: fleetadm_proto::ChangeClusterRequest,
) -> Result<fleetadm_proto::ChangeClusterResponse, Status> {
    let mut plan = PlanClusterResponse::default();
    if !r.node_selector.is_empty() {
        plan.errors.push("cluster remove takes --nodes (names or addresses), not a selector".into());
        return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
    }
    let (p, started) = match rollouts.remove_hosts(&r.cluster, &r.masters, &r.nodes, r.drain, r.force, r.dry_run) {
        Ok(x) => x,
        Err(e @ crate::rollout::RolloutError::Invalid(_)) => {
            plan.errors.push(fleetadm_common::error_chain(&e));
            return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
        }
        Err(e) => return Err(rollout_status(e)),
    };
    if r.force {
        plan.warnings
            .push("--force: the hosts are not reset; clean them up by hand (kubeadm reset) before reuse".into());
    }
    plan.plan_text = p.render();
    plan.plan = Some(p.view());
    let cluster = match started {
        Some(rec) => Some(cluster_view(ctl, &rec, false)?),
        None => None,
    };
    Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster })
}

fn expand_selectors(req: &mut PlanClusterRequest, nodes: &[crate::plan::resolve::Candidate]) -> Vec<String> {
    use crate::plan::select::Selector;
    let mut errors = Vec::new();
    let (ms, ns) = (std::mem::take(&mut req.master_selector), std::mem::take(&mut req.node_selector));
    if ms.is_empty() && ns.is_empty() {
        return errors;
    }
    if !req.clusterfile.trim().is_empty() {
        errors.push("host selectors cannot be combined with a Clusterfile (it lists its hosts)".into());
        return errors;
    }
    let mut pick = |flag: &str, text: &str, listed: &[String]| -> Option<Vec<String>> {
        if !listed.is_empty() {
            errors.push(format!("--{flag}-selector and --{flag}s both choose the {flag}s: give one"));
            return None;
        }
        let sel = match Selector::parse(text) {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("--{flag}-selector: {e}"));
                return None;
            }
        };
        let mut names: Vec<String> = nodes
            .iter()
            .filter(|c| !c.record.revoked && sel.matches(&c.record.labels))
            .map(|c| c.record.name.clone())
            .collect();
        names.sort();
        Some(names)
    };
    let masters = if ms.is_empty() { None } else { pick("master", &ms, &req.masters) };
    let workers = if ns.is_empty() { None } else { pick("node", &ns, &req.nodes) };
    if let Some(m) = masters {
        if m.is_empty() {
            errors.push(format!(
                "--master-selector {ms:?} matches no enrolled node (see `controller nodes list -l {ms}`)"
            ));
        }
        req.masters = m;
    }
    if let Some(mut w) = workers {
        w.retain(|n| !req.masters.contains(n));
        if w.is_empty() {
            errors.push(format!("--node-selector {ns:?} matches no enrolled node that is not a master"));
        }
        req.nodes = w;
    }
    errors
}

/// `cluster upgrade`: the bundle (its version must be the target, its architecture the hosts'),
/// the wave size and budget, then the rollout's own checks (version rules, a busy cluster).
fn upgrade_plan(
    ctl: &Controller,
    r: fleetadm_proto::UpgradeClusterRequest,
) -> Result<fleetadm_proto::ChangeClusterResponse, Status> {
    let mut plan = PlanClusterResponse::default();
    let refused = |mut plan: PlanClusterResponse, why: String| {
        plan.errors.push(why);
        Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None })
    };
    let rec = ctl.rollouts.get(&r.cluster).map_err(rollout_status)?;
    if let Err(e) = crate::plan::version::check_upgrade("v0.0.0", &r.version) {
        if matches!(e, crate::plan::version::VersionError::Bad(_)) {
            return refused(plan, format!("--version: {e}"));
        }
    }
    let bundle = if r.bundle.is_empty() {
        plan.warnings.push(format!(
            "no --bundle: kubeadm and kubelet {} must be installed on every host already (each host checks before it upgrades)",
            r.version
        ));
        None
    } else {
        let b = match ctl.bundles.get(&r.bundle) {
            Ok(b) => b.manifest,
            Err(e) => return refused(plan, e.to_string()),
        };
        if b.kubernetes_version != r.version {
            return refused(
                plan,
                format!("--version {} but bundle {} carries Kubernetes {}", r.version, b.name, b.kubernetes_version),
            );
        }
        let nodes = candidates(ctl)?;
        for h in rec.shape.masters.iter().chain(rec.shape.workers.iter()) {
            let arch = nodes
                .iter()
                .find(|c| c.record.name == h.node)
                .and_then(|c| c.facts.as_ref())
                .map(|f| debian_arch(&f.arch))
                .unwrap_or_default();
            if !arch.is_empty() && arch != b.arch {
                plan.errors.push(format!(
                    "{}: host architecture {arch} does not match bundle {} ({})",
                    h.node, b.name, b.arch
                ));
            }
        }
        if !plan.errors.is_empty() {
            return Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster: None });
        }
        Some((b.name.clone(), b.files.clone()))
    };
    let wave = if r.max_parallel.is_empty() {
        None
    } else {
        match crate::plan::phases::wave_size(&r.max_parallel, rec.shape.workers.len()) {
            Ok(w) => Some(w),
            Err(e) => return refused(plan, e.to_string()),
        }
    };
    let max_failures = (!r.max_failures.is_empty()).then(|| r.max_failures.clone());
    let canary = match canary_of(r.canary, r.auto_promote_secs) {
        Ok(c) => c,
        Err(e) => return refused(plan, e),
    };
    let to = crate::rollout::UpgradeTo { version: r.version.clone(), bundle, wave_size: wave, canary, max_failures };
    let (p, started) = match ctl.rollouts.upgrade(&r.cluster, to, r.dry_run) {
        Ok(x) => x,
        Err(e @ (crate::rollout::RolloutError::Invalid(_) | crate::rollout::RolloutError::Budget(_))) => {
            return refused(plan, fleetadm_common::error_chain(&e));
        }
        Err(e) => return Err(rollout_status(e)),
    };
    plan.plan_text = p.render();
    plan.plan = Some(p.view());
    let cluster = match started {
        Some(rec) => Some(cluster_view(ctl, &rec, false)?),
        None => None,
    };
    Ok(fleetadm_proto::ChangeClusterResponse { plan: Some(plan), cluster })
}

/// A rollout's canary from a request: `--auto-promote` only with `--canary`, at most a week.
fn canary_of(canary: u32, auto_promote_secs: u32) -> Result<crate::rollout::record::Canary, String> {
    if auto_promote_secs > 0 && canary == 0 {
        return Err("--auto-promote goes with --canary N".into());
    }
    if auto_promote_secs > 7 * 24 * 3600 {
        return Err("--auto-promote is at most a week (7d)".into());
    }
    Ok(crate::rollout::record::Canary::new(canary as usize, u64::from(auto_promote_secs)))
}

/// A cluster's current operation, host by host (the tasks of the current plan about each host,
/// also those master0 runs for it such as its drain: the state that matters most, the last
/// failure, the outputs).
fn cluster_op_status(
    rec: &crate::rollout::record::ClusterRecord,
    tasks: &[crate::rollout::record::TaskRecord],
) -> fleetadm_proto::OpStatus {
    use crate::rollout::record::TaskState;
    let planned: std::collections::HashSet<String> = rec.plan.tasks().map(|t| t.id.to_string()).collect();
    let mut by_host: std::collections::BTreeMap<String, Vec<&crate::rollout::record::TaskRecord>> = Default::default();
    for t in tasks.iter().filter(|t| planned.contains(&t.id.to_string())) {
        by_host.entry(t.id.subject().to_string()).or_default().push(t);
    }
    let mut hosts = Vec::new();
    for (host, mut ts) in by_host {
        ts.sort_by_key(|t| (t.dispatched_ms, t.id.to_string()));
        let has = |s: TaskState| ts.iter().any(|t| t.state == s);
        let state = if has(TaskState::Failed) {
            "failed"
        } else if has(TaskState::Running) {
            "running"
        } else if has(TaskState::Pending) {
            "pending"
        } else if ts.iter().all(|t| t.state == TaskState::Skipped) {
            "skipped"
        } else {
            "succeeded"
        };
        let error = ts
            .iter()
            .rev()
            .filter(|t| {
                t.state == TaskState::Failed
                    || (t.state == TaskState::Skipped && rec.failed_workers.iter().any(|w| w == t.id.subject()))
            })
            .find_map(|t| {
                t.output.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!("{}: {}", t.kind, l.trim()))
            })
            .unwrap_or_default();
        let output = ts
            .iter()
            .filter(|t| !t.output.is_empty())
            .map(|t| format!("[{} {}, attempt {}]\n{}\n", t.id, t.state, t.attempt, t.output.trim_end()))
            .collect::<String>();
        hosts.push(fleetadm_proto::OpHost { host, state: state.into(), error, output });
    }
    fleetadm_proto::OpStatus { info: Some(cluster_op_info(rec)), hosts }
}

/// A cluster's current operation as `controller op list` shows it.
fn cluster_op_info(rec: &crate::rollout::record::ClusterRecord) -> fleetadm_proto::OpInfo {
    use crate::rollout::record::{ClusterState, Operation};
    let kind = match rec.operation {
        Operation::Create => "cluster-create",
        Operation::AddWorkers { .. } | Operation::AddHosts { .. } => "cluster-add",
        Operation::Delete => "cluster-delete",
        Operation::RemoveWorkers { .. } | Operation::RemoveHosts { .. } => "cluster-remove",
        Operation::Certs { .. } => "cluster-certs",
        Operation::Restore { .. } => "cluster-restore",
        Operation::Upgrade { .. } => "cluster-upgrade",
    };
    let paused = rec.paused && rec.state == ClusterState::Running;
    fleetadm_proto::OpInfo {
        id: format!("cluster/{}", rec.name),
        kind: kind.into(),
        description: format!("cluster {}: {} (phase {})", rec.name, rec.operation, rec.phase),
        state: if paused { "paused".into() } else { rec.state.to_string() },
        reason: if paused && !rec.pause_reason.is_empty() {
            rec.pause_reason.clone()
        } else if paused {
            format!("paused by the operator; controller op resume cluster/{}", rec.name)
        } else {
            rec.message.clone()
        },
        hosts: (rec.shape.masters.len() + rec.shape.workers.len()) as u32,
        started_unix_ms: rec.created_ms,
        ..Default::default()
    }
}

fn op_info(op: &crate::ops::control::OpControl) -> fleetadm_proto::OpInfo {
    use std::sync::atomic::Ordering;
    let gate = op.gate();
    fleetadm_proto::OpInfo {
        id: op.id.clone(),
        kind: op.kind.into(),
        description: op.description.clone(),
        state: op.state().into(),
        reason: match gate {
            crate::ops::control::Gate::Paused(why) => why,
            _ => String::new(),
        },
        hosts: op.hosts as u32,
        done: op.done.load(Ordering::Relaxed) as u32,
        failed: op.failed.load(Ordering::Relaxed) as u32,
        started_unix_ms: op.started_ms,
    }
}

fn candidates(ctl: &Controller) -> Result<Vec<crate::plan::resolve::Candidate>, Status> {
    let records = ctl.nodes.list().map_err(|e| Status::internal(e.to_string()))?;
    let mut out = Vec::new();
    for record in records {
        let facts = ctl.nodes.facts(&record.name).map_err(|e| Status::internal(e.to_string()))?;
        let session = ctl.sessions.info(&record.name);
        let connected = session.is_some();
        // The address this node's session connects from: the live one, else the last recorded.
        let observed = session
            .map(|s| s.peer)
            .as_deref()
            .or(Some(record.peer_address.as_str()))
            .and_then(crate::plan::resolve::peer_ip);
        out.push(crate::plan::resolve::Candidate { record, facts, connected, observed });
    }
    Ok(out)
}

fn cluster_view(
    ctl: &Controller,
    rec: &crate::rollout::record::ClusterRecord,
    with_output: bool,
) -> Result<ClusterView, Status> {
    let tasks = ctl.rollouts.tasks(&rec.name).map_err(rollout_status)?;
    Ok(crate::rollout::view::build(rec, &tasks, with_output))
}

fn rollout_status(e: crate::rollout::RolloutError) -> Status {
    use crate::rollout::RolloutError as E;
    let msg = fleetadm_common::error_chain(&e);
    match e {
        E::NotFound(_) => Status::not_found(msg),
        E::Exists { .. } => Status::already_exists(msg),
        E::Invalid(_) | E::Budget(_) => Status::invalid_argument(msg),
        E::Pki(_) | E::Pin(_) | E::Store(_) => Status::internal(msg),
    }
}

fn backup_info(b: &crate::ops::backup::BackupRecord) -> fleetadm_proto::BackupInfo {
    fleetadm_proto::BackupInfo {
        id: b.id.clone(),
        cluster: b.cluster.clone(),
        host: b.host.clone(),
        taken_unix_ms: b.taken_ms,
        size: b.size,
        revision: b.revision,
        sha256: b.sha256.clone(),
        scheduled: b.scheduled,
        total_keys: b.total_keys,
    }
}

fn backup_list(
    ctl: &Controller,
    rec: &crate::rollout::record::ClusterRecord,
) -> Result<fleetadm_proto::BackupList, Status> {
    let list = ctl.backups.list(&rec.name).map_err(|e| Status::internal(fleetadm_common::error_chain(&e)))?;
    Ok(fleetadm_proto::BackupList {
        backups: list.iter().map(backup_info).collect(),
        every_secs: rec.spec.backup_every_secs,
        keep: rec.spec.backup_keep,
    })
}

fn backup_status(e: crate::ops::backup::BackupError) -> Status {
    use crate::ops::backup::BackupError as E;
    let msg = fleetadm_common::error_chain(&e);
    match e {
        E::NotFound(_) => Status::not_found(msg),
        E::Refused(_) | E::NoMaster { .. } | E::Snapshot { .. } => Status::failed_precondition(msg),
        _ => Status::internal(msg),
    }
}

/// Hosts at once for a fleet operation on `hosts` hosts: `--max-parallel N|P%` as given (P% of
/// the hosts, rounded up, at least 1), else the number field, else the work's default.
fn parallelism(r: &fleetadm_proto::ExecRequest, work: &crate::ops::exec::Work, hosts: usize) -> Result<usize, Status> {
    let bad = || Status::invalid_argument("--max-parallel must be 1-10000 or 1-100%");
    let spec = r.max_parallel_spec.trim();
    if !spec.is_empty() {
        if !spec.ends_with('%') && !spec.parse::<u32>().is_ok_and(|n| (1..=10_000).contains(&n)) {
            return Err(bad());
        }
        return crate::plan::phases::wave_size(spec, hosts).map_err(|e| Status::invalid_argument(e.to_string()));
    }
    match r.max_parallel {
        0 => Ok(work.default_parallel(hosts)),
        n if n <= 10_000 => Ok(n as usize),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod parallelism_tests {
    use super::*;
    use crate::ops::exec::Work;

    #[test]
    fn max_parallel_is_a_number_or_a_share_of_the_hosts() {
        let req = |n: u32, spec: &str| fleetadm_proto::ExecRequest {
            max_parallel: n,
            max_parallel_spec: spec.into(),
            ..Default::default()
        };
        let cmd = Work::Command(vec!["true".into()]);
        let at = |n, spec: &str, work: &Work, hosts| {
            parallelism(&req(n, spec), work, hosts).map_err(|e| e.message().to_string())
        };
        assert_eq!(at(0, "", &cmd, 50), Ok(10), "exec's default");
        assert_eq!(at(0, "", &Work::Ping, 50), Ok(50), "a ping: every host");
        assert_eq!(at(7, "", &cmd, 50), Ok(7), "an older client's number");
        assert_eq!(at(7, "25%", &cmd, 50), Ok(13), "the share wins, rounded up");
        assert_eq!(at(0, "1%", &cmd, 3), Ok(1), "at least one");
        assert_eq!(at(0, "100%", &cmd, 3), Ok(3));
        assert_eq!(at(0, " 20 ", &cmd, 3), Ok(20));
        for bad in ["0%", "101%", "lots", "0", "10001", "-1", "5%%"] {
            let e = at(0, bad, &cmd, 3).unwrap_err();
            assert!(e.contains("--max-parallel"), "{bad}: {e}");
        }
        assert!(at(10_001, "", &cmd, 3).is_err());
    }
}
