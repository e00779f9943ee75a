//! Packing a bundle directory into tar.gz and unpacking one safely: only regular files and
//! directories, every path checked before anything is written, sizes bounded.
use std::io::Read;
use std::path::Path;

use fleetadm_common::tasks::safe_bundle_path;

use super::manifest::{Manifest, MANIFEST};
use super::BundleError;

/// Write `dir` (the files in `m`, plus `bundle.yaml`) to `out` as tar.gz, atomically.
pub fn pack(dir: &Path, m: &Manifest, out: &Path) -> Result<(), BundleError> {
    let out_dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, f) =
        fleetadm_common::fsutil::create_temp_in(out_dir, &stem, 0o644).map_err(|e| BundleError::io(out, e))?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let yaml = serde_yaml::to_string(m).map_err(|e| BundleError::Manifest(e.to_string()))?;
    let mut h = tar::Header::new_gnu();
    h.set_size(yaml.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, MANIFEST, yaml.as_bytes()).map_err(|e| BundleError::io(out, e))?;
    for f in &m.files {
        let src = dir.join(&f.path);
        let mut file = std::fs::File::open(&src).map_err(|e| BundleError::io(&src, e))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(f.size);
        h.set_mode(f.mode);
        h.set_cksum();
        tar.append_data(&mut h, &f.path, &mut file).map_err(|e| BundleError::io(&src, e))?;
    }
    let gz = tar.into_inner().map_err(|e| BundleError::io(out, e))?;
    let f = gz.finish().map_err(|e| BundleError::io(out, e))?;
    f.sync_all().map_err(|e| BundleError::io(out, e))?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BundleError::io(out, e)
    })
}

/// Unpack a tar or tar.gz into `dest` (which must be empty). Refuses links, devices, absolute or
/// escaping paths, and archives that end early.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), BundleError> {
    let f = std::fs::File::open(archive).map_err(|e| BundleError::io(archive, e))?;
    let mut magic = [0u8; 2];
    let gz = {
        let mut probe = std::fs::File::open(archive).map_err(|e| BundleError::io(archive, e))?;
        probe.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
    };
    let reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) };
    let mut tar = tar::Archive::new(reader);
    let entries = tar.entries().map_err(|e| BundleError::Archive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Archive(format!("truncated or corrupt archive: {e}")))?;
        let path = entry.path().map_err(|e| BundleError::Archive(e.to_string()))?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").trim_end_matches('/').to_string();
        if path.is_empty() {
            continue;
        }
        if !safe_bundle_path(&path) {
            return Err(BundleError::Archive(format!("entry {path:?} escapes the bundle root")));
        }
        let kind = entry.header().entry_type();
        let target = dest.join(&path);
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| BundleError::io(&target, e))?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
            }
            let mut out = std::fs::File::create(&target).map_err(|e| BundleError::io(&target, e))?;
            let want = entry.header().size().unwrap_or(0);
            let got = std::io::copy(&mut entry, &mut out)
                .map_err(|e| BundleError::Archive(format!("truncated or corrupt archive at {path}: {e}")))?;
            if got != want {
                return Err(BundleError::Archive(format!("truncated archive: {path} has {got} of {want} bytes")));
            }
        } else {
            return Err(BundleError::Archive(format!(
                "entry {path:?} is a link or special file; bundles hold plain files only"
            )));
        }
    }
    Ok(())
}
