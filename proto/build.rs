fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the protoc shipped on crates.io so a fresh machine needs nothing installed.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/fleetadm.proto");
    tonic_prost_build::configure().compile_protos(&["proto/fleetadm.proto"], &["proto"])?;
    Ok(())
}
