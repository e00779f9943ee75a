//! Prometheus metrics, in the text exposition format, on an address the operator chooses
//! (`serve --metrics-listen ADDR`, off by default): connected agents, enrollments, task outcomes
//! by kind and state, running tasks, rollout durations, agent-port RPC errors by gRPC code, blob
//! bytes sent. Counters live in one process-wide registry that the code paths bump; gauges are
//! read from the controller when scraped.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use crate::state::Controller;

#[derive(Default)]
pub struct Metrics {
    enrollments: Mutex<BTreeMap<&'static str, u64>>,
    task_outcomes: Mutex<BTreeMap<(String, String), u64>>,
    rpc_errors: Mutex<BTreeMap<String, u64>>,
    rollout_seconds: Mutex<BTreeMap<(String, String), f64>>,
    blob_bytes: AtomicU64,
    peer_redirects: AtomicU64,
    relayed: Mutex<BTreeMap<&'static str, u64>>,
    sessions_shed: AtomicU64,
}

/// The process-wide registry.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K, by: u64) {
    if let Ok(mut g) = m.lock() {
        *g.entry(k).or_default() += by;
    }
}

impl Metrics {
    /// An enrollment answered: `ok`, `refused` or `rate_limited`.
    pub fn enrollment(&self, result: &'static str) {
        bump(&self.enrollments, result, 1);
    }

    /// A task reached an outcome (`succeeded`, `failed`).
    pub fn task_outcome(&self, kind: &str, state: &str) {
        bump(&self.task_outcomes, (kind.to_string(), state.to_string()), 1);
    }

    /// An agent-port call ended with this gRPC status code (not OK).
    pub fn rpc_error(&self, code: &str) {
        bump(&self.rpc_errors, code.to_string(), 1);
    }

    /// A relayed connection: `vouched` or `refused`.
    pub fn relayed(&self, result: &'static str) {
        bump(&self.relayed, result, 1);
    }

    /// A session open refused because the controller was busy (the agent was told when to retry).
    pub fn session_shed(&self) {
        self.sessions_shed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn blob_bytes(&self, n: u64) {
        self.blob_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// A blob request answered with a peer to fetch from instead of data.
    pub fn peer_redirect(&self) {
        self.peer_redirects.fetch_add(1, Ordering::Relaxed);
    }

    /// How long a cluster's last rollout took, by how it ended.
    pub fn rollout_finished(&self, cluster: &str, state: &str, seconds: f64) {
        if let Ok(mut g) = self.rollout_seconds.lock() {
            g.insert((cluster.to_string(), state.to_string()), seconds);
        }
    }
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Everything, as one scrape's text. Blocking (reads the store for the gauges).
pub fn render(ctl: &Controller) -> String {
    let m = metrics();
    let mut out = String::new();
    family(&mut out, "fleetadm_agents_connected", "gauge", "Agents with an open session.");
    let _ = writeln!(out, "fleetadm_agents_connected {}", ctl.sessions.count());
    if let Ok(nodes) = ctl.nodes.list() {
        family(&mut out, "fleetadm_nodes", "gauge", "Enrolled nodes, by whether they are revoked.");
        let revoked = nodes.iter().filter(|n| n.revoked).count();
        let _ = writeln!(out, "fleetadm_nodes{{revoked=\"false\"}} {}", nodes.len() - revoked);
        let _ = writeln!(out, "fleetadm_nodes{{revoked=\"true\"}} {revoked}");
        family(
            &mut out,
            "fleetadm_node_certs_expiring",
            "gauge",
            "Kubernetes certificates on a node that expire within 30 days, as its agent last reported (nodes with none are left out).",
        );
        for n in &nodes {
            let k = ctl.nodes.facts(&n.name).ok().flatten().map(|f| f.expiring_certs.len()).unwrap_or(0);
            if k > 0 {
                let _ = writeln!(out, "fleetadm_node_certs_expiring{{node=\"{}\"}} {k}", label(&n.name));
            }
        }
    }
    family(&mut out, "fleetadm_enrollments_total", "counter", "Enrollment requests answered, by result.");
    for (k, v) in m.enrollments.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ = writeln!(out, "fleetadm_enrollments_total{{result=\"{k}\"}} {v}");
    }
    family(&mut out, "fleetadm_task_outcomes_total", "counter", "Task outcomes, by task kind and state.");
    for ((kind, state), v) in m.task_outcomes.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ =
            writeln!(out, "fleetadm_task_outcomes_total{{kind=\"{}\",state=\"{}\"}} {v}", label(&kind), label(&state));
    }
    if let Ok(clusters) = ctl.rollouts.list() {
        let mut tasks: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        for c in &clusters {
            *states.entry(c.state.to_string()).or_default() += 1;
            if c.state == crate::rollout::record::ClusterState::Running {
                for t in ctl.rollouts.tasks(&c.name).unwrap_or_default() {
                    *tasks.entry((t.kind.as_str().to_string(), t.state.to_string())).or_default() += 1;
                }
            }
        }
        family(&mut out, "fleetadm_clusters", "gauge", "Clusters, by state.");
        for (s, v) in states {
            let _ = writeln!(out, "fleetadm_clusters{{state=\"{s}\"}} {v}");
        }
        family(&mut out, "fleetadm_rollout_tasks", "gauge", "Tasks of running rollouts, by step and state.");
        for ((kind, state), v) in tasks {
            let _ = writeln!(out, "fleetadm_rollout_tasks{{step=\"{kind}\",state=\"{state}\"}} {v}");
        }
    }
    family(&mut out, "fleetadm_rollout_duration_seconds", "gauge", "How long each cluster's last rollout took.");
    for ((cluster, state), v) in m.rollout_seconds.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ = writeln!(
            out,
            "fleetadm_rollout_duration_seconds{{cluster=\"{}\",state=\"{}\"}} {v:.3}",
            label(&cluster),
            label(&state)
        );
    }
    family(
        &mut out,
        "fleetadm_agent_rpc_errors_total",
        "counter",
        "Agent-port calls that ended in an error, by gRPC code.",
    );
    for (code, v) in m.rpc_errors.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ = writeln!(out, "fleetadm_agent_rpc_errors_total{{code=\"{}\"}} {v}", label(&code));
    }
    family(&mut out, "fleetadm_blob_bytes_sent_total", "counter", "Bundle blob bytes sent to agents.");
    let _ = writeln!(out, "fleetadm_blob_bytes_sent_total {}", m.blob_bytes.load(Ordering::Relaxed));
    family(
        &mut out,
        "fleetadm_blob_peer_redirects_total",
        "counter",
        "Blob requests answered with a peer that holds the blob (peer-to-peer distribution).",
    );
    let _ = writeln!(out, "fleetadm_blob_peer_redirects_total {}", m.peer_redirects.load(Ordering::Relaxed));
    family(
        &mut out,
        "fleetadm_relayed_connections_total",
        "counter",
        "Connections through relays, by whether a registered relay vouched for them.",
    );
    for (k, v) in m.relayed.lock().map(|g| g.clone()).unwrap_or_default() {
        let _ = writeln!(out, "fleetadm_relayed_connections_total{{result=\"{k}\"}} {v}");
    }
    family(
        &mut out,
        "fleetadm_sessions_shed_total",
        "counter",
        "Session opens refused while busy, each told when to retry (RESOURCE_EXHAUSTED).",
    );
    let _ = writeln!(out, "fleetadm_sessions_shed_total {}", m.sessions_shed.load(Ordering::Relaxed));
    out
}

/// Serve `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, ctl: Arc<Controller>) {
    serve_text(listener, Arc::new(move || render(&ctl))).await
}

/// Serve `GET /metrics` on `listener` with the text `render` makes (called on a blocking thread).
pub async fn serve_text(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    use hyper::service::service_fn;
    // A few scrapes at once; each may read the store. More wait instead of piling up threads.
    let renders = Arc::new(tokio::sync::Semaphore::new(4));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors or similar: do not spin; the agent port matters more.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        let (render, renders) = (render.clone(), renders.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (render, renders) = (render.clone(), renders.clone());
                async move {
                    let (code, body) = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                        let _slot = renders.acquire_owned().await;
                        match tokio::task::spawn_blocking(move || render()).await {
                            Ok(text) => (200, text),
                            Err(e) => (500, format!("metrics: {e}\n")),
                        }
                    } else {
                        (404, "only GET /metrics here\n".to_string())
                    };
                    hyper::Response::builder()
                        .status(code)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

/// A tower layer for the agent port that counts calls ending in a gRPC error (status in the
/// response headers: how tonic answers a failed unary call).
#[derive(Clone, Default)]
pub struct CountErrors;

impl<S> tower::Layer<S> for CountErrors {
    type Service = CountErrorsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountErrorsService { inner }
    }
}

#[derive(Clone)]
pub struct CountErrorsService<S> {
    inner: S,
}

impl<S, Req, B> tower::Service<Req> for CountErrorsService<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(code) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
                if code != "0" {
                    let name = code
                        .parse::<i32>()
                        .map(|c| format!("{:?}", tonic::Code::from(c)))
                        .unwrap_or_else(|_| code.to_string());
                    metrics().rpc_error(&name);
                }
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
