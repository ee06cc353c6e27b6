//! `embed`: sentences in, L2-normalised vectors out, streamed into a safetensors file.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use super::console::Console;
use super::load_model;
use crate::bail;
use crate::dist::World;
use crate::error::Result;
use crate::io::sha256_file;
use crate::model::pooling::Pooling;
use crate::model::Compute;
use crate::progress::Progress;

/// Which model to embed with, and how.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A model folder, a Hub repo id, or pip:PACKAGE==VERSION.
    #[arg(long)]
    pub model: String,
    /// Pooling (default: what the model folder declares, else mean).
    #[arg(long, value_enum)]
    pub pooling: Option<Pooling>,
    /// Tokens per sentence, [CLS] and [SEP] included (default: the model folder's declared
    /// max_seq_length, as sentence-transformers uses, else its position table).
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long, default_value_t = crate::model::EMBED_BATCH)]
    pub batch_size: usize,
    /// Arithmetic of the model (the written file's number type is --out-dtype).
    #[arg(long, value_enum, default_value_t = Compute::F32)]
    pub dtype: Compute,
}

impl ModelArgs {
    pub fn loading(&self) -> super::Loading {
        super::Loading { pooling: self.pooling, max_len: self.max_len, compute: self.dtype }
    }
}

/// Number format of the written embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats: half the size, about 3 significant digits.
    F16,
}

/// A model spec as stored with embeddings: a folder as its absolute path (the file stays
/// meaningful once moved), a Hub id or pip spec as given.
pub fn resolved_spec(spec: &str) -> String {
    let (path, pooling) = match spec.rsplit_once('@') {
        Some((p, pool)) => (p, Some(pool)),
        None => (spec, None),
    };
    match std::fs::canonicalize(path) {
        Ok(abs) => abs.display().to_string() + &pooling.map(|p| format!("@{p}")).unwrap_or_default(),
        Err(_) => spec.to_string(),
    }
}

/// Non-empty lines of a text file as (0-based line number, text), checked for UTF-8; the
/// number of empty lines is returned too.
pub fn read_lines(path: &Path) -> Result<(Vec<(usize, String)>, usize)> {
    if path.is_dir() {
        bail!("{} is a folder: give a file with one sentence per line (or --sentences for books)", path.display());
    }
    let text = crate::data::read_text(path)?;
    let mut empty = 0;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            empty += 1;
        } else {
            lines.push((i, line.to_string()));
        }
    }
    if lines.is_empty() {
        bail!("{}: no non-empty lines to embed", path.display());
    }
    Ok((lines, empty))
}

/// The rows to embed: (input line or sentence number, text), and how many empty lines were
/// skipped. Lines of a file, or with `sentences` the sentences of the books (or the prepared
/// corpus) in it.
fn input_rows(input: &Path, sentences: bool) -> Result<(Vec<(usize, String)>, usize)> {
    use crate::data::books::{corpus, prepared};
    if sentences && prepared::is_prepared(input) {
        let corpus = prepared::Prepared::open_any(input)?;
        let rows = (0..corpus.sentences()).map(|i| Ok((i as usize, corpus.text(i)?))).collect::<Result<_>>()?;
        return Ok((rows, 0));
    }
    if !sentences {
        return read_lines(input);
    }
    let mut rows = Vec::new();
    for file in corpus::list_book_files(input)? {
        let book = corpus::read_book(&file)?;
        let sents = book.chapters.iter().flat_map(|c| c.paragraphs.iter().flatten());
        rows.extend(sents.map(|s| s.to_string()));
    }
    Ok((rows.into_iter().enumerate().collect(), 0))
}

/// What the embeddings file records of how it was made.
fn metadata(
    files: &crate::model::source::ModelFiles,
    encoder: &crate::model::Encoder,
    max_len: usize,
    input: &Path,
    rows: usize,
    empty: usize,
    whiten: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("model".to_string(), resolved_spec(&files.spec));
    meta.insert("weights_sha256".to_string(), sha256_file(&files.weights)?);
    meta.insert("pooling".to_string(), encoder.pooling.as_str().to_string());
    meta.insert("compute".to_string(), encoder.compute().as_str().to_string());
    meta.insert("normalized".to_string(), "true".to_string());
    meta.insert("whitening".to_string(), whiten.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()));
    meta.insert("count".to_string(), rows.to_string());
    meta.insert("empty_lines".to_string(), empty.to_string());
    meta.insert("max_len".to_string(), max_len.to_string());
    meta.insert("input_sha256".to_string(), if input.is_file() { sha256_file(input)? } else { "folder".into() });
    meta.insert("hypersphere_version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    Ok(meta)
}

/// What `embed` writes: the file, its number format and optional whitening.
pub struct EmbedOut<'a> {
    pub path: &'a Path,
    pub out_dtype: OutDtype,
    pub whiten: Option<&'a Path>,
}

/// Embed `input` (lines, or with `sentences` the sentences of the books in it) into `out`.
/// Over several ranks, each embeds a contiguous share of every chunk and rank 0 writes the file.
pub fn embed(
    m: &ModelArgs,
    input: &Path,
    sentences: bool,
    out: &EmbedOut,
    device: &Device,
    world: &World,
) -> Result<()> {
    use crate::embedding_file::EmbeddingWriter;
    let root = world.is_root();
    // Before any work: a folder in the way would otherwise fail only at the final rename.
    crate::io::check_output_file(out.path)?;
    let whitening = out.whiten.map(crate::whiten::load).transpose()?;
    let (files, encoder, tokenizer) = load_model(&m.model, &m.loading(), device)?;
    let (rows, empty) = input_rows(input, sentences)?;
    if empty > 0 && root {
        eprintln!(
            "warning: {} has {empty} empty lines; they get no row (the `line` tensor maps rows to input lines)",
            input.display()
        );
    }
    let hidden = encoder.config.hidden_size;
    let dim = whitening.as_ref().map(|w| w.k).unwrap_or(hidden);
    if let Some(w) = whitening.as_ref().filter(|w| w.dim != hidden) {
        bail!("whitening parameters are for dim {}, the model gives {hidden}", w.dim);
    }
    let meta = metadata(&files, &encoder, tokenizer.max_len, input, rows.len(), empty, out.whiten)?;
    let f16 = out.out_dtype == OutDtype::F16;
    let mut writer = root.then(|| EmbeddingWriter::create(out.path, rows.len(), dim, f16, &meta)).transpose()?;
    let console = if root { Console::default() } else { Console::quiet() };
    console.start("embedding", 0, rows.len() as u64);
    let start = Instant::now();
    // Chunks bound memory; inside a chunk, batches are sorted by length.
    for (k, chunk) in rows.chunks(4096).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|(_, s)| s.as_str()).collect();
        let mut flat = world.embed(&encoder, &tokenizer, &texts, m.batch_size, device)?;
        if let Some(w) = &whitening {
            flat = w.apply(&flat, texts.len(), true)?;
        }
        for ((line, _), row) in chunk.iter().zip(flat.chunks_exact(dim)).filter(|_| root) {
            writer.as_mut().map(|w| w.push(row, *line)).transpose()?;
        }
        console.advance((k * 4096 + chunk.len()) as u64, "sentences");
    }
    writer.map(|w| w.finish()).transpose()?;
    console.finish();
    let secs = start.elapsed().as_secs_f64();
    let ranks = if world.size() > 1 { format!(" over {} ranks", world.size()) } else { String::new() };
    console.line(&format!(
        "embedded {} sentences in {secs:.1}s ({:.0}/s){ranks} -> {}",
        rows.len(),
        rows.len() as f64 / secs,
        out.path.display()
    ));
    Ok(())
}
