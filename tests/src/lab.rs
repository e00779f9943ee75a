//! The lab fleet (`tests/lab/lab.sh`) from Rust tests: hosts in network/mount namespaces on this
//! machine, one controller, real agents. The lab uses one bridge and fixed namespace names, so one
//! lab runs at a time (test binaries run one after another; inside one, hold [`ONE_LAB`]).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::vm::repo_root;

pub static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Lab {
    pub dir: PathBuf,
    hosts: usize,
    bin_dir: PathBuf,
    /// Extra environment for `lab.sh` (`LAB_BASTION`, `LAB_BUNDLE`).
    env: Vec<(String, String)>,
}

impl Lab {
    /// A fresh lab of `hosts` hosts under a private directory, running the binaries of `bin_dir`
    /// (`controller`, `node-agent`, `kubeadm-sim`).
    pub fn up_with(tag: &str, hosts: usize, bin_dir: &Path) -> Self {
        Self::up_env(tag, hosts, bin_dir, &[])
    }

    /// [`Lab::up_with`] with extra `lab.sh` settings, e.g. `("LAB_BASTION", "proxy")`.
    pub fn up_env(tag: &str, hosts: usize, bin_dir: &Path, env: &[(&str, &str)]) -> Self {
        let lab = Lab {
            dir: std::env::temp_dir().join(format!("fleetadm-lab-{tag}-{}", std::process::id())),
            hosts,
            bin_dir: bin_dir.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let up = lab.run(&["up"]);
        assert!(
            up.status.success(),
            "lab up: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        lab
    }

    /// Four hosts running this build.
    pub fn up(tag: &str) -> Self {
        Self::up_with(tag, 4, crate::bin("controller").parent().expect("bin dir"))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(repo_root().join("tests/lab/lab.sh"))
            .args(args)
            .env("LAB_DIR", &self.dir)
            .env("LAB_HOSTS", self.hosts.to_string())
            .env("FLEETADM_BIN_DIR", &self.bin_dir)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run lab.sh")
    }

    /// `controller ARGS` against the lab: (success, stdout+stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["ctl"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.success(), text)
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        let (ok, text) = self.ctl(&["cluster", "status", name, "-o", "json"]);
        assert!(ok, "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    pub fn host(&self, h: &str) -> PathBuf {
        self.dir.join("hosts").join(h)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}
