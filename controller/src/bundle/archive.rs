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

/// What one import may unpack. The manifest comes first and declares every file and size;
/// nothing beyond it, or beyond these caps, is ever written.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_total_bytes: u64,
    pub max_files: usize,
    pub max_file_bytes: u64,
    pub max_manifest_bytes: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_total_bytes: 64 << 30, max_files: 10_000, max_file_bytes: 16 << 30, max_manifest_bytes: 4 << 20 }
    }
}

impl Budget {
    /// Refuse a manifest that declares more than the budget allows.
    pub fn check(&self, m: &Manifest) -> Result<(), BundleError> {
        let over = |what: String| Err(BundleError::Archive(format!("{what}; refused before unpacking anything")));
        if m.files.len() > self.max_files {
            return over(format!(
                "the manifest lists {} files, more than the {} allowed",
                m.files.len(),
                self.max_files
            ));
        }
        if let Some(f) = m.files.iter().find(|f| f.size > self.max_file_bytes) {
            return over(format!(
                "{} declares {} bytes, more than the {} allowed per file",
                f.path, f.size, self.max_file_bytes
            ));
        }
        let total: u64 = m.files.iter().map(|f| f.size).fold(0u64, |a, b| a.saturating_add(b));
        if total > self.max_total_bytes {
            return over(format!("the bundle declares {total} bytes, more than the {} allowed", self.max_total_bytes));
        }
        Ok(())
    }
}

/// Unpack a tar or tar.gz into `dest` (which must be empty) and return its manifest.
///
/// `bundle.yaml` must be the first file: it is parsed and checked against `budget` before any
/// other entry is written, and every later file must be one it lists, with exactly the size it
/// declares. Links, devices, absolute or escaping paths, unlisted or repeated files, and
/// archives that end early are refused. On an error the caller removes `dest`.
pub fn unpack(archive: &Path, dest: &Path, budget: &Budget) -> Result<Manifest, BundleError> {
    let f = std::fs::File::open(archive).map_err(|e| BundleError::io(archive, e))?;
    let mut magic = [0u8; 2];
    let gz = {
        let mut probe = std::fs::File::open(archive).map_err(|e| BundleError::io(archive, e))?;
        probe.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
    };
    let reader: Box<dyn Read> = if gz { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) };
    let mut tar = tar::Archive::new(reader);
    let entries = tar.entries().map_err(|e| BundleError::Archive(e.to_string()))?;
    let mut manifest: Option<Manifest> = None;
    let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
    let mut entries_seen = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Archive(format!("truncated or corrupt archive: {e}")))?;
        entries_seen += 1;
        if entries_seen > budget.max_files.saturating_mul(2) + 64 {
            return Err(BundleError::Archive(format!("more than {entries_seen} entries; refused")));
        }
        let path = entry.path().map_err(|e| BundleError::Archive(e.to_string()))?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").trim_end_matches('/').to_string();
        if path.is_empty() {
            continue;
        }
        if !safe_bundle_path(&path) {
            return Err(BundleError::Archive(format!("entry {path:?} escapes the bundle root")));
        }
        let kind = entry.header().entry_type();
        let size = entry.header().size().map_err(|e| BundleError::Archive(format!("{path}: {e}")))?;
        if kind.is_dir() {
            continue; // directories are made for the files they hold
        }
        if !kind.is_file() {
            return Err(BundleError::Archive(format!(
                "entry {path:?} is a link or special file; bundles hold plain files only"
            )));
        }
        if manifest.is_none() {
            if path != MANIFEST {
                return Err(BundleError::Archive(format!(
                    "the first file is {path:?}; {MANIFEST} must come first (make bundles with `controller bundle pack`)"
                )));
            }
            if size > budget.max_manifest_bytes {
                return Err(BundleError::Archive(format!(
                    "{MANIFEST} is {size} bytes; at most {} allowed",
                    budget.max_manifest_bytes
                )));
            }
            let mut text = String::new();
            (&mut entry)
                .take(budget.max_manifest_bytes + 1)
                .read_to_string(&mut text)
                .map_err(|e| BundleError::Archive(format!("{MANIFEST}: {e}")))?;
            let m = Manifest::parse(&text)?;
            budget.check(&m)?;
            expected = m.files.iter().map(|f| (f.path.clone(), f.size)).collect();
            std::fs::write(dest.join(MANIFEST), text.as_bytes()).map_err(|e| BundleError::io(dest, e))?;
            manifest = Some(m);
            continue;
        }
        let Some(want) = expected.remove(&path) else {
            return Err(BundleError::Archive(format!(
                "entry {path:?} is not listed in {MANIFEST} (or is listed once and archived twice)"
            )));
        };
        if size != want {
            return Err(BundleError::Archive(format!("{path}: the archive says {size} bytes, {MANIFEST} says {want}")));
        }
        let target = dest.join(&path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| BundleError::io(parent, e))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| BundleError::io(&target, e))?;
        let got = std::io::copy(&mut (&mut entry).take(want + 1), &mut out)
            .map_err(|e| BundleError::Archive(format!("truncated or corrupt archive at {path}: {e}")))?;
        if got != want {
            return Err(BundleError::Archive(format!("truncated archive: {path} has {got} of {want} bytes")));
        }
    }
    let m = manifest.ok_or_else(|| BundleError::Archive(format!("no {MANIFEST} in the archive")))?;
    if let Some((missing, _)) = expected.into_iter().next() {
        return Err(BundleError::Verify(format!("{missing} is listed in the manifest but missing")));
    }
    Ok(m)
}
