//! `node-agent run`: keep one mTLS session with the controller. The controller pushes work down a
//! server stream; heartbeats, inventory and certificate renewal are separate calls. Any failure
//! ends the session and the agent reconnects after an exponential, fully jittered backoff.
pub mod backoff;
pub mod status;

use std::time::{Duration, SystemTime};

use fleetadm_common::clock::now_unix_ms;
use fleetadm_common::dial::{self, DialOptions, PinReport, Trust};
use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::{server_event, ConnectRequest, HeartbeatRequest, Inventory, RenewRequest, TaskReport};
use thiserror::Error;
use tonic::transport::Channel;

use crate::execute::{Executor, HostPaths};
use crate::identity::{cert_matches_key, new_key_and_csr, validity, Identity, IdentityError, StateDir};
use crate::inventory;
use backoff::Backoff;
use status::{SessionState, SessionStatus};

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The controller said, over the authenticated session, that this node is revoked.
    #[error("the controller revoked this node: {0}")]
    Revoked(String),
    #[error("this node's certificate expired at {0}; re-enroll with a new token: node-agent enroll --force ...")]
    Expired(String),
    #[error("the peer listener (peer_listen)")]
    Peer(#[source] Box<crate::peer::PeerError>),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub inventory_interval: Duration,
    pub dial: DialOptions,
    /// The config file's `proxy` (wins over the one recorded at enrollment, then the environment).
    pub proxy: Option<String>,
    /// Serve bundle blobs to peers on this address (`peer_listen`; None: no peer-to-peer).
    pub peer_listen: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            inventory_interval: Duration::from_secs(60),
            dial: DialOptions::default(),
            proxy: None,
            peer_listen: None,
        }
    }
}

/// Why a session ended.
enum Ended {
    /// Reconnect after a backoff.
    Retry(String),
    /// The controller is busy and said when to come back: wait that long (its own spread),
    /// without stepping the backoff.
    Busy(String, Duration),
    /// Reconnect at once (certificate renewed).
    Renewed,
    /// Stop for good.
    Fatal(RunError),
    /// Asked to stop.
    Stop,
}

/// Run until `stop` resolves or a fatal error.
pub async fn run(
    dir: &StateDir,
    opts: &RunOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(stop);
    let mut backoff = Backoff::new(opts.backoff_initial, opts.backoff_max);
    // Tasks and their journal outlive sessions: a task keeps running across a reconnect, and its
    // report goes out on whichever session is open when it finishes.
    let (executor, mut reports) = Executor::new(&dir.root, HostPaths::system());
    executor.resume();
    let peer = match opts.peer_listen.as_deref().filter(|a| !a.is_empty()) {
        Some(addr) => {
            let listener = crate::peer::bind(addr).await.map_err(|e| RunError::Peer(Box::new(e)))?;
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            let name = Identity::load(dir)?.config.node_name;
            let holder = std::sync::Arc::new(crate::peer::Holder {
                name,
                key: std::sync::RwLock::new(Vec::new()),
                blobs: dir.root.join("blobs"),
            });
            crate::peer::serve(listener, dir.clone(), holder.clone());
            executor.set_peers(dir.clone());
            tracing::info!(%addr, port, "serving bundle blobs to peers");
            Some((port, holder))
        }
        None => None,
    };
    let mut last_inventory: Option<Inventory> = None;
    loop {
        let identity = Identity::load(dir)?;
        // Every journal entry of this agent says which node it is (NODE=...).
        fleetadm_common::logging::set_field("node", &identity.config.node_name);
        if identity.expired() {
            // Not the end: the clock may be wrong (and be fixed), or an operator may re-enroll
            // this host (`node-agent enroll --force` replaces the identity this loop reloads).
            let err = RunError::Expired(humantime::format_rfc3339_seconds(identity.not_after).to_string());
            let delay = opts.backoff_max;
            tracing::error!(error = %err, retry_in = ?delay, "cannot connect");
            let mut st = SessionStatus::new(SessionState::Backoff, &identity.config.controller, Some(err.to_string()));
            st.retry_at_ms = now_unix_ms() + delay.as_millis() as u64;
            status::write(dir, &st);
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = &mut stop => {
                    status::write(dir, &SessionStatus::new(SessionState::Stopped, &identity.config.controller, None));
                    return Ok(());
                }
            }
        }
        status::write(dir, &SessionStatus::new(SessionState::Connecting, &identity.config.controller, None));
        let started = std::time::Instant::now();
        let ended = tokio::select! {
            e = session(dir, &identity, opts, &mut last_inventory, &executor, &mut reports, peer.as_ref()) => e,
            _ = &mut stop => Ended::Stop,
        };
        let (reason, delay) = match ended {
            Ended::Stop => {
                status::write(dir, &SessionStatus::new(SessionState::Stopped, &identity.config.controller, None));
                return Ok(());
            }
            Ended::Fatal(e) => {
                tracing::error!(error = %e, "giving up");
                status::write(
                    dir,
                    &SessionStatus::new(SessionState::Stopped, &identity.config.controller, Some(e.to_string())),
                );
                return Err(e);
            }
            Ended::Renewed => {
                backoff.reset();
                continue;
            }
            Ended::Busy(reason, delay) => {
                tracing::info!(
                    retry_in_ms = delay.as_millis() as u64,
                    "the controller is busy; retrying when it asked"
                );
                (reason, delay)
            }
            Ended::Retry(reason) => {
                // A session that lasted a while was healthy: start the backoff afresh.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %reason, retry_in = ?delay, "session ended");
                (reason, delay)
            }
        };
        let mut st = SessionStatus::new(SessionState::Backoff, &identity.config.controller, Some(reason));
        st.retry_at_ms = now_unix_ms() + delay.as_millis() as u64;
        status::write(dir, &st);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => {
                status::write(dir, &SessionStatus::new(SessionState::Stopped, &identity.config.controller, None));
                return Ok(());
            }
        }
    }
}

/// Only the controller's explicit word that this node is revoked ends the agent (the channel is
/// mTLS to the fleet CA, so the word is authenticated). Any other refusal (a restored backup
/// that does not know this node yet, a superseded serial, a bug) is retried with backoff and
/// logged as an error: stopping for good would strand the host until someone logs in.
fn classify(st: &tonic::Status) -> Ended {
    if is_revocation(st) {
        return Ended::Fatal(RunError::Revoked(st.message().to_string()));
    }
    if matches!(st.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
        tracing::error!(code = ?st.code(), error = %st.message(), "the controller refuses this node; retrying (only a revocation stops the agent)");
    }
    if let Some(wait) = retry_after(st) {
        return Ended::Busy(dial::explain_status(st), wait);
    }
    Ended::Retry(dial::explain_status(st))
}

/// The longest wait a busy controller's hint is followed for (a bad hint must not park a host).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A busy controller's hint: `RESOURCE_EXHAUSTED` with `fleetadm-retry-after-ms`.
pub(crate) fn retry_after(st: &tonic::Status) -> Option<Duration> {
    if st.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = st.metadata().get(fleetadm_proto::RETRY_AFTER_METADATA)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

pub(crate) fn is_revocation(st: &tonic::Status) -> bool {
    st.code() == tonic::Code::PermissionDenied
        && st.metadata().get(fleetadm_proto::REFUSAL_METADATA).and_then(|v| v.to_str().ok())
            == Some(fleetadm_proto::REFUSAL_REVOKED)
}

async fn collect_inventory(dir: &StateDir) -> Inventory {
    let src = inventory::Sources { root: "/".into(), fallback_machine_id: dir.machine_id() };
    tokio::task::spawn_blocking(move || inventory::collect(&src)).await.unwrap_or_default()
}

pub(crate) async fn connect(identity: &Identity, opts: &RunOptions) -> Result<AgentClient<Channel>, String> {
    let config = dial::client_config(
        &Trust::Ca(identity.ca_der().map_err(|e| e.to_string())?),
        Some(identity.tls_identity().map_err(|e| e.to_string())?),
        PinReport::default(),
    )
    .map_err(|e| e.to_string())?;
    let (host, _) = dial::split_host_port(&identity.config.controller).map_err(|e| e.to_string())?;
    let setting = opts.proxy.as_deref().or(identity.config.proxy.as_deref());
    let mut dial_opts = opts.dial.clone();
    dial_opts.proxy = fleetadm_common::proxy::Proxy::choose(setting, &host).map_err(|e| e.to_string())?;
    let channel = dial::connect(&identity.config.controller, config, &dial_opts).await.map_err(|e| e.to_string())?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES))
}

async fn session(
    dir: &StateDir,
    identity: &Identity,
    opts: &RunOptions,
    last_inventory: &mut Option<Inventory>,
    executor: &std::sync::Arc<Executor>,
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<TaskReport>,
    peer: Option<&(u16, std::sync::Arc<crate::peer::Holder>)>,
) -> Ended {
    let mut client = match connect(identity, opts).await {
        Ok(c) => c,
        Err(e) => return Ended::Retry(e),
    };
    let inv = collect_inventory(dir).await;
    let req = ConnectRequest {
        inventory: Some(inv.clone()),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: fleetadm_proto::PROTOCOL_VERSION,
        capabilities: crate::execute::capabilities(),
        peer_port: peer.map(|(p, _)| u32::from(*p)).unwrap_or(0),
    };
    let mut stream = match client.open_session(req).await {
        Ok(r) => r.into_inner(),
        Err(st) => return classify(&st),
    };
    *last_inventory = Some(inv);
    let welcome = match stream.message().await {
        Ok(Some(fleetadm_proto::ServerEvent { event: Some(server_event::Event::Welcome(w)) })) => w,
        Ok(Some(_)) => return Ended::Retry("controller sent something other than a welcome".into()),
        Ok(None) => return Ended::Retry("controller closed the session".into()),
        Err(st) => return classify(&st),
    };
    use fleetadm_proto::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&welcome.protocol) {
        // Not fatal: the controller may be upgraded (or rolled back) while this agent waits.
        let why = format!(
            "controller {} chose protocol {}; this node-agent ({}) speaks {MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}: upgrade the older side",
            welcome.controller_version,
            welcome.protocol,
            env!("CARGO_PKG_VERSION")
        );
        tracing::error!("{why}");
        return Ended::Retry(why);
    }
    if let Some((_, holder)) = peer {
        if let Ok(mut k) = holder.key.write() {
            *k = welcome.peer_key.clone();
        }
    }
    let mut st = SessionStatus::new(SessionState::Connected, &identity.config.controller, None);
    st.session_id = welcome.session_id.clone();
    status::write(dir, &st);
    tracing::info!(node = %welcome.node_name, session = %welcome.session_id, controller = %identity.config.controller, controller_version = %welcome.controller_version, protocol = welcome.protocol, "session established");
    // Tasks that need the controller (bundle chunks) use this session's connection.
    executor.set_channel(Some(client.clone()));
    let _channel = ClearOnDrop(executor);

    let hb_every = Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1)));
    let mut heartbeat = tokio::time::interval(hb_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inventory_tick = tokio::time::interval(opts.inventory_interval);
    inventory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    inventory_tick.reset();
    let renew_in = identity.renew_at().duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    // The guard's status arrives on a watch channel; it is reported when health or rotation
    // changes (not on every probe), and once at the start of every session (the controller may
    // have restarted).
    let mut lb_rx = executor.lb_status();
    lb_rx.mark_changed();
    let mut last_lb: Option<crate::report::lb::LbKey> = None;
    let renew = tokio::time::sleep(renew_in);
    tokio::pin!(renew);

    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(ev)) => match ev.event {
                    Some(server_event::Event::Shutdown(s)) if s.r#final => {
                        return Ended::Fatal(RunError::Revoked(s.reason));
                    }
                    Some(server_event::Event::Shutdown(s)) => return Ended::Retry(format!("controller ended the session: {}", s.reason)),
                    Some(server_event::Event::Task(t)) => executor.submit(t),
                    Some(server_event::Event::Welcome(_)) | None => {}
                },
                Ok(None) => return Ended::Retry("controller closed the session".into()),
                Err(st) => return classify(&st),
            },
            Some(report) = reports.recv() => {
                let id = report.task_id.clone();
                if let Err(st) = client.report_task(report).await {
                    // The result is in the journal; the controller re-sends the task after a
                    // reconnect and gets it from there.
                    tracing::warn!(task = %id, error = %st.message(), "task report not delivered");
                    if !is_revocation(&st) && (st.code() == tonic::Code::PermissionDenied || st.code() == tonic::Code::NotFound) {
                        continue;
                    }
                    return classify(&st);
                }
            }
            Ok(()) = lb_rx.changed() => {
                let current = lb_rx.borrow_and_update().clone();
                if let Some(report) = crate::report::lb::if_changed(current.as_ref(), &mut last_lb) {
                    if let Err(st) = client.report_lb_status(report).await {
                        return classify(&st);
                    }
                }
            }
            _ = heartbeat.tick() => {
                let mut req = tonic::Request::new(HeartbeatRequest { agent_time_unix_ms: now_unix_ms() });
                req.set_timeout(hb_every.max(Duration::from_secs(5)));
                if let Err(st) = client.heartbeat(req).await {
                    return classify(&st);
                }
            }
            _ = inventory_tick.tick() => {
                let inv = collect_inventory(dir).await;
                if last_inventory.as_ref().map(|old| inventory::changed(old, &inv)).unwrap_or(true) {
                    if let Err(st) = client.report_inventory(inv.clone()).await {
                        return classify(&st);
                    }
                    tracing::info!("inventory change reported");
                    if !inv.expiring_certs.is_empty() {
                        let names: Vec<&str> = inv.expiring_certs.iter().map(|c| c.name.as_str()).collect();
                        tracing::warn!(certificates = %names.join(", "), "Kubernetes certificates on this host expire within 30 days; the controller was told");
                    }
                    *last_inventory = Some(inv);
                }
            }
            _ = &mut renew => {
                match renew_certificate(dir, identity, &mut client).await {
                    Ok(()) => return Ended::Renewed,
                    Err(e) => {
                        // Retry in 30 s, or sooner if the certificate would expire first.
                        let left = identity.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                        let retry = Duration::from_secs(30).min(left / 2).max(Duration::from_millis(100));
                        tracing::warn!(error = %fleetadm_common::error_chain(&e), retry_in = ?retry, "certificate renewal failed");
                        renew.as_mut().reset(tokio::time::Instant::now() + retry);
                    }
                }
            }
        }
    }
}

/// Takes the session's connection away from the executor when the session ends.
struct ClearOnDrop<'a>(&'a std::sync::Arc<Executor>);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set_channel(None);
    }
}

/// Why a renewal did not happen (the current certificate stays in use; it is retried).
#[derive(Debug, Error)]
pub enum RenewError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the controller refused the renewal: {0}")]
    Refused(String),
    #[error("the controller did not answer the renewal within {0:?}")]
    TimedOut(Duration),
    #[error("the renewed certificate is not for the new key")]
    WrongKey,
    #[error("the controller answered with a different CA; refusing to switch trust")]
    OtherCa,
    #[error("the renewed certificate")]
    BadCertificate(#[from] crate::identity::BadCertificate),
}

const RENEW_TIMEOUT: Duration = Duration::from_secs(30);

/// One renewal call, bounded here (a `grpc-timeout` alone relies on a server that answers): a
/// controller or network that never answers does not hold the renewal, or the session, hostage.
async fn request_renewal(
    client: &mut AgentClient<Channel>,
    csr_der: Vec<u8>,
    timeout: Duration,
) -> Result<fleetadm_proto::RenewResponse, RenewError> {
    let mut req = tonic::Request::new(RenewRequest { csr_der });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.renew_certificate(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        // tonic enforces the grpc-timeout on the client too; whichever fires first.
        Ok(Err(st)) if matches!(st.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) => {
            Err(RenewError::TimedOut(timeout))
        }
        Ok(Err(st)) => Err(RenewError::Refused(dial::explain_status(&st))),
        Err(_) => Err(RenewError::TimedOut(timeout)),
    }
}

async fn renew_certificate(
    dir: &StateDir,
    identity: &Identity,
    client: &mut AgentClient<Channel>,
) -> Result<(), RenewError> {
    let kc = new_key_and_csr(&identity.config.node_name)?;
    let resp = request_renewal(client, kc.csr_der.clone(), RENEW_TIMEOUT).await?;
    if !cert_matches_key(&resp.certificate_pem, &kc.key) {
        return Err(RenewError::WrongKey);
    }
    if resp.ca_pem.trim() != identity.ca_pem.trim() {
        return Err(RenewError::OtherCa);
    }
    let (_, not_after) = validity(&resp.certificate_pem)?;
    Identity::save(dir, &identity.config, &kc.key.serialize_pem(), &resp.certificate_pem, &identity.ca_pem)?;
    tracing::info!(not_after = %humantime::format_rfc3339_seconds(not_after), "certificate renewed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_controllers_hint_is_followed_and_bounded() {
        let busy = |code: tonic::Code, v: &str| {
            let mut st = tonic::Status::new(code, "busy");
            st.metadata_mut().insert(fleetadm_proto::RETRY_AFTER_METADATA, v.parse().unwrap());
            st
        };
        assert_eq!(retry_after(&busy(tonic::Code::ResourceExhausted, "1500")), Some(Duration::from_millis(1500)));
        assert!(
            matches!(classify(&busy(tonic::Code::ResourceExhausted, "1500")), Ended::Busy(_, d) if d == Duration::from_millis(1500))
        );
        // Capped; ignored when malformed, absent, or on another code.
        assert_eq!(retry_after(&busy(tonic::Code::ResourceExhausted, "99999999999")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&busy(tonic::Code::ResourceExhausted, "soon")), None);
        assert_eq!(retry_after(&tonic::Status::resource_exhausted("busy")), None);
        assert_eq!(retry_after(&busy(tonic::Code::Unavailable, "1500")), None);
        assert!(matches!(classify(&busy(tonic::Code::Unavailable, "1500")), Ended::Retry(_)));
    }

    #[tokio::test]
    async fn a_renewal_nobody_answers_times_out() {
        // A peer that accepts connections and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let mut client = AgentClient::new(ch);
        let t = std::time::Instant::now();
        let err = request_renewal(&mut client, vec![1, 2, 3], Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(err, RenewError::TimedOut(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        hold.abort();
    }
}
