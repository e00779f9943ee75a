//! The one way the agent runs an external command (kubeadm, kubectl, ctr, hooks, swapoff,
//! systemctl, modprobe): in its own process group, with a timeout and a cancel signal that kill
//! the whole group, stdin closed, stdout and stderr captured together and bounded (the tail is
//! kept: the end of a failing command says most). A run returns only once the process has really
//! ended (reaped, and its output pipes closed by everything in its group), so a caller that
//! retries never overlaps the previous run.
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// Output kept per command.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// How long to wait for the output pipes to close after the process exited (a daemon it started
/// outside its process group may hold them).
const PIPE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("{program} not found in PATH ({path}); install it on this host (or use a bundle)")]
    NotFound { program: String, path: String },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {secs}s; its process group was killed")]
    Timeout { program: String, secs: u64 },
    #[error("{program} was stopped: its task was cancelled (timed out or the agent is stopping)")]
    Cancelled { program: String },
    #[error("{program} failed (exit {code}):\n{output}")]
    Failed { program: String, code: String, output: String },
}

/// A command to run.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    /// When set, the environment is exactly this (hooks run with a clean environment).
    pub env: Option<Vec<(String, String)>>,
    pub cwd: Option<PathBuf>,
    pub timeout: Duration,
}

impl Cmd {
    pub fn new(program: &str, args: &[&str], timeout: Duration) -> Self {
        Self {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: None,
            cwd: None,
            timeout,
        }
    }

    pub fn clean_env(mut self, env: &[(&str, String)]) -> Self {
        self.env = Some(env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
}

/// Exit status and combined stdout+stderr (bounded).
#[derive(Debug)]
pub struct Ran {
    pub success: bool,
    pub code: Option<i32>,
    pub output: String,
}

impl Ran {
    /// `Ok(output)` on exit 0, else a [`CommandError::Failed`] carrying the output.
    pub fn ok(self, program: &str) -> Result<String, CommandError> {
        if self.success {
            Ok(self.output)
        } else {
            Err(CommandError::Failed {
                program: program.to_string(),
                code: self.code.map(|c| c.to_string()).unwrap_or_else(|| "by signal".into()),
                output: self.output,
            })
        }
    }
}

/// A cancel signal shared by everything one task runs. Cloned freely; [`Cancel::none`] never fires.
#[derive(Debug, Clone)]
pub struct Cancel(watch::Receiver<bool>);

/// Fires a [`Cancel`].
#[derive(Debug)]
pub struct CancelHandle(watch::Sender<bool>);

impl Cancel {
    pub fn new() -> (CancelHandle, Cancel) {
        let (tx, rx) = watch::channel(false);
        (CancelHandle(tx), Cancel(rx))
    }

    pub fn none() -> Cancel {
        // The sender is dropped: `wait_for` returns an error, which `fired` treats as "never".
        Cancel(watch::channel(false).1)
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when cancelled; pending forever when it cannot be cancelled any more.
    pub async fn fired(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl CancelHandle {
    pub fn cancel(&self) {
        let _ = self.0.send(true);
    }
}

/// Find `program` in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The tail of a stream of bytes.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
    dropped: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > MAX_OUTPUT {
            let cut = self.buf.len() - MAX_OUTPUT;
            self.buf.drain(..cut);
            self.dropped += cut;
        }
    }

    fn text(&self) -> String {
        let body = String::from_utf8_lossy(&self.buf);
        if self.dropped > 0 {
            format!("[... {} bytes cut ...]\n{body}", self.dropped)
        } else {
            body.into_owned()
        }
    }
}

/// Where a command's output goes as it comes, besides the kept tail.
pub type OutputSink = tokio::sync::mpsc::UnboundedSender<Vec<u8>>;

fn reader(
    mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    tail: Arc<Mutex<Tail>>,
    sink: Option<OutputSink>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = vec![0u8; 8192];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Ok(mut t) = tail.lock() {
                        t.push(&chunk[..n]);
                    }
                    if let Some(s) = &sink {
                        let _ = s.send(chunk[..n].to_vec());
                    }
                }
            }
        }
    })
}

fn kill_group(pgid: u32) {
    // The child is the leader of its own group (process_group(0)): kill it and its children.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// Run `cmd` to its end.
pub async fn run(cmd: &Cmd, cancel: &Cancel) -> Result<Ran, CommandError> {
    run_streaming(cmd, cancel, None).await
}

/// [`run`], also sending the output to `sink` as it comes.
pub async fn run_streaming(cmd: &Cmd, cancel: &Cancel, sink: Option<OutputSink>) -> Result<Ran, CommandError> {
    let program = cmd.program.clone();
    let path = which(&program).ok_or_else(|| CommandError::NotFound {
        program: program.clone(),
        path: std::env::var("PATH").unwrap_or_default(),
    })?;
    if cancel.is_cancelled() {
        return Err(CommandError::Cancelled { program });
    }
    let mut c = tokio::process::Command::new(&path);
    c.args(&cmd.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    if let Some(env) = &cmd.env {
        c.env_clear().envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    if let Some(d) = &cmd.cwd {
        c.current_dir(d);
    }
    let mut child = c.spawn().map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
    let pgid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(Tail::default()));
    let readers: Vec<_> = [
        child.stdout.take().map(|o| reader(o, tail.clone(), sink.clone())),
        child.stderr.take().map(|e| reader(e, tail.clone(), sink.clone())),
    ]
    .into_iter()
    .flatten()
    .collect();
    drop(sink);
    let mut stopped = None;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = tokio::time::sleep(cmd.timeout) => {
            stopped = Some(CommandError::Timeout { program: program.clone(), secs: cmd.timeout.as_secs() });
            kill_group(pgid);
            child.wait().await
        }
        _ = cancel.fired() => {
            stopped = Some(CommandError::Cancelled { program: program.clone() });
            kill_group(pgid);
            child.wait().await
        }
    };
    if stopped.is_some() {
        // Whatever the leader left behind in its group goes too.
        kill_group(pgid);
    }
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(PIPE_GRACE, r).await.is_err() {
            tracing::warn!(program = %program, "output pipe still open after exit (a process left its group?)");
            abort.abort();
        }
    }
    let status = status.map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
    if let Some(e) = stopped {
        return Err(e);
    }
    let output = tail.lock().map(|t| t.text()).unwrap_or_default();
    Ok(Ran { success: status.success(), code: status.code(), output })
}

/// [`run`] from blocking code (a `spawn_blocking` thread inside the agent's runtime).
pub fn run_blocking(cmd: &Cmd, cancel: &Cancel) -> Result<Ran, CommandError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(run(cmd, cancel)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CommandError::Spawn { program: cmd.program.clone(), source })?
            .block_on(run(cmd, cancel)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Cmd {
        Cmd::new("sh", &["-c", script], timeout)
    }

    #[tokio::test]
    async fn runs_captures_and_reports_failure() {
        let r = run(&sh("echo out; echo err >&2; exit 3", Duration::from_secs(5)), &Cancel::none()).await.unwrap();
        assert!(!r.success);
        assert_eq!(r.code, Some(3));
        assert!(r.output.contains("out") && r.output.contains("err"));
        assert!(matches!(r.ok("sh"), Err(CommandError::Failed { code, .. }) if code == "3"));
        assert!(matches!(
            run(&Cmd::new("no-such-program-fleetadm", &[], Duration::from_secs(1)), &Cancel::none()).await,
            Err(CommandError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn output_is_bounded_to_its_tail() {
        let r =
            run(&sh("head -c 200000 /dev/zero | tr '\\0' x; echo THE-END", Duration::from_secs(10)), &Cancel::none())
                .await
                .unwrap();
        assert!(r.output.len() < MAX_OUTPUT + 64, "{}", r.output.len());
        assert!(r.output.starts_with("[... ") && r.output.trim_end().ends_with("THE-END"));
    }

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // The command starts a grandchild that would outlive it, then hangs.
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let t0 = std::time::Instant::now();
        let r = run(&sh(&script, Duration::from_millis(300)), &Cancel::none()).await;
        assert!(matches!(r, Err(CommandError::Timeout { .. })), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // killpg has been delivered; give the kernel a moment to finish the grandchild.
        for _ in 0..50 {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn cancel_stops_a_running_command() {
        let (handle, cancel) = Cancel::new();
        let task = tokio::spawn(async move { run(&sh("sleep 300", Duration::from_secs(600)), &cancel).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        handle.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert!(matches!(r, Err(CommandError::Cancelled { .. })), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_callers_use_the_same_runner() {
        let r = tokio::task::spawn_blocking(|| {
            run_blocking(
                &sh("echo $FOO; pwd", Duration::from_secs(5)).clean_env(&[("FOO", "bar".into())]).cwd("/"),
                &Cancel::none(),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r.output, "bar\n/\n");
    }
}
