//! The training loop: pairs -> length-bucketed batches -> encoder -> loss -> AdamW.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::checkpoint::{self, TrainState};
use crate::config::{LossConfig, RunConfig};
use crate::data::batch::{Batch, TextTokenizer};
use crate::data::pairs::Pair;
use crate::error::{Error, Result};
use crate::loss;
use crate::model::{embed_texts, Encoder};
use crate::optim::{lr_at, AdamW};

/// Batches of this many consecutive (shuffled) batches are sorted by length together: padding
/// drops while batches stay random.
const BUCKET_BATCHES: usize = 50;

/// Indices of one epoch's batches: shuffled, bucketed by `lens`, batch order shuffled again.
/// The incomplete last batch is dropped (uniformity wants full batches).
pub fn epoch_batches(lens: &[usize], batch_pairs: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for bucket in idx.chunks_mut(batch_pairs * BUCKET_BATCHES) {
        bucket.sort_by_key(|&i| lens[i]);
        batches.extend(bucket.chunks_exact(batch_pairs).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepStats {
    pub loss: f32,
    pub align: f32,
    pub uniform: f32,
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// Forward, backward and (when the numbers are finite) an optimizer update on one batch.
/// Returns an error naming what went non-finite without touching the weights.
///
/// `batch` holds the anchors of `n` pairs followed by their positives (2n rows).
pub fn train_step(
    encoder: &Encoder,
    opt: &mut AdamW,
    batch: &Batch,
    loss_cfg: &LossConfig,
    max_grad_norm: f64,
    dropout_rng: Option<&mut StdRng>,
) -> Result<StepStats> {
    let t0 = Instant::now();
    let n = batch.lengths.len() / 2;
    let emb = encoder.embed(batch, dropout_rng)?;
    let parts = loss::objective(&emb.narrow(0, 0, n)?, &emb.narrow(0, n, n)?, loss_cfg)?;
    let loss = parts.total.to_scalar::<f32>()?;
    let forward_s = t0.elapsed().as_secs_f64();
    if !loss.is_finite() {
        return Err(Error::Invalid(format!("loss is {loss} (align {}, uniform {})", parts.align, parts.uniform)));
    }
    let t1 = Instant::now();
    let grads = parts.total.backward()?;
    let grad_norm = opt.grad_norm(&grads)?;
    let backward_s = t1.elapsed().as_secs_f64();
    if !grad_norm.is_finite() {
        return Err(Error::Invalid(format!("gradient norm is {grad_norm} at loss {loss}")));
    }
    let t2 = Instant::now();
    let scale = if max_grad_norm > 0.0 && grad_norm > max_grad_norm { max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
    opt.step(&grads, scale)?;
    Ok(StepStats {
        loss,
        align: parts.align,
        uniform: parts.uniform,
        grad_norm,
        forward_s,
        backward_s,
        optimizer_s: t2.elapsed().as_secs_f64(),
    })
}

/// Alignment and uniformity (t from the config) of held-out pairs, dropout off.
pub fn validate(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    pairs: &[Pair],
    cfg: &LossConfig,
    device: &Device,
) -> Result<(f64, f64)> {
    let embed = |texts: Vec<&str>| -> Result<Tensor> {
        let flat = embed_texts(encoder, tokenizer, &texts, 64, device)?;
        Ok(Tensor::from_vec(flat, (texts.len(), encoder.config.hidden_size), device)?)
    };
    let x = embed(pairs.iter().map(|p| &*p.anchor).collect())?;
    let y = embed(pairs.iter().map(|p| &*p.positive).collect())?;
    let align = loss::align(&x, &y, 2.0)?.to_scalar::<f32>()? as f64;
    let uniform = ((loss::uniform(&x, cfg.t)? + loss::uniform(&y, cfg.t)?)? / 2.0)?.to_scalar::<f32>()? as f64;
    Ok((align, uniform))
}

/// One line of `log.jsonl`.
#[derive(Debug, Serialize)]
struct LogLine {
    step: usize,
    epoch: usize,
    lr: f64,
    train_loss: f32,
    train_align: f32,
    train_uniform: f32,
    val_align: f64,
    val_uniform: f64,
    pairs_per_s: f64,
    elapsed_s: f64,
}

/// How training ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub planned_steps: usize,
    pub seconds: f64,
    /// Pairs per second of this process (a resumed run counts from its resume point).
    pub pairs_per_s: f64,
    /// Steps skipped for a non-finite loss or gradient.
    pub bad_steps: usize,
    /// Why the run stopped before its budget (a NaN loss, say); the weights are the last good ones.
    pub stopped: Option<String>,
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

/// Keep only the log lines up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::export::write_atomic(path, kept.as_bytes())
}

/// Train `encoder` in place, logging validation numbers to `<run_dir>/log.jsonl` and writing
/// checkpoints to `<run_dir>/checkpoints/`. With `resume`, continue from the newest usable
/// checkpoint. `stop` (set by Ctrl-C) makes the loop checkpoint and return.
#[allow(clippy::too_many_arguments)]
pub fn train(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    cfg: &RunConfig,
    train_pairs: &[Pair],
    val_pairs: &[Pair],
    run_dir: &Path,
    device: &Device,
    resume: bool,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    let tc = &cfg.train;
    if train_pairs.len() < tc.batch_pairs {
        return Err(Error::Invalid(format!(
            "only {} training pairs, fewer than one batch of {}: use a larger corpus or lower train.batch_pairs",
            train_pairs.len(),
            tc.batch_pairs
        )));
    }
    let total = planned_steps(cfg, train_pairs.len());
    let lens: Vec<usize> = train_pairs.iter().map(|p| p.anchor.len().max(p.positive.len())).collect();
    let mut opt = AdamW::new(encoder.vars(), tc)?;
    let log_path = run_dir.join("log.jsonl");
    let mut state =
        TrainState { step: 0, epoch: 0, batch_in_epoch: 0, bad_steps: 0, model: encoder.files.spec.clone() };
    if resume {
        let mut warn = |m: String| eprintln!("warning: {m}");
        match checkpoint::restore_latest(run_dir, &encoder.files.spec, &encoder.params, &mut opt, &mut warn)? {
            Some((s, dir)) => {
                eprintln!("resuming from {} (step {} of {total})", dir.display(), s.step);
                state = s;
            }
            None => eprintln!("warning: no usable checkpoint in {}: starting from step 0", run_dir.display()),
        }
        truncate_log(&log_path, state.step)?;
    } else {
        let _ = std::fs::remove_file(&log_path);
    }
    let mut log =
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let shuffle = |epoch: usize| {
        epoch_batches(&lens, tc.batch_pairs, &mut StdRng::seed_from_u64(derived_seed(cfg.seed, 1, epoch)))
    };
    let mut batches =
        if state.epoch > 0 { shuffle(state.epoch) } else { Vec::new() }.into_iter().skip(state.batch_in_epoch);

    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}")
            .map_err(|e| Error::Invalid(e.to_string()))?
            .progress_chars("=> "),
    );
    pb.set_position(state.step as u64);
    let start = Instant::now();
    let first_step = state.step;
    let (mut sum_loss, mut sum_align, mut sum_uniform, mut since) = (0f32, 0f32, 0f32, 0usize);
    let mut stopped = None;
    let checkpoint = |state: &TrainState, opt: &AdamW| -> Result<()> {
        checkpoint::save(run_dir, state, &encoder.params, opt, tc.keep_checkpoints).map(|_| ())
    };
    while state.step < total {
        if stop.load(Ordering::SeqCst) {
            checkpoint(&state, &opt)?;
            stopped = Some(format!(
                "interrupted at step {}; a checkpoint was written: continue with --resume {}",
                state.step,
                run_dir.display()
            ));
            break;
        }
        let Some(batch) = batches.next() else {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            batches = shuffle(state.epoch).into_iter().skip(state.batch_in_epoch);
            continue;
        };
        state.batch_in_epoch += 1;
        let lr = lr_at(state.step + 1, total, tc);
        opt.set_lr(lr);
        let pairs = batch.iter().map(|&i| &train_pairs[i]);
        let texts: Vec<&str> = pairs.clone().map(|p| &*p.anchor).chain(pairs.map(|p| &*p.positive)).collect();
        let tokens = tokenizer.batch(&texts, device)?;
        let mut dropout_rng = StdRng::seed_from_u64(derived_seed(cfg.seed, 2, state.step + 1));
        let rng = tc.dropout.then_some(&mut dropout_rng);
        let stats = match train_step(encoder, &mut opt, &tokens, &cfg.loss, tc.max_grad_norm, rng) {
            Ok(s) => s,
            Err(Error::Invalid(msg)) => {
                state.bad_steps += 1;
                let what = format!("step {}: {msg}", state.step + 1);
                if state.bad_steps > tc.max_bad_steps {
                    stopped = Some(format!(
                        "{what}; {} bad steps, more than train.max_bad_steps = {}. Stopped with the weights of step {} (the last checkpoint is kept). Try a lower train.lr or train.max_grad_norm",
                        state.bad_steps, tc.max_bad_steps, state.step
                    ));
                    break;
                }
                pb.suspend(|| {
                    eprintln!(
                        "warning: {what}; skipped without an update ({} of at most {} bad steps)",
                        state.bad_steps, tc.max_bad_steps
                    )
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        state.step += 1;
        let step = state.step;
        (sum_loss, sum_align, sum_uniform, since) =
            (sum_loss + stats.loss, sum_align + stats.align, sum_uniform + stats.uniform, since + 1);
        let pairs_per_s = ((step - first_step) * tc.batch_pairs) as f64 / start.elapsed().as_secs_f64();
        pb.set_position(step as u64);
        pb.set_message(format!(
            "loss {:.4} align {:.4} uniform {:.4} | {:.1} pairs/s",
            stats.loss, stats.align, stats.uniform, pairs_per_s
        ));
        if pb.is_hidden() && step.is_multiple_of(10) {
            // No terminal (a log file, CI): a plain line now and then instead of the bar.
            let eta = start.elapsed().as_secs_f64() / (step - first_step) as f64 * (total - step) as f64;
            eprintln!(
                "step {step}/{total}: loss {:.4} align {:.4} uniform {:.4} | {pairs_per_s:.1} pairs/s | ETA {eta:.0}s",
                stats.loss, stats.align, stats.uniform
            );
        }
        if step == total || (tc.checkpoint_every_steps > 0 && step.is_multiple_of(tc.checkpoint_every_steps)) {
            checkpoint(&state, &opt)?;
        }
        let eval_now = step == total || (tc.eval_every_steps > 0 && step.is_multiple_of(tc.eval_every_steps));
        if eval_now && !val_pairs.is_empty() {
            let (val_align, val_uniform) = validate(encoder, tokenizer, val_pairs, &cfg.loss, device)?;
            let k = since.max(1) as f32;
            let line = LogLine {
                step,
                epoch: state.epoch,
                lr,
                train_loss: sum_loss / k,
                train_align: sum_align / k,
                train_uniform: sum_uniform / k,
                val_align,
                val_uniform,
                pairs_per_s,
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            let json = serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?;
            writeln!(log, "{json}").and_then(|_| log.flush()).map_err(|e| Error::io(&log_path, e))?;
            pb.suspend(|| {
                eprintln!(
                    "step {step}/{total}: train loss {:.4} | val align {val_align:.4} uniform {val_uniform:.4} | {pairs_per_s:.1} pairs/s",
                    line.train_loss
                )
            });
            (sum_loss, sum_align, sum_uniform, since) = (0.0, 0.0, 0.0, 0);
        }
    }
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: state.step,
        planned_steps: total,
        seconds,
        pairs_per_s: ((state.step - first_step) * tc.batch_pairs) as f64 / seconds.max(1e-9),
        bad_steps: state.bad_steps,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_full_disjoint_and_bucketed() {
        let lens: Vec<usize> = (0..1000).map(|i| (i * 37) % 101).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let batches = epoch_batches(&lens, 8, &mut rng);
        assert_eq!(batches.len(), 1000 / 8);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
        // Within a batch lengths are close: the mean spread is far below the global spread.
        let spread: f64 = batches
            .iter()
            .map(|b| {
                let (lo, hi) = (b.iter().map(|&i| lens[i]).min().unwrap(), b.iter().map(|&i| lens[i]).max().unwrap());
                (hi - lo) as f64
            })
            .sum::<f64>()
            / batches.len() as f64;
        assert!(spread < 10.0, "mean in-batch spread {spread}");
        // Same seed, same order.
        assert_eq!(batches, epoch_batches(&lens, 8, &mut StdRng::seed_from_u64(1)));
    }
}
