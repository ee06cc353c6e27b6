//! Atomic writes: every file is written under a temporary name in its own folder and renamed
//! into place, so a reader never sees half a file and a kill leaves the old file intact.
//!
//! Temporary names are `.<name>.<pid>.<n>.tmp`: unique per process and write, so two processes
//! never share one, and [`clean_stale`] can tell a dead process's leftovers from live ones.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// A fresh temporary path beside `path` (see the module docs for the naming).
pub fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

/// Write `bytes` to `path` atomically; the temporary file is removed if anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Remove temporary files for `path` left by processes that no longer run (a kill between
/// create and rename). Where process ids cannot be checked (no `/proc`), nothing is removed.
pub fn clean_stale(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_place_and_leaves_no_temporary() {
        let dir = tempfile_dir("write");
        let path = dir.join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert_ne!(temp_path(&path), temp_path(&path), "each write gets its own name");
        // A folder in the way: an error naming the path, and no temporary left behind.
        let e = write_atomic(&dir, b"x").unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile_dir("stale");
        let path = dir.join("emb.safetensors");
        // A process id that is not running: above the kernel's maximum.
        let dead = dir.join(".emb.safetensors.4294967.0.tmp");
        let mine = temp_path(&path);
        let other = dir.join(".other.safetensors.4294967.0.tmp");
        for p in [&dead, &mine, &other] {
            std::fs::write(p, b"").unwrap();
        }
        clean_stale(&path);
        assert!(!dead.exists() && mine.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hs-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
