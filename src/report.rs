//! The before/after report: anisotropy of held-out sentences, measured the same way twice.

use std::sync::Arc;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::data::batch::TextTokenizer;
use crate::data::source::{Pair, PairSource};
use crate::error::Result;
use crate::metrics::{anisotropy, Anisotropy, Embeddings};
use crate::model::{embed_texts, Encoder};

/// A fixed sample of held-out text, drawn once and measured before and after training.
#[derive(Debug, Clone)]
pub struct Sample {
    pub sentences: Vec<Arc<str>>,
    pub pairs: Vec<Pair>,
}

impl Sample {
    /// Up to `n_sentences` sentences (the first sentences of as many random pairs: distinct
    /// sentences, whatever their text) and `n_pairs` random pairs from `pairs`, seeded. Reads
    /// only what it draws, so a held-out set of any size costs nothing.
    pub fn draw(pairs: &dyn PairSource, n_sentences: usize, n_pairs: usize, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = pairs.len();
        let firsts = rand::seq::index::sample(&mut rng, n, n_sentences.min(n));
        let sentences = firsts.into_iter().map(|k| Ok(pairs.pair(k)?.anchor)).collect::<Result<_>>()?;
        let chosen = rand::seq::index::sample(&mut rng, n, n_pairs.min(n));
        Ok(Self { sentences, pairs: chosen.into_iter().map(|k| pairs.pair(k)).collect::<Result<_>>()? })
    }
}

/// Anisotropy metrics of `encoder` on the sample, with alignment over its pairs.
pub fn measure(encoder: &Encoder, tokenizer: &TextTokenizer, sample: &Sample, device: &Device) -> Result<Anisotropy> {
    let dim = encoder.config.hidden_size;
    let embed = |texts: Vec<&str>| embed_texts(encoder, tokenizer, &texts, crate::model::EMBED_BATCH, device);
    let x = embed(sample.sentences.iter().map(|s| &**s).collect())?;
    let a = embed(sample.pairs.iter().map(|p| &*p.anchor).collect())?;
    let b = embed(sample.pairs.iter().map(|p| &*p.positive).collect())?;
    let m = sample.pairs.len();
    let pairs = (m > 0).then(|| (Embeddings { data: &a, n: m, dim }, Embeddings { data: &b, n: m, dim }));
    let mut out = anisotropy(Embeddings { data: &x, n: sample.sentences.len(), dim }, pairs)?;
    if m > 0 {
        let first: Vec<&str> = sample.pairs.iter().map(|p| &*p.anchor).collect();
        let second: Vec<&str> = sample.pairs.iter().map(|p| &*p.positive).collect();
        out.next_sentence = Some(crate::retrieval::next_sentence(&first, &second, &a, &b, dim));
    }
    Ok(out)
}

/// Rows of the before/after table: (name, before, after, better when).
fn rows(before: &Anisotropy, after: &Anisotropy) -> Vec<(&'static str, f64, f64, &'static str)> {
    vec![
        ("alignment (alpha=2)", before.alignment.unwrap_or(f64::NAN), after.alignment.unwrap_or(f64::NAN), "lower"),
        ("uniformity (t=2)", before.uniformity, after.uniformity, "lower"),
        ("mean cosine", before.mean_cosine, after.mean_cosine, "closer to 0"),
        ("isotropy I(W)", before.isotropy, after.isotropy, "higher, max 1"),
        ("effective rank", before.effective_rank, after.effective_rank, "higher"),
        ("top PC variance", before.top_pc_variance, after.top_pc_variance, "lower"),
        ("next-sent. nDCG@10", next(before, |r| r.ndcg_at_10), next(after, |r| r.ndcg_at_10), "higher"),
        ("next-sent. Recall@10", next(before, |r| r.recall_at_10), next(after, |r| r.recall_at_10), "higher"),
    ]
}

/// A next-sentence retrieval score, NaN when it was not measured.
fn next(a: &Anisotropy, f: fn(&crate::retrieval::Retrieval) -> f64) -> f64 {
    a.next_sentence.as_ref().map_or(f64::NAN, f)
}

/// A plain-text table: metric, before, after, change.
pub fn table(before: &Anisotropy, after: &Anisotropy) -> String {
    let mut out = format!("{:<22}{:>12}{:>12}{:>12}   {}\n", "metric", "before", "after", "change", "better");
    for (name, b, a, better) in rows(before, after) {
        out += &format!("{name:<22}{b:>12.4}{a:>12.4}{:>+12.4}   {better}\n", a - b);
    }
    out
}

/// `report.json`.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub model: &'a str,
    pub pooling: &'a str,
    pub sample: SampleInfo,
    pub before: &'a Anisotropy,
    pub after: &'a Anisotropy,
    pub train: &'a crate::train::TrainSummary,
    pub eval: EvalReport<'a>,
}

/// `[eval]` results before and after training (null without tasks).
#[derive(Debug, Serialize)]
pub struct EvalReport<'a> {
    pub before: Option<&'a [crate::eval::runner::Evaluated]>,
    pub after: Option<&'a [crate::eval::runner::Evaluated]>,
}

#[derive(Debug, Serialize)]
pub struct SampleInfo {
    pub val_books: Vec<String>,
    pub sentences: usize,
    pub pairs: usize,
}
