//! `compare`: several models or embedding files measured side by side on the same sentences.

use std::path::Path;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::embed::read_lines;
use super::{load_model, Loading};
use crate::bail;
use crate::compare::Column;
use crate::data::batch::TextTokenizer;
use crate::data::books::pairs::PairOptions;
use crate::data::books::BookPairs;
use crate::error::{Context, Result};
use crate::model::{embed_texts, Compute, Encoder};
use crate::report::Sample;
use std::path::PathBuf;

/// Where `compare` takes its sentences from.
#[derive(clap::Args, Debug)]
pub struct TextArgs {
    /// Books: sentences and adjacent pairs are sampled from them.
    #[arg(long, conflicts_with = "input")]
    pub corpus: Option<PathBuf>,
    /// One sentence per line.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Positive pairs, one `sentence<TAB>sentence` per line.
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Sentences sampled for the metrics.
    #[arg(long, default_value_t = 2000)]
    pub sentences: usize,
    /// Positive pairs sampled from the corpus.
    #[arg(long, default_value_t = 1000)]
    pub num_pairs: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// The sentences and pairs `compare` measures every model on.
/// Sentences to measure, and positive pairs.
type Texts = (Vec<String>, Vec<(String, String)>);

/// `first_model`: the first model input's tokenizer (its file and itself), which prepares a
/// plain `--corpus` folder.
pub fn compare_text(t: &TextArgs, first_model: Option<(&Path, &TextTokenizer)>) -> Result<Texts> {
    let mut rng = StdRng::seed_from_u64(t.seed);
    let (mut sentences, mut pairs): (Vec<String>, Vec<(String, String)>) = match (&t.corpus, &t.input) {
        (Some(corpus), _) => {
            let (file, tok) =
                first_model.context("--corpus needs at least one model input (its tokenizer filters sentences)")?;
            let prepared = super::open_corpus(corpus, file, tok, &PairOptions::default(), false)?;
            let all = prepared.split(None, 0.0, t.seed);
            let sample = Sample::draw(&BookPairs::new(&prepared, &all.train), t.sentences, t.num_pairs, t.seed)?;
            let pairs = sample.pairs.iter().map(|p| (p.anchor.to_string(), p.positive.to_string())).collect();
            (sample.sentences.iter().map(|s| s.to_string()).collect(), pairs)
        }
        (None, Some(input)) => {
            let (mut lines, _) = read_lines(input)?;
            lines.shuffle(&mut rng);
            lines.truncate(t.sentences);
            (lines.into_iter().map(|(_, s)| s).collect(), Vec::new())
        }
        (None, None) => (Vec::new(), Vec::new()),
    };
    if let Some(path) = &t.pairs {
        let (lines, _) = read_lines(path)?;
        pairs = lines
            .into_iter()
            .map(|(i, l)| match l.split_once('\t') {
                Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => Ok((a.to_string(), b.to_string())),
                _ => bail!("{} line {}: expected `sentence<TAB>sentence`", path.display(), i + 1),
            })
            .collect::<Result<_>>()?;
    }
    sentences.dedup();
    Ok((sentences, pairs))
}

/// One input of `compare`: an embeddings file, or a model (its label, encoder, tokenizer and
/// tokenizer file).
enum Input {
    File(crate::embedding_file::EmbeddingFile),
    Model(String, Box<(Encoder, TextTokenizer, PathBuf)>),
}

/// Read every input: embedding files, and models loaded for inference.
fn load_inputs(inputs: &[String], loading: &Loading, device: &Device) -> Result<Vec<Input>> {
    let mut loaded = Vec::new();
    for spec in inputs {
        if spec.ends_with(".safetensors") {
            loaded.push(Input::File(crate::embedding_file::read_embeddings(Path::new(spec))?));
        } else {
            let (files, enc, tok) = load_model(spec, loading, device)?;
            let label = if spec.contains('@') { spec.clone() } else { format!("{spec}@{}", enc.pooling.as_str()) };
            // Columns say when they were not computed in f32.
            let label = match loading.compute {
                Compute::F32 => label,
                other => format!("{label} {}", other.as_str()),
            };
            loaded.push(Input::Model(label, Box::new((enc, tok, files.tokenizer))));
        }
    }
    Ok(loaded)
}

/// A model's column: its embeddings of the sentences and of both sides of the pairs.
fn model_column(label: &str, enc: &Encoder, tok: &TextTokenizer, texts: &Texts, device: &Device) -> Result<Column> {
    let (sentences, pairs) = texts;
    eprintln!("embedding {} sentences and {} pairs with {label}", sentences.len(), pairs.len());
    let embed = |texts: Vec<&str>| embed_texts(enc, tok, &texts, crate::model::EMBED_BATCH, device);
    let s = embed(sentences.iter().map(String::as_str).collect())?;
    let p = match pairs.is_empty() {
        true => None,
        false => Some((
            embed(pairs.iter().map(|(a, _)| a.as_str()).collect())?,
            embed(pairs.iter().map(|(_, b)| b.as_str()).collect())?,
        )),
    };
    Ok(Column { name: label.to_string(), dim: enc.config.hidden_size, sentences: s, pairs: p })
}

/// BERT-whitening fitted on the first column's sentences, keeping `k` dimensions (all: 0), as
/// a column of its own; its parameters are saved in `out/whitening.safetensors`.
fn whitened(base: &Column, k: usize, out: &Path) -> Result<Column> {
    let w = crate::whiten::Whitening::fit(&base.sentences, base.n(), base.dim, (k > 0).then_some(k))?;
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    crate::whiten::save(&w, &out.join("whitening.safetensors"))?;
    let apply = |d: &[f32]| w.apply(d, d.len() / base.dim, true);
    let pairs = match &base.pairs {
        Some((a, b)) => Some((apply(a)?, apply(b)?)),
        None => None,
    };
    Ok(Column {
        name: format!("{} + whitening({})", base.name, w.k),
        dim: w.k,
        sentences: apply(&base.sentences)?,
        pairs,
    })
}

/// Measure every input (models, embedding files) on the same sentences; tables, JSON and plots in `out`.
pub fn compare(
    inputs: &[String],
    text: &TextArgs,
    out: &Path,
    whiten: Option<usize>,
    loading: &Loading,
    device: &Device,
) -> Result<()> {
    use crate::compare::{compare as measure_all, table as compare_table};
    let loaded = load_inputs(inputs, loading, device)?;
    let first_tok = loaded.iter().find_map(|i| match i {
        Input::Model(_, m) => Some((m.2.as_path(), &m.1)),
        Input::File(_) => None,
    });
    let texts = compare_text(text, first_tok)?;
    if first_tok.is_some() && texts.0.len() < 2 {
        bail!("model inputs need sentences: pass --corpus DIR or --input FILE");
    }
    let mut columns = Vec::new();
    for (input, spec) in loaded.iter().zip(inputs) {
        columns.push(match input {
            Input::File(f) => Column { name: spec.clone(), dim: f.dim, sentences: f.data.clone(), pairs: None },
            Input::Model(label, m) => model_column(label, &m.0, &m.1, &texts, device)?,
        });
    }
    if let Some(k) = whiten {
        columns.push(whitened(&columns[0], k, out)?);
    }
    let (results, files) = measure_all(&columns, out, text.seed)?;
    println!("{}", compare_table(&results));
    println!("wrote {}/compare.json, compare.md and {} plot files", out.display(), files.len());
    Ok(())
}
