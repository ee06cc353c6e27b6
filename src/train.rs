//! The training loop: pairs -> length-bucketed batches -> encoder -> loss -> AdamW.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainState};
use crate::config::{LossConfig, LossKind, RunConfig, Select};
use crate::data::batch::{Batch, TextTokenizer};
use crate::data::order::EpochOrder;
use crate::data::pairs::Pair;
use crate::data::prepared::PairView;
use crate::error::{Error, Result};
use crate::loss;
use crate::model::{embed_texts, Encoder};
use crate::optim::{lr_at, AdamW};

/// What one step measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub loss: f32,
    /// The objective's named parts (see [`loss::objective`]).
    pub parts: Vec<(&'static str, f32)>,
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl StepStats {
    fn part(&self, name: &str) -> f32 {
        loss::part(&self.parts, name).unwrap_or(f32::NAN)
    }
}

/// Why a step made no update: the loss or the gradient norm was not finite.
#[derive(Debug, Clone)]
pub struct NonFinite(pub String);

/// What one step did.
#[derive(Debug)]
pub enum StepOutcome {
    Updated(StepStats),
    /// Skipped without touching the weights.
    Skipped(NonFinite),
}

/// The rows of one step's batch: the anchors, their adjacent sentences, and the anchors again
/// when dropout views are a positive source (`loss.w_dropout > 0`).
pub fn step_rows<'a, T: ?Sized>(pairs: &[[&'a T; 2]], loss_cfg: &LossConfig) -> Vec<&'a T> {
    let mut rows: Vec<&T> = pairs.iter().map(|p| p[0]).chain(pairs.iter().map(|p| p[1])).collect();
    if loss::views(loss_cfg) == 3 {
        rows.extend(pairs.iter().map(|p| p[0]));
    }
    rows
}

/// One step's micro-batches from its pairs' word-piece ids ([`step_rows`] in each).
pub fn step_batches(
    ids: &[[Vec<u32>; 2]],
    micro_pairs: usize,
    loss_cfg: &LossConfig,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<Vec<Batch>> {
    let rows: Vec<[&[u32]; 2]> = ids.iter().map(|[a, b]| [a.as_slice(), b.as_slice()]).collect();
    let micro = if micro_pairs == 0 { rows.len() } else { micro_pairs };
    rows.chunks(micro.max(1)).map(|c| tokenizer.batch_ids(&step_rows(c, loss_cfg), device)).collect()
}

/// A batch's loss, its parts and the parameter gradients.
pub struct Gradients {
    pub loss: f32,
    pub parts: Vec<(&'static str, f32)>,
    pub grads: GradStore,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// The view blocks of a batch's embeddings: anchors, positives (and dropout views).
pub(crate) fn split_views(emb: &Tensor, views: usize) -> candle_core::Result<Vec<Tensor>> {
    let n = emb.dim(0)? / views;
    (0..views).map(|k| emb.narrow(0, k * n, n)).collect()
}

/// The objective on view blocks; `mean` holds the mean-pooled rows of the first two blocks.
pub(crate) fn objective_of(
    blocks: &[Tensor],
    mean: Option<&Tensor>,
    cfg: &LossConfig,
) -> candle_core::Result<loss::LossParts> {
    let v = loss::Views { x: &blocks[0], y: &blocks[1], x_drop: blocks.get(2), mean_xy: mean };
    loss::objective(&v, cfg)
}

/// The mean-pooled rows of a batch's anchors and positives (the first two view blocks).
fn mean_rows(mean: Option<Tensor>, views: usize) -> candle_core::Result<Option<Tensor>> {
    mean.map(|m| {
        let n = m.dim(0)? / views;
        m.narrow(0, 0, 2 * n)
    })
    .transpose()
}

/// The encoder a run trains and, with `loss.mean_teacher`, its frozen teacher (mean pooling),
/// both with `kernels` and computing in `compute`.
pub fn load_encoders(
    files: &crate::model::source::ModelFiles,
    cfg: &RunConfig,
    device: &Device,
    kernels: crate::model::ops::Kernels,
    compute: candle_core::DType,
) -> Result<(Encoder, Option<Encoder>)> {
    let load = |pooling, trainable| -> Result<Encoder> {
        let mut e = Encoder::load_with(files, pooling, trainable, device, kernels)?;
        e.bert.compute = compute;
        Ok(e)
    };
    let teacher = cfg.loss.mean_teacher.then(|| load(crate::model::pooling::Pooling::Mean, false)).transpose()?;
    Ok((load(cfg.model.pooling, true)?, teacher))
}

/// Loss and gradients of one batch given as micro-batches (each laid out by [`step_texts`]).
///
/// One micro-batch: an ordinary forward and backward. Several: GradCache (Gao et al. 2021),
/// exact for any loss over the whole batch with the memory of one micro-batch: embed every
/// micro-batch without keeping its graph, take the loss over all embeddings and its gradient
/// `G` with respect to them, then run each micro-batch again with a graph and back-propagate
/// `sum(e * G)`; the parameter gradients add up to the full batch's. Each micro-batch draws
/// its dropout masks from its own seed, so both passes see the same masks.
///
/// With a frozen `teacher` (`loss.mean_teacher`), the mean-pooled view comes from it instead of
/// from the same pass.
pub fn batch_gradients(
    encoder: &Encoder,
    teacher: Option<&Encoder>,
    micro: &[Batch],
    loss_cfg: &LossConfig,
    dropout_rng: Option<&mut StdRng>,
) -> Result<std::result::Result<Gradients, NonFinite>> {
    let t0 = Instant::now();
    let views = loss::views(loss_cfg);
    let finite = |parts: &loss::LossParts| -> Result<std::result::Result<f32, NonFinite>> {
        let loss = parts.total.to_scalar::<f32>()?;
        Ok(if loss.is_finite() {
            Ok(loss)
        } else {
            Err(NonFinite(format!("loss is {loss} (parts {:?})", parts.parts)))
        })
    };
    // With a teacher, the encoder itself need not keep its mean view.
    let with_mean = loss_cfg.needs_mean_view() && teacher.is_none();
    if let [batch] = micro {
        let (emb, own) = encoder.embed_views(batch, dropout_rng, with_mean)?;
        let mean = own.or(teacher_view(teacher, batch)?);
        let parts = objective_of(&split_views(&emb, views)?, mean_rows(mean, views)?.as_ref(), loss_cfg)?;
        let loss = match finite(&parts)? {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let forward_s = t0.elapsed().as_secs_f64();
        let grads = parts.total.backward()?;
        let backward_s = t0.elapsed().as_secs_f64() - forward_s;
        return Ok(Ok(Gradients { loss, parts: parts.parts, grads, forward_s, backward_s }));
    }
    let seeds: Option<Vec<u64>> = dropout_rng.map(|r| micro.iter().map(|_| rand::Rng::gen(r)).collect());
    let rng_for = |k: usize| seeds.as_ref().map(|s| StdRng::seed_from_u64(s[k]));
    // Pass 1: embeddings only.
    let mut blocks: Vec<Vec<Tensor>> = vec![Vec::new(); views];
    let mut means: Vec<Vec<Tensor>> = vec![Vec::new(); 2];
    for (k, b) in micro.iter().enumerate() {
        let (emb, own) = encoder.embed_views(b, rng_for(k).as_mut(), with_mean)?;
        let mean = own.or(teacher_view(teacher, b)?);
        for (v, part) in split_views(&emb.detach(), views)?.into_iter().enumerate() {
            blocks[v].push(part);
        }
        if let Some(m) = mean {
            for (v, part) in split_views(&m, views)?.into_iter().take(2).enumerate() {
                means[v].push(part);
            }
        }
    }
    let vars = blocks.iter().map(|b| Var::from_tensor(&Tensor::cat(b, 0)?)).collect::<candle_core::Result<Vec<_>>>()?;
    let full: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let mean = match means[0].is_empty() {
        false => Some(Tensor::cat(&[Tensor::cat(&means[0], 0)?, Tensor::cat(&means[1], 0)?], 0)?),
        true => None,
    };
    let parts = objective_of(&full, mean.as_ref(), loss_cfg)?;
    let loss = match finite(&parts)? {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let g_emb = parts.total.backward()?;
    let g_views = full
        .iter()
        .map(|t| g_emb.get(t).cloned().map_or_else(|| t.zeros_like(), Ok))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let forward_s = t0.elapsed().as_secs_f64();
    // Pass 2: each micro-batch with a graph, back-propagating its rows of G.
    let rngs: Vec<Option<StdRng>> = (0..micro.len()).map(rng_for).collect();
    let acc = backprop_rows(encoder, micro, &g_views, rngs, with_mean)?;
    let backward_s = t0.elapsed().as_secs_f64() - forward_s;
    Ok(Ok(Gradients { loss, parts: parts.parts, grads: acc, forward_s, backward_s }))
}

/// The mean-pooled target rows of a micro-batch from a frozen `teacher` (mean pooling, no
/// dropout, no gradient), laid out like the encoder's own mean view.
fn teacher_view(teacher: Option<&Encoder>, batch: &Batch) -> candle_core::Result<Option<Tensor>> {
    teacher.map(|t| Ok(t.embed(batch, None)?.detach())).transpose()
}

/// GradCache's second pass: each micro-batch embedded again with its graph (and its own dropout
/// stream), `sum(e * G)` back-propagated with its rows of `G` (one tensor per view block, rows
/// in micro-batch order), and the parameter gradients added up.
fn backprop_rows(
    encoder: &Encoder,
    micro: &[Batch],
    g_views: &[Tensor],
    rngs: Vec<Option<StdRng>>,
    with_mean: bool,
) -> Result<GradStore> {
    let views = g_views.len();
    let mut acc =
        Var::new(0f32, encoder.params.first().map_or(&Device::Cpu, |(_, v)| v.device()))?.as_tensor().backward()?;
    let mut offset = 0;
    for (b, mut rng) in micro.iter().zip(rngs) {
        let n = b.lengths.len() / views;
        let (emb, _) = encoder.embed_views(b, rng.as_mut(), with_mean)?;
        let g =
            Tensor::cat(&g_views.iter().map(|g| g.narrow(0, offset, n)).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
        let grads = (emb * g)?.sum_all()?.backward()?;
        for (_, var) in &encoder.params {
            if let Some(gk) = grads.get(var.as_tensor()) {
                let sum = match acc.get(var.as_tensor()) {
                    Some(ga) => (ga + gk)?,
                    None => gk.clone(),
                };
                acc.insert(var.as_tensor(), sum);
            }
        }
        offset += n;
    }
    Ok(acc)
}

/// Forward, backward and (when the numbers are finite) an optimizer update on one batch, given
/// as one or more micro-batches, with an optional frozen `teacher` (see [`batch_gradients`]).
pub fn train_step(
    encoder: &Encoder,
    teacher: Option<&Encoder>,
    opt: &mut AdamW,
    micro: &[Batch],
    loss_cfg: &LossConfig,
    max_grad_norm: f64,
    dropout_rng: Option<&mut StdRng>,
) -> Result<StepOutcome> {
    let g = match batch_gradients(encoder, teacher, micro, loss_cfg, dropout_rng)? {
        Ok(g) => g,
        Err(e) => return Ok(StepOutcome::Skipped(e)),
    };
    let t1 = Instant::now();
    let grad_norm = opt.grad_norm(&g.grads)?;
    let backward_s = g.backward_s + t1.elapsed().as_secs_f64();
    if !grad_norm.is_finite() {
        return Ok(StepOutcome::Skipped(NonFinite(format!("gradient norm is {grad_norm} at loss {}", g.loss))));
    }
    let t2 = Instant::now();
    let scale = if max_grad_norm > 0.0 && grad_norm > max_grad_norm { max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
    opt.step(&g.grads, scale)?;
    Ok(StepOutcome::Updated(StepStats {
        loss: g.loss,
        parts: g.parts,
        grad_norm,
        forward_s: g.forward_s,
        backward_s,
        optimizer_s: t2.elapsed().as_secs_f64(),
    }))
}

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
pub fn balance(start: &Validation, cfg: &LossConfig) -> Option<f64> {
    let with_infonce = match cfg.kind {
        LossKind::Infonce => true,
        LossKind::Mix => cfg.w_infonce > 0.0,
        LossKind::AlignUniform => false,
    };
    let pull = cfg.w_align * start.val_align;
    (!with_infonce && pull > 0.0).then(|| cfg.w_uniform * cfg.t * 2.0 * (1.0 - start.val_mean_cos) / pull)
}

/// The share of (i, j != i) with `x_i . y_i > x_i . y_j`: how often an anchor is closer to its
/// own positive than to another pair's.
fn positive_auc(x: &Tensor, y: &Tensor) -> Result<f64> {
    let sims = x.matmul(&y.t()?)?.to_vec2::<f32>()?;
    let n = sims.len();
    if n < 2 {
        return Ok(1.0);
    }
    let closer: usize = sims.iter().enumerate().map(|(i, row)| row.iter().filter(|&&s| s < row[i]).count()).sum();
    Ok(closer as f64 / (n * (n - 1)) as f64)
}

/// Mean cosine over distinct rows of unit rows `x` [n, d]: `(|sum x|^2 - n) / (n (n - 1))`.
fn mean_cosine(x: &Tensor) -> Result<f64> {
    let n = x.dim(0)? as f64;
    let s = x.sum(0)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((s - n) / (n * (n - 1.0)).max(1.0))
}

/// STS-B dev, embedded and scored during training for model selection.
pub struct DevSet {
    pairs: Vec<(String, String)>,
    scores: Vec<f64>,
    tokenizer: TextTokenizer,
}

impl DevSet {
    /// `sts/STSBenchmark/sts-dev.csv` under the data root (read now, so a missing file stops
    /// the run before training); `tokenizer` truncates as evaluation does (`eval.max_len`).
    pub fn stsb(root: &Path, tokenizer: TextTokenizer) -> Result<Self> {
        let dev = crate::eval::tasks::stsb(&root.join("sts/STSBenchmark/sts-dev.csv"))?;
        if dev.pairs.len() < 3 {
            return Err(Error::Invalid(format!("{}: STS-B dev needs at least 3 pairs", root.display())));
        }
        Ok(Self { pairs: dev.pairs, scores: dev.scores, tokenizer })
    }

    /// Spearman x 100 of the cosine of each pair's embeddings against the gold scores.
    pub fn score(&self, encoder: &Encoder, device: &Device) -> Result<f64> {
        let texts: Vec<&str> = self.pairs.iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
        let flat = embed_texts(encoder, &self.tokenizer, &texts, crate::model::EMBED_BATCH, device)?;
        let d = encoder.config.hidden_size;
        let cos: Vec<f64> = (0..self.pairs.len())
            .map(|i| {
                crate::eval::protocol::cosine(
                    &flat[2 * i * d..(2 * i + 1) * d],
                    &flat[(2 * i + 1) * d..(2 * i + 2) * d],
                )
            })
            .collect();
        Ok(100.0 * crate::eval::stats::spearman(&cos, &self.scores))
    }
}

/// Alignment, uniformity (t from the config) and mean cosine of held-out pairs, dropout off;
/// STS-B dev too when `dev` is given.
pub fn validate(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    pairs: &[Pair],
    cfg: &LossConfig,
    dev: Option<&DevSet>,
    device: &Device,
) -> Result<Validation> {
    let embed = |texts: Vec<&str>| -> Result<Tensor> {
        let flat = embed_texts(encoder, tokenizer, &texts, crate::model::EMBED_BATCH, device)?;
        Ok(Tensor::from_vec(flat, (texts.len(), encoder.config.hidden_size), device)?)
    };
    let x = embed(pairs.iter().map(|p| &*p.anchor).collect())?;
    let y = embed(pairs.iter().map(|p| &*p.positive).collect())?;
    let val_align = loss::align(&x, &y, 2.0)?.to_scalar::<f32>()? as f64;
    let val_uniform = ((loss::uniform(&x, cfg.t)? + loss::uniform(&y, cfg.t)?)? / 2.0)?.to_scalar::<f32>()? as f64;
    let sts_dev = dev.map(|d| d.score(encoder, device)).transpose()?;
    Ok(Validation {
        val_align,
        val_uniform,
        val_mean_cos: mean_cosine(&x)?,
        val_pos_auc: positive_auc(&x, &y)?,
        sts_dev,
    })
}

/// One line of `log.jsonl`. Step 0 is the model before training (no train numbers).
#[derive(Debug, Default, Serialize, Deserialize)]
struct LogLine {
    step: usize,
    epoch: usize,
    lr: f64,
    /// Means since the previous line: the total and each named loss part.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    train: BTreeMap<String, f32>,
    #[serde(flatten)]
    val: Validation,
    /// Drift or collapse, when the held-out geometry shows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
    pairs_per_s: f64,
    elapsed_s: f64,
}

/// The step whose weights the run keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selected {
    pub by: Select,
    pub step: usize,
    /// The STS-B dev Spearman x 100 of that step, when selecting on it.
    pub sts_dev: Option<f64>,
}

/// How training ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub planned_steps: usize,
    /// The step this process resumed from (`--resume`), if it did.
    pub resumed_at: Option<usize>,
    /// Seconds spent training, over the whole run (every process, resumes included).
    pub seconds: f64,
    /// Pairs per second over the whole run.
    pub pairs_per_s: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub bad_steps: usize,
    /// Why the run stopped before its budget (a NaN loss, a collapse); the weights are the last
    /// good ones.
    pub stopped: Option<String>,
    /// The stop was the collapse guard (the weights are collapsed; nothing is exported).
    pub collapsed: bool,
    /// Warnings from the held-out geometry (drift of the positives), with their step.
    pub warnings: Vec<String>,
    /// Which step's weights the encoder holds now.
    pub selected: Selected,
}

/// Total steps for the budget: `steps`, else `epochs` full passes.
pub fn planned_steps(cfg: &RunConfig, n_pairs: usize) -> usize {
    if cfg.train.steps > 0 {
        cfg.train.steps
    } else {
        cfg.train.epochs * (n_pairs / cfg.train.batch_pairs)
    }
}

/// A seed for step `step`'s dropout masks, or epoch `epoch`'s shuffle: streams derived from the
/// run seed, so a resumed run draws exactly what an uninterrupted one would.
fn derived_seed(seed: u64, kind: u64, index: usize) -> u64 {
    let mut x = seed ^ kind.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser: nearby indices give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Keep only the log lines up to `step` (a resumed run rewrites what came after); returns the
/// kept lines.
fn truncate_log(path: &Path, step: usize) -> Result<Vec<LogLine>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let kept: Vec<(&str, LogLine)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok().map(|v| (l, v)))
        .filter(|(_, v)| v.step <= step)
        .collect();
    let bytes: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
    crate::export::write_atomic(path, bytes.as_bytes())?;
    Ok(kept.into_iter().map(|(_, v)| v).collect())
}

/// The best step's weights so far, kept in `<run>/best/` for STS-B dev selection.
fn best_dir(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("best")
}

fn save_best(run_dir: &Path, encoder: &Encoder, best: &Selected) -> Result<()> {
    let dir = best_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let weights: std::collections::HashMap<String, Tensor> =
        encoder.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    crate::model::save_safetensors(&weights, &dir.join("model.safetensors"))?;
    crate::export::write_json(&dir.join("best.json"), best)
}

/// Load the kept best weights (which must be those of `best`) into the encoder.
fn load_best(run_dir: &Path, encoder: &Encoder, best: &Selected, device: &Device) -> Result<()> {
    let meta = best_dir(run_dir).join("best.json");
    let saved: Option<Selected> = std::fs::read_to_string(&meta).ok().and_then(|t| serde_json::from_str(&t).ok());
    if saved.as_ref() != Some(best) {
        return Err(Error::data(
            &meta,
            format!("does not describe the best step {}: start the run again with --force", best.step),
        ));
    }
    let path = best_dir(run_dir).join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device).map_err(|e| Error::data(&path, e.to_string()))?;
    for (name, var) in &encoder.params {
        let t = tensors.get(name).ok_or_else(|| Error::data(&path, format!("no tensor {name}")))?;
        var.set(t).map_err(|e| Error::data(&path, format!("{name}: {e}")))?;
    }
    Ok(())
}

/// The best step so far on STS-B dev, from the kept log lines. Its weights are in `best/`,
/// except when it is the current step (step 0 of a new run: saved now), or when `best/` holds a
/// later step than the checkpoint resumed from: the resumed run reproduces that step exactly
/// (same seed, same data order, same dropout) and finds it again.
fn restore_best(lines: &[LogLine], run_dir: &Path, encoder: &Encoder, step: usize) -> Result<Option<Selected>> {
    let mut best: Option<Selected> = None;
    for l in lines {
        if let Some(b) = improves(best.as_ref(), l.step, &l.val) {
            best = Some(b);
        }
    }
    let Some(b) = best else { return Ok(None) };
    let saved: Option<Selected> =
        std::fs::read_to_string(best_dir(run_dir).join("best.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    match saved {
        Some(s) if s == b || s.step > step => {}
        _ if b.step == step => save_best(run_dir, encoder, &b)?,
        _ => {
            return Err(Error::Invalid(format!(
                "{}: the weights of the best step so far (step {}) are missing; start the run again with --force",
                best_dir(run_dir).display(),
                b.step
            )))
        }
    }
    Ok(Some(b))
}

/// The selection for `step` when its STS-B dev score beats `best`'s.
fn improves(best: Option<&Selected>, step: usize, val: &Validation) -> Option<Selected> {
    let s = val.sts_dev?;
    let beaten = best.is_none_or(|b| s > b.sts_dev.unwrap_or(f64::NEG_INFINITY));
    beaten.then_some(Selected { by: Select::StsbDev, step, sts_dev: Some(s) })
}

/// The run's log, the reference validation of step 0, the warnings so far and the best step:
/// what [`train`] keeps between validations.
struct Monitor<'a> {
    inp: &'a TrainInputs<'a>,
    log: std::fs::File,
    log_path: std::path::PathBuf,
    start: Validation,
    warnings: Vec<String>,
    /// Selecting on STS-B dev: the best step so far (its weights in `best/`).
    best: Option<Selected>,
    select_dev: bool,
}

impl<'a> Monitor<'a> {
    /// Open `log.jsonl` (trimmed to `step` on resume, new otherwise), validate the model before
    /// training unless the log has it, warn when the push/pull balance makes collapse downhill,
    /// and find the best step so far.
    fn open(inp: &'a TrainInputs<'a>, step: usize) -> Result<Self> {
        let log_path = inp.run_dir.join("log.jsonl");
        let mut previous = Vec::new();
        if inp.resume {
            previous = truncate_log(&log_path, step)?;
        } else {
            let _ = std::fs::remove_file(&log_path);
            let _ = std::fs::remove_dir_all(best_dir(inp.run_dir));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let select_dev = inp.cfg.train.select == Select::StsbDev && inp.dev.is_some();
        let warnings = previous.iter().filter_map(|l| l.warning.clone()).collect();
        let mut m = Self { inp, log, log_path, start: Validation::default(), warnings, best: None, select_dev };
        m.start = match previous.iter().find(|l| l.step == 0) {
            Some(l) => l.val,
            None if inp.val_pairs.is_empty() => Validation::default(),
            None => {
                let line = LogLine { val: m.validate()?, ..LogLine::default() };
                m.write(&line)?;
                inp.observer.line(&format!("step 0 (before training): {}", line.val));
                previous.push(line);
                previous.last().map_or_else(Validation::default, |l| l.val)
            }
        };
        if let Some(r) = balance(&m.start, &inp.cfg.loss).filter(|&r| r < 1.0) {
            let w = format!(
                "step 0: push/pull balance {r:.2} < 1 (w_uniform * t * random-pair distance over w_align * positive distance): shrinking everything lowers this loss, expect a collapse; raise loss.w_uniform or loss.t, or lower loss.w_align"
            );
            inp.observer.line(&format!("warning: {w}"));
            m.warnings.push(w);
        }
        if m.select_dev {
            m.best = restore_best(&previous, inp.run_dir, inp.encoder, step)?;
        }
        Ok(m)
    }

    fn validate(&self) -> Result<Validation> {
        let i = self.inp;
        validate(i.encoder, i.tokenizer, i.val_pairs, &i.cfg.loss, i.dev, i.device)
    }

    fn write(&mut self, line: &LogLine) -> Result<()> {
        let json = serde_json::to_string(line).map_err(|e| Error::Invalid(e.to_string()))?;
        writeln!(self.log, "{json}").and_then(|_| self.log.flush()).map_err(|e| Error::io(&self.log_path, e))
    }

    /// Validate after a step, log it (with `line`'s step, lr and train means), keep the best
    /// weights; returns the validation and what the geometry says.
    fn after_step(&mut self, mut line: LogLine) -> Result<(Validation, Health)> {
        let val = self.validate()?;
        let verdict = health(&val, &self.start, self.inp.cfg.loss.t);
        if let Health::Drift(m) | Health::Collapse(m) = &verdict {
            line.warning = Some(format!("step {}: {m}", line.step));
        }
        line.val = val;
        self.write(&line)?;
        if matches!(verdict, Health::Drift(_)) {
            self.warnings.extend(line.warning.clone());
        }
        if let (true, Some(b)) = (self.select_dev, improves(self.best.as_ref(), line.step, &val)) {
            save_best(self.inp.run_dir, self.inp.encoder, &b)?;
            self.best = Some(b);
        }
        Ok((val, verdict))
    }

    /// The step whose weights the encoder should end with, loaded when it is not `last`.
    fn select(self, last: usize, stopped: bool) -> Result<Selected> {
        match self.best {
            Some(b) if self.select_dev && !stopped => {
                if b.step != last {
                    load_best(self.inp.run_dir, self.inp.encoder, &b, self.inp.device)?;
                }
                Ok(b)
            }
            _ => Ok(Selected { by: Select::Last, step: last, sts_dev: None }),
        }
    }
}

/// What the training loop reports as it goes. The library prints nothing itself: the CLI draws
/// a progress bar (`app::finetune::Console`); tests and other front ends may keep quiet
/// ([`Quiet`]).
pub trait Observer: Sync {
    /// Training starts (or resumes) at `step` of `total`.
    fn start(&self, _step: usize, _total: usize) {}
    /// Step `step` of `total` finished; `brief` summarises it on one line.
    fn step(&self, _step: usize, _total: usize, _brief: &str) {}
    /// A line worth keeping: validation results, warnings, resume notes.
    fn line(&self, _text: &str) {}
    /// Training is over.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Everything [`train`] reads.
pub struct TrainInputs<'a> {
    pub encoder: &'a Encoder,
    pub tokenizer: &'a TextTokenizer,
    pub cfg: &'a RunConfig,
    /// The training pairs, from a prepared corpus.
    pub train: PairView<'a>,
    /// The frozen starting model whose mean-pooled vectors are the mean view's target
    /// (`loss.mean_teacher`); None: the same pass's.
    pub teacher: Option<&'a Encoder>,
    pub val_pairs: &'a [Pair],
    /// STS-B dev for `train.select = "stsb-dev"`.
    pub dev: Option<&'a DevSet>,
    pub run_dir: &'a Path,
    pub device: &'a Device,
    pub resume: bool,
    /// Set by Ctrl-C: the loop writes a checkpoint and returns.
    pub stop: &'a AtomicBool,
    /// Where progress, validation lines and warnings go.
    pub observer: &'a dyn Observer,
}

/// Learning-rate multipliers per parameter: `train.norm_lr_scale` for the last layer's output
/// LayerNorm (times `train.offset_lr_scale` for its bias), 1 elsewhere.
fn lr_scales(encoder: &Encoder, tc: &crate::config::TrainConfig) -> Vec<f64> {
    let last = format!("encoder.layer.{}.output.LayerNorm.", encoder.config.num_hidden_layers.saturating_sub(1));
    let scale = |name: &str| match name.split_once(&last) {
        Some((_, "bias")) => tc.norm_lr_scale * tc.offset_lr_scale,
        Some(_) => tc.norm_lr_scale,
        None => 1.0,
    };
    encoder.params.iter().map(|(name, _)| scale(name)).collect()
}

/// Train the encoder in place, logging validation numbers to `<run_dir>/log.jsonl` and writing
/// checkpoints to `<run_dir>/checkpoints/`. With `resume`, continue from the newest usable
/// checkpoint. On return the encoder holds the selected step's weights.
pub fn train(inp: &TrainInputs) -> Result<TrainSummary> {
    let tc = &inp.cfg.train;
    if inp.train.len() < tc.batch_pairs {
        return Err(Error::Invalid(format!(
            "only {} training pairs, fewer than one batch of {}: use a larger corpus or lower train.batch_pairs",
            inp.train.len(),
            tc.batch_pairs
        )));
    }
    let total = planned_steps(inp.cfg, inp.train.len());
    let (mut opt, mut state) = optimizer_and_state(inp, total)?;
    let mut monitor = Monitor::open(inp, state.step)?;
    let mut run = Run::new(inp, &mut state, total)?;
    let mut end = None;
    while state.step < total && end.is_none() {
        end = run.advance(&mut state, &mut opt, &mut monitor)?;
    }
    inp.observer.finish();
    let (stopped, collapsed) = match end {
        Some(End::Stopped(why)) => (Some(why), false),
        Some(End::Collapsed(why)) => (Some(why), true),
        None => (None, false),
    };
    let seconds = run.seconds();
    let warnings = monitor.warnings.clone();
    let selected = monitor.select(state.step, stopped.is_some())?;
    Ok(TrainSummary {
        steps: state.step,
        planned_steps: total,
        resumed_at: inp.resume.then_some(run.first_step),
        seconds,
        pairs_per_s: (state.step * tc.batch_pairs) as f64 / seconds.max(1e-9),
        bad_steps: state.bad_steps,
        stopped,
        collapsed,
        warnings,
        selected,
    })
}

/// AdamW with the configured learning-rate multipliers, and the state to start from: the newest
/// usable checkpoint's on resume (weights and moments restored), else step 0.
fn optimizer_and_state(inp: &TrainInputs, total: usize) -> Result<(AdamW, TrainState)> {
    let (encoder, tc) = (inp.encoder, &inp.cfg.train);
    let mut opt = AdamW::new(encoder.vars(), tc.adamw())?;
    opt.set_lr_scales(&lr_scales(encoder, tc))?;
    let mut state = TrainState { model: encoder.files.spec.clone(), ..TrainState::default() };
    if inp.resume {
        let mut warn = |m: String| inp.observer.line(&format!("warning: {m}"));
        match checkpoint::restore_latest(inp.run_dir, &encoder.files.spec, &encoder.params, &mut opt, &mut warn)? {
            Some((s, dir)) => {
                inp.observer.line(&format!("resuming from {} (step {} of {total})", dir.display(), s.step));
                state = s;
            }
            None => inp
                .observer
                .line(&format!("warning: no usable checkpoint in {}: starting from step 0", inp.run_dir.display())),
        }
    }
    Ok((opt, state))
}

/// Why the loop ended before its budget.
enum End {
    /// Interrupted, or too many non-finite steps: the message says what to do.
    Stopped(String),
    /// The collapse guard: the weights are collapsed.
    Collapsed(String),
}

/// The training loop's moving parts: data order, progress, time and the loss sums since the
/// last log line (the sums and time travel in checkpoints, so a resume continues them).
struct Run<'a> {
    inp: &'a TrainInputs<'a>,
    total: usize,
    /// The current epoch's order (None before the first).
    order: Option<EpochOrder>,
    clock: Instant,
    first_step: usize,
    prior_s: f64,
    sums: Vec<(String, f32)>,
    since: usize,
}

impl<'a> Run<'a> {
    fn new(inp: &'a TrainInputs<'a>, state: &mut TrainState, total: usize) -> Result<Self> {
        inp.observer.start(state.step, total);
        let run = Self {
            inp,
            total,
            // A resume continues its epoch's order at `state.batch_in_epoch`.
            order: (state.epoch > 0).then(|| Self::shuffle(inp, state.epoch)),
            clock: Instant::now(),
            first_step: state.step,
            prior_s: state.seconds,
            sums: std::mem::take(&mut state.log_sums),
            since: state.log_since,
        };
        Ok(run)
    }

    /// Epoch `epoch`'s batches: an order seeded by (seed, epoch), so a resume redraws it.
    fn shuffle(inp: &TrainInputs, epoch: usize) -> EpochOrder {
        EpochOrder::new(inp.train.len(), inp.cfg.train.batch_pairs, derived_seed(inp.cfg.seed, 1, epoch))
    }

    /// Seconds spent training over the whole run (earlier processes' from the checkpoint).
    fn seconds(&self) -> f64 {
        self.prior_s + self.clock.elapsed().as_secs_f64()
    }

    fn checkpoint(&self, state: &mut TrainState, opt: &AdamW) -> Result<()> {
        (state.seconds, state.log_sums, state.log_since) = (self.seconds(), self.sums.clone(), self.since);
        checkpoint::save(self.inp.run_dir, state, &self.inp.encoder.params, opt, self.inp.cfg.train.keep_checkpoints)
            .map(|_| ())
    }

    /// The next batch's pair indices, starting a new epoch when one runs out.
    fn next_batch(&mut self, state: &mut TrainState) -> Vec<usize> {
        loop {
            if let Some(order) = self.order.as_ref().filter(|o| state.batch_in_epoch < o.len()) {
                let train = self.inp.train;
                let batch = order.batch(state.batch_in_epoch, &|k| train.max_tokens(k));
                state.batch_in_epoch += 1;
                return batch;
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
            self.order = Some(Self::shuffle(self.inp, state.epoch));
        }
    }

    /// One step: stop on an interrupt, skip a non-finite step (stop after too many), else update,
    /// report progress, validate and checkpoint when due.
    fn advance(&mut self, state: &mut TrainState, opt: &mut AdamW, monitor: &mut Monitor) -> Result<Option<End>> {
        let (inp, tc) = (self.inp, &self.inp.cfg.train);
        if inp.stop.load(Ordering::SeqCst) {
            self.checkpoint(state, opt)?;
            let run_dir = inp.run_dir.display();
            let why = format!(
                "interrupted at step {}; a checkpoint was written: continue with --resume {run_dir}",
                state.step
            );
            return Ok(Some(End::Stopped(why)));
        }
        let batch = self.next_batch(state);
        let lr = lr_at(state.step + 1, self.total, tc.lr, tc.warmup_steps);
        opt.set_lr(lr);
        let stats = match self.step(state, opt, &batch)? {
            StepOutcome::Updated(s) => s,
            StepOutcome::Skipped(NonFinite(msg)) => return Ok(self.bad_step(state, msg)),
        };
        state.step += 1;
        accumulate(&mut self.sums, &stats);
        self.since += 1;
        self.progress(state.step, &stats);
        let step = state.step;
        let eval_now = step == self.total || (tc.eval_every_steps > 0 && step.is_multiple_of(tc.eval_every_steps));
        if eval_now && !inp.val_pairs.is_empty() {
            if let Some(end) = self.validate(state, lr, monitor)? {
                return Ok(Some(end));
            }
        }
        // After the log line, so the sums it saves are those the next line will average.
        if step == self.total || (tc.checkpoint_every_steps > 0 && step.is_multiple_of(tc.checkpoint_every_steps)) {
            self.checkpoint(state, opt)?;
        }
        Ok(None)
    }

    /// Forward, backward and update on one batch (in micro-batches when configured), with
    /// dropout masks seeded by (seed, step).
    fn step(&self, state: &TrainState, opt: &mut AdamW, batch: &[usize]) -> Result<StepOutcome> {
        let (inp, cfg) = (self.inp, self.inp.cfg);
        let ids: Vec<[Vec<u32>; 2]> = batch.iter().map(|&k| inp.train.ids(k)).collect();
        let micro = step_batches(&ids, cfg.train.micro_batch_pairs, &cfg.loss, inp.tokenizer, inp.device)?;
        let mut dropout_rng = StdRng::seed_from_u64(derived_seed(cfg.seed, 2, state.step + 1));
        let rng = cfg.train.dropout.then_some(&mut dropout_rng);
        train_step(inp.encoder, inp.teacher, opt, &micro, &cfg.loss, cfg.train.max_grad_norm, rng)
    }

    /// Count a skipped step; past `train.max_bad_steps` the run stops.
    fn bad_step(&self, state: &mut TrainState, msg: String) -> Option<End> {
        let max = self.inp.cfg.train.max_bad_steps;
        state.bad_steps += 1;
        let what = format!("step {}: {msg}", state.step + 1);
        if state.bad_steps > max {
            return Some(End::Stopped(format!(
                "{what}; {} bad steps, more than train.max_bad_steps = {max}. Stopped with the weights of step {} (the last checkpoint is kept). Try a lower train.lr or train.max_grad_norm",
                state.bad_steps, state.step
            )));
        }
        let n = state.bad_steps;
        self.inp.observer.line(&format!("warning: {what}; skipped without an update ({n} of at most {max} bad steps)"));
        None
    }

    fn pairs_per_s(&self, step: usize) -> f64 {
        (step * self.inp.cfg.train.batch_pairs) as f64 / self.seconds()
    }

    /// Hand the step's one-line summary to the observer.
    fn progress(&self, step: usize, stats: &StepStats) {
        let brief = format!(
            "loss {:.4} align {:.4} uniform {:.4} | {:.1} pairs/s",
            stats.loss,
            stats.part("align"),
            stats.part("uniform"),
            self.pairs_per_s(step)
        );
        self.inp.observer.step(step, self.total, &brief);
    }

    /// Log a validation line with the training means since the last one; a collapse ends the run.
    fn validate(&mut self, state: &TrainState, lr: f64, monitor: &mut Monitor) -> Result<Option<End>> {
        let step = state.step;
        let k = self.since.max(1) as f32;
        let line = LogLine {
            step,
            epoch: state.epoch,
            lr,
            train: self.sums.iter().map(|(n, v)| (n.clone(), v / k)).collect(),
            pairs_per_s: self.pairs_per_s(step),
            elapsed_s: self.seconds(),
            ..LogLine::default()
        };
        let (val, verdict) = monitor.after_step(line)?;
        let loss = self.sums.first().map_or(f32::NAN, |(_, v)| v / k);
        let speed = self.pairs_per_s(step);
        let obs = self.inp.observer;
        obs.line(&format!("step {step}/{}: train loss {loss:.4} | {val} | {speed:.1} pairs/s", self.total));
        if let Health::Drift(m) | Health::Collapse(m) = &verdict {
            obs.line(&format!("warning: step {step}: {m}"));
        }
        (self.sums, self.since) = (Vec::new(), 0);
        Ok(match verdict {
            Health::Collapse(m) => Some(End::Collapsed(format!("step {step}: {m}"))),
            _ => None,
        })
    }
}

/// Add a step's loss and parts to the running sums (the total first).
fn accumulate(sums: &mut Vec<(String, f32)>, stats: &StepStats) {
    let values = std::iter::once(("loss", stats.loss)).chain(stats.parts.iter().copied());
    for (name, v) in values {
        match sums.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => *s += v,
            None => sums.push((name.to_string(), v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn positive_auc_counts_closer_positives() {
        let t = |rows: [[f32; 3]; 3]| Tensor::new(&rows, &Device::Cpu).unwrap();
        let x = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
        assert_eq!(positive_auc(&x, &x).unwrap(), 1.0);
        // Each anchor's positive is orthogonal to it and equal to another anchor: never closest.
        let y = t([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]);
        assert_eq!(positive_auc(&x, &y).unwrap(), 0.0);
    }

    #[test]
    fn balance_predicts_collapse() {
        // The cone of MiniLM's [CLS]: positives 0.55 apart, mean cosine 0.69.
        let start = val(0.55, 0.69);
        let paper = LossConfig { w_align: 0.9, w_uniform: 0.1, t: 5.0, ..Default::default() };
        let r = balance(&start, &paper).unwrap();
        assert!((r - 0.1 * 5.0 * 0.62 / (0.9 * 0.55)).abs() < 1e-12 && r < 1.0);
        assert!(balance(&start, &LossConfig::default()).unwrap() > 2.0);
        let nce = LossConfig { kind: LossKind::Mix, w_infonce: 1.0, ..paper };
        assert_eq!(balance(&start, &nce), None);
    }

    #[test]
    fn mean_cosine_matches_the_report_metric() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, d) = (40, 8);
        // A cone: a shared direction plus noise, normalised.
        let rows: Vec<f32> = (0..n)
            .flat_map(|_| {
                let v: Vec<f32> = (0..d)
                    .map(|j| if j == 0 { 2.0 } else { 0.0 } + rand::Rng::gen_range(&mut rng, -1.0..1.0))
                    .collect();
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                v.into_iter().map(move |a| a / norm)
            })
            .collect();
        let x = Tensor::from_vec(rows.clone(), (n, d), &Device::Cpu).unwrap();
        let got = mean_cosine(&x).unwrap();
        let e = crate::metrics::Embeddings { data: &rows, n, dim: d };
        let want = crate::metrics::anisotropy(e, None).unwrap().mean_cosine;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!(got > 0.5);
    }

    #[test]
    fn accumulate_sums_named_parts() {
        let s = StepStats { loss: 1.0, parts: vec![("align", 0.5), ("uniform", -2.0)], ..Default::default() };
        let mut sums = Vec::new();
        accumulate(&mut sums, &s);
        accumulate(&mut sums, &s);
        assert_eq!(sums, [("loss".to_string(), 2.0), ("align".into(), 1.0), ("uniform".into(), -4.0)]);
    }
}
