//! Run a shell test inside a VM with a real Debian kernel (see tests/vm/run.sh).
use std::path::PathBuf;
use std::process::Command;

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Run `tests/vm/<script>` (or `<script>` relative to the repository root when it contains a
/// `/`) in a fresh VM; returns (success, console output).
pub fn run_script(script: &str, timeout_secs: u32) -> (bool, String) {
    let root = repo_root();
    let path = if script.contains('/') { root.join(script) } else { root.join("tests/vm").join(script) };
    let out = root.join("tests/.cache/runs").join(script.trim_end_matches(".sh").replace('/', "-"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create VM output dir");
    let status = Command::new(root.join("tests/vm/run.sh"))
        .arg(&path)
        .arg(&out)
        .arg(timeout_secs.to_string())
        .status()
        .expect("run tests/vm/run.sh");
    let console = std::fs::read_to_string(out.join("console.log")).unwrap_or_else(|_| {
        format!(
            "(no console log; serial console tail:)\n{}",
            std::fs::read_to_string(out.join("serial.log")).unwrap_or_default()
        )
    });
    (status.success(), console)
}

/// Lines of the form `ok - ...` / `not ok - ...` from a VM script.
pub fn failures(console: &str) -> Vec<&str> {
    console.lines().filter(|l| l.starts_with("not ok")).collect()
}
