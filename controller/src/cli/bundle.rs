//! `controller bundle build|import|list|remove`. `build` works offline on a directory; the others
//! talk to the daemon, which owns the blob store.
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fleetadm_common::output::OutputFormat;
use fleetadm_proto::{BundlePath, BundleRef, BundleView, Empty};

use super::{rpc_error, DataDir, Output};
use crate::admin::client;
use crate::bundle::{archive, manifest};

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Describe a directory tree (bin/ images/ conf/ manifests/ scripts/) in DIR/bundle.yaml and pack it.
    #[command(disable_version_flag = true)]
    Build {
        /// The bundle's root directory.
        dir: PathBuf,
        /// Output file (.tar.gz).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[arg(long)]
        name: String,
        /// Kubernetes version the bundle carries (e.g. v1.29.9).
        #[arg(long = "version", id = "kube_version")]
        kube_version: String,
        /// Debian architecture of its binaries.
        #[arg(long, default_value = "amd64")]
        arch: String,
    },
    /// Verify a bundle (directory, .tar or .tar.gz) against its manifest and store it.
    Import {
        path: PathBuf,
        #[command(flatten)]
        data: DataDir,
    },
    /// Imported bundles.
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        output: Output,
    },
    /// Remove a bundle and the blobs no other bundle needs (refused while a cluster uses it).
    Remove {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
}

fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" { format!("{bytes} B") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    format!("{bytes} B")
}

fn rows(list: &[BundleView]) -> Vec<Vec<String>> {
    list.iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.kubernetes_version.clone(),
                b.arch.clone(),
                b.files.to_string(),
                human(b.total_bytes),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(b.imported_at_unix_ms),
                )
                .to_string(),
            ]
        })
        .collect()
}

#[derive(serde::Serialize)]
struct Json<'a> {
    name: &'a str,
    kubernetes_version: &'a str,
    arch: &'a str,
    files: u32,
    total_bytes: u64,
    new_bytes: u64,
    imported_at_unix_ms: u64,
}

fn json(b: &BundleView) -> Json<'_> {
    Json {
        name: &b.name,
        kubernetes_version: &b.kubernetes_version,
        arch: &b.arch,
        files: b.files,
        total_bytes: b.total_bytes,
        new_bytes: b.new_bytes,
        imported_at_unix_ms: b.imported_at_unix_ms,
    }
}

pub async fn run(cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Build { dir, output, name, kube_version, arch } => {
            let m = manifest::describe_dir(&dir, &name, &kube_version, &arch)
                .with_context(|| format!("describing {}", dir.display()))?;
            if m.files.is_empty() {
                anyhow::bail!("{} has no files under {}/", dir.display(), manifest::LAYOUT.join("/, "));
            }
            archive::pack(&dir, &m, &output).with_context(|| format!("writing {}", output.display()))?;
            // The directory is a bundle too (importable as is, usable by `node-agent bootstrap`).
            let yaml = serde_yaml::to_string(&m)?;
            fleetadm_common::fsutil::write_atomic(&dir.join(manifest::MANIFEST), yaml.as_bytes(), 0o644)
                .with_context(|| format!("writing {}/{}", dir.display(), manifest::MANIFEST))?;
            println!("{}: bundle {} ({} files, {})", output.display(), m.name, m.files.len(), human(m.total_bytes()));
            Ok(())
        }
        BundleCmd::Import { path, data } => {
            let abs = std::fs::canonicalize(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let mut c = client::connect(&data.data_dir).await?;
            let b = c
                .import_bundle(BundlePath { path: abs.to_string_lossy().into_owned() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            println!(
                "imported bundle {} (Kubernetes {}, {}, {} files, {}; {} new, the rest already stored)",
                b.name,
                b.kubernetes_version,
                b.arch,
                b.files,
                human(b.total_bytes),
                human(b.new_bytes)
            );
            Ok(())
        }
        BundleCmd::List { data, output } => {
            let mut c = client::connect(&data.data_dir).await?;
            let list = c.list_bundles(Empty {}).await.map_err(rpc_error)?.into_inner().bundles;
            match output.output {
                OutputFormat::Table => print!(
                    "{}",
                    fleetadm_common::output::table(
                        &["NAME", "KUBERNETES", "ARCH", "FILES", "SIZE", "IMPORTED"],
                        &rows(&list)
                    )
                ),
                f => println!(
                    "{}",
                    fleetadm_common::output::render_structured(&list.iter().map(json).collect::<Vec<_>>(), f)
                        .unwrap_or_default()
                        .trim_end()
                ),
            }
            Ok(())
        }
        BundleCmd::Remove { name, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            let b = c.remove_bundle(BundleRef { name }).await.map_err(rpc_error)?.into_inner();
            println!("removed bundle {}", b.name);
            Ok(())
        }
    }
}
