//! Runs evaluation tasks on an encoder: embeds each task's sentences once per (weights, pooling,
//! max_len, task, quick) and caches them on disk as safetensors, then runs the protocols.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::beir::Beir;
use super::{run_task, task_sentences, Task, TaskResult, UserSts};
use crate::data::batch::TextTokenizer;
use crate::dist::World;
use crate::embedding_file::{read_embeddings, EmbeddingRows, EmbeddingWriter};
use crate::error::Result;
use crate::model::{Encoder, EMBED_BATCH};
use crate::progress::Progress;

pub struct EvalOptions {
    /// The data root holding `senteval/` and `sts/`.
    pub root: PathBuf,
    pub tasks: Vec<Task>,
    pub quick: bool,
    pub seed: u64,
    /// Where embeddings are cached; None disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// The user's scored-pair sets (`eval --sts NAME=FILE`), after the tasks.
    pub user_sts: Vec<UserSts>,
    /// The user's retrieval sets (`eval --retrieval NAME=DIR`), last.
    pub user_retrieval: Vec<Beir>,
}

/// One task's scores plus how long its embedding took (0 when it came from the cache).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Evaluated {
    #[serde(flatten)]
    pub result: TaskResult,
    pub sentences: usize,
    pub embed_seconds: f64,
    pub cached: bool,
}

/// What embeds the tasks' sentences: the encoder, its tokenizer and device, and the ranks that
/// share the work (a world of one: this process).
pub struct Embedder<'a> {
    pub encoder: &'a Encoder,
    pub tokenizer: &'a TextTokenizer,
    pub device: &'a Device,
    pub world: &'a World,
}

/// Evaluate the encoder (whose weights file hashes to `weights_sha256`) on every task, then on
/// the user's STS sets. Every task's files are read first, so a missing or malformed file stops
/// the run before anything is embedded. `progress` hears status lines and each embedding's progress;
/// `finished` receives the results so far after each task, so a caller can keep them. Over
/// several ranks each embeds a share of every task's sentences; every rank scores.
pub fn evaluate(
    embedder: &Embedder,
    weights_sha256: &str,
    opts: &EvalOptions,
    progress: &dyn Progress,
    finished: &mut dyn FnMut(&[Evaluated]) -> Result<()>,
) -> Result<Vec<Evaluated>> {
    let (encoder, tokenizer) = (embedder.encoder, embedder.tokenizer);
    let all_sentences =
        opts.tasks.iter().map(|&task| task_sentences(task, &opts.root, opts.quick)).collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    let cache_key = |what: &str| {
        use sha2::{Digest, Sha256};
        // f32 keys stay as they were before int8 existed, so old caches still hit.
        let int8 = if encoder.compute() == crate::model::Compute::Int8 { "|int8" } else { "" };
        let id = format!(
            "{weights_sha256}|{}|{}|{what}|{}{int8}",
            encoder.pooling.as_str(),
            tokenizer.max_len,
            if opts.quick { "quick" } else { "full" }
        );
        format!("{:x}", Sha256::digest(id.as_bytes()))
    };
    for (&task, sentences) in opts.tasks.iter().zip(all_sentences) {
        let key = cache_key(task.name());
        let cache_file = opts.cache_dir.as_ref().map(|d| d.join(format!("{}-{}.safetensors", task.name(), &key[..16])));
        let embedded = embed_cached(embedder, task.name(), &sentences, cache_file.as_deref(), progress)?;
        let lookup = embedded.lookup(&sentences, encoder.config.hidden_size);
        let embed = |s: &str| lookup.get(s).copied();
        let result = run_task(task, &opts.root, opts.quick, &embed, opts.seed, &mut |m| progress.line(m))?;
        out.push(embedded.done(result, sentences.len(), progress));
        finished(&out)?;
    }
    for set in &opts.user_sts {
        let sentences = set.sentences();
        // Keyed by the content too: an edited file is embedded again.
        let content: String = sentences.concat();
        let key = cache_key(&format!("user:{}:{content}", set.name));
        let cache_file =
            opts.cache_dir.as_ref().map(|d| d.join(format!("sts-{}-{}.safetensors", set.name, &key[..16])));
        let embedded = embed_cached(embedder, &set.name, &sentences, cache_file.as_deref(), progress)?;
        let lookup = embedded.lookup(&sentences, encoder.config.hidden_size);
        let result = set.score(&|s| lookup.get(s).copied())?;
        out.push(embedded.done(result, sentences.len(), progress));
        finished(&out)?;
    }
    for set in &opts.user_retrieval {
        // Keyed by a hash of the content, not the content itself (a million documents).
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for t in &set.texts {
            h.update((t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
        let key = cache_key(&format!("retrieval:{}:{}:{:x}", set.name, set.skip_own_text, h.finalize()));
        let cache_file =
            opts.cache_dir.as_ref().map(|d| d.join(format!("retrieval-{}-{}.safetensors", set.name, &key[..16])));
        out.push(retrieval_task(embedder, set, cache_file.as_deref(), progress)?);
        finished(&out)?;
    }
    Ok(out)
}

/// Rows for a task's sentences and how they were obtained.
struct Embedded {
    flat: Vec<f32>,
    cached: bool,
    seconds: f64,
}

impl Embedded {
    fn lookup<'a>(&'a self, sentences: &'a [String], dim: usize) -> HashMap<&'a str, &'a [f32]> {
        sentences.iter().zip(self.flat.chunks_exact(dim)).map(|(s, row)| (s.as_str(), row)).collect()
    }

    fn done(&self, result: TaskResult, sentences: usize, progress: &dyn Progress) -> Evaluated {
        evaluated(result, sentences, self.seconds, self.cached, progress)
    }
}

/// A task's result with its embedding cost (`seconds`, 0 when read from the cache), said on
/// the progress line.
fn evaluated(result: TaskResult, sentences: usize, seconds: f64, cached: bool, progress: &dyn Progress) -> Evaluated {
    progress.line(&format!(
        "{}: done in {:.1}s (embedding {:.1}s{}, scoring {:.1}s)",
        result.task,
        seconds + result.seconds,
        seconds,
        if cached { ", cached" } else { "" },
        result.seconds
    ));
    Evaluated { result, sentences, embed_seconds: seconds, cached }
}

/// A cache read on this rank, kept only when every rank could read it (the cache may be a
/// per-node folder): otherwise every rank embeds, calling the same collectives.
fn on_every_rank<T>(world: &World, here: Option<T>) -> Result<Option<T>> {
    Ok(match world.size() {
        1 => here,
        _ if world.any(here.is_none(), true)? => None,
        _ => here,
    })
}

/// Embed `sentences` (or read them from `cache_file`), with a progress bar labelled `label`.
/// Over several ranks, rank 0 says whether the cache holds them, and writes it.
fn embed_cached(
    embedder: &Embedder,
    label: &str,
    sentences: &[String],
    cache_file: Option<&Path>,
    progress: &dyn Progress,
) -> Result<Embedded> {
    let (encoder, world) = (embedder.encoder, embedder.world);
    let dim = encoder.config.hidden_size;
    let start = Instant::now();
    let here = cache_file.and_then(|f| read_embeddings(f).ok()).filter(|e| e.n == sentences.len() && e.dim == dim);
    if let Some(e) = on_every_rank(world, here)? {
        return Ok(Embedded { flat: e.data, cached: true, seconds: 0.0 });
    }
    progress.line(&format!("{label}: embedding {} sentences", sentences.len()));
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let mut flat = Vec::with_capacity(texts.len() * dim);
    progress.start(label, 0, texts.len() as u64);
    for chunk in texts.chunks(512 * world.size()) {
        flat.extend(world.embed(encoder, embedder.tokenizer, chunk, EMBED_BATCH, embedder.device)?);
        progress.advance((flat.len() / dim) as u64, "sentences");
    }
    progress.finish();
    if let (Some(f), true) = (cache_file, world.is_root()) {
        write_cache(f, &flat, sentences.len(), dim)?;
    }
    Ok(Embedded { flat, cached: false, seconds: start.elapsed().as_secs_f64() })
}

/// A retrieval set: its texts embedded a chunk at a time into an embeddings file (the cache,
/// or a temporary file removed afterwards) or read from the cache, then searched with the
/// documents streamed back from the file ([`Beir::score`]): no rank ever holds every
/// document's embedding. Over several ranks each writes its own file.
fn retrieval_task(
    embedder: &Embedder,
    set: &Beir,
    cache_file: Option<&Path>,
    progress: &dyn Progress,
) -> Result<Evaluated> {
    let (encoder, world) = (embedder.encoder, embedder.world);
    let dim = encoder.config.hidden_size;
    let start = Instant::now();
    let readable = |f: &Path| EmbeddingRows::open(f).ok().filter(|r| r.n == set.texts.len() && r.dim == dim);
    let mut temp = None;
    let (rows, was_cached) = match on_every_rank(world, cache_file.and_then(readable))? {
        Some(rows) => (rows, true),
        None => {
            let path = match (cache_file, world.is_root()) {
                (Some(f), true) => f.to_path_buf(),
                _ => {
                    let name = format!("hypersphere-{}-{}-{}.safetensors", std::process::id(), world.rank(), set.name);
                    temp.insert(TempFile(std::env::temp_dir().join(name))).0.clone()
                }
            };
            embed_to_file(embedder, &set.name, &set.texts, &path, progress)?;
            (EmbeddingRows::open(&path)?, false)
        }
    };
    let seconds = if was_cached { 0.0 } else { start.elapsed().as_secs_f64() };
    let result = set.score(&rows, dim)?;
    drop(temp);
    Ok(evaluated(result, set.texts.len(), seconds, was_cached, progress))
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Embed `texts` into an F32 embeddings file at `path`, 512 per rank at a time.
fn embed_to_file(
    embedder: &Embedder,
    label: &str,
    texts: &[String],
    path: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let (encoder, world) = (embedder.encoder, embedder.world);
    let dim = encoder.config.hidden_size;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    progress.line(&format!("{label}: embedding {} texts", texts.len()));
    progress.start(label, 0, texts.len() as u64);
    let mut w = EmbeddingWriter::create(path, texts.len(), dim, false, &Default::default())?;
    let mut done = 0;
    for chunk in texts.chunks(512 * world.size()) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for row in world.embed(encoder, embedder.tokenizer, &chunk, EMBED_BATCH, embedder.device)?.chunks_exact(dim) {
            w.push(row, done)?;
            done += 1;
        }
        progress.advance(done as u64, "texts");
    }
    progress.finish();
    w.finish()
}

fn write_cache(path: &Path, flat: &[f32], n: usize, dim: usize) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    let mut w = EmbeddingWriter::create(path, n, dim, false, &Default::default())?;
    for (i, row) in flat.chunks_exact(dim).enumerate() {
        w.push(row, i)?;
    }
    w.finish()
}

/// The headline metric names of a task, in display order.
fn shown(r: &TaskResult) -> Vec<(String, f64)> {
    r.metrics.iter().filter(|(k, _)| k != "dev_accuracy").cloned().collect()
}

/// Published references of a built-in task; a user set has none.
fn reference_text(task: &str) -> String {
    let refs = Task::parse(task).map(Task::reference).unwrap_or_default();
    refs.iter().map(|(name, v)| format!("{name} {v:.2}")).collect::<Vec<_>>().join("; ")
}

/// Display name: "SST-2" for a built-in task's id, the user's name for a user set.
fn display_name(task: &str) -> String {
    Task::parse(task).map_or_else(|| task.to_string(), |t| t.name().to_string())
}

/// Text and Markdown tables: one row per (task, metric); with `before`, before/after/change.
pub fn tables(after: &[Evaluated], before: Option<&[Evaluated]>) -> (String, String) {
    // The task column fits the longest name (user sets, BOOKS-NEXT) and a space.
    let w = after.iter().map(|e| display_name(&e.result.task).len() + 1).max().unwrap_or(0).max(8);
    let mut text = match before {
        Some(_) => format!(
            "{:<w$}{:<16}{:>10}{:>10}{:>10}{:>9}   reference\n",
            "task", "metric", "before", "after", "change", "secs"
        ),
        None => format!("{:<w$}{:<16}{:>10}{:>9}   reference\n", "task", "metric", "value", "secs"),
    };
    let mut md = match before {
        Some(_) => "| task | metric | before | after | change | seconds | published reference |\n|---|---|---:|---:|---:|---:|---|\n".to_string(),
        None => "| task | metric | value | seconds | published reference |\n|---|---|---:|---:|---|\n".to_string(),
    };
    for (i, e) in after.iter().enumerate() {
        let secs = e.embed_seconds + e.result.seconds;
        let reference = reference_text(&e.result.task);
        let prior = before.and_then(|b| b.get(i)).map(|b| shown(&b.result));
        for (j, (metric, v)) in shown(&e.result).into_iter().enumerate() {
            let name = display_name(&e.result.task);
            match prior.as_ref().and_then(|p| p.get(j)) {
                Some((_, b)) => {
                    text +=
                        &format!("{name:<w$}{metric:<16}{b:>10.2}{v:>10.2}{:>+10.2}{secs:>9.1}   {reference}\n", v - b);
                    md +=
                        &format!("| {name} | {metric} | {b:.2} | {v:.2} | {:+.2} | {secs:.1} | {reference} |\n", v - b);
                }
                None => {
                    text += &format!("{name:<w$}{metric:<16}{v:>10.2}{secs:>9.1}   {reference}\n");
                    md += &format!("| {name} | {metric} | {v:.2} | {secs:.1} | {reference} |\n");
                }
            }
        }
    }
    (text, md)
}
