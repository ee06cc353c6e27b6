//! The pipelines behind each command, callable from tests and other front ends: the CLI parses
//! arguments into these calls and prints what they return. The only place besides `cli.rs`
//! and `main.rs` that prints.

pub mod compare;
pub mod console;
pub mod embed;
pub mod finetune;

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::bail;
use crate::config::resolved::Resolved;
use crate::data::batch::TextTokenizer;
use crate::data::books::pairs::PairOptions;
use crate::data::books::prepared::{Prepared, Recipe, Split};
use crate::data::books::BookPairs;
use crate::data::dataset::Dataset;
use crate::data::source::PairSource;
use crate::error::Result;
use crate::eval::runner::{EvalOptions, Evaluated};
use crate::eval::Task;
use crate::io::sha256_file;
use crate::model::pooling::Pooling;
use crate::model::source::{resolve, ModelFiles, SourceOptions};
use crate::model::st_layout::{declared_max_len, saved_pooling};
use crate::model::Encoder;
use console::Console;

/// Where models come from, as the environment says, with notes on stderr.
pub fn sources() -> SourceOptions {
    SourceOptions { note: |m| eprintln!("{m}"), ..SourceOptions::from_env() }
}

/// The training tokenizer (at `model.max_len`), the run's corpus prepared (see
/// [`open_corpus`]) and its book-level split.
pub fn tokenizer_and_corpus(run: &Resolved, files: &ModelFiles) -> Result<(TextTokenizer, Prepared, Split)> {
    let cfg = run.cfg();
    let tokenizer = TextTokenizer::load(&files.tokenizer, cfg.model.max_len)?;
    let corpus = open_corpus(run.corpus(), &files.tokenizer, &tokenizer, &cfg.data.pair_options(), true)?;
    let split = corpus.split(run.max_books(), cfg.data.val_fraction, cfg.seed);
    if split.train.is_empty() {
        let s = corpus.stats(run.max_books());
        bail!(
            "{}: no training pairs: {} sentences in {} books, none pairs within {}..={} tokens; check data.min_tokens/max_tokens",
            run.corpus().display(),
            s.sentences,
            s.books,
            cfg.data.min_tokens,
            cfg.data.max_tokens
        );
    }
    Ok((tokenizer, corpus, split))
}

/// The training tokenizer and the run's examples: the books (see [`tokenizer_and_corpus`]) or
/// a file's (`data.pairs`, `data.sentences`, prepared once into `<cache>/files/`), split.
pub fn training_data(run: &Resolved, files: &ModelFiles) -> Result<(TextTokenizer, Dataset)> {
    use crate::data::files::Examples;
    let Some((file, wanted, val_file)) = run.data_files() else {
        let (tokenizer, corpus, split) = tokenizer_and_corpus(run, files)?;
        return Ok((tokenizer, Dataset::Books { corpus, split }));
    };
    let cfg = run.cfg();
    let tokenizer = TextTokenizer::load(&files.tokenizer, cfg.model.max_len)?;
    let (sha, encode) = (sha256_file(&files.tokenizer)?, tokenizer.encoder()?);
    let cache = SourceOptions::from_env().cache_dir.join("files");
    let open = |path: &Path| -> Result<Examples> {
        let ex = Examples::open(path, wanted, &cache, &sha, &encode)?;
        let c = &ex.manifest.counts;
        if c.empty + c.duplicate > 0 {
            eprintln!(
                "note: {}: skipped {} rows with an empty field (lines {:?}{}) and {} repeated rows, of {}",
                path.display(),
                c.empty,
                c.empty_lines,
                if c.empty > c.empty_lines.len() { ", ..." } else { "" },
                c.duplicate,
                c.rows
            );
        }
        Ok(ex)
    };
    let train = open(file)?;
    let (train_rows, val, val_rows) = match val_file {
        Some(v) => {
            let val = open(v)?;
            let n = val.len();
            ((0..train.len()).collect(), Some(val), (0..n).collect())
        }
        None => {
            let (t, v) = train.split(cfg.data.val_fraction);
            (t, None, v)
        }
    };
    if train_rows.is_empty() {
        bail!(
            "{}: no training examples left after holding out data.val_fraction = {}",
            file.display(),
            cfg.data.val_fraction
        );
    }
    Ok((tokenizer, Dataset::File { train, val, train_rows, val_rows }))
}

/// `corpus` as a prepared corpus: the folder itself when it is one (with `strict`, it must
/// have been made with this tokenizer and `opts`), else prepared once into the cache
/// (`<cache>/corpora/`, keyed by the path, the tokenizer and the options; made again when a
/// book file changes). Its ids are checked against the tokenizer's vocabulary. Links the
/// corpus walk skipped are noted on stderr.
pub fn open_corpus(
    corpus: &Path,
    tokenizer_file: &Path,
    tokenizer: &TextTokenizer,
    opts: &PairOptions,
    strict: bool,
) -> Result<Prepared> {
    let recipe = Recipe::new(sha256_file(tokenizer_file)?, opts);
    let prepared = if crate::data::books::prepared::is_prepared(corpus) {
        match strict {
            true => Prepared::open(corpus, &recipe)?,
            false => Prepared::open_any(corpus)?,
        }
    } else {
        let abs = std::fs::canonicalize(corpus).map_err(|e| crate::Error::io(corpus, e))?;
        let key = crate::data::books::prepared::cache_key(&abs, &recipe);
        let dir = SourceOptions::from_env().cache_dir.join("corpora").join(key);
        let encode = tokenizer.encoder()?;
        crate::data::books::build::prepare(&abs, &dir, &recipe, opts, &encode, &Console::default())?;
        Prepared::open(&dir, &recipe)?
    };
    let skipped = &prepared.manifest.skipped;
    if !skipped.is_empty() {
        let names: Vec<String> = skipped.iter().take(5).map(|p| p.display().to_string()).collect();
        eprintln!(
            "note: {} paths in the corpus not followed (broken links, links back into a folder above them, folders reached twice): {}{}",
            skipped.len(),
            names.join(", "),
            if skipped.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(prepared.with_vocab(tokenizer.vocab_size()))
}

/// A model spec with an optional `@pooling` suffix, resolved and loaded for inference at
/// `max_len` (default: the length the model folder declares).
pub fn load_model(spec: &str, loading: &Loading, device: &Device) -> Result<(ModelFiles, Encoder, TextTokenizer)> {
    let Loading { pooling, max_len, compute } = *loading;
    use clap::ValueEnum;
    let (spec, pooling) = match spec.rsplit_once('@') {
        Some((s, p)) => match Pooling::from_str(p, true) {
            Ok(p) => (s, Some(p)),
            Err(_) => bail!("{spec}: unknown pooling `{p}` after @ (use mean, cls or first-last-avg)"),
        },
        None => (spec, pooling),
    };
    let files = resolve(spec, &sources())?;
    crate::model::st_layout::check_weights(&files)?;
    let pooling = pooling.or_else(|| saved_pooling(&files)).unwrap_or(Pooling::Mean);
    if compute == crate::model::Compute::Int8 && !crate::model::ops::int8::vnni_supported() {
        eprintln!(
            "note: this CPU lacks AVX-512 VNNI, so --dtype int8 runs a portable kernel, slower than f32 (same results)"
        );
    }
    let encoder = Encoder::load_with(&files, pooling, false, device, compute.kernels(device)?)?;
    let positions = encoder.config.max_position_embeddings;
    let max_len = max_len.unwrap_or_else(|| declared_max_len(&files, positions)).min(positions);
    let tokenizer = TextTokenizer::load(&files.tokenizer, max_len)?;
    Ok((files, encoder, tokenizer))
}

/// How a model is loaded for inference: pooling and length where the spec and the folder do
/// not say, and the arithmetic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loading {
    pub pooling: Option<Pooling>,
    pub max_len: Option<usize>,
    pub compute: crate::model::Compute,
}

/// Evaluation options with the embedding cache under the model cache (unless `cache` is off).
pub fn eval_options(root: PathBuf, tasks: Vec<Task>, quick: bool, seed: u64, cache: bool) -> EvalOptions {
    let cache_dir = cache.then(|| SourceOptions::from_env().cache_dir.join("embeddings"));
    EvalOptions { root, tasks, quick, seed, cache_dir, user_sts: Vec::new(), user_retrieval: Vec::new() }
}

/// Evaluate the encoder whose weights are in `weights` (`embedder`'s), progress on stderr (rank
/// 0's), handing the results so far to `finished` after each task.
pub fn run_eval(
    embedder: &crate::eval::runner::Embedder,
    weights: &Path,
    opts: &EvalOptions,
    finished: &mut dyn FnMut(&[Evaluated]) -> Result<()>,
) -> Result<Vec<Evaluated>> {
    let sha = sha256_file(weights)?;
    let console = if embedder.world.is_root() { Console::default() } else { Console::quiet() };
    crate::eval::runner::evaluate(embedder, &sha, opts, &console, finished)
}

/// `BOOKS-NEXT` over a corpus of books (`eval --tasks BOOKS-NEXT --corpus DIR`): its held-out
/// books as the default config holds them out (`data.val_fraction`, pairing options) with
/// `seed`, the corpus prepared with the model's tokenizer (or a prepared folder read as it is).
pub fn books_next_set(model: &str, corpus: &Path, seed: u64) -> Result<crate::eval::beir::Beir> {
    let cfg = crate::config::RunConfig::load(None, &[])?;
    let spec = model.rsplit_once('@').map_or(model, |(s, _)| s);
    let files = resolve(spec, &sources())?;
    let tokenizer = TextTokenizer::load(&files.tokenizer, cfg.model.max_len)?;
    let prepared = open_corpus(corpus, &files.tokenizer, &tokenizer, &cfg.data.pair_options(), false)?;
    let split = prepared.split(None, cfg.data.val_fraction, seed);
    if split.val.is_empty() {
        bail!(
            "{}: no held-out pairs for {}: the corpus needs at least 2 books",
            corpus.display(),
            crate::eval::books_next::NAME
        );
    }
    crate::eval::books_next::books_next(&crate::data::books::BookPairs::new(&prepared, &split.val))
}

/// `prepare`: the run's corpus split and tokenized into `out` with the run's model tokenizer
/// and pairing options; a summary on stdout. With `verify`, every read is checked afterwards.
pub fn prepare(run: &Resolved, out: &Path, verify: bool) -> Result<()> {
    let cfg = run.cfg();
    let files = resolve(&cfg.model.source, &sources())?;
    let tokenizer = TextTokenizer::load(&files.tokenizer, cfg.model.max_len)?;
    let opts = cfg.data.pair_options();
    let recipe = Recipe::new(sha256_file(&files.tokenizer)?, &opts);
    let encode = tokenizer.encoder()?;
    let t0 = std::time::Instant::now();
    let m = crate::data::books::build::prepare(run.corpus(), out, &recipe, &opts, &encode, &Console::default())?;
    let corpus = Prepared::open(out, &recipe)?.with_vocab(tokenizer.vocab_size());
    if verify {
        corpus.verify()?;
    }
    let s = corpus.stats(None);
    let pairs = m.books.last().map_or(0, |b| b.pairs[1]);
    println!(
        "{}: {} books, {} sentences, {} pairs ({}, {}..={} word pieces per sentence), {:.1} MB, in {:.1}s{}",
        out.display(),
        s.books,
        s.sentences,
        pairs,
        if opts.cross_paragraph { "across paragraphs" } else { "within paragraphs" },
        opts.min_tokens,
        opts.max_tokens,
        corpus.disk_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        if verify { "; every read checked" } else { "" }
    );
    Ok(())
}

/// `pairs`: the corpus statistics and a length histogram (after checking every read of the
/// prepared corpus), and/or `sample` random training pairs.
pub fn pairs(run: &Resolved, stats: bool, sample: Option<usize>) -> Result<()> {
    let files = resolve(&run.cfg().model.source, &sources())?;
    if run.data_files().is_some() {
        let (_, data) = training_data(run, &files)?;
        if let Dataset::File { train, val, .. } = &data {
            if stats || sample.is_none() {
                for ex in std::iter::once(train).chain(val) {
                    print_file_stats(ex);
                }
                println!("held out    {}", data.held_out().join(", "));
            }
        }
        if let Some(n) = sample {
            let train = data.train();
            let mut rng = StdRng::seed_from_u64(run.cfg().seed);
            for k in rand::seq::index::sample(&mut rng, train.len(), n.min(train.len())) {
                let p = train.pair(k)?;
                println!("\nA: {}\nB: {}", p.anchor, p.positive);
                if let Some(neg) = p.negative {
                    println!("N: {neg}");
                }
            }
        }
        return Ok(());
    }
    let (_, corpus, set) = tokenizer_and_corpus(run, &files)?;
    if stats || sample.is_none() {
        corpus.verify()?;
        print_stats(run, &corpus, &set);
    }
    if let Some(n) = sample {
        let train = BookPairs::new(&corpus, &set.train);
        let mut rng = StdRng::seed_from_u64(run.cfg().seed);
        for k in rand::seq::index::sample(&mut rng, train.len(), n.min(train.len())) {
            let p = train.pair(k)?;
            println!("\nA: {}\nB: {}", p.anchor, p.positive);
        }
    }
    Ok(())
}

/// A data file's rows: read, kept, skipped, and how long preparing it took.
fn print_file_stats(ex: &crate::data::files::Examples) {
    let m = &ex.manifest;
    let c = &m.counts;
    println!("file        {}", m.source.display());
    println!(
        "rows        {} read, {} kept, {} with an empty field, {} repeated; {} texts per example",
        c.rows, c.kept, c.empty, c.duplicate, m.per_example
    );
    println!("prepared    read in {:.2}s, tokenized in {:.2}s (when first prepared)", m.read_s, m.tokenize_s);
}

/// Books, chapters, paragraphs, sentences, pairs and a histogram of sentence lengths.
fn print_stats(run: &Resolved, corpus: &Prepared, set: &Split) {
    let cfg = run.cfg();
    let s = corpus.stats(run.max_books());
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
    for (&len, &n) in &corpus.manifest.token_lengths {
        *bins.entry((len / 8).min(16)).or_default() += n;
    }
    let peak = bins.values().copied().max().unwrap_or(1).max(1);
    for (bin, n) in bins {
        let label = if bin == 16 { ">=128".to_string() } else { format!("{:>3}-{:<3}", bin * 8, bin * 8 + 7) };
        println!("{label:>8} {n:>8} {}", "#".repeat((n * 50).div_ceil(peak)));
    }
}

/// `bench`: time the config's training steps and embedding; the JSON report is printed and
/// written to `out`.
pub fn bench(
    run: &Resolved,
    opts: &crate::bench::BenchOptions,
    out: Option<&Path>,
    export: Option<&Path>,
) -> Result<()> {
    let (cfg, device) = (run.cfg(), run.device());
    let files = resolve(&cfg.model.source, &sources())?;
    let (encoder, teacher) = training_encoders(&files, run)?;
    // Embedding as `embed` does it: the model's own pooling (mean for sentence-transformers).
    let pooling = saved_pooling(&files).unwrap_or(Pooling::Mean);
    let inference = Encoder::load(&files, pooling, false, device)?;
    let embed_tokenizer = TextTokenizer::load(&files.tokenizer, opts.embed_max_len)?;
    eprintln!("reading the corpus for the length mix and the embedding sentences");
    let (tokenizer, corpus, set) = tokenizer_and_corpus(run, &files)?;
    let sentences = (0..corpus.sentences()).map(|i| corpus.text(i)).collect::<Result<Vec<String>>>()?;
    let layout = crate::train::step::StepLayout::new(run.objective());
    let model = crate::train::step::StepModel {
        encoder: &encoder,
        teacher: teacher.as_ref(),
        objective: run.objective(),
        layout: &layout,
    };
    let inputs = crate::bench::BenchInputs {
        cfg,
        model,
        inference: &inference,
        tokenizer: &tokenizer,
        embed_tokenizer: &embed_tokenizer,
        pairs: &BookPairs::new(&corpus, &set.train),
        sentences: &sentences,
        device,
        progress: &Console::default(),
    };
    let report = crate::bench::run(&inputs, opts, export)?;
    let path = out.unwrap_or(Path::new("bench.json"));
    let text = serde_json::to_string_pretty(&report).map_err(|e| crate::Error::json(path, e))?;
    println!("{text}");
    if let Some(path) = out {
        crate::io::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

/// The encoder a run trains and its frozen teacher, with the device's ops in `train.dtype`.
pub fn training_encoders(files: &ModelFiles, run: &Resolved) -> Result<(Encoder, Option<Encoder>)> {
    use crate::model::ops::{bf16, Kernels};
    let (cfg, device) = (run.cfg(), run.device());
    let bf16_cpu = cfg.train.dtype == crate::config::Precision::Bf16 && device.is_cpu();
    let (kernels, compute) = match bf16_cpu && bf16::supported() {
        true => (Kernels::Bf16, candle_core::DType::F32),
        false => (Kernels::for_device(device), cfg.train.dtype.dtype()),
    };
    if bf16_cpu && !bf16::supported() {
        eprintln!("note: this CPU lacks AVX-512 BF16, so train.dtype = \"bf16\" runs the reference ops, several times slower than f32");
    }
    let teacher = cfg.loss.mean_teacher;
    crate::model::load_encoders(files, cfg.model.pooling, teacher, device, kernels, compute)
}

/// `check-device`: [`crate::device_check::check`] on `pairs` x `seq`, a summary on stderr, the
/// JSON on stdout and in `out`. False when out of tolerance.
pub fn check_device(
    cfg: &crate::config::RunConfig,
    device: &Device,
    pairs: usize,
    seq: usize,
    out: Option<&Path>,
) -> Result<bool> {
    let files = resolve(&cfg.model.source, &sources())?;
    let objective = crate::loss::objective::Objective::new(&cfg.loss);
    let rows = crate::train::step::StepLayout::new(&objective).views() * pairs;
    eprintln!("one step of {rows} x {seq} on the CPU (fused ops) and on {device:?}");
    let c = crate::device_check::check(&files, cfg, device, rows, seq)?;
    eprintln!("loss: CPU {:.7} device {:.7} (relative difference {:.2e})", c.loss_cpu, c.loss_device, c.loss_rel_diff);
    for p in c.grads.iter().take(3) {
        eprintln!(
            "gradient {}: max |g| {:.3e}, max difference {:.3e} (relative {:.2e})",
            p.name, p.max_abs, p.max_abs_diff, p.rel
        );
    }
    eprintln!(
        "updated weights: max difference {:.3e}, {:.4}% more than lr/100 apart",
        c.weights_max_abs_diff,
        100.0 * c.weights_flipped_share
    );
    let path = out.unwrap_or(Path::new("check-device.json"));
    let text = serde_json::to_string_pretty(&c).map_err(|e| crate::Error::json(path, e))?;
    println!("{text}");
    if let Some(path) = out {
        crate::io::write_atomic(path, text.as_bytes())?;
    }
    match c.passed() {
        true => eprintln!("passed: every value within tolerance ({} parameters)", c.grads.len()),
        false => eprintln!("FAILED:\n  {}", c.failures.join("\n  ")),
    }
    Ok(c.passed())
}

/// `eval`: the model on the tasks and user STS sets of `opts`; tables on stdout, `eval.json`
/// (saved after each task, `"complete": false` until the last) and `eval.md` in `out`. Over
/// several ranks, they share the embedding and rank 0 writes and prints.
pub fn evaluate(
    model: &embed::ModelArgs,
    opts: &EvalOptions,
    out: &Path,
    device: &Device,
    world: &crate::dist::World,
) -> Result<Vec<Evaluated>> {
    let root = world.is_root();
    let (files, encoder, tokenizer) = load_model(&model.model, &model.loading(), device)?;
    if root {
        eprintln!(
            "evaluating {} ({} pooling) on {} tasks, {} STS sets and {} retrieval sets",
            files.spec,
            encoder.pooling.as_str(),
            opts.tasks.len(),
            opts.user_sts.len(),
            opts.user_retrieval.len()
        );
        std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    }
    let json = out.join("eval.json");
    let save = |results: &[Evaluated], complete: bool| match root {
        true => crate::io::write_json(
            &json,
            &serde_json::json!({"model": files.spec, "pooling": encoder.pooling.as_str(), "dtype": model.dtype.as_str(), "quick": opts.quick, "complete": complete, "results": results}),
        ),
        false => Ok(()),
    };
    let embedder = crate::eval::runner::Embedder { encoder: &encoder, tokenizer: &tokenizer, device, world };
    let results = run_eval(&embedder, &files.weights, opts, &mut |r| save(r, false))?;
    if root {
        let (text, md) = crate::eval::runner::tables(&results, None);
        println!("{text}");
        save(&results, true)?;
        crate::io::write_atomic(&out.join("eval.md"), md.as_bytes())?;
        println!("wrote {}/eval.json and eval.md", out.display());
    }
    Ok(results)
}
