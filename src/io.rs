//! File I/O that the rest of the crate shares: atomic writes, JSON, sha256, lock files and
//! folders written under a `.partial` name then renamed, safetensors files. A leaf module: it
//! uses nothing of the crate but the error type.
//!
//! Temporary names are `.<name>.<pid>.<n>.tmp`: unique per process and write, so two processes
//! never share one, and [`clean_stale`] can tell a dead process's leftovers from live ones.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};

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

/// `value` as pretty JSON with a final newline, written atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::json(path, e))?;
    write_atomic(path, (text + "\n").as_bytes())
}

/// A JSON file read into `T`; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::json(path, e))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// sha256 of some bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// Fail before any work when `path` cannot take an output file: a folder is in the way, or the
/// folder it goes in is missing.
pub fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::data(path, "is a folder; give a file name for the output, e.g. out.safetensors"));
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(Error::data(dir, "no such folder for the output file; create it first")),
        _ => Ok(()),
    }
}

/// An exclusive OS lock on a file, held until dropped (the OS releases it if the process dies,
/// so a crash leaves no stale lock). The file holds the holder's process id.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Take the lock on `path` (created if missing); `Ok(None)` when another process holds it.
    pub fn try_take(path: &Path) -> Result<Option<Self>> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Self::held(path, file).map(Some),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }

    /// Take the lock on `path`, waiting while another process holds it; `waiting` is called
    /// once before a wait.
    pub fn take(path: &Path, waiting: &mut dyn FnMut()) -> Result<Self> {
        if let Some(lock) = Self::try_take(path)? {
            return Ok(lock);
        }
        waiting();
        let file = open_lock_file(path)?;
        file.lock().map_err(|e| Error::io(path, e))?;
        Self::held(path, file)
    }

    fn held(path: &Path, mut file: File) -> Result<Self> {
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(path, e))?;
        Ok(Self { _file: file })
    }

    /// Who holds the lock on `path`: "process N", or "another process" when it says nothing.
    pub fn holder(path: &Path) -> String {
        let mut pid = String::new();
        let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut pid));
        match pid.trim() {
            "" => "another process".to_string(),
            p => format!("process {p}"),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// A folder written under `<dest>.partial` and renamed over `dest` when complete, so a folder
/// without the suffix is always whole. A leftover `.partial` (a kill) is removed on creation.
pub struct PartialDir {
    tmp: PathBuf,
    dest: PathBuf,
}

impl PartialDir {
    pub fn create(dest: &Path) -> Result<Self> {
        let name = dest.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dest.with_file_name(format!("{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self { tmp, dest: dest.to_path_buf() })
    }

    /// Where to write the folder's files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replace `dest` with the finished folder.
    pub fn commit(self) -> Result<PathBuf> {
        let _ = std::fs::remove_dir_all(&self.dest);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        Ok(self.dest)
    }
}

/// Whether a folder name is a [`PartialDir`] in progress.
pub fn is_partial(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".partial"))
}

/// Save tensors as safetensors through a temp file and a rename, with `{"format": "pt"}`
/// metadata (what transformers expects) and the ordinary file mode (candle's own writer
/// leaves 0600, which other users cannot load).
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let raw = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), RawTensor::new(t)?)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| Error::data(path, e.to_string()))?;
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(raw, &meta).map_err(|e| Error::data(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// The tensors of a safetensors file, on the CPU; an unreadable file is an error naming it.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::data(path, format!("not a readable safetensors file: {e}")))
}

/// A tensor's little-endian bytes, for the safetensors writer.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawTensor {
    fn new(t: &Tensor) -> candle_core::Result<Self> {
        use safetensors::Dtype as S;
        let flat = t.flatten_all()?;
        let (dtype, data): (S, Vec<u8>) = match t.dtype() {
            DType::F32 => (S::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F64 => (S::F64, flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => (S::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::BF16 => (S::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::I64 => (S::I64, flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U32 => (S::U32, flat.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U8 => (S::U8, flat.to_vec1::<u8>()?),
            other => candle_core::bail!("cannot save a {other:?} tensor"),
        };
        Ok(Self { dtype, shape: t.dims().to_vec(), data })
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Fill `buf` from `file` at `offset`, without moving a shared cursor (threads may read at once).
pub fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], offset + done as u64)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_place_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
        assert_ne!(temp_path(&path), temp_path(&path), "each write gets its own name");
        // A folder in the way: an error naming the path, and no temporary left behind.
        let e = write_atomic(dir, b"x").unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
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
    }

    #[test]
    fn a_lock_is_exclusive_names_its_holder_and_is_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".lock");
        let held = Lock::try_take(&path).unwrap().unwrap();
        assert!(Lock::try_take(&path).unwrap().is_none());
        assert_eq!(Lock::holder(&path), format!("process {}", std::process::id()));
        drop(held);
        assert!(Lock::try_take(&path).unwrap().is_some());
    }

    #[test]
    fn a_partial_folder_replaces_its_destination_only_when_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("model");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("old.txt"), "old").unwrap();
        let dir = PartialDir::create(&dest).unwrap();
        assert!(is_partial(dir.path()));
        std::fs::write(dir.path().join("new.txt"), "new").unwrap();
        assert!(dest.join("old.txt").is_file(), "untouched until committed");
        dir.commit().unwrap();
        assert!(dest.join("new.txt").is_file() && !dest.join("old.txt").exists());
        assert!(!tmp.path().join("model.partial").exists());
    }

    #[test]
    fn json_and_sha256_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("v.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![1, 2, 3]);
        let e = read_json::<String>(&path).unwrap_err().to_string();
        assert!(e.contains("v.json"), "{e}");
        std::fs::write(&path, "abc").unwrap();
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&path).unwrap(), want);
        assert_eq!(sha256_hex(b"abc"), want);
    }
}
