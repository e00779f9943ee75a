use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the protoc shipped on crates.io so a fresh machine needs nothing installed.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/fleetadm.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut source = std::fs::read_to_string("proto/fleetadm.proto")?;
    // Test-only: stand in for "the next release" by adding a field to every task message, so the
    // version-skew test can show that each side ignores a field only the other one knows.
    if std::env::var_os("CARGO_FEATURE_SKEW_PROBE").is_some() {
        source = add_skew_probe(&source);
    }
    let dir = out.join("proto");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("fleetadm.proto"), source)?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("fleetadm_descriptor.bin"))
        .compile_protos(&[dir.join("fleetadm.proto")], &[dir])?;
    Ok(())
}

/// `string skew_probe = 4000;` in TaskAssignment, TaskReport and every message of the
/// `TaskAssignment.task` oneof.
fn add_skew_probe(source: &str) -> String {
    let mut targets = vec!["TaskAssignment".to_string(), "TaskReport".to_string()];
    let mut in_oneof = false;
    for line in source.lines().map(str::trim) {
        if line == "oneof task {" {
            in_oneof = true;
        } else if in_oneof && line == "}" {
            in_oneof = false;
        } else if in_oneof {
            if let Some(ty) = line.split_whitespace().next().filter(|t| !t.starts_with("//")) {
                targets.push(ty.to_string());
            }
        }
    }
    let mut out = String::with_capacity(source.len() + 4096);
    for line in source.lines() {
        let t = line.trim();
        // An empty message (`message PingTask {}`) is opened up to take the field.
        if let Some(name) = t.strip_prefix("message ").and_then(|r| r.strip_suffix(" {}")) {
            if targets.iter().any(|x| x == name) {
                out.push_str(&format!("message {name} {{\n  string skew_probe = 4000;\n}}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
        if let Some(name) = t.strip_prefix("message ").and_then(|r| r.strip_suffix(" {")) {
            if targets.iter().any(|x| x == name) {
                out.push_str("  string skew_probe = 4000;\n");
            }
        }
    }
    out
}
