//! Running operations an operator can steer: `controller op list`, `op pause|resume|abort ID`.
//! Each operation has a gate its workers pass before starting the next host: open, paused (with
//! why, e.g. "the canary passed"), or aborted (for good). Hosts already running finish.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open,
    Paused(String),
    Aborted,
}

impl Gate {
    pub fn name(&self) -> &'static str {
        match self {
            Gate::Open => "running",
            Gate::Paused(_) => "paused",
            Gate::Aborted => "aborting",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OpError {
    #[error("no running operation {0:?} (see `controller op list`)")]
    Unknown(String),
    #[error("operation {0} was aborted; it cannot be resumed")]
    Aborted(String),
    #[error("unknown action {0:?}: expected pause, resume or abort")]
    Action(String),
}

/// One running operation.
#[derive(Debug)]
pub struct OpControl {
    pub id: String,
    pub kind: &'static str,
    pub description: String,
    pub started_ms: u64,
    pub hosts: usize,
    pub done: AtomicUsize,
    pub failed: AtomicUsize,
    gate: watch::Sender<Gate>,
    /// Each host's state, error and output's tail, for `op status` and `op logs`.
    hosts_log: Mutex<BTreeMap<String, HostLog>>,
    /// When it ended (0: running).
    pub finished_ms: AtomicU64,
}

/// What an operation keeps of one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLog {
    pub state: String,
    pub error: String,
    pub output: String,
}

/// The output kept per host: its last this many bytes.
pub const OUTPUT_TAIL: usize = 16 * 1024;

/// How many finished operations are kept for `op status` / `op logs`.
const KEEP_FINISHED: usize = 100;

/// The last `max` bytes of `s` (cut at a character boundary).
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

impl OpControl {
    pub fn gate(&self) -> Gate {
        self.gate.borrow().clone()
    }

    /// Record a host's event: `Some(state)` when its state changes, output appended (its tail
    /// kept), `error` when it failed.
    pub fn host_event(&self, host: &str, state: Option<&str>, output: &str, error: &str) {
        let Ok(mut m) = self.hosts_log.lock() else { return };
        let h = m.entry(host.to_string()).or_insert_with(|| HostLog { state: "running".into(), ..Default::default() });
        if let Some(s) = state {
            h.state = s.to_string();
        }
        if !output.is_empty() {
            h.output.push_str(output);
            if h.output.len() > OUTPUT_TAIL {
                h.output = tail(&h.output, OUTPUT_TAIL).to_string();
            }
        }
        if !error.is_empty() {
            h.error = error.to_string();
        }
    }

    /// Every host's record so far, by name.
    pub fn hosts_log(&self) -> Vec<(String, HostLog)> {
        self.hosts_log.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// running, paused, aborting; once ended: succeeded, failed (some host failed) or aborted.
    pub fn state(&self) -> &'static str {
        if self.finished_ms.load(Ordering::Relaxed) == 0 {
            return self.gate().name();
        }
        match self.gate() {
            Gate::Aborted => "aborted",
            _ if self.failed.load(Ordering::Relaxed) > 0 => "failed",
            _ => "succeeded",
        }
    }

    pub fn pause(&self, why: &str) -> Result<(), OpError> {
        self.set(|g| match g {
            Gate::Aborted => None,
            _ => Some(Gate::Paused(why.to_string())),
        })
    }

    pub fn resume(&self) -> Result<(), OpError> {
        self.set(|g| match g {
            Gate::Aborted => None,
            _ => Some(Gate::Open),
        })
    }

    pub fn abort(&self) {
        self.gate.send_replace(Gate::Aborted);
    }

    fn set(&self, f: impl Fn(&Gate) -> Option<Gate>) -> Result<(), OpError> {
        let mut refused = false;
        self.gate.send_if_modified(|g| match f(g) {
            Some(n) => {
                *g = n;
                true
            }
            None => {
                refused = true;
                false
            }
        });
        if refused {
            Err(OpError::Aborted(self.id.clone()))
        } else {
            Ok(())
        }
    }

    /// Wait until the gate is open: `true`, or `false` once aborted.
    pub async fn wait_open(&self) -> bool {
        let mut rx = self.gate.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Gate::Open => return true,
                Gate::Aborted => return false,
                Gate::Paused(_) => {}
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Wait for a resume or an abort, at most `limit` (then the gate is opened): `false` if
    /// aborted.
    pub async fn wait_promoted(&self, limit: Option<std::time::Duration>) -> bool {
        match limit {
            None => self.wait_open().await,
            Some(d) => match tokio::time::timeout(d, self.wait_open()).await {
                Ok(open) => open,
                Err(_) => self.resume().is_ok(),
            },
        }
    }
}

/// The running operations, by id.
#[derive(Debug, Default)]
pub struct Ops {
    running: Mutex<BTreeMap<String, Arc<OpControl>>>,
    /// The newest finished ones, oldest first.
    finished: Mutex<VecDeque<Arc<OpControl>>>,
}

impl Ops {
    pub fn start(self: &Arc<Self>, id: &str, kind: &'static str, description: String, hosts: usize) -> Running {
        let op = Arc::new(OpControl {
            id: id.to_string(),
            kind,
            description,
            started_ms: fleetadm_common::clock::now_unix_ms(),
            hosts,
            done: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            gate: watch::channel(Gate::Open).0,
            hosts_log: Mutex::default(),
            finished_ms: AtomicU64::new(0),
        });
        if let Ok(mut m) = self.running.lock() {
            m.insert(id.to_string(), op.clone());
        }
        Running { ops: self.clone(), op }
    }

    pub fn list(&self) -> Vec<Arc<OpControl>> {
        self.running.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// A running operation, or one of the newest finished ones.
    pub fn get(&self, id: &str) -> Option<Arc<OpControl>> {
        if let Some(op) = self.running.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Some(op);
        }
        self.finished.lock().ok().and_then(|f| f.iter().rev().find(|o| o.id == id).cloned())
    }

    pub fn control(&self, id: &str, action: &str) -> Result<Arc<OpControl>, OpError> {
        let op =
            self.running.lock().ok().and_then(|m| m.get(id).cloned()).ok_or_else(|| OpError::Unknown(id.into()))?;
        match action {
            "pause" => op.pause("paused by the operator")?,
            "resume" => op.resume()?,
            "abort" => op.abort(),
            other => return Err(OpError::Action(other.into())),
        }
        Ok(op)
    }
}

/// An operation's registration; dropped when it ends.
pub struct Running {
    ops: Arc<Ops>,
    pub op: Arc<OpControl>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.op.finished_ms.store(fleetadm_common::clock::now_unix_ms().max(1), Ordering::Relaxed);
        if let Ok(mut f) = self.ops.finished.lock() {
            f.push_back(self.op.clone());
            while f.len() > KEEP_FINISHED {
                f.pop_front();
            }
        }
        if let Ok(mut m) = self.ops.running.lock() {
            m.remove(&self.op.id);
        }
    }
}

impl Running {
    pub fn finished_host(&self, ok: bool) {
        self.op.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.op.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hosts_are_recorded_with_their_output_tail_and_finished_ops_are_kept() {
        let ops = Arc::new(Ops::default());
        let r = ops.start("e1", "exec", "uptime".into(), 2);
        r.op.host_event("h1", None, "line 1\n", "");
        r.op.host_event("h1", Some("succeeded"), "", "");
        r.op.host_event("h2", None, &"é".repeat(OUTPUT_TAIL), "");
        r.op.host_event("h2", Some("failed"), "last\n", "exit status 3");
        let log = r.op.hosts_log();
        assert_eq!(
            log[0],
            ("h1".into(), HostLog { state: "succeeded".into(), error: "".into(), output: "line 1\n".into() })
        );
        assert_eq!((log[1].1.state.as_str(), log[1].1.error.as_str()), ("failed", "exit status 3"));
        let out = &log[1].1.output;
        assert!(out.len() <= OUTPUT_TAIL && out.len() > OUTPUT_TAIL - 4 && out.ends_with("élast\n"), "{}", out.len());
        assert_eq!(r.op.state(), "running");
        r.finished_host(true);
        r.finished_host(false);
        drop(r);
        let done = ops.get("e1").expect("kept after it ended");
        assert_eq!(done.state(), "failed");
        assert!(ops.list().is_empty(), "not running any more");
        for i in 0..KEEP_FINISHED + 5 {
            drop(ops.start(&format!("x{i}"), "exec", "true".into(), 0));
        }
        assert!(ops.get("e1").is_none(), "only the newest are kept");
        assert_eq!(ops.get(&format!("x{}", KEEP_FINISHED + 4)).unwrap().state(), "succeeded");
        assert!(ops.get("nosuch").is_none());
    }

    #[tokio::test]
    async fn the_gate_pauses_resumes_and_aborts_for_good() {
        let ops = Arc::new(Ops::default());
        let r = ops.start("x", "exec", "true".into(), 3);
        assert!(r.op.wait_open().await);
        ops.control("x", "pause").unwrap();
        assert_eq!(r.op.gate().name(), "paused");
        let waiter = {
            let op = r.op.clone();
            tokio::spawn(async move { op.wait_open().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "paused: nobody passes");
        ops.control("x", "resume").unwrap();
        assert!(waiter.await.unwrap());
        // Timed promotion opens the gate by itself.
        r.op.pause("canary").unwrap();
        assert!(r.op.wait_promoted(Some(Duration::from_millis(20))).await);
        assert_eq!(r.op.gate(), Gate::Open);
        ops.control("x", "abort").unwrap();
        assert!(!r.op.wait_open().await);
        assert_eq!(ops.control("x", "resume").unwrap_err(), OpError::Aborted("x".into()));
        assert_eq!(ops.control("x", "jump").unwrap_err(), OpError::Action("jump".into()));
        assert_eq!(ops.control("nope", "abort").unwrap_err(), OpError::Unknown("nope".into()));
        drop(r);
        assert!(ops.list().is_empty(), "an ended operation leaves the list");
    }
}
