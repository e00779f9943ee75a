//! `/etc/node-agent/config.toml`. Every key is optional; command-line flags win over the file.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentFileConfig {
    pub state_dir: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    pub backoff_initial: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub backoff_max: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub inventory_interval: Option<Duration>,
    /// HTTP CONNECT proxy to the controller: "http://[USER:PASSWORD@]HOST:PORT" ("": none, even if
    /// HTTPS_PROXY is set). Unset: the one given at enrollment, else HTTPS_PROXY/NO_PROXY.
    pub proxy: Option<String>,
    /// Serve bundle blobs to peers on this address ("0.0.0.0:7451"; unset: off). Only where
    /// the other agents can reach this host; its fleet certificate and the controller's tickets
    /// guard it.
    pub peer_listen: Option<String>,
}

impl AgentFileConfig {
    /// Load `path` if it exists; a missing file means defaults, a bad one is an error.
    pub fn load(path: &Path) -> Result<Self, fleetadm_common::config::ConfigError> {
        fleetadm_common::config::load_optional(path)
    }
}

pub mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| fleetadm_common::clock::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: AgentFileConfig = toml::from_str("state_dir = \"/x\"\nbackoff_max = \"30s\"\n").unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/x")));
        assert_eq!(c.backoff_max, Some(Duration::from_secs(30)));
        let c: AgentFileConfig = toml::from_str("proxy = \"http://bastion:3128\"\n").unwrap();
        assert_eq!(c.proxy.as_deref(), Some("http://bastion:3128"));
        assert!(toml::from_str::<AgentFileConfig>("stat_dir = \"/x\"").is_err());
        assert!(toml::from_str::<AgentFileConfig>("backoff_max = \"soon\"").is_err());
        assert_eq!(AgentFileConfig::load(Path::new("/nonexistent/x.toml")).unwrap(), AgentFileConfig::default());
    }
}
