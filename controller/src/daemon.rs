//! `controller serve`: open the store, load the fleet CA, and serve the agent-facing TLS listener
//! and the local admin socket until told to stop.
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fleetadm_common::fsutil::ensure_dir;
use fleetadm_proto::MAX_MESSAGE_BYTES;
use fleetadm_proto::{admin_server::AdminServer, agent_server::AgentServer, enrollment_server::EnrollmentServer};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::admin::{self, AdminService};
use crate::dispatch::AgentService;
use crate::enroll::EnrollmentService;
use crate::pki::FleetCa;
use crate::state::{Controller, Settings};
use crate::store::{SledStore, Store};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: Vec<String>,
    pub node_cert_validity: Duration,
    pub heartbeat_interval: Duration,
    pub server_cert_validity: Duration,
    pub limits: crate::listen::Limits,
    /// Where to serve Prometheus metrics (none: off).
    pub metrics_listen: Option<SocketAddr>,
}

/// Names the serving certificate covers: advertised names, the listen address if specific,
/// loopback, and this host's name.
pub fn server_names(opts: &ServeOptions) -> Vec<String> {
    let mut names: Vec<String> = opts.advertise.clone();
    if !opts.listen.ip().is_unspecified() {
        names.push(opts.listen.ip().to_string());
    }
    names.extend(["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()]);
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str() {
            if !h.is_empty() {
                names.push(h.to_string());
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn enroll_endpoint(opts: &ServeOptions) -> String {
    let port = opts.listen.port();
    let host = opts.advertise.first().cloned().unwrap_or_else(|| {
        if opts.listen.ip().is_unspecified() {
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
        } else {
            opts.listen.ip().to_string()
        }
    });
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// TLS for the agent port: the serving certificate comes from `serving` at every handshake;
/// client certificates are optional (enrollment has none yet) but, when sent, must chain to the
/// fleet CA. Which calls need one is decided per service (see `dispatch::auth`).
fn agent_tls_config(
    ctl: &Controller,
    serving: Arc<crate::listen::ServingCert>,
) -> Result<Arc<rustls::ServerConfig>, crate::listen::ListenError> {
    use crate::listen::ListenError;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ctl.ca.cert_der().to_vec())).map_err(ListenError::Tls)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(ListenError::Verifier)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ListenError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for a in &opts.advertise {
        if a.is_empty() || a.contains(char::is_whitespace) || a.contains('/') {
            bail!("--advertise-address {a:?} is not a host name or IP address");
        }
    }
    ensure_dir(&opts.data_dir, 0o700).with_context(|| format!("cannot create data dir {}", opts.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&opts.data_dir.join("state")).with_context(|| {
        format!(
            "cannot open the state store in {} (is another controller using this data dir?)",
            opts.data_dir.display()
        )
    })?);
    let ca = FleetCa::load_or_create(&opts.data_dir).context("fleet CA")?;
    let names = server_names(&opts);
    let server_cert = ca.server_cert(&names, opts.server_cert_validity).context("controller serving certificate")?;
    let settings = Settings {
        node_cert_validity: opts.node_cert_validity,
        heartbeat_interval: opts.heartbeat_interval,
        enroll_endpoint: enroll_endpoint(&opts),
        data_dir: opts.data_dir.clone(),
    };
    let pin = ca.pin().to_string();
    let ctl = Controller::new(store, ca, settings);

    let serving = Arc::new(crate::listen::ServingCert::new(server_cert).context("controller serving certificate")?);
    let tls = agent_tls_config(&ctl, serving.clone()).context("TLS configuration")?;
    tokio::spawn(crate::listen::keep_fresh(ctl.clone(), serving, names, opts.server_cert_validity));

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let local = listener.local_addr()?;

    let sock = admin::socket_path(&opts.data_dir);
    let _ = std::fs::remove_file(&sock);
    let uds = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot bind admin socket {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let sock_ino = std::fs::metadata(&sock).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sessions = ctl.sessions.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        // Agents hold long-lived streams; end them so the servers can drain (agents reconnect
        // with backoff to the next controller).
        sessions.terminate_all("controller shutting down");
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    if let Some(addr) = opts.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(listen = %addr, "metrics on GET /metrics");
        tokio::spawn(crate::metrics::serve(l, ctl.clone()));
    }
    let listen_stats = Arc::new(crate::listen::ListenStats::default());
    let incoming = crate::listen::incoming(listener, tls, opts.limits.clone(), listen_stats, ctl.relays.clone());
    let agent_api = Server::builder()
        // Per connection: streams, header size; the listener bounds connections and handshakes.
        .max_concurrent_streams(Some(64))
        .http2_max_header_list_size(Some(16 * 1024))
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .concurrency_limit_per_connection(32)
        .layer(crate::metrics::CountErrors)
        .add_service(
            // Served without a client certificate: bodies are small (a token and a CSR).
            EnrollmentServer::new(EnrollmentService::new(ctl.clone()))
                .max_decoding_message_size(fleetadm_proto::MAX_ENROLL_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentServer::new(AgentService::with_session_rate(
                ctl.clone(),
                ctl.rollouts.clone(),
                opts.limits.session_rate,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            // Every Agent call is authenticated here, before its body is decoded.
            crate::dispatch::auth::layer(ctl.nodes.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, wait(stop_rx.clone()));

    // Server reflection on the admin socket, so grpcurl or a client in another language can
    // discover the typed Admin API (both the v1 and the older v1alpha reflection protocols).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fleetadm_proto::FILE_DESCRIPTOR_SET)
    };
    let admin_api = Server::builder()
        .add_service(AdminServer::new(AdminService::new(ctl.clone())))
        .add_service(reflection().build_v1().context("gRPC reflection")?)
        .add_service(reflection().build_v1alpha().context("gRPC reflection")?)
        .serve_with_incoming_shutdown(UnixListenerStream::new(uds), wait(stop_rx.clone()));

    match ctl.rollouts.resume_all() {
        Ok(0) => {}
        Ok(n) => tracing::info!(clusters = n, "resumed unfinished rollouts"),
        Err(e) => tracing::error!(error = %e, "cannot resume unfinished rollouts"),
    }
    // Scheduled etcd backups (`cluster set NAME --backup-every D --keep N`).
    let round = std::env::var("FLEETADM_BACKUP_ROUND_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    tokio::spawn(crate::ops::backup::schedule(
        ctl.backups.clone(),
        ctl.rollouts.clone(),
        ctl.rollouts.execs().clone(),
        round,
    ));
    tracing::info!(listen = %local, ca_hash = %pin, admin = %sock.display(), endpoint = %ctl.settings.enroll_endpoint, "controller ready");
    println!("controller listening on {local} (ca hash {pin}); admin socket {}", sock.display());
    fleetadm_common::notify_ready();

    let servers = async { tokio::join!(agent_api, admin_api) };
    tokio::pin!(servers);
    let mut stopping = stop_rx.clone();
    let (a, b) = tokio::select! {
        r = &mut servers => r,
        _ = async {
            let _ = stopping.wait_for(|v| *v).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        } => {
            tracing::warn!("connections did not drain within 10s; stopping anyway");
            (Ok(()), Ok(()))
        }
    };
    // Only remove the socket if it is still ours (a newer daemon may have replaced it).
    if std::fs::metadata(&sock).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok() == sock_ino {
        let _ = std::fs::remove_file(&sock);
    }
    a.context("agent API server")?;
    b.context("admin API server")?;
    ctl.store_flush();
    tracing::info!("controller stopped");
    Ok(())
}
