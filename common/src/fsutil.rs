//! File writes that never leave a half-written file behind, and private (0600) secrets.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Create a new file in `dir` for writing, named `.{stem}.{random}`: `O_EXCL` (a file, or a
/// symlink planted by someone else, at that name is never opened) and `O_NOFOLLOW`, mode `mode`.
pub fn create_temp_in(dir: &Path, stem: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    use rand::Rng;
    for _ in 0..16 {
        let suffix: u64 = rand::thread_rng().gen();
        let path = dir.join(format!(".{stem}.{suffix:016x}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                // The mode given to open() is filtered by the umask; make it exact.
                f.set_permissions(fs::Permissions::from_mode(mode))?;
                return Ok((path, f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("cannot create a temporary file in {}", dir.display())))
}

/// Open an existing file, or create it, for appending, never through a symlink.
pub fn open_append_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(mode).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// fsync a directory (after a rename in it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `data` to `path` atomically: an exclusive temp file in the same directory, fsync,
/// rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let (tmp, mut f) = create_temp_in(dir, &name.to_string_lossy(), mode)?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir);
    Ok(())
}

/// Is `path` strictly below `root`, compared component by component after refusing `..` and
/// `.` (so `/etc/kubernetes/../x` is not below `/etc/kubernetes`, and `/etc/kubernetes-x` is
/// not either)? No filesystem access: symlinks are the writer's concern (`O_NOFOLLOW`).
pub fn is_below(root: &Path, path: &Path) -> bool {
    use std::path::Component;
    path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && root.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.starts_with(root)
        && path != root
}

/// Write a secret (private key, token) readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Create a directory (and parents) and set it to `mode`.
pub fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // no temp files left behind
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn below_compares_components_not_strings() {
        let root = Path::new("/etc/kubernetes");
        // (`.` in the middle means nothing: Path drops it)
        for ok in ["/etc/kubernetes/pki/ca.crt", "/etc/kubernetes/x", "/etc/kubernetes/./x"] {
            assert!(is_below(root, Path::new(ok)), "{ok}");
        }
        for bad in [
            "/etc/kubernetes",
            "/etc/kubernetes/",
            "/etc/kubernetes/../shadow",
            "/etc/kubernetes/pki/../../shadow",
            "/etc/kubernetes-evil/x",
            "etc/kubernetes/x",
            "/etc",
        ] {
            assert!(!is_below(root, Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn temp_files_never_follow_a_planted_symlink() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("hosts");
        // The names an attacker could predict (the old scheme used the pid) all point at the victim.
        symlink(&victim, dir.path().join(format!(".hosts.tmp-{}", std::process::id()))).unwrap();
        for _ in 0..50 {
            write_atomic(&p, b"new", 0o644).unwrap();
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&p).unwrap(), b"new");
        // Exclusive: an existing name is never reused, and the names are not predictable.
        let a = create_temp_in(dir.path(), "x", 0o600).unwrap().0;
        let b = create_temp_in(dir.path(), "x", 0o600).unwrap().0;
        assert_ne!(a, b);
        // Appending never goes through a symlink either.
        let link = dir.path().join("partial");
        symlink(&victim, &link).unwrap();
        assert!(open_append_nofollow(&link, 0o600).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }
}
