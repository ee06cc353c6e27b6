//! The training loop: examples -> length-bucketed batches -> step -> validation, selection and
//! checkpoints. It reports through a [`Progress`] and prints nothing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use super::monitor::{balance, health, validate, Health, Log, LogLine, Validation};
use super::selection::{Action, Selected, Selection};
use super::step::{
    apply, derived_seed, shard_gradients, train_step, NonFinite, StepLayout, StepModel, StepOutcome, StepStats,
};
use crate::checkpoint::{self, TrainState};
use crate::config::resolved::Resolved;
use crate::config::{Select, TrainConfig};
use crate::data::batch::TextTokenizer;
use crate::data::order::EpochOrder;
use crate::data::source::{Pair, PairIds, PairSource};
use crate::dist::World;
use crate::error::{Context, Error, Result};
use crate::eval::dev::DevSet;
use crate::model::Encoder;
use crate::optim::{lr_at, AdamW};
use crate::progress::Progress;

/// Everything [`train`] reads.
pub struct TrainInputs<'a> {
    pub encoder: &'a Encoder,
    /// The frozen starting model whose mean-pooled vectors are the mean view's target
    /// (`loss.mean_teacher`); None: the same pass's.
    pub teacher: Option<&'a Encoder>,
    pub tokenizer: &'a TextTokenizer,
    pub run: &'a Resolved,
    /// The training examples.
    pub train: &'a dyn PairSource,
    pub val_pairs: &'a [Pair],
    /// STS-B dev for `train.select = "stsb-dev"` (on every rank: they share its embedding).
    pub dev: Option<&'a DevSet>,
    pub run_dir: &'a Path,
    pub resume: bool,
    /// Set by Ctrl-C: the loop writes a checkpoint and returns.
    pub stop: &'a AtomicBool,
    /// Where progress, validation lines and warnings go.
    pub progress: &'a dyn Progress,
    /// The ranks training together (a world of one: this process alone). Every rank trains on
    /// its shard of each global batch and embeds its share of each validation; rank 0 logs,
    /// selects and writes.
    pub world: &'a World,
}

impl TrainInputs<'_> {
    fn tc(&self) -> &TrainConfig {
        &self.run.cfg().train
    }

    /// How the kept step is chosen: STS-B dev needs the dev set, else the last step.
    fn select_by(&self) -> Select {
        self.dev.map_or(Select::Last, |_| self.tc().select)
    }

    /// The held-out numbers of the current weights; every rank calls it together.
    fn validate(&self) -> Result<Validation> {
        validate(
            self.encoder,
            self.tokenizer,
            self.val_pairs,
            self.run.objective().t(),
            self.dev,
            self.run.device(),
            self.world,
        )
    }
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
    /// Seconds inside the training steps (batching, forward, backward, collectives, update),
    /// resumes included: `seconds` without validation and checkpoints.
    pub step_seconds: f64,
    /// Pairs per second inside the steps: the throughput that data parallelism scales.
    pub step_pairs_per_s: f64,
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
    /// Over several ranks: this process's collectives during training (rank 0's).
    pub traffic: Option<crate::dist::Traffic>,
}

/// Learning-rate multipliers per parameter: `train.norm_lr_scale` for the last layer's output
/// LayerNorm (times `train.offset_lr_scale` for its bias), 1 elsewhere.
fn lr_scales(encoder: &Encoder, tc: &TrainConfig) -> Vec<f64> {
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
    let batch_pairs = inp.tc().batch_pairs;
    if inp.train.len() < batch_pairs {
        return Err(Error::invalid(format!(
            "only {} training pairs, fewer than one batch of {batch_pairs}: use a larger corpus or lower train.batch_pairs",
            inp.train.len()
        )));
    }
    let ranks = inp.world.size();
    if !batch_pairs.is_multiple_of(ranks) {
        return Err(Error::invalid(format!(
            "train.batch_pairs = {batch_pairs} does not divide over {ranks} ranks: pick a multiple of {ranks}"
        )));
    }
    let total = inp.run.budget().steps(inp.train.len(), batch_pairs)?;
    let (mut opt, mut state) = optimizer_and_state(inp, total)?;
    if inp.world.size() > 1 {
        // Every rank restores on its own: they must have found the same checkpoint.
        let root: usize = inp.world.broadcast_json(Some(&state.step))?;
        if root != state.step {
            return Err(Error::invalid(format!(
                "rank {} resumed at step {}, rank 0 at step {root}: every rank must read the same run folder (on a shared file system)",
                inp.world.rank(),
                state.step
            )));
        }
    }
    if state.step > total {
        return Err(Error::invalid(format!(
            "the checkpoint resumed is at step {}, past the budget of {total} steps: resume with train.steps of at least {} (equal: finish without training)",
            state.step, state.step
        )));
    }
    let mut watch = inp.world.is_root().then(|| Watch::open(inp, state.step)).transpose()?;
    // Step 0 is validated (a new run, or a resumed log without it) by every rank together.
    let pending = watch.as_ref().is_some_and(Watch::needs_start);
    let pending = match inp.world.size() {
        1 => pending,
        _ => inp.world.broadcast_json(Some(&pending))?,
    };
    let start = pending.then(|| inp.validate()).transpose()?;
    if let Some(w) = watch.as_mut() {
        w.begin(start, state.step)?;
    }
    // Every rank starts its clock, and its first collective, once rank 0 has opened the run.
    inp.world.barrier_patiently()?;
    let mut run = Run::new(inp, &mut state, total);
    let mut end = None;
    while state.step < total && end.is_none() {
        end = run.advance(&mut state, &mut opt, &mut watch)?;
    }
    inp.progress.finish();
    let (stopped, collapsed) = match end {
        Some(End::Stopped(why)) => (Some(why), false),
        Some(End::Collapsed(why)) => (Some(why), true),
        None => (None, false),
    };
    let seconds = run.seconds();
    let (selected, warnings) = match watch {
        Some(w) => (w.select(state.step, stopped.is_some())?, w.warnings),
        None => (Selection::new(Select::Last).result(state.step, stopped.is_some()), Vec::new()),
    };
    Ok(TrainSummary {
        steps: state.step,
        planned_steps: total,
        resumed_at: inp.resume.then_some(run.first_step),
        seconds,
        pairs_per_s: (state.step * batch_pairs) as f64 / seconds.max(1e-9),
        step_seconds: state.step_seconds,
        step_pairs_per_s: (state.step * batch_pairs) as f64 / state.step_seconds.max(1e-9),
        bad_steps: state.bad_steps,
        stopped,
        collapsed,
        warnings,
        selected,
        traffic: (ranks > 1).then(|| inp.world.traffic()),
    })
}

/// AdamW with the configured learning-rate multipliers, and the state to start from: the newest
/// usable checkpoint's on resume (weights and moments restored), else step 0.
fn optimizer_and_state(inp: &TrainInputs, total: usize) -> Result<(AdamW, TrainState)> {
    let (encoder, tc) = (inp.encoder, inp.tc());
    let mut opt = AdamW::new(encoder.vars(), tc.adamw())?;
    opt.set_lr_scales(&lr_scales(encoder, tc))?;
    let mut state = TrainState { model: encoder.files.spec.clone(), ..TrainState::default() };
    if inp.resume {
        let mut warn = |m: String| inp.progress.line(&format!("warning: {m}"));
        match checkpoint::restore_latest(inp.run_dir, encoder, &mut opt, &mut warn)? {
            Some((s, dir)) => {
                inp.progress.line(&format!("resuming from {} (step {} of {total})", dir.display(), s.step));
                state = s;
            }
            None => inp
                .progress
                .line(&format!("warning: no usable checkpoint in {}: starting from step 0", inp.run_dir.display())),
        }
    }
    Ok((opt, state))
}

/// The run's log, the reference validation of step 0, the warnings so far and the selection:
/// what [`train`] keeps between validations.
struct Watch<'a> {
    inp: &'a TrainInputs<'a>,
    log: Log,
    /// The log's lines up to the resumed step, until [`Watch::begin`] replays them.
    previous: Vec<LogLine>,
    start: Validation,
    warnings: Vec<String>,
    selection: Selection,
}

impl<'a> Watch<'a> {
    /// Open the log (trimmed to `step` on resume) and keep its lines for [`Watch::begin`].
    fn open(inp: &'a TrainInputs<'a>, step: usize) -> Result<Self> {
        if !inp.resume {
            checkpoint::clear_best(inp.run_dir);
        }
        let (log, previous) = Log::open(inp.run_dir, inp.resume, step)?;
        let warnings = previous.iter().filter_map(|l| l.warning.clone()).collect();
        let selection = Selection::new(inp.select_by());
        Ok(Self { inp, log, previous, start: Validation::default(), warnings, selection })
    }

    /// Whether the model before training still has to be validated (the log has no step 0).
    fn needs_start(&self) -> bool {
        !self.inp.val_pairs.is_empty() && !self.previous.iter().any(|l| l.step == 0)
    }

    /// Take step 0's validation (`measured`, when [`Watch::needs_start`] said so) or the log's,
    /// warn when the push/pull balance makes collapse downhill, and find the best step so far.
    fn begin(&mut self, measured: Option<Validation>, step: usize) -> Result<()> {
        let inp = self.inp;
        let mut previous = std::mem::take(&mut self.previous);
        self.start = match (previous.iter().find(|l| l.step == 0), measured) {
            (Some(l), _) => l.val,
            (None, None) => Validation::default(),
            (None, Some(val)) => {
                let line = LogLine { val, ..LogLine::default() };
                self.log.write(&line)?;
                inp.progress.line(&format!("step 0 (before training): {}", line.val));
                previous.push(line);
                val
            }
        };
        if let Some(r) = balance(&self.start, inp.run.objective()).filter(|&r| r < 1.0) {
            let m = format!(
                "step 0: push/pull balance {r:.2} < 1 (w_uniform * t * random-pair distance over w_align * positive distance): shrinking everything lowers this loss, expect a collapse; raise loss.w_uniform or loss.t, or lower loss.w_align"
            );
            inp.progress.line(&format!("warning: {m}"));
            self.warnings.push(m);
        }
        self.selection = Selection::replay(inp.select_by(), &previous);
        self.restore_best(step)
    }

    /// The best step so far has its weights in `best/`, except when it is the current step
    /// (step 0 of a new run: saved now), or when `best/` holds a later step than the checkpoint
    /// resumed from: the resumed run reproduces that step exactly (same seed, data order and
    /// dropout) and finds it again.
    fn restore_best(&self, step: usize) -> Result<()> {
        let Some(b) = self.selection.best() else { return Ok(()) };
        let saved: Option<Selected> = checkpoint::best_meta(self.inp.run_dir);
        match saved {
            Some(s) if s == *b || s.step > step => Ok(()),
            _ if b.step == step => checkpoint::save_best(self.inp.run_dir, self.inp.encoder, b),
            _ => Err(Error::invalid(format!(
                "{}: the weights of the best step so far (step {}) are missing; start the run again with --force",
                self.inp.run_dir.join("best").display(),
                b.step
            ))),
        }
    }

    /// Validate after a step, log it (with `line`'s step, lr and train means), keep the best
    /// weights; returns the validation and what the geometry says.
    fn after_step(&mut self, mut line: LogLine) -> Result<(Validation, Health)> {
        let val = self.inp.validate()?;
        let verdict = health(&val, &self.start, self.inp.run.objective().t());
        if let Health::Drift(m) | Health::Collapse(m) = &verdict {
            line.warning = Some(format!("step {}: {m}", line.step));
        }
        line.val = val;
        self.log.write(&line)?;
        if matches!(verdict, Health::Drift(_)) {
            self.warnings.extend(line.warning.clone());
        }
        if let Action::Keep(best) = self.selection.observe(line.step, &val) {
            checkpoint::save_best(self.inp.run_dir, self.inp.encoder, &best)?;
        }
        Ok((val, verdict))
    }

    /// The step whose weights the encoder ends with, loaded when it is not `last`.
    fn select(&self, last: usize, stopped: bool) -> Result<Selected> {
        let selected = self.selection.result(last, stopped);
        if selected.step != last {
            let saved: Option<Selected> = checkpoint::best_meta(self.inp.run_dir);
            if saved.as_ref() != Some(&selected) {
                return Err(Error::data(
                    self.inp.run_dir.join("best/best.json"),
                    format!("does not describe the best step {}: start the run again with --force", selected.step),
                ));
            }
            checkpoint::load_best(self.inp.run_dir, self.inp.encoder)?;
        }
        Ok(selected)
    }
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
    layout: StepLayout,
    total: usize,
    /// The current epoch's order (None before the first).
    order: Option<EpochOrder>,
    clock: Instant,
    first_step: usize,
    prior_s: f64,
    sums: Vec<(String, f32)>,
    since: usize,
    /// Whether rank 0 ran a phase of its own (validation, a checkpoint) since the last stop
    /// check: the next one then waits for it without the collective timeout.
    after_own_phase: bool,
}

impl<'a> Run<'a> {
    fn new(inp: &'a TrainInputs<'a>, state: &mut TrainState, total: usize) -> Self {
        inp.progress.start("training", state.step as u64, total as u64);
        Self {
            inp,
            layout: StepLayout::new(inp.run.objective()).with_negatives(inp.train.has_negatives()),
            total,
            // A resume continues its epoch's order at `state.batch_in_epoch`.
            order: (state.epoch > 0).then(|| Self::shuffle(inp, state.epoch)),
            clock: Instant::now(),
            first_step: state.step,
            prior_s: state.seconds,
            sums: std::mem::take(&mut state.log_sums),
            since: state.log_since,
            after_own_phase: true,
        }
    }

    /// Epoch `epoch`'s batches: an order seeded by (seed, epoch), so a resume redraws it.
    fn shuffle(inp: &TrainInputs, epoch: usize) -> EpochOrder {
        let cfg = inp.run.cfg();
        EpochOrder::new(inp.train.len(), cfg.train.batch_pairs, derived_seed(cfg.seed, 1, epoch))
            .local(cfg.data.local_batches)
    }

    /// Seconds spent training over the whole run (earlier processes' from the checkpoint).
    fn seconds(&self) -> f64 {
        self.prior_s + self.clock.elapsed().as_secs_f64()
    }

    /// Rank 0 writes a checkpoint (the others hold the same weights and moments).
    fn checkpoint(&self, state: &mut TrainState, opt: &AdamW) -> Result<()> {
        (state.seconds, state.log_sums, state.log_since) = (self.seconds(), self.sums.clone(), self.since);
        if !self.inp.world.is_root() {
            return Ok(());
        }
        let dir = self.inp.run_dir;
        checkpoint::save(dir, state, self.inp.encoder, opt, self.inp.tc().keep_checkpoints).map(|_| ()).with_context(
            || {
                let kept = checkpoint::list(dir)
                    .pop()
                    .map_or("none yet".to_string(), |p| p.display().to_string());
                format!(
                    "writing the checkpoint of step {} (the last good one: {kept}; after freeing space, `hypersphere finetune --resume {}` continues from it)",
                    state.step,
                    dir.display()
                )
            },
        )
    }

    /// Whether to stop: an interrupt seen here, or on any rank (so every rank stops after the
    /// same step). Under the collective timeout unless rank 0 has just had a phase of its own:
    /// a rank that hangs between two plain steps must not leave the others waiting here.
    fn interrupted(&mut self) -> Result<bool> {
        let here = self.inp.stop.load(Ordering::SeqCst);
        let patient = std::mem::take(&mut self.after_own_phase);
        match self.inp.world.size() {
            1 => Ok(here),
            _ => self.inp.world.any(here, patient),
        }
    }

    /// The next batch's example indices, starting a new epoch when one runs out.
    fn next_batch(&mut self, state: &mut TrainState) -> Result<Vec<usize>> {
        loop {
            if let Some(order) = self.order.as_ref().filter(|o| state.batch_in_epoch < o.len()) {
                let train = self.inp.train;
                let batch = order.batch(state.batch_in_epoch, &|k| train.max_tokens(k))?;
                state.batch_in_epoch += 1;
                return Ok(batch);
            }
            state.epoch += 1;
            state.batch_in_epoch = 0;
            self.order = Some(Self::shuffle(self.inp, state.epoch));
        }
    }

    /// One step: stop on an interrupt, skip a non-finite step (stop after too many), else update,
    /// report progress, validate and checkpoint when due.
    fn advance(&mut self, state: &mut TrainState, opt: &mut AdamW, watch: &mut Option<Watch>) -> Result<Option<End>> {
        let (inp, tc) = (self.inp, self.inp.tc());
        if self.interrupted()? {
            self.checkpoint(state, opt)?;
            let run_dir = inp.run_dir.display();
            let why = format!(
                "interrupted at step {}; a checkpoint was written: continue with --resume {run_dir}",
                state.step
            );
            return Ok(Some(End::Stopped(why)));
        }
        let clock = Instant::now();
        let batch = self.next_batch(state)?;
        let lr = lr_at(state.step + 1, self.total, tc.lr, tc.warmup_steps);
        opt.set_lr(lr);
        let outcome = self.step(state, opt, &batch)?;
        state.step_seconds += clock.elapsed().as_secs_f64();
        let stats = match outcome {
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
            self.after_own_phase = true;
            if let Some(end) = self.validate(state, lr, watch)? {
                return Ok(Some(end));
            }
        }
        // After the log line, so the sums it saves are those the next line will average.
        if step == self.total || (tc.checkpoint_every_steps > 0 && step.is_multiple_of(tc.checkpoint_every_steps)) {
            self.after_own_phase = true;
            self.checkpoint(state, opt)?;
        }
        Ok(None)
    }

    /// Forward, backward and update on one batch (in micro-batches when configured), with
    /// dropout masks seeded by (seed, step); over several ranks, this rank's shard of it.
    fn step(&self, state: &TrainState, opt: &mut AdamW, batch: &[usize]) -> Result<StepOutcome> {
        let (inp, run, world) = (self.inp, self.inp.run, self.inp.world);
        let model =
            StepModel { encoder: inp.encoder, teacher: inp.teacher, objective: run.objective(), layout: &self.layout };
        let mut dropout_rng = StdRng::seed_from_u64(derived_seed(run.cfg().seed, 2, state.step + 1));
        let rng = inp.tc().dropout.then_some(&mut dropout_rng);
        if world.size() == 1 {
            let ids = batch.iter().map(|&k| inp.train.ids(k)).collect::<Result<Vec<PairIds>>>()?;
            let micro = self.layout.batches(&ids, run.micro_batch_pairs(), inp.tokenizer, run.device())?;
            return train_step(model, opt, &micro, inp.tc().max_grad_norm, rng);
        }
        // Rank k's slice of the global batch, in micro-batches; the seeds are the ones one
        // process would draw for all ranks' micro-batches in order, rank k's taken.
        let n = batch.len() / world.size();
        let shard = &batch[world.rank() * n..(world.rank() + 1) * n];
        let ids = shard.iter().map(|&k| inp.train.ids(k)).collect::<Result<Vec<PairIds>>>()?;
        let micro = self.layout.batches(&ids, run.micro_batch_pairs(), inp.tokenizer, run.device())?;
        let seeds: Option<Vec<u64>> = rng.map(|r| {
            let all: Vec<u64> = (0..micro.len() * world.size()).map(|_| rand::Rng::gen(r)).collect();
            all[world.rank() * micro.len()..(world.rank() + 1) * micro.len()].to_vec()
        });
        match shard_gradients(model, world, &micro, seeds.as_deref())? {
            Ok(g) => apply(opt, g, inp.tc().max_grad_norm),
            Err(e) => Ok(StepOutcome::Skipped(e)),
        }
    }

    /// Count a skipped step; past `train.max_bad_steps` the run stops.
    fn bad_step(&self, state: &mut TrainState, msg: String) -> Option<End> {
        let max = self.inp.tc().max_bad_steps;
        state.bad_steps += 1;
        let what = format!("step {}: {msg}", state.step + 1);
        if state.bad_steps > max {
            return Some(End::Stopped(format!(
                "{what}; {} bad steps, more than train.max_bad_steps = {max}. Stopped with the weights of step {}. Try a lower train.lr or train.max_grad_norm",
                state.bad_steps, state.step
            )));
        }
        let n = state.bad_steps;
        self.inp.progress.line(&format!("warning: {what}; skipped without an update ({n} of at most {max} bad steps)"));
        None
    }

    fn pairs_per_s(&self, step: usize) -> f64 {
        (step * self.inp.tc().batch_pairs) as f64 / self.seconds()
    }

    /// Hand the step's one-line summary to the progress.
    fn progress(&self, step: usize, stats: &StepStats) {
        let brief = format!(
            "loss {:.4} align {:.4} uniform {:.4} | {:.1} pairs/s",
            stats.loss,
            stats.part("align"),
            stats.part("uniform"),
            self.pairs_per_s(step)
        );
        self.inp.progress.advance(step as u64, &brief);
    }

    /// Validate (every rank embeds its share; rank 0 logs and selects) and tell every rank
    /// whether the run ends (a collapse).
    fn validate(&mut self, state: &TrainState, lr: f64, watch: &mut Option<Watch>) -> Result<Option<End>> {
        let collapse = match watch {
            Some(w) => self.validate_here(state, lr, w)?,
            None => {
                self.inp.validate()?;
                None
            }
        };
        let collapse = match self.inp.world.size() {
            1 => collapse,
            _ => self.inp.world.broadcast_json(Some(&collapse))?,
        };
        (self.sums, self.since) = (Vec::new(), 0);
        Ok(collapse.map(End::Collapsed))
    }

    /// Log a validation line with the training means since the last one; a collapse's message.
    fn validate_here(&mut self, state: &TrainState, lr: f64, watch: &mut Watch) -> Result<Option<String>> {
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
        let (val, verdict) = watch.after_step(line)?;
        let loss = self.sums.first().map_or(f32::NAN, |(_, v)| v / k);
        let speed = self.pairs_per_s(step);
        let progress = self.inp.progress;
        progress.line(&format!("step {step}/{}: train loss {loss:.4} | {val} | {speed:.1} pairs/s", self.total));
        if let Health::Drift(m) | Health::Collapse(m) = &verdict {
            progress.line(&format!("warning: step {step}: {m}"));
        }
        Ok(match verdict {
            Health::Collapse(m) => Some(format!("step {step}: {m}")),
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

    #[test]
    fn accumulate_sums_named_parts() {
        let s = StepStats { loss: 1.0, parts: vec![("align", 0.5), ("uniform", -2.0)], ..Default::default() };
        let mut sums = Vec::new();
        accumulate(&mut sums, &s);
        accumulate(&mut sums, &s);
        assert_eq!(sums, [("loss".to_string(), 2.0), ("align".into(), 1.0), ("uniform".into(), -4.0)]);
    }
}
