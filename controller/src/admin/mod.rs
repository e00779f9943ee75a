//! The admin API: served by the daemon on `DATA_DIR/admin.sock` (mode 0600), called by the CLI.
pub mod client;
pub mod service;

pub use service::AdminService;

/// Path of the admin socket inside a data directory.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("admin.sock")
}
