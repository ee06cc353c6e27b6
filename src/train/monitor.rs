//! Watching a run between steps: validation on held-out pairs (and STS-B dev), what the
//! geometry says (fine, drift, collapse), the push/pull balance at the start, and the run's
//! log (`log.jsonl`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::batch::TextTokenizer;
use crate::data::source::Pair;
use crate::dist::World;
use crate::error::{Error, Result};
use crate::eval::dev::DevSet;
use crate::loss::objective::Objective;
use crate::metrics::{held_out_geometry, Embeddings};
use crate::model::{Encoder, EMBED_BATCH};

/// Held-out numbers at one validation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Validation {
    /// Alignment (alpha = 2) of held-out adjacent pairs.
    pub val_align: f64,
    /// Uniformity at the configured t of the held-out anchors and positives.
    pub val_uniform: f64,
    /// Mean cosine of distinct held-out anchors.
    pub val_mean_cos: f64,
    /// Share of (anchor, other positive) pairs that are farther apart than the anchor and its
    /// own positive: 1 = positives always closest, 0.5 = no closer than strangers.
    #[serde(default)]
    pub val_pos_auc: f64,
    /// STS-B dev Spearman x 100 (with `train.select = "stsb-dev"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_dev: Option<f64>,
}

impl std::fmt::Display for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "val align {:.4} (positive closer {:.1}%) uniform {:.4} mean cos {:.4}",
            self.val_align,
            100.0 * self.val_pos_auc,
            self.val_uniform,
            self.val_mean_cos
        )?;
        match self.sts_dev {
            Some(s) => write!(f, " | STS-B dev {s:.2}"),
            None => Ok(()),
        }
    }
}

/// A mean cosine of held-out sentences at or above this is a collapse (when it also rose).
pub const COLLAPSE_COSINE: f64 = 0.95;
/// Held-out positives this far apart (squared distance; 2 is the expected distance of random
/// unit vectors) have drifted towards random.
pub const DRIFT_ALIGN: f64 = 1.8;
/// ...and so have positives closer to their anchor than only this share of other held-out
/// sentences (MiniLM-L6 [CLS] starts at 0.61 on ELTeC: adjacent sentences are weak positives).
pub const DRIFT_AUC: f64 = 0.55;

/// What the held-out geometry says about the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Fine,
    /// The positives drifted towards random (a warning: the run goes on).
    Drift(String),
    /// Every sentence is being mapped near one point: the run stops.
    Collapse(String),
}

/// Judge a validation against the one before training (`start`).
pub fn health(v: &Validation, start: &Validation, t: f64) -> Health {
    if v.val_mean_cos >= COLLAPSE_COSINE && v.val_mean_cos > start.val_mean_cos + 0.02 {
        return Health::Collapse(format!(
            "the embeddings collapsed: held-out mean cosine {:.3} (it was {:.3} before training), uniformity {:.3} at t={t}, alignment {:.4}. The alignment term outweighs uniformity: raise loss.w_uniform or loss.t (keep w_uniform * t * (random-pair distance) above w_align * (positive-pair distance); see README, 'Collapse and drift'), or lower train.lr",
            v.val_mean_cos, start.val_mean_cos, v.val_uniform, v.val_align
        ));
    }
    if v.val_align >= DRIFT_ALIGN || v.val_pos_auc < DRIFT_AUC {
        return Health::Drift(format!(
            "positives drifted towards random: held-out alignment {:.3} (2 = random unit vectors), each positive closer than {:.0}% of the other held-out sentences (50% = chance); uniformity dominates: raise loss.w_align or lower loss.w_uniform",
            v.val_align,
            100.0 * v.val_pos_auc
        ));
    }
    Health::Fine
}

/// The push/pull balance of align + uniform at the start: shrinking every distance by a
/// factor lowers `w_align * d_pos` by more than it raises `w_uniform * L_uniform` (whose
/// derivative is at most `t * d_rand`) unless `w_uniform * t * d_rand > w_align * d_pos`. Below
/// 1 collapse is downhill all the way; `None` when InfoNCE (which repels by itself) is in the loss.
pub fn balance(start: &Validation, objective: &Objective) -> Option<f64> {
    let pull = objective.weight("align") * start.val_align;
    (!objective.repels() && pull > 0.0)
        .then(|| objective.weight("uniform") * objective.t() * 2.0 * (1.0 - start.val_mean_cos) / pull)
}

/// Alignment, uniformity (at `t`) and mean cosine of held-out pairs, dropout off; STS-B dev
/// too when `dev` is given. Over several ranks every rank must call this with the same inputs:
/// each embeds a share of the sentences, and all get the same numbers.
pub fn validate(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    pairs: &[Pair],
    t: f64,
    dev: Option<&DevSet>,
    device: &Device,
    world: &World,
) -> Result<Validation> {
    let dim = encoder.config.hidden_size;
    let embed = |texts: Vec<&str>| world.embed(encoder, tokenizer, &texts, EMBED_BATCH, device);
    let x = embed(pairs.iter().map(|p| &*p.anchor).collect())?;
    let y = embed(pairs.iter().map(|p| &*p.positive).collect())?;
    let n = pairs.len();
    let sts_dev = dev.map(|d| d.score(encoder, device, world)).transpose()?;
    if x.iter().chain(&y).any(|v| !v.is_finite()) {
        // Blown-up weights: the numbers are undefined, and the run's bad-step guard stops it.
        let nan = f64::NAN;
        return Ok(Validation { val_align: nan, val_uniform: nan, val_mean_cos: nan, val_pos_auc: nan, sts_dev });
    }
    let g = held_out_geometry(Embeddings { data: &x, n, dim }, Embeddings { data: &y, n, dim }, t)?;
    Ok(Validation {
        val_align: g.align,
        val_uniform: g.uniform,
        val_mean_cos: g.mean_cos,
        val_pos_auc: g.pos_auc,
        sts_dev,
    })
}

/// One line of `log.jsonl`. Step 0 is the model before training (no train numbers).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    /// Means since the previous line: the total and each named loss part.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train: BTreeMap<String, f32>,
    #[serde(flatten)]
    pub val: Validation,
    /// Drift or collapse, when the held-out geometry shows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    pub pairs_per_s: f64,
    pub elapsed_s: f64,
}

/// A run's `log.jsonl`, appended a line at a time.
pub struct Log {
    file: std::fs::File,
    path: PathBuf,
}

impl Log {
    /// Open `<run_dir>/log.jsonl`: new (any old one removed), or on resume trimmed to the lines
    /// up to `step` (a resumed run rewrites what came after), which are returned.
    pub fn open(run_dir: &Path, resume: bool, step: usize) -> Result<(Self, Vec<LogLine>)> {
        let path = run_dir.join("log.jsonl");
        let kept = match resume {
            true => truncate_log(&path, step)?,
            false => {
                let _ = std::fs::remove_file(&path);
                Vec::new()
            }
        };
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok((Self { file, path }, kept))
    }

    pub fn write(&mut self, line: &LogLine) -> Result<()> {
        let json = serde_json::to_string(line).map_err(|e| Error::json(&self.path, e))?;
        writeln!(self.file, "{json}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// Keep only the log lines up to `step`; returns the kept lines.
fn truncate_log(path: &Path, step: usize) -> Result<Vec<LogLine>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let kept: Vec<(&str, LogLine)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok().map(|v| (l, v)))
        .filter(|(_, v)| v.step <= step)
        .collect();
    let bytes: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
    crate::io::write_atomic(path, bytes.as_bytes())?;
    Ok(kept.into_iter().map(|(_, v)| v).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LossConfig, LossKind};

    fn val(align: f64, cos: f64) -> Validation {
        Validation { val_align: align, val_uniform: 0.0, val_mean_cos: cos, val_pos_auc: 0.8, sts_dev: None }
    }

    #[test]
    fn health_flags_collapse_and_drift() {
        let start = val(0.55, 0.69);
        assert_eq!(health(&val(0.6, 0.5), &start, 2.0), Health::Fine);
        // Everything on one point: collapse, whatever the alignment.
        assert!(matches!(health(&val(0.004, 0.998), &start, 5.0), Health::Collapse(m) if m.contains("loss.w_uniform")));
        // A base model that already sits at 0.97 and gets no narrower is not a collapse...
        assert_eq!(health(&val(0.01, 0.975), &val(0.01, 0.97), 2.0), Health::Fine);
        // ...but one that narrows further is.
        assert!(matches!(health(&val(0.01, 0.995), &val(0.01, 0.97), 2.0), Health::Collapse(_)));
        // Positives 1.85 apart (random unit vectors: 2), or no closer than strangers: drift.
        assert!(matches!(health(&val(1.85, 0.0), &start, 2.0), Health::Drift(m) if m.contains("1.850")));
        assert_eq!(health(&val(1.7, 0.0), &start, 2.0), Health::Fine);
        let chance = Validation { val_pos_auc: 0.52, ..val(0.4, 0.5) };
        assert!(matches!(health(&chance, &start, 2.0), Health::Drift(m) if m.contains("52%")));
    }

    #[test]
    fn balance_predicts_collapse() {
        // The cone of MiniLM's [CLS]: positives 0.55 apart, mean cosine 0.69.
        let start = val(0.55, 0.69);
        let paper = LossConfig { w_align: 0.9, w_uniform: 0.1, t: 5.0, ..Default::default() };
        let r = balance(&start, &Objective::new(&paper)).unwrap();
        assert!((r - 0.1 * 5.0 * 0.62 / (0.9 * 0.55)).abs() < 1e-12 && r < 1.0);
        assert!(balance(&start, &Objective::new(&LossConfig::default())).unwrap() > 2.0);
        let nce = LossConfig { kind: LossKind::Mix, w_infonce: 1.0, ..paper.clone() };
        assert_eq!(balance(&start, &Objective::new(&nce)), None);
        let infonce = LossConfig { kind: LossKind::Infonce, ..paper };
        assert_eq!(balance(&start, &Objective::new(&infonce)), None);
    }
}
