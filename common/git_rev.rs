// Shared by the controller's and node-agent's build scripts (via include!): bake the git revision
// into `--version`, and rebuild when HEAD moves.
fn emit_git_rev() {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| std::env::var("FLEETADM_GIT_REV").unwrap_or_else(|_| "unknown".into()));
    println!("cargo:rustc-env=FLEETADM_GIT_REV={rev}");
    println!("cargo:rerun-if-env-changed=FLEETADM_GIT_REV");
    // Watch HEAD, the branch it points to, and packed refs.
    let git = std::path::Path::new("../.git");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/packed-refs");
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=../.git/{r}");
        }
    }
}
