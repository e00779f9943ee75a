//! The `bootstrap` task: install a fetched bundle on the host, idempotently, and record exactly
//! what it did so `bootstrap-reset` can undo it.
//!
//! - `bin/*` -> /usr/local/bin (the bundle's modes); `conf/kubelet.service` and
//!   `conf/10-kubeadm.conf` -> systemd units; `conf/containerd.toml` -> /etc/containerd/config.toml;
//!   other `conf/*` -> /etc/kubernetes/fleetadm/conf/. Each write is temp-then-rename.
//! - kernel modules (overlay, br_netfilter, the ip_vs set) loaded now and listed in
//!   /etc/modules-load.d; sysctls (ip_forward, bridge-nf-call-iptables) set now and persisted in
//!   /etc/sysctl.d; swap off now (`swapoff -a`) and commented out of /etc/fstab.
//! - `systemctl daemon-reload` when systemd runs; `images/*` imported with `ctr` when containerd
//!   runs; `scripts/pre-bootstrap.sh` / `scripts/post-bootstrap.sh` run with a clean environment.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fleetadm_common::tasks::{is_sha256_hex, safe_bundle_path, BundleFile};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::command::{self, Cancel, Cmd, CommandError};
use super::fetch::BlobCache;

#[derive(Debug, Error)]
pub enum BootstrapError {
    #[error("{path} is not fetched ({blob})")]
    NotFetched {
        path: String,
        blob: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: cached blob is corrupt; fetch the bundle again")]
    Corrupt(String),
    #[error("{0:?}: not a bundle path or not a SHA-256; refused")]
    BadFile(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the bootstrap record")]
    Record(#[source] serde_json::Error),
    #[error("{step}")]
    System {
        step: String,
        #[source]
        source: CommandError,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let path = path.display().to_string();
    move |source| BootstrapError::Io { what, path, source }
}

fn sys(step: impl Into<String>) -> impl FnOnce(CommandError) -> BootstrapError {
    let step = step.into();
    move |source| BootstrapError::System { step, source }
}

pub const MODULES: &[&str] = &["overlay", "br_netfilter", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack"];
pub const SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
];
const MODULES_FILE: &str = "etc/modules-load.d/fleetadm-kubernetes.conf";
const SYSCTL_FILE: &str = "etc/sysctl.d/99-fleetadm-kubernetes.conf";
const FSTAB: &str = "etc/fstab";
const FSTAB_MARK: &str = "#fleetadm-swap-off# ";

/// What touches the running system, beyond files (so the logic is testable without root).
pub trait System {
    fn modprobe(&mut self, module: &str) -> Result<(), CommandError>;
    fn set_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<bool>;
    fn swap_active(&mut self) -> bool;
    fn swapoff(&mut self) -> Result<(), CommandError>;
    /// `None` when systemd is not running.
    fn daemon_reload(&mut self) -> Option<Result<(), CommandError>>;
    /// `None` when containerd (or ctr) is not available.
    fn import_image(&mut self, path: &Path) -> Option<Result<(), CommandError>>;
    fn run_hook(&mut self, script: &Path, env: &[(&str, String)]) -> Result<String, CommandError>;
}

/// What bootstrap installed, kept in the agent's state dir.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Installed path (absolute on the host) -> SHA-256 of what was written.
    pub files: BTreeMap<String, String>,
    /// fstab lines fleetadm commented out.
    pub fstab_lines: Vec<String>,
    /// Image blobs already imported.
    pub images: Vec<String>,
}

pub struct Bootstrap<'a, S: System> {
    /// "/" on a host; a temp dir in tests.
    pub root: PathBuf,
    pub cache: &'a BlobCache,
    pub record_path: PathBuf,
    pub sys: S,
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The mode a bundle file is installed with: never group- or world-writable, whatever the
/// bundle says (the agent runs these binaries as root); binaries readable and executable by all.
pub fn install_mode(path: &str, mode: u32) -> u32 {
    if path.starts_with("bin/") {
        (mode | 0o555) & 0o755
    } else {
        (mode & 0o644) | 0o600
    }
}

/// Where a bundle file goes (relative to the root), or `None` when bootstrap does not install it
/// (or the path is not a plain relative bundle path: no `..`, `.`, empty or absolute component).
pub fn destination(path: &str) -> Option<String> {
    if !safe_bundle_path(path) {
        return None;
    }
    let (top, rest) = path.split_once('/')?;
    let name = Path::new(rest).file_name()?.to_string_lossy().into_owned();
    Some(match (top, rest) {
        ("bin", _) => format!("usr/local/bin/{name}"),
        ("conf", "kubelet.service") => "etc/systemd/system/kubelet.service".into(),
        ("conf", "10-kubeadm.conf") => "etc/systemd/system/kubelet.service.d/10-kubeadm.conf".into(),
        ("conf", "containerd.toml") | ("conf", "containerd/config.toml") => "etc/containerd/config.toml".into(),
        ("conf", _) => format!("etc/kubernetes/fleetadm/conf/{rest}"),
        _ => return None,
    })
}

impl<S: System> Bootstrap<'_, S> {
    fn load_record(&self) -> Record {
        std::fs::read(&self.record_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_record(&self, r: &Record) -> Result<(), BootstrapError> {
        let json = serde_json::to_vec_pretty(r).map_err(BootstrapError::Record)?;
        fleetadm_common::fsutil::write_atomic(&self.record_path, &json, 0o600).map_err(io("saving", &self.record_path))
    }

    /// Write `data` at `rel` (under root) with `mode` unless it is already exactly that.
    fn ensure_file(&self, rel: &str, data: &[u8], mode: u32, changes: &mut Vec<String>) -> Result<(), BootstrapError> {
        let p = self.root.join(rel);
        let same = std::fs::read(&p).map(|c| c == data).unwrap_or(false)
            && std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777 == mode).unwrap_or(false);
        if same {
            return Ok(());
        }
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io("creating", d))?;
        }
        fleetadm_common::fsutil::write_atomic(&p, data, mode).map_err(io("writing", &p))?;
        changes.push(format!("installed /{rel}"));
        Ok(())
    }

    /// Install blob `f` at `rel` with `mode` unless it is already exactly that: streamed from the
    /// cache through a running hash into an exclusive temp file, renamed into place only if the
    /// hash matches (multi-GiB files never sit in memory).
    fn ensure_blob(
        &self,
        rel: &str,
        f: &BundleFile,
        mode: u32,
        changes: &mut Vec<String>,
    ) -> Result<(), BootstrapError> {
        let p = self.root.join(rel);
        let same_mode = std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777 == mode).unwrap_or(false);
        if same_mode && super::fetch::sha256_file(&p).map(|h| h == f.sha256).unwrap_or(false) {
            return Ok(());
        }
        let dir = p.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let src = self.cache.path(&f.sha256);
        let mut input = std::fs::File::open(&src).map_err(io("reading", &src))?;
        let stem = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (tmp, mut out) =
            fleetadm_common::fsutil::create_temp_in(&dir, &stem, mode).map_err(io("creating", &dir))?;
        let copied = (|| -> Result<String, BootstrapError> {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = input.read(&mut buf).map_err(io("reading", &src))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io("writing", &tmp))?;
            }
            out.sync_all().map_err(io("writing", &tmp))?;
            Ok(hex::encode(h.finalize()))
        })();
        drop(out);
        match copied {
            Ok(got) if got == f.sha256 => {}
            Ok(_) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(BootstrapError::Corrupt(f.path.clone()));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        std::fs::rename(&tmp, &p).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("installing", &p)(e)
        })?;
        fleetadm_common::fsutil::sync_dir(&dir);
        changes.push(format!("installed /{rel}"));
        Ok(())
    }

    pub fn install(
        &mut self,
        files: &[BundleFile],
        bundle: &str,
        version: &str,
    ) -> Result<Vec<String>, BootstrapError> {
        let mut changes = Vec::new();
        let mut rec = self.load_record();
        // Everything must be in the cache and intact before anything is installed (hashed as a
        // stream; installing hashes again while copying).
        for f in files {
            if !safe_bundle_path(&f.path) || !is_sha256_hex(&f.sha256) {
                return Err(BootstrapError::BadFile(f.path.clone()));
            }
            let p = self.cache.path(&f.sha256);
            let got = super::fetch::sha256_file(&p).map_err(|source| BootstrapError::NotFetched {
                path: f.path.clone(),
                blob: p.display().to_string(),
                source,
            })?;
            if got != f.sha256 {
                return Err(BootstrapError::Corrupt(f.path.clone()));
            }
        }
        let env = |stage: &str| {
            vec![
                ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
                ("FLEETADM_BUNDLE", bundle.to_string()),
                ("FLEETADM_KUBERNETES_VERSION", version.to_string()),
                ("FLEETADM_STAGE", stage.to_string()),
            ]
        };
        let hook = |name: &str| files.iter().find(|f| f.path == format!("scripts/{name}"));
        // Hooks run when something is (re)installed, not on a no-op re-run.
        let first = rec.files.is_empty();
        if let Some(h) = hook("pre-bootstrap.sh").filter(|_| first) {
            let out = self
                .sys
                .run_hook(&self.cache.path(&h.sha256), &env("pre-bootstrap"))
                .map_err(sys("scripts/pre-bootstrap.sh"))?;
            changes.push(format!("ran scripts/pre-bootstrap.sh: {}", out.trim()));
        }
        for f in files {
            let Some(dest) = destination(&f.path) else { continue };
            self.ensure_blob(&dest, f, install_mode(&f.path, f.mode), &mut changes)?;
            rec.files.insert(format!("/{dest}"), f.sha256.clone());
        }
        let modules: String = MODULES.iter().map(|m| format!("{m}\n")).collect();
        self.ensure_file(MODULES_FILE, modules.as_bytes(), 0o644, &mut changes)?;
        rec.files.insert(format!("/{MODULES_FILE}"), sha256(modules.as_bytes()));
        let mut warnings = Vec::new();
        for m in MODULES {
            if let Err(e) = self.sys.modprobe(m) {
                warnings.push(format!("warning: module {m}: {e}"));
            }
        }
        let sysctl: String = SYSCTLS.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        self.ensure_file(SYSCTL_FILE, sysctl.as_bytes(), 0o644, &mut changes)?;
        rec.files.insert(format!("/{SYSCTL_FILE}"), sha256(sysctl.as_bytes()));
        for (k, v) in SYSCTLS {
            match self.sys.set_sysctl(k, v) {
                Ok(true) => changes.push(format!("set {k}={v}")),
                Ok(false) => {}
                Err(e) => warnings.push(format!("warning: sysctl {k}: {e}")),
            }
        }
        if self.sys.swap_active() {
            self.sys.swapoff().map_err(sys("turning swap off"))?;
            changes.push("turned swap off".into());
        }
        let fstab = self.root.join(FSTAB);
        if let Ok(text) = std::fs::read_to_string(&fstab) {
            let mut out = String::new();
            let mut commented = Vec::new();
            for line in text.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if !line.trim_start().starts_with('#') && fields.get(2) == Some(&"swap") {
                    out.push_str(&format!("{FSTAB_MARK}{line}\n"));
                    commented.push(line.to_string());
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            if !commented.is_empty() {
                fleetadm_common::fsutil::write_atomic(&fstab, out.as_bytes(), 0o644).map_err(io("writing", &fstab))?;
                changes.push(format!("disabled {} swap entries in /etc/fstab", commented.len()));
                rec.fstab_lines.extend(commented);
            }
        }
        if !changes.is_empty() {
            if let Some(r) = self.sys.daemon_reload() {
                r.map_err(sys("systemctl daemon-reload"))?;
                changes.push("systemctl daemon-reload".into());
            }
        }
        for f in files.iter().filter(|f| f.path.starts_with("images/")) {
            if rec.images.contains(&f.sha256) {
                continue;
            }
            match self.sys.import_image(&self.cache.path(&f.sha256)) {
                Some(Ok(())) => {
                    changes.push(format!("imported {}", f.path));
                    rec.images.push(f.sha256.clone());
                }
                Some(Err(e)) => return Err(sys(format!("importing {}", f.path))(e)),
                None => warnings.push(format!("skipped {}: containerd is not running", f.path)),
            }
        }
        if let Some(h) = hook("post-bootstrap.sh").filter(|_| !changes.is_empty()) {
            let out = self
                .sys
                .run_hook(&self.cache.path(&h.sha256), &env("post-bootstrap"))
                .map_err(sys("scripts/post-bootstrap.sh"))?;
            changes.push(format!("ran scripts/post-bootstrap.sh: {}", out.trim()));
        }
        self.save_record(&rec)?;
        changes.extend(warnings);
        Ok(changes)
    }

    /// Undo what install recorded: remove the files it wrote (unless changed since), restore fstab.
    pub fn reset(&mut self) -> Result<Vec<String>, BootstrapError> {
        let rec = self.load_record();
        let mut changes = Vec::new();
        for (path, sum) in &rec.files {
            let p = self.root.join(path.trim_start_matches('/'));
            match std::fs::read(&p) {
                Ok(data) if sha256(&data) == *sum => {
                    std::fs::remove_file(&p).map_err(io("removing", &p))?;
                    changes.push(format!("removed {path}"));
                }
                Ok(_) => changes.push(format!("kept {path}: changed since bootstrap")),
                Err(_) => {}
            }
        }
        if !rec.fstab_lines.is_empty() {
            let fstab = self.root.join(FSTAB);
            if let Ok(text) = std::fs::read_to_string(&fstab) {
                let out: String =
                    text.lines().map(|l| format!("{}\n", l.strip_prefix(FSTAB_MARK).unwrap_or(l))).collect();
                fleetadm_common::fsutil::write_atomic(&fstab, out.as_bytes(), 0o644).map_err(io("writing", &fstab))?;
                changes.push(format!("re-enabled {} swap entries in /etc/fstab", rec.fstab_lines.len()));
            }
        }
        if !changes.is_empty() {
            if let Some(r) = self.sys.daemon_reload() {
                r.map_err(sys("systemctl daemon-reload"))?;
            }
        }
        let _ = std::fs::remove_file(&self.record_path);
        Ok(changes)
    }
}

#[derive(Deserialize)]
struct LocalManifest {
    name: String,
    #[serde(rename = "kubernetesVersion")]
    kubernetes_version: String,
    files: Vec<BundleFile>,
}

/// `node-agent bootstrap --bundle-dir DIR [--reset]`: verify a local bundle directory, put its
/// files in the blob cache, and run the same install (or reset) as the controller's task.
pub fn local(state_dir: &Path, bundle_dir: Option<&Path>, reset: bool) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let cache = BlobCache::new(state_dir);
    let mut b = Bootstrap {
        root: "/".into(),
        cache: &cache,
        record_path: state_dir.join("bootstrap.json"),
        sys: HostSystem { cancel: Cancel::none() },
    };
    if reset {
        return Ok(b.reset()?);
    }
    let dir = bundle_dir.context("--bundle-dir is required")?;
    let text = std::fs::read_to_string(dir.join("bundle.yaml"))
        .with_context(|| format!("reading {}/bundle.yaml", dir.display()))?;
    let m: LocalManifest = serde_yaml::from_str(&text).context("bundle.yaml")?;
    std::fs::create_dir_all(state_dir.join("blobs"))?;
    for f in &m.files {
        if !fleetadm_common::tasks::safe_bundle_path(&f.path) {
            anyhow::bail!("bundle.yaml: path {:?} escapes the bundle", f.path);
        }
        let data = std::fs::read(dir.join(&f.path)).with_context(|| format!("reading {}", f.path))?;
        if data.len() as u64 != f.size || sha256(&data) != f.sha256 {
            anyhow::bail!("{} does not match bundle.yaml (size or SHA-256)", f.path);
        }
        if std::fs::metadata(cache.path(&f.sha256)).map(|m| m.len() != f.size).unwrap_or(true) {
            fleetadm_common::fsutil::write_atomic(&cache.path(&f.sha256), &data, 0o600)?;
        }
    }
    Ok(b.install(&m.files, &m.name, &m.kubernetes_version)?)
}

/// The real system: every command through the agent's runner, stopped with its task.
pub struct HostSystem {
    pub cancel: Cancel,
}

const SHORT: std::time::Duration = std::time::Duration::from_secs(60);
const LONG: std::time::Duration = std::time::Duration::from_secs(600);

impl HostSystem {
    fn run(&self, prog: &str, args: &[&str], timeout: std::time::Duration) -> Result<String, CommandError> {
        command::run_blocking(&Cmd::new(prog, args, timeout), &self.cancel)?.ok(prog)
    }
}

impl System for HostSystem {
    fn modprobe(&mut self, module: &str) -> Result<(), CommandError> {
        if Path::new("/sys/module").join(module).exists() {
            return Ok(());
        }
        self.run("modprobe", &[module], SHORT).map(drop)
    }
    fn set_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<bool> {
        let p = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let cur = std::fs::read_to_string(&p)?;
        if cur.trim() == value {
            return Ok(false);
        }
        std::fs::write(&p, value)?;
        Ok(true)
    }
    fn swap_active(&mut self) -> bool {
        std::fs::read_to_string("/proc/swaps").map(|s| s.lines().count() > 1).unwrap_or(false)
    }
    fn swapoff(&mut self) -> Result<(), CommandError> {
        self.run("swapoff", &["-a"], LONG).map(drop)
    }
    fn daemon_reload(&mut self) -> Option<Result<(), CommandError>> {
        if !Path::new("/run/systemd/system").is_dir() {
            return None;
        }
        Some(self.run("systemctl", &["daemon-reload"], SHORT).map(drop))
    }
    fn import_image(&mut self, path: &Path) -> Option<Result<(), CommandError>> {
        if !Path::new("/run/containerd/containerd.sock").exists() || command::which("ctr").is_none() {
            return None;
        }
        Some(self.run("ctr", &["-n", "k8s.io", "images", "import", &path.to_string_lossy()], LONG).map(drop))
    }
    fn run_hook(&mut self, script: &Path, env: &[(&str, String)]) -> Result<String, CommandError> {
        let script = script.to_string_lossy();
        let cmd = Cmd::new("/bin/sh", &[&script], LONG).clean_env(env).cwd("/");
        command::run_blocking(&cmd, &self.cancel)?.ok("bootstrap hook")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        swap: bool,
        sysctl: BTreeMap<String, String>,
    }

    impl System for &mut Fake {
        fn modprobe(&mut self, m: &str) -> Result<(), CommandError> {
            self.log.push(format!("modprobe {m}"));
            Ok(())
        }
        fn set_sysctl(&mut self, k: &str, v: &str) -> std::io::Result<bool> {
            Ok(self.sysctl.insert(k.into(), v.into()).as_deref() != Some(v))
        }
        fn swap_active(&mut self) -> bool {
            self.swap
        }
        fn swapoff(&mut self) -> Result<(), CommandError> {
            self.swap = false;
            self.log.push("swapoff".into());
            Ok(())
        }
        fn daemon_reload(&mut self) -> Option<Result<(), CommandError>> {
            self.log.push("daemon-reload".into());
            Some(Ok(()))
        }
        fn import_image(&mut self, _: &Path) -> Option<Result<(), CommandError>> {
            self.log.push("import".into());
            Some(Ok(()))
        }
        fn run_hook(&mut self, s: &Path, env: &[(&str, String)]) -> Result<String, CommandError> {
            let stage = &env.iter().find(|(k, _)| *k == "FLEETADM_STAGE").unwrap().1;
            self.log.push(format!("hook {stage} {}", s.exists()));
            Ok("ok".into())
        }
    }

    fn put(cache_dir: &Path, path: &str, body: &[u8], mode: u32) -> BundleFile {
        let sum = sha256(body);
        std::fs::create_dir_all(cache_dir.join("blobs")).unwrap();
        std::fs::write(cache_dir.join("blobs").join(&sum), body).unwrap();
        BundleFile { path: path.into(), size: body.len() as u64, mode, sha256: sum }
    }

    #[test]
    fn installs_is_idempotent_and_reset_undoes_it() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/fstab"), "/dev/sda1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n")
            .unwrap();
        let files = vec![
            put(state.path(), "bin/kubeadm", b"kubeadm", 0o755),
            put(state.path(), "conf/kubelet.service", b"[Service]", 0o644),
            put(state.path(), "conf/10-kubeadm.conf", b"[Service]\nEnvironment=x", 0o644),
            put(state.path(), "images/pause.tar", b"image", 0o644),
            put(state.path(), "manifests/cni.yaml", b"kind: List", 0o644),
            put(state.path(), "scripts/post-bootstrap.sh", b"echo hi", 0o755),
        ];
        let cache = BlobCache::new(state.path());
        let mut fake = Fake { swap: true, ..Default::default() };
        let mut b = Bootstrap {
            root: root.path().into(),
            cache: &cache,
            record_path: state.path().join("bootstrap.json"),
            sys: &mut fake,
        };
        let changes = b.install(&files, "k8s", "v1.29.9").unwrap();
        let joined = changes.join("\n");
        for want in [
            "installed /usr/local/bin/kubeadm",
            "installed /etc/systemd/system/kubelet.service",
            "installed /etc/systemd/system/kubelet.service.d/10-kubeadm.conf",
            "installed /etc/modules-load.d/fleetadm-kubernetes.conf",
            "turned swap off",
            "disabled 1 swap entries",
            "imported images/pause.tar",
            "daemon-reload",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        assert!(!root.path().join("usr/local/bin/cni.yaml").exists(), "manifests are not installed by bootstrap");
        let m = std::fs::metadata(root.path().join("usr/local/bin/kubeadm")).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o755);
        let fstab = std::fs::read_to_string(root.path().join("etc/fstab")).unwrap();
        assert!(fstab.contains("#fleetadm-swap-off# /swapfile") && fstab.contains("/dev/sda1 / ext4"));
        // Second run: nothing to do.
        let again = b.install(&files, "k8s", "v1.29.9").unwrap();
        assert!(again.is_empty(), "second run changes nothing: {again:?}");
        // A corrupt cache entry stops the install before anything is written.
        std::fs::write(cache.path(&files[0].sha256), b"tampered").unwrap();
        assert!(matches!(b.install(&files, "k8s", "v1.29.9"), Err(BootstrapError::Corrupt(_))));
        // Reset removes what was installed (unless changed) and restores fstab.
        std::fs::write(root.path().join("etc/systemd/system/kubelet.service"), "edited by the admin").unwrap();
        let undone = b.reset().unwrap().join("\n");
        assert!(undone.contains("removed /usr/local/bin/kubeadm"), "{undone}");
        assert!(undone.contains("kept /etc/systemd/system/kubelet.service: changed since bootstrap"), "{undone}");
        assert!(!root.path().join("usr/local/bin/kubeadm").exists());
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/fstab")).unwrap(),
            "/dev/sda1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n"
        );
        assert!(fake.log.iter().any(|l| l == "hook post-bootstrap true"));
    }

    #[test]
    fn destinations() {
        assert_eq!(destination("bin/kubeadm").as_deref(), Some("usr/local/bin/kubeadm"));
        assert_eq!(destination("conf/containerd.toml").as_deref(), Some("etc/containerd/config.toml"));
        assert_eq!(
            destination("conf/kubeadm/extra.yaml").as_deref(),
            Some("etc/kubernetes/fleetadm/conf/kubeadm/extra.yaml")
        );
        assert_eq!(destination("manifests/cni.yaml"), None);
        assert_eq!(destination("images/x.tar"), None);
        for hostile in ["conf/../../etc/shadow", "conf/./x", "conf//x", "/conf/x", "bin/../x"] {
            assert_eq!(destination(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn installed_files_are_never_group_or_world_writable() {
        for (path, given, want) in [
            ("bin/kubeadm", 0o777, 0o755),
            ("bin/kubeadm", 0o700, 0o755),
            ("bin/kubeadm", 0o4777, 0o755),
            ("conf/kubelet.service", 0o666, 0o644),
            ("conf/secret.yaml", 0o600, 0o600),
        ] {
            assert_eq!(install_mode(path, given), want, "{path} {given:o}");
        }
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let files = vec![
            put(state.path(), "bin/kubeadm", b"kubeadm", 0o777),
            put(state.path(), "conf/kubelet.service", b"[Service]", 0o666),
        ];
        let cache = BlobCache::new(state.path());
        let mut fake = Fake::default();
        let mut b = Bootstrap {
            root: root.path().into(),
            cache: &cache,
            record_path: state.path().join("bootstrap.json"),
            sys: &mut fake,
        };
        b.install(&files, "k8s", "v1.29.9").unwrap();
        let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("usr/local/bin/kubeadm"), 0o755);
        assert_eq!(mode("etc/systemd/system/kubelet.service"), 0o644);
        // No temporary file is left next to what was installed.
        let names: Vec<_> =
            std::fs::read_dir(root.path().join("usr/local/bin")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A hostile path in the task is refused before anything is installed.
        let bad = BundleFile { path: "conf/../../etc/shadow".into(), ..files[1].clone() };
        assert!(matches!(b.install(&[bad], "k8s", "v1.29.9"), Err(BootstrapError::BadFile(_))));
    }
}
