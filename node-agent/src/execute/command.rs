//! Running host commands (kubeadm, kubectl) with a timeout, capturing their output.
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;

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
    #[error("{program} did not finish within {secs}s and was killed")]
    Timeout { program: String, secs: u64 },
}

/// Exit status and combined stdout+stderr.
#[derive(Debug)]
pub struct Ran {
    pub success: bool,
    pub code: Option<i32>,
    pub output: String,
}

/// Find `program` in PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false)
    })
}

pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<Ran, CommandError> {
    let path = which(program).ok_or_else(|| CommandError::NotFound {
        program: program.into(),
        path: std::env::var("PATH").unwrap_or_default(),
    })?;
    let child = tokio::process::Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn { program: program.into(), source })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| CommandError::Timeout { program: program.into(), secs: timeout.as_secs() })?
        .map_err(|source| CommandError::Spawn { program: program.into(), source })?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Ran { success: out.status.success(), code: out.status.code(), output })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_captures_and_times_out() {
        let r = run("sh", &["-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(5)).await.unwrap();
        assert!(!r.success);
        assert_eq!(r.code, Some(3));
        assert!(r.output.contains("out") && r.output.contains("err"));
        assert!(matches!(run("sleep", &["5"], Duration::from_millis(100)).await, Err(CommandError::Timeout { .. })));
        assert!(matches!(
            run("no-such-program-fleetadm", &[], Duration::from_secs(1)).await,
            Err(CommandError::NotFound { .. })
        ));
    }
}
