//! The finetune pipeline, one phase per function: open the run folder (lock, config), load the
//! model and the corpus, measure before, train, then measure after, export, evaluate and report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::console::Console;
use super::{eval_options, run_eval, sources, training_data};
use crate::bail;
use crate::config::resolved::Resolved;
use crate::config::{RunConfig, Select};
use crate::data::batch::TextTokenizer;
use crate::data::dataset::Dataset;
use crate::data::source::{Pair, PairSource};
use crate::dist::World;
use crate::error::{Context, Result};
use crate::eval::dev::DevSet;
use crate::eval::runner::{tables, Embedder, EvalOptions, Evaluated};
use crate::io::{write_atomic, write_json};
use crate::metrics::Anisotropy;
use crate::model::source::{resolve, ModelFiles};
use crate::model::st_layout::{declared_max_len, write_model};
use crate::model::Encoder;
use crate::report::{measure, table, Report, Sample, SampleInfo};
use crate::run_dir::RunLock;
use crate::train::{train, TrainInputs, TrainSummary};

/// What to run: a new run from a config (with overrides), or `resume` of a run folder.
pub struct Finetune<'a> {
    pub config: Option<&'a Path>,
    pub overrides: &'a [String],
    /// The folder `$HYPERSPHERE_DATA` stands for.
    pub data: Option<&'a Path>,
    /// Move an earlier run in the folder aside.
    pub force: bool,
    pub resume: Option<&'a Path>,
    /// The `--device` flag: overrides the config's `model.device`.
    pub device: Option<&'a str>,
    pub interrupt: &'a Interrupt,
    /// The ranks training together; rank 0 owns the run folder and reports.
    pub world: &'a World,
}

/// Shared with a signal handler: `stop` asks training to checkpoint and return; `phase` says
/// where the run is ([`Interrupt::BEFORE`], [`Interrupt::TRAINING`], [`Interrupt::AFTER`]):
/// outside training there is no step to finish.
#[derive(Default, Clone)]
pub struct Interrupt {
    pub stop: Arc<AtomicBool>,
    pub phase: Arc<AtomicU8>,
}

impl Interrupt {
    pub const BEFORE: u8 = 0;
    pub const TRAINING: u8 = 1;
    pub const AFTER: u8 = 2;
}

/// How a run ended.
pub enum Outcome {
    /// Trained, measured and exported into this run folder.
    Done(PathBuf),
    /// Stopped early (interrupt, non-finite steps, collapse); the message says why and what now.
    Stopped(String),
}

/// Measurements taken before training, kept so a resumed run reports against them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Before {
    anisotropy: Anisotropy,
    eval: Option<Vec<Evaluated>>,
}

/// Everything loaded once for a run.
struct Loaded {
    res: Resolved,
    run_dir: PathBuf,
    files: ModelFiles,
    tokenizer: TextTokenizer,
    data: Dataset,
    /// The frozen starting model for `loss.mean_teacher`.
    teacher: Option<Encoder>,
    encoder: Encoder,
}

/// Downstream evaluation and STS-B dev scoring: options and the tokenizer at the eval length.
struct EvalSetup {
    opts: Option<EvalOptions>,
    tokenizer: TextTokenizer,
}

/// Run the whole pipeline. Over several ranks, rank 0 opens the run folder and tells the others
/// the config, prepares the corpus before they open it, measures, validates, selects and
/// writes; every rank trains.
pub fn finetune(req: &Finetune) -> Result<Outcome> {
    let world = req.world;
    let (res, run_dir, _lock) = open_shared(req)?;
    let run = match world.is_root() {
        true => {
            let run = load(res, run_dir, true)?;
            world.barrier()?;
            run
        }
        false => {
            world.barrier()?;
            load(res, run_dir, false)?
        }
    };
    if !world.is_root() {
        world.barrier()?;
        let summary = train_run(&run, req)?;
        return Ok(match summary.stopped {
            Some(why) => Outcome::Stopped(why),
            None => Outcome::Done(run.run_dir),
        });
    }
    if req.resume.is_none() {
        write_run_toml(&run)?;
    }
    let cfg = run.res.cfg();
    let sample = Sample::draw(&*run.val(), cfg.report.sentences, cfg.report.pairs, cfg.seed)?;
    let eval = eval_setup(&run)?;
    let before = before(&run, &sample, &eval, req.resume.is_some())?;
    world.barrier()?;
    let summary = train_run(&run, req)?;
    if let Some(why) = &summary.stopped {
        return Ok(Outcome::Stopped(stopped_message(&run.run_dir, &summary, why)));
    }
    finish(&run, &sample, &eval, &before, &summary)?;
    Ok(Outcome::Done(run.run_dir))
}

/// [`open_run`] on rank 0; the others get its resolved config and run folder (and no lock).
fn open_shared(req: &Finetune) -> Result<(Resolved, PathBuf, Option<RunLock>)> {
    let world = req.world;
    if world.size() == 1 {
        let (res, dir, lock) = open_run(req)?;
        return Ok((res, dir, Some(lock)));
    }
    let opened = world.is_root().then(|| open_run(req)).transpose()?;
    // The config travels as TOML, as run.toml holds it: JSON has no infinity for a key such as
    // train.max_grad_norm = inf.
    let shared = match &opened {
        Some((res, dir, _)) => {
            Some((toml::to_string(res.cfg()).map_err(|e| crate::Error::invalid(e.to_string()))?, dir.clone()))
        }
        None => None,
    };
    let (text, dir): (String, PathBuf) = world.broadcast_json(shared.as_ref())?;
    let cfg: RunConfig =
        toml::from_str(&text).map_err(|e| crate::Error::invalid(format!("the run config from rank 0: {e}")))?;
    match opened {
        Some((res, dir, lock)) => Ok((res, dir, Some(lock))),
        None => Ok((Resolved::new(cfg, req.data, req.device)?, dir, None)),
    }
}

/// Lock the run folder and read the config: the saved one (with allowed changes) on resume; on
/// a fresh start the given one, resolved and checked before anything is touched, with an
/// earlier run refused or (`force`) moved aside.
fn open_run(req: &Finetune) -> Result<(Resolved, PathBuf, RunLock)> {
    let resolve = |cfg| -> Result<Resolved> {
        let res = Resolved::new(cfg, req.data, req.device)?;
        res.check_training()?;
        Ok(res)
    };
    match req.resume {
        Some(dir) => {
            // Before the lock, which would create the folder: a folder that is not a run is
            // left untouched.
            crate::run_dir::check_resumable(dir)?;
            let lock = crate::run_dir::lock(dir)?;
            let (cfg, changes) = crate::run_dir::resume_config(dir, req.overrides)?;
            let res = resolve(cfg)?;
            for (k, a, b) in &changes {
                eprintln!("resume: {k} = {b} (was {a}), recorded in {}", dir.join("run.toml").display());
            }
            Ok((res, dir.to_path_buf(), lock))
        }
        None => {
            let res = resolve(RunConfig::load(req.config, req.overrides)?)?;
            let run_dir = res.cfg().out_dir.join(&res.cfg().name);
            let (lock, aside) = crate::run_dir::start_fresh(&run_dir, req.force)?;
            if let Some(old) = aside {
                eprintln!("--force: moved the earlier run to {} (delete it when no longer needed)", old.display());
            }
            Ok((res, run_dir, lock))
        }
    }
}

/// The model files, the corpus's pairs and the trainable encoder; `say`: report what was loaded.
fn load(res: Resolved, run_dir: PathBuf, say: bool) -> Result<Loaded> {
    let t0 = Instant::now();
    let cfg = res.cfg();
    let files = resolve(&cfg.model.source, &sources())?;
    let (tokenizer, data) = training_data(&res, &files)?;
    let (train, val) = (data.train().len(), data.val().len());
    if say {
        let what = match &data {
            Dataset::Books { corpus, split } => {
                let stats = corpus.stats(res.max_books());
                format!(
                    "corpus: {} books, {} sentences -> {train} train pairs, {val} validation pairs ({} held-out books)",
                    stats.books,
                    stats.sentences,
                    split.val_books.len(),
                )
            }
            Dataset::File { train: t, .. } => format!(
                "{}: {train} training examples{}, {val} held out",
                t.manifest.source.display(),
                if data.train().has_negatives() { " with hard negatives" } else { "" }
            ),
        };
        eprintln!("{what} in {:.1}s", t0.elapsed().as_secs_f64());
    }
    if val == 0 {
        bail!("no validation pairs: the corpus needs at least 2 books and data.val_fraction > 0 (or a data.val_file) for the before/after report");
    }
    let (encoder, teacher) = super::training_encoders(&files, &res)?;
    if cfg.model.max_len > encoder.config.max_position_embeddings {
        bail!(
            "model.max_len {} is longer than the model's max_position_embeddings {} ({})",
            cfg.model.max_len,
            encoder.config.max_position_embeddings,
            files.config.display()
        );
    }
    if say {
        let pooling = cfg.model.pooling.as_str();
        eprintln!("model: {} ({} parameters, pooling {pooling})", files.spec, encoder.num_params());
    }
    Ok(Loaded { res, run_dir, files, tokenizer, data, encoder, teacher })
}

fn write_run_toml(run: &Loaded) -> Result<()> {
    let resolved = toml::to_string_pretty(run.res.cfg()).map_err(|e| crate::Error::invalid(e.to_string()))?;
    let header = format!(
        "# resolved config of this run; hypersphere {}; model weights {}\n",
        env!("CARGO_PKG_VERSION"),
        run.files.weights.display()
    );
    write_atomic(&run.run_dir.join("run.toml"), (header + &resolved).as_bytes())
}

/// `[eval]` options (None without tasks) and the tokenizer at the evaluation length (the
/// model's declared length unless `eval.max_len` is set).
fn eval_setup(run: &Loaded) -> Result<EvalSetup> {
    let (res, cfg) = (&run.res, run.res.cfg());
    // BOOKS-NEXT is the books' task: a file's pairs are not a book's sentences in order.
    let books_next = cfg.report.books_next && matches!(run.data, Dataset::Books { .. });
    let opts = match (res.tasks().is_empty(), books_next) {
        (true, false) => None,
        (no_tasks, books_next) => {
            let root = if no_tasks { PathBuf::new() } else { res.data_dir()?.to_path_buf() };
            let mut o = eval_options(root, res.tasks().to_vec(), cfg.eval.quick, cfg.seed, true);
            if books_next {
                o.user_retrieval.push(crate::eval::books_next::books_next(&*run.val())?);
            }
            Some(o)
        }
    };
    Ok(EvalSetup { opts, tokenizer: eval_tokenizer(run)? })
}

/// The tokenizer at the evaluation length: the model's declared length unless `eval.max_len`
/// is set.
fn eval_tokenizer(run: &Loaded) -> Result<TextTokenizer> {
    let positions = run.encoder.config.max_position_embeddings;
    let len = run.res.eval_max_len(declared_max_len(&run.files, positions), positions);
    TextTokenizer::load(&run.files.tokenizer, len)
}

/// The model before training: read from `before.json` on resume, else measured (and `[eval]`
/// run) and saved there.
fn before(run: &Loaded, sample: &Sample, eval: &EvalSetup, resume: bool) -> Result<Before> {
    let device = run.res.device();
    eprintln!(
        "measuring the model before training on {} held-out sentences, {} pairs...",
        sample.sentences.len(),
        sample.pairs.len()
    );
    let saved: Option<Before> = resume
        .then(|| std::fs::read_to_string(run.run_dir.join("before.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    let (anisotropy, saved_eval) = match saved {
        Some(b) => (b.anisotropy, b.eval),
        None => {
            let a = measure(&run.encoder, &run.tokenizer, sample, device)
                .with_context(|| format!("measuring {} before training", run.files.weights.display()))?;
            (a, None)
        }
    };
    let eval_before = match (&eval.opts, saved_eval) {
        (Some(_), Some(saved)) => Some(saved),
        (Some(o), None) => {
            eprintln!("evaluating the model before training on {} tasks", o.tasks.len() + o.user_retrieval.len());
            let embedder =
                Embedder { encoder: &run.encoder, tokenizer: &eval.tokenizer, device, world: &World::single() };
            Some(run_eval(&embedder, &run.files.weights, o, &mut |_| Ok(()))?)
        }
        (None, _) => None,
    };
    let before = Before { anisotropy, eval: eval_before };
    write_json(&run.run_dir.join("before.json"), &before)?;
    Ok(before)
}

impl Loaded {
    fn train(&self) -> Box<dyn PairSource + '_> {
        self.data.train()
    }

    fn val(&self) -> Box<dyn PairSource + '_> {
        self.data.val()
    }
}

/// Held-out pairs for validation during training: a fixed random choice among the validation
/// books' pairs.
fn val_pairs(run: &Loaded) -> Result<Vec<Pair>> {
    let (val, cfg) = (run.val(), run.res.cfg());
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let chosen = rand::seq::index::sample(&mut rng, val.len(), cfg.train.val_pairs.min(val.len()));
    chosen.into_iter().map(|k| val.pair(k)).collect()
}

/// Train, with STS-B dev loaded when selecting on it (rank 0, which has `eval`);
/// `interrupt.phase` says so meanwhile.
fn train_run(run: &Loaded, req: &Finetune) -> Result<TrainSummary> {
    // Every rank holds STS-B dev: each embeds a share of it at every validation.
    let dev = match run.res.cfg().train.select {
        Select::StsbDev => Some(DevSet::stsb(run.res.data_dir()?, eval_tokenizer(run)?)?),
        _ => None,
    };
    let val = val_pairs(run)?;
    let console = if req.world.is_root() { Console::default() } else { Console::quiet() };
    req.interrupt.phase.store(Interrupt::TRAINING, SeqCst);
    let summary = train(&TrainInputs {
        encoder: &run.encoder,
        teacher: run.teacher.as_ref(),
        tokenizer: &run.tokenizer,
        run: &run.res,
        train: &*run.train(),
        val_pairs: &val,
        dev: dev.as_ref(),
        run_dir: &run.run_dir,
        resume: req.resume.is_some(),
        stop: &req.interrupt.stop,
        progress: &console,
        world: req.world,
    });
    // A run that stopped early only exits now; it stays "training" for the signal handler, so
    // the same interrupt reaching another rank late (a scheduler signals every rank) is not
    // taken for a second one, whose exit code would become the job's.
    if summary.as_ref().is_ok_and(|s| s.stopped.is_none()) {
        req.interrupt.phase.store(Interrupt::AFTER, SeqCst);
    }
    summary
}

/// Why the run stopped, and what is left: nothing after a collapse, else the last checkpoint.
fn stopped_message(run_dir: &Path, summary: &TrainSummary, why: &str) -> String {
    if summary.collapsed {
        return format!("training stopped: {why}");
    }
    let kept = crate::checkpoint::list(run_dir)
        .pop()
        .map(|p| format!("last good checkpoint: {}", p.display()))
        .unwrap_or_else(|| "no checkpoint yet: the last good model is the original".into());
    format!("training stopped early: {why} ({kept})")
}

/// After training: measure, export the model (at the base model's declared length, so Python
/// gets the same vectors), run `[eval]` on the exported weights, write the report.
fn finish(run: &Loaded, sample: &Sample, eval: &EvalSetup, before: &Before, summary: &TrainSummary) -> Result<()> {
    let device = run.res.device();
    eprintln!(
        "trained {} of {} steps in {:.1}s ({:.1} pairs/s{}); keeping the weights of step {} ({})",
        summary.steps,
        summary.planned_steps,
        summary.seconds,
        summary.pairs_per_s,
        summary.resumed_at.map_or(String::new(), |s| format!(", whole run; resumed at step {s}")),
        summary.selected.step,
        match summary.selected.sts_dev {
            Some(s) => format!("best STS-B dev Spearman, {s:.2}"),
            None => "the last step".into(),
        }
    );
    if let Some(t) = summary.traffic {
        // The counters cover this process only; a resumed run's seconds cover the whole run.
        let steps = (summary.steps - summary.resumed_at.unwrap_or(0)).max(1) as f64;
        let share = match summary.resumed_at {
            None => format!(", {:.0}% of training", 100.0 * t.seconds / summary.seconds.max(1e-9)),
            Some(_) => String::new(),
        };
        eprintln!(
            "collectives on rank 0: {:.3}s and {:.2} MB per step{share} (waiting for slower ranks included)",
            t.seconds / steps,
            t.bytes as f64 / steps / 1e6
        );
    }
    let after = measure(&run.encoder, &run.tokenizer, sample, device)?;
    println!("\nheld out: {}", run.data.held_out().join(", "));
    println!("{}", table(&before.anisotropy, &after));
    let model_dir = run.run_dir.join("model");
    write_model(&run.encoder, &model_dir, declared_max_len(&run.files, run.encoder.config.max_position_embeddings))?;
    let eval_after = match &eval.opts {
        Some(o) => {
            eprintln!("evaluating the trained model on {} tasks", o.tasks.len() + o.user_retrieval.len());
            let weights = model_dir.join("model.safetensors");
            let embedder =
                Embedder { encoder: &run.encoder, tokenizer: &eval.tokenizer, device, world: &World::single() };
            let after = run_eval(&embedder, &weights, o, &mut |_| Ok(()))?;
            let (text, md) = tables(&after, before.eval.as_deref());
            println!("{text}");
            write_atomic(&run.run_dir.join("eval.md"), md.as_bytes())?;
            Some(after)
        }
        None => None,
    };
    let report = Report {
        model: &run.files.spec,
        pooling: run.res.cfg().model.pooling.as_str(),
        sample: SampleInfo {
            val_books: run.data.held_out(),
            sentences: sample.sentences.len(),
            pairs: sample.pairs.len(),
        },
        before: &before.anisotropy,
        after: &after,
        train: summary,
        eval: crate::report::EvalReport { before: before.eval.as_deref(), after: eval_after.as_deref() },
    };
    write_json(&run.run_dir.join("report.json"), &report)?;
    println!("wrote {}/{{model/, report.json, log.jsonl, run.toml, checkpoints/}}", run.run_dir.display());
    Ok(())
}
