//! Checkpoints: everything a run needs to continue bit for bit — weights, AdamW moments, the
//! step and the data-order position. Random streams are derived from (seed, step) and
//! (seed, epoch), so no RNG state needs saving. Also the run's kept best weights (`best/`).
//!
//! Layout: `<run>/checkpoints/step-NNNNNNN/{model.safetensors, optimizer.safetensors, state.json}`,
//! written into a `.partial` folder and renamed, so a folder without `.partial` is complete.
//! `state.json` records each tensor file's sha256, checked when the checkpoint is loaded: a
//! damaged file is found, and the checkpoint skipped for the one before.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{is_partial, load_safetensors, read_json, save_safetensors, sha256_file, write_json, PartialDir};
use crate::model::Encoder;
use crate::optim::AdamW;

/// Where a run is; saved as `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Steps done.
    pub step: usize,
    /// Current epoch (1-based) and how many of its batches are consumed.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// Steps skipped for a non-finite loss or gradient.
    pub bad_steps: usize,
    /// The model spec trained, to refuse a checkpoint of another model.
    pub model: String,
    /// Seconds spent training so far, over every process that worked on the run.
    #[serde(default)]
    pub seconds: f64,
    /// Of those, the seconds inside the training steps (batching, forward, backward,
    /// collectives, update): without validation and checkpoints, which rank 0 does alone.
    #[serde(default)]
    pub step_seconds: f64,
    /// Loss sums since the last log line and how many steps they hold, so the first line after
    /// a resume averages the same steps an uninterrupted run's would.
    #[serde(default)]
    pub log_sums: Vec<(String, f32)>,
    #[serde(default)]
    pub log_since: usize,
    /// sha256 of the checkpoint's tensor files, by name (empty in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
}

const TENSOR_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

fn folder(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Write a checkpoint for `state`, then delete all but the newest `keep`.
pub fn save(run_dir: &Path, state: &TrainState, encoder: &Encoder, opt: &AdamW, keep: usize) -> Result<PathBuf> {
    let dir = PartialDir::create(&folder(run_dir).join(format!("step-{:07}", state.step)))?;
    save_safetensors(&encoder.weights(), &dir.path().join(TENSOR_FILES[0]))?;
    let mut moments = HashMap::new();
    for ((name, _), (m, v)) in encoder.params.iter().zip(opt.moments()) {
        moments.insert(format!("m.{name}"), m.clone());
        moments.insert(format!("v.{name}"), v.clone());
    }
    save_safetensors(&moments, &dir.path().join(TENSOR_FILES[1]))?;
    let mut state = state.clone();
    for name in TENSOR_FILES {
        state.sha256.insert(name.to_string(), sha256_file(&dir.path().join(name))?);
    }
    write_json(&dir.path().join("state.json"), &state)?;
    let dest = dir.commit()?;
    let mut all = list(run_dir);
    while all.len() > keep {
        let old = all.remove(0);
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(dest)
}

/// Complete checkpoint folders, oldest first.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder(run_dir)) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !is_partial(p)
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Check a checkpoint's tensor files against the sha256 its state recorded.
fn verify(dir: &Path, state: &TrainState) -> Result<()> {
    for (name, want) in &state.sha256 {
        let path = dir.join(name);
        if sha256_file(&path)? != *want {
            return Err(Error::data(&path, "does not match the sha256 recorded in state.json: the file is damaged"));
        }
    }
    Ok(())
}

/// Load one checkpoint into the encoder and `opt`; any mismatch is an error naming the file,
/// and nothing is changed before everything is read and checked.
fn load_one(dir: &Path, encoder: &Encoder, opt: &mut AdamW) -> Result<TrainState> {
    let state: TrainState = read_json(&dir.join("state.json"))?;
    let model = &encoder.files.spec;
    if state.model != *model {
        return Err(Error::data(
            dir.join("state.json"),
            format!("checkpoint of model {}, this run trains {model}", state.model),
        ));
    }
    verify(dir, &state)?;
    let weights = load_safetensors(&dir.join(TENSOR_FILES[0]))?;
    let moments_path = dir.join(TENSOR_FILES[1]);
    let moments = load_safetensors(&moments_path)?;
    let mut restored = Vec::new();
    for (name, var) in &encoder.params {
        let get = |key: String| -> Result<Tensor> {
            let t = moments.get(&key).ok_or_else(|| Error::data(&moments_path, format!("missing tensor {key}")))?;
            if t.shape() != var.shape() {
                let msg = format!("{key} has shape {:?}, the model {:?}", t.dims(), var.dims());
                return Err(Error::data(&moments_path, msg));
            }
            Ok(t.clone())
        };
        restored.push((get(format!("m.{name}"))?, get(format!("v.{name}"))?));
    }
    // Checks every weight before setting any.
    encoder.set_weights(&weights, &dir.join(TENSOR_FILES[0]))?;
    opt.restore(restored, state.step)?;
    Ok(state)
}

/// Restore the newest checkpoint that loads; broken ones are reported through `warn` and
/// skipped. None when there is no usable checkpoint.
pub fn restore_latest(
    run_dir: &Path,
    encoder: &Encoder,
    opt: &mut AdamW,
    warn: &mut dyn FnMut(String),
) -> Result<Option<(TrainState, PathBuf)>> {
    for dir in list(run_dir).into_iter().rev() {
        match load_one(&dir, encoder, opt) {
            Ok(state) => return Ok(Some((state, dir))),
            Err(e) => warn(format!("skipping checkpoint {}: {e}", dir.display())),
        }
    }
    Ok(None)
}

/// The folder of the run's kept best weights.
fn best_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("best")
}

/// Keep the encoder's weights as the run's best so far, described by `meta` (`best.json`);
/// written whole or not at all.
pub fn save_best(run_dir: &Path, encoder: &Encoder, meta: &impl Serialize) -> Result<()> {
    let dir = PartialDir::create(&best_dir(run_dir))?;
    save_safetensors(&encoder.weights(), &dir.path().join("model.safetensors"))?;
    write_json(&dir.path().join("best.json"), meta)?;
    dir.commit().map(|_| ())
}

/// What `best.json` says of the kept best weights, if there are any.
pub fn best_meta<T: DeserializeOwned>(run_dir: &Path) -> Option<T> {
    read_json(&best_dir(run_dir).join("best.json")).ok()
}

/// Load the kept best weights into the encoder.
pub fn load_best(run_dir: &Path, encoder: &Encoder) -> Result<()> {
    let path = best_dir(run_dir).join("model.safetensors");
    encoder.set_weights(&load_safetensors(&path)?, &path)
}

/// Forget the kept best weights (a fresh start).
pub fn clear_best(run_dir: &Path) {
    let _ = std::fs::remove_dir_all(best_dir(run_dir));
}
