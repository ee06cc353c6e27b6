//! Checkpoints: everything a run needs to continue bit for bit — weights, AdamW moments, the
//! step and the data-order position. Random streams are derived from (seed, step) and
//! (seed, epoch), so no RNG state needs saving.
//!
//! Layout: `<run>/checkpoints/step-NNNNNNN/{model.safetensors, optimizer.safetensors, state.json}`,
//! written into a `.partial` folder and renamed, so a folder without `.partial` is complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::export::write_json;
use crate::model::save_safetensors;
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
    /// Loss sums since the last log line and how many steps they hold, so the first line after
    /// a resume averages the same steps an uninterrupted run's would.
    #[serde(default)]
    pub log_sums: Vec<(String, f32)>,
    #[serde(default)]
    pub log_since: usize,
}

fn folder(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Write a checkpoint for `state`, then delete all but the newest `keep`.
pub fn save(run_dir: &Path, state: &TrainState, params: &[(String, Var)], opt: &AdamW, keep: usize) -> Result<PathBuf> {
    let root = folder(run_dir);
    let dest = root.join(format!("step-{:07}", state.step));
    let tmp = root.join(format!("step-{:07}.partial", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights: HashMap<String, Tensor> = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    save_safetensors(&weights, &tmp.join("model.safetensors"))?;
    let mut moments = HashMap::new();
    for ((name, _), (m, v)) in params.iter().zip(opt.moments()) {
        moments.insert(format!("m.{name}"), m.clone());
        moments.insert(format!("v.{name}"), v.clone());
    }
    save_safetensors(&moments, &tmp.join("optimizer.safetensors"))?;
    write_json(&tmp.join("state.json"), state)?;
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
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
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".partial"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Load one checkpoint into `params` and `opt`; any mismatch is an error naming the file.
fn load_one(dir: &Path, model: &str, params: &[(String, Var)], opt: &mut AdamW) -> Result<TrainState> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| Error::data(&state_path, format!("unreadable state: {e}")))?;
    if state.model != model {
        return Err(Error::data(&state_path, format!("checkpoint of model {}, this run trains {model}", state.model)));
    }
    let dev = Device::Cpu;
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(name);
        candle_core::safetensors::load(&p, &dev).map_err(|e| Error::data(&p, format!("corrupt or truncated: {e}")))
    };
    let (weights, moments) = (read("model.safetensors")?, read("optimizer.safetensors")?);
    let mut values = Vec::new();
    let mut restored = Vec::new();
    for (name, var) in params {
        let get = |map: &HashMap<String, Tensor>, key: &str, file: &str| -> Result<Tensor> {
            let t = map.get(key).ok_or_else(|| Error::data(dir.join(file), format!("missing tensor {key}")))?;
            if t.shape() != var.shape() {
                return Err(Error::data(
                    dir.join(file),
                    format!("{key} has shape {:?}, the model {:?}", t.dims(), var.dims()),
                ));
            }
            Ok(t.clone())
        };
        values.push(get(&weights, name, "model.safetensors")?);
        restored.push((
            get(&moments, &format!("m.{name}"), "optimizer.safetensors")?,
            get(&moments, &format!("v.{name}"), "optimizer.safetensors")?,
        ));
    }
    // Only now, with everything read and checked, touch the live state.
    for ((_, var), value) in params.iter().zip(values) {
        var.set(&value)?;
    }
    opt.restore(restored, state.step)?;
    Ok(state)
}

/// Restore the newest checkpoint that loads; broken ones are reported through `warn` and
/// skipped. None when there is no usable checkpoint.
pub fn restore_latest(
    run_dir: &Path,
    model: &str,
    params: &[(String, Var)],
    opt: &mut AdamW,
    warn: &mut dyn FnMut(String),
) -> Result<Option<(TrainState, PathBuf)>> {
    for dir in list(run_dir).into_iter().rev() {
        match load_one(&dir, model, params, opt) {
            Ok(state) => return Ok(Some((state, dir))),
            Err(e) => warn(format!("skipping checkpoint {}: {e}", dir.display())),
        }
    }
    Ok(None)
}
