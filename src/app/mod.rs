//! The pipelines behind each command, callable from tests and other front ends: the CLI parses
//! arguments into these calls and prints what they return.

pub mod finetune;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;

use crate::config::RunConfig;
use crate::data::batch::TextTokenizer;
use crate::data::pairs::PairOptions;
use crate::data::{load_pairs, PairSet};
use crate::eval::runner::{evaluate, sha256_file, EvalOptions, Evaluated};
use crate::eval::Task;
use crate::model::pooling::Pooling;
use crate::model::source::{declared_max_len, resolve, saved_pooling, ModelFiles, SourceOptions};
use crate::model::Encoder;

/// The training tokenizer (at `model.max_len`) and the corpus's pairs (`corpus`, else the
/// config's `data.corpus`); skipped links are noted on stderr.
pub fn tokenizer_and_pairs(
    cfg: &RunConfig,
    files: &ModelFiles,
    data: Option<&Path>,
    corpus: Option<PathBuf>,
) -> Result<(TextTokenizer, PairSet)> {
    let tokenizer = TextTokenizer::load(&files.tokenizer, cfg.model.max_len)?;
    let corpus = match corpus {
        Some(c) => c,
        None => cfg.corpus_path(data)?,
    };
    let opts = PairOptions {
        cross_paragraph: cfg.data.cross_paragraph,
        min_tokens: cfg.data.min_tokens,
        max_tokens: cfg.data.max_tokens,
    };
    let counter = tokenizer.counter()?;
    let set = load_pairs(&corpus, cfg.data.max_books, &opts, cfg.data.val_fraction, cfg.seed, &counter)?;
    if !set.skipped.is_empty() {
        let names: Vec<String> = set.skipped.iter().take(5).map(|p| p.display().to_string()).collect();
        eprintln!(
            "note: {} paths in the corpus not followed (broken links, links back into a folder above them, folders reached twice): {}{}",
            set.skipped.len(),
            names.join(", "),
            if set.skipped.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok((tokenizer, set))
}

/// A model spec with an optional `@pooling` suffix, resolved and loaded for inference at
/// `max_len` (default: the length the model folder declares).
pub fn load_model(
    spec: &str,
    pooling: Option<Pooling>,
    max_len: Option<usize>,
    device: &Device,
) -> Result<(ModelFiles, Encoder, TextTokenizer)> {
    use clap::ValueEnum;
    let (spec, pooling) = match spec.rsplit_once('@') {
        Some((s, p)) => match Pooling::from_str(p, true) {
            Ok(p) => (s, Some(p)),
            Err(_) => bail!("{spec}: unknown pooling `{p}` after @ (use mean, cls or first-last-avg)"),
        },
        None => (spec, pooling),
    };
    let files = resolve(spec, &SourceOptions::from_env())?;
    let pooling = pooling.or_else(|| saved_pooling(&files)).unwrap_or(Pooling::Mean);
    let encoder = Encoder::load(&files, pooling, false, device)?;
    let positions = encoder.config.max_position_embeddings;
    let max_len = max_len.unwrap_or_else(|| declared_max_len(&files, positions)).min(positions);
    let tokenizer = TextTokenizer::load(&files.tokenizer, max_len)?;
    Ok((files, encoder, tokenizer))
}

/// Evaluation options with the embedding cache under the model cache (unless `cache` is off).
pub fn eval_options(root: PathBuf, tasks: Vec<Task>, quick: bool, seed: u64, cache: bool) -> EvalOptions {
    let cache_dir = cache.then(|| SourceOptions::from_env().cache_dir.join("embeddings"));
    EvalOptions { root, tasks, quick, seed, cache_dir, user_sts: Vec::new() }
}

/// Evaluate the encoder whose weights are in `weights`, progress on stderr.
pub fn run_eval(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    weights: &Path,
    opts: &EvalOptions,
    device: &Device,
) -> Result<Vec<Evaluated>> {
    run_eval_saving(encoder, tokenizer, weights, opts, device, &mut |_| Ok(()))
}

/// [`run_eval`], handing the results so far to `finished` after each task.
pub fn run_eval_saving(
    encoder: &Encoder,
    tokenizer: &TextTokenizer,
    weights: &Path,
    opts: &EvalOptions,
    device: &Device,
    finished: &mut dyn FnMut(&[Evaluated]) -> crate::Result<()>,
) -> Result<Vec<Evaluated>> {
    let sha = sha256_file(weights)?;
    Ok(evaluate(encoder, tokenizer, &sha, opts, device, &mut |m| eprintln!("  {m}"), finished)?)
}
