//! `agent-upgrade` (`controller agent upgrade`): the agent installs its own package from a bundle
//! and comes back running it.
//!
//! The old agent fetches the package (hash-verified like every blob), checks it is a node-agent
//! package newer than (or other than) the installed one, writes a marker (fsync'd) and starts the
//! install in a transient systemd unit, so the package's scripts may restart this service without
//! killing the installer. The new agent finds the marker at start, waits for the install unit to
//! end, and reports the outcome of the same task: the version now installed, and whether the
//! running binary is the installed one. If the old agent is still alive when the install ended,
//! the install failed (or did not restart the service): it reports that itself, with the
//! installer's output.
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetadm_common::tasks::BundleFile;
use serde::{Deserialize, Serialize};

use super::command::{self, Cancel, Cmd, CommandError};

/// The package name the bundle must carry (and the one that owns the running binary).
pub const PACKAGE: &str = "node-agent";
/// The marker a started self-upgrade leaves for the agent that comes after it.
pub const MARKER: &str = "agent-upgrade.json";
/// The installer's output (the transient unit's stdout and stderr).
pub const LOG: &str = "agent-upgrade.log";
/// How long the old agent waits for the package's scripts to restart it after the install ended.
pub const RESTART_GRACE: Duration = Duration::from_secs(20);

/// The package manager that installed this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Dpkg,
    Rpm,
}

impl Manager {
    /// The file suffix of its packages.
    pub fn suffix(self) -> &'static str {
        match self {
            Manager::Dpkg => ".deb",
            Manager::Rpm => ".rpm",
        }
    }

    /// The command that installs package file `path` over the installed version.
    pub fn install_argv(self, path: &Path) -> Vec<String> {
        let p = path.display().to_string();
        match self {
            // --force-confold: a locally changed config.toml is kept without a question.
            Manager::Dpkg => vec!["dpkg".into(), "--force-confold".into(), "-i".into(), p],
            // --oldpackage: going back to an older build is an operator's choice too.
            Manager::Rpm => vec!["rpm".into(), "-U".into(), "--oldpackage".into(), "--replacepkgs".into(), p],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentUpgradeError {
    #[error(
        "node-agent at {exe} is not installed from a package (neither dpkg nor rpm knows it); upgrade it the way it was installed"
    )]
    NotPackaged { exe: String },
    #[error("the bundle carries no {PACKAGE} {suffix} package for this host ({manager:?} installed the agent); bundle packages: {have}")]
    NoPackage { suffix: &'static str, manager: Manager, have: String },
    #[error("{path} is the package {name:?}, not {PACKAGE}")]
    WrongPackage { path: String, name: String },
    #[error("reading the package {path}")]
    Inspect {
        path: String,
        #[source]
        source: CommandError,
    },
    #[error("starting the install of {PACKAGE} {version} in a transient unit")]
    Start {
        version: String,
        #[source]
        source: CommandError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the install of {PACKAGE} {to} failed (installed now: {installed}); the installer said:\n{log}")]
    InstallFailed { to: String, installed: String, log: String },
    #[error(
        "{PACKAGE} {to} is installed but the service was not restarted within {}s; restart node-agent on this host",
        RESTART_GRACE.as_secs()
    )]
    NotRestarted { to: String },
    #[error("stopped while the install ran in {unit}; the agent that starts next reports its outcome")]
    Stopped { unit: String },
}

/// What a self-upgrade in flight left behind for the next agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub task_id: String,
    pub attempt: u32,
    pub digest: String,
    pub from: String,
    pub to: String,
    pub manager: Manager,
    pub unit: String,
    pub started_ms: u64,
}

impl Marker {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(MARKER)
    }

    pub fn load(state_dir: &Path) -> Option<Marker> {
        let raw = std::fs::read(Self::path(state_dir)).ok()?;
        match serde_json::from_slice(&raw) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable self-upgrade marker; ignoring it");
                let _ = std::fs::remove_file(Self::path(state_dir));
                None
            }
        }
    }

    /// Written and flushed before the install starts: the agent that comes after must find it.
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        fleetadm_common::fsutil::write_private(&Self::path(state_dir), &json)
    }

    pub fn clear(state_dir: &Path) {
        let _ = std::fs::remove_file(Self::path(state_dir));
    }
}

/// The host's package manager and systemd, as the upgrade needs them.
pub trait System: Send + Sync {
    /// Which package manager owns `exe` (None: neither).
    fn manager_of(&self, exe: &Path) -> impl std::future::Future<Output = Option<Manager>> + Send;
    /// (package name, version) of a package file.
    fn inspect(
        &self,
        m: Manager,
        path: &Path,
    ) -> impl std::future::Future<Output = Result<(String, String), CommandError>> + Send;
    /// The installed version of [`PACKAGE`] ("" when not installed).
    fn installed(&self, m: Manager) -> impl std::future::Future<Output = String> + Send;
    /// Start `argv` in transient unit `unit`, its output to `log`; returns once it started.
    fn start_unit(
        &self,
        unit: &str,
        argv: &[String],
        log: &Path,
    ) -> impl std::future::Future<Output = Result<(), CommandError>> + Send;
    /// Whether `unit` is still running.
    fn unit_running(&self, unit: &str) -> impl std::future::Future<Output = bool> + Send;
    /// Whether the running binary was replaced on disk since it started.
    fn running_replaced(&self) -> bool;
}

/// The real host: dpkg/rpm and systemd-run.
pub struct Host;

const Q: Duration = Duration::from_secs(60);

impl System for Host {
    async fn manager_of(&self, exe: &Path) -> Option<Manager> {
        let p = exe.display().to_string();
        for (m, prog, args) in
            [(Manager::Dpkg, "dpkg-query", ["-S", p.as_str()]), (Manager::Rpm, "rpm", ["-qf", p.as_str()])]
        {
            if command::which(prog).is_none() {
                continue;
            }
            let ran = command::run(&Cmd::new(prog, &args, Q), &Cancel::none()).await;
            if let Ok(r) = ran {
                // dpkg-query -S prints "node-agent: /usr/bin/node-agent"; rpm -qf "node-agent-0.1.0-1.x86_64".
                let owner = r.output.lines().next().unwrap_or("").to_string();
                if r.success && (owner.starts_with(&format!("{PACKAGE}:")) || owner.starts_with(&format!("{PACKAGE}-")))
                {
                    return Some(m);
                }
            }
        }
        None
    }

    async fn inspect(&self, m: Manager, path: &Path) -> Result<(String, String), CommandError> {
        let p = path.display().to_string();
        let out = match m {
            Manager::Dpkg => command::run(&Cmd::new("dpkg-deb", &["-f", &p, "Package", "Version"], Q), &Cancel::none())
                .await?
                .ok("dpkg-deb")?,
            Manager::Rpm => command::run(
                &Cmd::new("rpm", &["-qp", "--qf", "Package: %{NAME}\nVersion: %{VERSION}-%{RELEASE}\n", &p], Q),
                &Cancel::none(),
            )
            .await?
            .ok("rpm")?,
        };
        let field =
            |k: &str| out.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string())).unwrap_or_default();
        Ok((field("Package:"), field("Version:")))
    }

    async fn installed(&self, m: Manager) -> String {
        let cmd = match m {
            Manager::Dpkg => Cmd::new("dpkg-query", &["-W", "-f", "${Version}", PACKAGE], Q),
            Manager::Rpm => Cmd::new("rpm", &["-q", "--qf", "%{VERSION}-%{RELEASE}", PACKAGE], Q),
        };
        match command::run(&cmd, &Cancel::none()).await {
            Ok(r) if r.success => r.output.trim().to_string(),
            _ => String::new(),
        }
    }

    async fn start_unit(&self, unit: &str, argv: &[String], log: &Path) -> Result<(), CommandError> {
        let out = format!("StandardOutput=file:{}", log.display());
        let err = format!("StandardError=file:{}", log.display());
        let mut args: Vec<&str> =
            vec!["--unit", unit, "--collect", "--quiet", "--no-block", "--property", &out, "--property", &err, "--"];
        args.extend(argv.iter().map(String::as_str));
        command::run(&Cmd::new("systemd-run", &args, Q), &Cancel::none()).await?.ok("systemd-run").map(|_| ())
    }

    async fn unit_running(&self, unit: &str) -> bool {
        let cmd = Cmd::new("systemctl", &["is-active", &format!("{unit}.service")], Q);
        match command::run(&cmd, &Cancel::none()).await {
            Ok(r) => matches!(r.output.trim(), "active" | "activating" | "reloading" | "deactivating"),
            Err(_) => false,
        }
    }

    fn running_replaced(&self) -> bool {
        std::fs::read_link("/proc/self/exe").map(|p| p.display().to_string().ends_with(" (deleted)")).unwrap_or(false)
    }
}

/// The package for manager `m` among the bundle's files.
pub fn choose(packages: &[BundleFile], m: Manager) -> Result<&BundleFile, AgentUpgradeError> {
    packages.iter().find(|f| f.path.ends_with(m.suffix())).ok_or_else(|| AgentUpgradeError::NoPackage {
        suffix: m.suffix(),
        manager: m,
        have: if packages.is_empty() {
            "none".into()
        } else {
            packages.iter().map(|f| f.path.as_str()).collect::<Vec<_>>().join(", ")
        },
    })
}

/// What the old agent does: prepare, start the install, then wait to be replaced. `Ok` only when
/// nothing needed doing (already installed and running).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    sys: &impl System,
    state_dir: &Path,
    exe: &Path,
    packages: &[BundleFile],
    fetched: impl AsyncFnOnce(&BundleFile) -> Result<PathBuf, super::handler::TaskError>,
    task: (&str, u32, &str),
    progress: &(dyn Fn(String) + Send + Sync),
    cancel: &Cancel,
    grace: Duration,
) -> Result<String, super::handler::TaskError> {
    let m =
        sys.manager_of(exe).await.ok_or_else(|| AgentUpgradeError::NotPackaged { exe: exe.display().to_string() })?;
    let file = choose(packages, m)?;
    let path = fetched(file).await?;
    let (name, to) =
        sys.inspect(m, &path).await.map_err(|source| AgentUpgradeError::Inspect { path: file.path.clone(), source })?;
    if name != PACKAGE {
        return Err(AgentUpgradeError::WrongPackage { path: file.path.clone(), name }.into());
    }
    let from = sys.installed(m).await;
    if from == to && !sys.running_replaced() {
        return Ok(format!("{PACKAGE} {to} is installed and running; nothing to do"));
    }
    let (task_id, attempt, digest) = task;
    let unit = format!("node-agent-upgrade-{}", fleetadm_common::clock::now_unix_ms());
    let marker = Marker {
        task_id: task_id.to_string(),
        attempt,
        digest: digest.to_string(),
        from: from.clone(),
        to: to.clone(),
        manager: m,
        unit: unit.clone(),
        started_ms: fleetadm_common::clock::now_unix_ms(),
    };
    let dir = state_dir.to_path_buf();
    let m2 = marker.clone();
    super::handler::blocking(move || {
        m2.store(&dir).map_err(|source| AgentUpgradeError::Io {
            what: "writing",
            path: Marker::path(&dir).display().to_string(),
            source,
        })
    })
    .await?;
    let log = state_dir.join(LOG);
    progress(format!("installing {PACKAGE} {to} (installed: {}) in {unit}; the agent restarts\n", or_none(&from)));
    tracing::info!(from = %from, to = %to, unit = %unit, "starting the agent's own upgrade");
    if let Err(source) = sys.start_unit(&unit, &m.install_argv(&path), &log).await {
        Marker::clear(state_dir);
        return Err(AgentUpgradeError::Start { version: to, source }.into());
    }
    // Normally this process is stopped (and replaced) while it waits here. Stopped otherwise
    // (the agent stopping, the task's timeout), the marker stays: the next agent concludes.
    let stopped = || AgentUpgradeError::Stopped { unit: unit.clone() };
    while sys.unit_running(&unit).await {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = cancel.fired() => return Err(stopped().into()),
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        _ = cancel.fired() => return Err(stopped().into()),
    }
    // Still here: the install failed, or it did not restart the service.
    Marker::clear(state_dir);
    let installed = sys.installed(m).await;
    if installed == to {
        return Err(AgentUpgradeError::NotRestarted { to }.into());
    }
    Err(AgentUpgradeError::InstallFailed { to, installed: or_none(&installed).to_string(), log: log_tail(&log) }.into())
}

fn or_none(v: &str) -> &str {
    if v.is_empty() {
        "none"
    } else {
        v
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What the new agent reports for the marker's task, once the install unit has ended (waits up
/// to `wait` for it): `Ok(output)` when the version installed is the marker's and this process
/// runs the installed binary.
pub async fn conclude(sys: &impl System, state_dir: &Path, m: &Marker, wait: Duration) -> Result<String, String> {
    let until = tokio::time::Instant::now() + wait;
    while sys.unit_running(&m.unit).await && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let installed = sys.installed(m.manager).await;
    if installed != m.to {
        return Err(format!(
            "after the install, {PACKAGE} {} is installed, expected {}; the installer said:\n{}",
            or_none(&installed),
            m.to,
            log_tail(&state_dir.join(LOG))
        ));
    }
    if sys.running_replaced() {
        return Err(format!("{PACKAGE} {} is installed but this agent runs a replaced binary", m.to));
    }
    Ok(format!(
        "{PACKAGE} upgraded from {} to {}; running it since the restart (pid {})",
        or_none(&m.from),
        m.to,
        std::process::id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A host whose package manager and systemd are in memory.
    struct Fake {
        manager: Option<Manager>,
        package: (String, String),
        installed: Mutex<String>,
        started: Mutex<Vec<(String, Vec<String>)>>,
        /// What the install does to the installed version (None: it fails).
        installs: Option<String>,
        replaced: bool,
    }

    impl Fake {
        fn new(installed: &str, package: &str) -> Self {
            Fake {
                manager: Some(Manager::Dpkg),
                package: (PACKAGE.into(), package.into()),
                installed: Mutex::new(installed.into()),
                started: Mutex::default(),
                installs: Some(package.into()),
                replaced: false,
            }
        }
    }

    impl System for Fake {
        async fn manager_of(&self, _: &Path) -> Option<Manager> {
            self.manager
        }
        async fn inspect(&self, _: Manager, _: &Path) -> Result<(String, String), CommandError> {
            Ok(self.package.clone())
        }
        async fn installed(&self, _: Manager) -> String {
            self.installed.lock().unwrap().clone()
        }
        async fn start_unit(&self, unit: &str, argv: &[String], log: &Path) -> Result<(), CommandError> {
            self.started.lock().unwrap().push((unit.into(), argv.to_vec()));
            match &self.installs {
                Some(v) => *self.installed.lock().unwrap() = v.clone(),
                None => std::fs::write(log, "dpkg: error processing archive: broken\n").unwrap(),
            }
            Ok(())
        }
        async fn unit_running(&self, _: &str) -> bool {
            false
        }
        fn running_replaced(&self) -> bool {
            self.replaced
        }
    }

    fn pkgs() -> Vec<BundleFile> {
        ["packages/node-agent-0.2.0-1.x86_64.rpm", "packages/node-agent_0.2.0-1_amd64.deb"]
            .map(|p| BundleFile { path: p.into(), size: 1, mode: 0o644, sha256: "ab".repeat(32) })
            .to_vec()
    }

    async fn run(sys: &Fake, dir: &Path, packages: &[BundleFile]) -> Result<String, String> {
        start(
            sys,
            dir,
            Path::new("/usr/bin/node-agent"),
            packages,
            async |f: &BundleFile| Ok(dir.join(&f.sha256)),
            ("agent-upgrade/op1/h1", 1, "d1"),
            &|_| {},
            &Cancel::none(),
            Duration::ZERO,
        )
        .await
        .map_err(|e| fleetadm_common::error_chain(&e))
    }

    #[tokio::test]
    async fn installs_the_package_of_its_own_manager_and_says_so_when_it_was_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Fake::new("0.1.0-1", "0.2.0-1");
        // The old agent survived the install: in real life it is replaced first. Here it
        // reports that the service was not restarted, and clears its marker.
        let err = run(&sys, dir.path(), &pkgs()).await.unwrap_err();
        assert!(err.contains("not restarted"), "{err}");
        let started = sys.started.lock().unwrap().clone();
        assert_eq!(started.len(), 1);
        assert!(started[0].0.starts_with("node-agent-upgrade-"));
        assert_eq!(started[0].1[..3], ["dpkg", "--force-confold", "-i"]);
        assert!(started[0].1[3].ends_with(&"ab".repeat(32)), "the fetched blob is installed");
        assert!(Marker::load(dir.path()).is_none());
    }

    #[tokio::test]
    async fn an_agent_stopped_during_the_install_leaves_the_marker_for_the_next_one() {
        struct Slow(Fake);
        impl System for Slow {
            async fn manager_of(&self, e: &Path) -> Option<Manager> {
                self.0.manager_of(e).await
            }
            async fn inspect(&self, m: Manager, p: &Path) -> Result<(String, String), CommandError> {
                self.0.inspect(m, p).await
            }
            async fn installed(&self, m: Manager) -> String {
                self.0.installed(m).await
            }
            async fn start_unit(&self, u: &str, a: &[String], l: &Path) -> Result<(), CommandError> {
                self.0.start_unit(u, a, l).await
            }
            async fn unit_running(&self, _: &str) -> bool {
                true
            }
            fn running_replaced(&self) -> bool {
                false
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let sys = Slow(Fake::new("0.1.0-1", "0.2.0-1"));
        let (stop, cancel) = Cancel::new();
        let d = dir.path().to_path_buf();
        let run = async {
            start(
                &sys,
                &d,
                Path::new("/usr/bin/node-agent"),
                &pkgs(),
                async |f: &BundleFile| Ok(d.join(&f.sha256)),
                ("agent-upgrade/op1/h1", 3, "d1"),
                &|_| {},
                &cancel,
                Duration::ZERO,
            )
            .await
        };
        let (r, _) = tokio::join!(run, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.cancel();
        });
        let err = fleetadm_common::error_chain(&r.unwrap_err());
        assert!(err.contains("the agent that starts next reports"), "{err}");
        let m = Marker::load(dir.path()).expect("the marker stays");
        assert_eq!((m.attempt, m.from.as_str(), m.to.as_str()), (3, "0.1.0-1", "0.2.0-1"));
    }

    #[tokio::test]
    async fn the_next_agent_concludes_from_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marker {
            task_id: "agent-upgrade/op1/h1".into(),
            attempt: 1,
            digest: "d1".into(),
            from: "0.1.0-1".into(),
            to: "0.2.0-1".into(),
            manager: Manager::Dpkg,
            unit: "node-agent-upgrade-1".into(),
            started_ms: 1,
        };
        m.store(dir.path()).unwrap();
        assert_eq!(Marker::load(dir.path()).as_ref(), Some(&m));
        let mode = std::fs::metadata(Marker::path(dir.path())).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let ok = Fake::new("0.2.0-1", "0.2.0-1");
        let out = conclude(&ok, dir.path(), &m, Duration::ZERO).await.unwrap();
        assert!(out.contains("upgraded from 0.1.0-1 to 0.2.0-1"), "{out}");
        std::fs::write(dir.path().join(LOG), "dpkg: dependency problems\n").unwrap();
        let old = Fake::new("0.1.0-1", "0.2.0-1");
        let err = conclude(&old, dir.path(), &m, Duration::ZERO).await.unwrap_err();
        assert!(err.contains("0.1.0-1 is installed, expected 0.2.0-1") && err.contains("dependency problems"), "{err}");
        let replaced = Fake { replaced: true, ..Fake::new("0.2.0-1", "0.2.0-1") };
        assert!(conclude(&replaced, dir.path(), &m, Duration::ZERO).await.unwrap_err().contains("replaced binary"));
        std::fs::write(Marker::path(dir.path()), "{not json").unwrap();
        assert!(Marker::load(dir.path()).is_none(), "a broken marker is dropped, not fatal");
    }

    #[tokio::test]
    async fn refusals_say_why_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let same = Fake::new("0.2.0-1", "0.2.0-1");
        let out = run(&same, dir.path(), &pkgs()).await.unwrap();
        assert!(out.contains("nothing to do") && same.started.lock().unwrap().is_empty(), "{out}");
        let loose = Fake { manager: None, ..Fake::new("", "0.2.0-1") };
        assert!(run(&loose, dir.path(), &pkgs()).await.unwrap_err().contains("not installed from a package"));
        let rpm_only = &pkgs()[..1];
        let err = run(&Fake::new("0.1.0-1", "0.2.0-1"), dir.path(), rpm_only).await.unwrap_err();
        assert!(err.contains("no node-agent .deb package") && err.contains("node-agent-0.2.0-1.x86_64.rpm"), "{err}");
        let other = Fake { package: ("kubelet".into(), "1.0".into()), ..Fake::new("0.1.0-1", "0.2.0-1") };
        assert!(run(&other, dir.path(), &pkgs()).await.unwrap_err().contains("\"kubelet\", not node-agent"));
        let broken = Fake { installs: None, ..Fake::new("0.1.0-1", "0.2.0-1") };
        let err = run(&broken, dir.path(), &pkgs()).await.unwrap_err();
        assert!(err.contains("install of node-agent 0.2.0-1 failed") && err.contains("broken"), "{err}");
        assert!(Marker::load(dir.path()).is_none());
    }
}
