//! A run's config resolved once: the corpus path expanded, eval task names parsed, the data
//! folder and the device settled, the budget and the settings where 0 means "the default"
//! decoded into types, and the loss built into an [`Objective`]. The phases downstream read
//! these values, never the raw keys they come from, and every mistake here is reported before a
//! run folder is touched.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::{RunConfig, Select};
use crate::error::{Error, Result};
use crate::eval::Task;
use crate::loss::objective::Objective;

/// How long a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `train.steps`.
    Steps(usize),
    /// `train.epochs` full passes over the training examples (when `train.steps` is 0).
    Epochs(usize),
}

/// The most steps a run may plan: far above any real run, and small enough that step counts
/// never overflow anything downstream (learning-rate schedule, log, checkpoint names).
pub const MAX_STEPS: usize = 1 << 40;

impl Budget {
    /// Total steps for `examples` training examples in batches of `batch`; an epoch budget that
    /// would overflow, or exceed [`MAX_STEPS`], is an error.
    pub fn steps(self, examples: usize, batch: usize) -> Result<usize> {
        let steps = match self {
            Budget::Steps(n) => Some(n),
            Budget::Epochs(e) => e.checked_mul(examples / batch.max(1)),
        };
        match steps {
            Some(n) if n <= MAX_STEPS => Ok(n),
            _ => Err(Error::invalid(format!(
                "the budget {self:?} of {examples} examples in batches of {batch} is more than {MAX_STEPS} steps: lower train.epochs or set train.steps"
            ))),
        }
    }
}

/// A checked [`RunConfig`] and what its settings stand for.
pub struct Resolved {
    cfg: RunConfig,
    corpus: PathBuf,
    files: Option<(PathBuf, crate::data::files::Wanted, Option<PathBuf>)>,
    tasks: Vec<Task>,
    data: Option<PathBuf>,
    device: Device,
    budget: Budget,
    micro_batch_pairs: Option<usize>,
    eval_max_len: Option<usize>,
    max_books: Option<usize>,
    objective: Objective,
}

/// What to change when no loss term has a weight above 0 (training would change nothing): the
/// weights that train under `loss.kind`.
fn untrained_hint(loss: &super::LossConfig) -> String {
    use super::LossKind;
    let which = match loss.kind {
        LossKind::AlignUniform => "loss.w_align, w_uniform, w_mean, w_dropout, w_distill or w_simcorr",
        LossKind::Infonce => {
            "loss.w_align (under loss.kind = \"infonce\" it weighs InfoNCE; uniformity is only measured), \
             w_mean, w_dropout, w_distill or w_simcorr"
        }
        LossKind::Mix => "loss.w_align, w_uniform, w_infonce, w_mean, w_dropout, w_distill or w_simcorr",
    };
    format!("config: every loss weight is 0, so training would change nothing: set {which} above 0")
}

impl Resolved {
    /// Resolve `cfg` against the data folder `data` (what `$HYPERSPHERE_DATA` stands for) and
    /// the device spec `device` (overriding `model.device`).
    pub fn new(cfg: RunConfig, data: Option<&Path>, device: Option<&str>) -> Result<Self> {
        let device = match device {
            Some(spec) => parse_device(spec, "--device")?,
            None => parse_device(&cfg.model.device, "model.device")?,
        };
        let tasks = crate::eval::parse_tasks(&cfg.eval.tasks)?;
        let files = cfg.data_files(data)?;
        // Training on a file, the books' path is not read (and may name an unset data folder).
        let corpus = match files {
            Some(_) => cfg.corpus_path(data).unwrap_or_default(),
            None => cfg.corpus_path(data)?,
        };
        let nonzero = |n: usize| (n > 0).then_some(n);
        let t = &cfg.train;
        Ok(Self {
            budget: if t.steps > 0 { Budget::Steps(t.steps) } else { Budget::Epochs(t.epochs) },
            micro_batch_pairs: nonzero(t.micro_batch_pairs).filter(|&m| m < t.batch_pairs),
            eval_max_len: nonzero(cfg.eval.max_len),
            max_books: nonzero(cfg.data.max_books),
            objective: Objective::new(&cfg.loss),
            data: data.map(Path::to_path_buf),
            cfg,
            corpus,
            files,
            tasks,
            device,
        })
    }

    /// The config as given (what `run.toml` records); settings with a typed accessor here are
    /// read through it.
    pub fn cfg(&self) -> &RunConfig {
        &self.cfg
    }

    /// `data.corpus`, with `$HYPERSPHERE_DATA` replaced by the data folder.
    pub fn corpus(&self) -> &Path {
        &self.corpus
    }

    /// The file trained on (`data.pairs` or `data.sentences`), what to read from it and the
    /// held-out file (`data.val_file`), expanded; None when training on books.
    pub fn data_files(&self) -> Option<(&Path, &crate::data::files::Wanted, Option<&Path>)> {
        self.files.as_ref().map(|(f, w, v)| (f.as_path(), w, v.as_deref()))
    }

    /// `eval.tasks`, parsed (empty: no downstream evaluation).
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    /// Where the model runs: the `--device` flag if given, else `model.device`.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Pairs per GradCache micro-batch; None: the whole batch at once.
    pub fn micro_batch_pairs(&self) -> Option<usize> {
        self.micro_batch_pairs
    }

    /// Tokens per sentence when evaluating (STS-B dev selection included): `eval.max_len`, or
    /// the length the model declares (`declared`), as sentence-transformers uses; never more
    /// than the model's position table.
    pub fn eval_max_len(&self, declared: usize, positions: usize) -> usize {
        self.eval_max_len.unwrap_or(declared).min(positions)
    }

    /// Use only the first N books (`data.max_books`); None: all.
    pub fn max_books(&self) -> Option<usize> {
        self.max_books
    }

    /// The loss, term by term.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// What training needs: a loss that trains something, and the data folder where `[eval]`
    /// reads `senteval/` and `sts/` and selection on STS-B dev reads `sts/`. Checked before a
    /// run folder is touched (other commands read the config without training).
    pub fn check_training(&self) -> Result<()> {
        if !self.objective.trains() {
            return Err(Error::invalid(untrained_hint(&self.cfg.loss)));
        }
        if self.data.is_some() {
            return Ok(());
        }
        if !self.tasks.is_empty() {
            return Err(Error::invalid(
                "eval.tasks needs the data folder (senteval/ and sts/): set HYPERSPHERE_DATA or pass --data DIR, or set eval.tasks = []",
            ));
        }
        if self.cfg.train.select == Select::StsbDev {
            return Err(Error::invalid(
                "train.select = \"stsb-dev\" needs the data folder (sts/STSBenchmark/sts-dev.csv): set HYPERSPHERE_DATA or pass --data DIR, or set train.select = \"last\"",
            ));
        }
        Ok(())
    }

    /// The data folder (see [`Resolved::check_training`]).
    pub fn data_dir(&self) -> Result<&Path> {
        self.data
            .as_deref()
            .ok_or_else(|| Error::invalid("the data folder is not set: set HYPERSPHERE_DATA or pass --data DIR"))
    }
}

/// `cuda` without an index: under a launcher, the GPU of this rank's index on its machine (its
/// local rank), else the first.
fn default_gpu() -> usize {
    crate::dist::launched(&|k| std::env::var(k).ok()).and_then(|l| l.local_rank).unwrap_or(0)
}

/// The device a spec names: `cpu`, `cuda` (= `cuda:0`, or under a launcher `cuda:LOCAL_RANK`), `cuda:N` or `metal` (candle's; this
/// crate has no `metal` feature). Devices this build does not support are an error that says
/// how to get them; `origin` names the setting (`--device`, `model.device`) in it.
pub fn parse_device(spec: &str, origin: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| Error::invalid(format!("{origin} {spec}: expected cuda:N with N a number")))?,
        ),
        None => (spec, default_gpu()),
    };
    let device = match kind {
        "cpu" if spec == "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::new_cuda(index),
        "metal" => Device::new_metal(index),
        _ => return Err(Error::invalid(format!("{origin} {spec}: expected cpu, cuda, cuda:N or metal"))),
    };
    // candle's device errors carry a backtrace after the first line.
    device.map_err(|e| {
        let why = e.to_string().lines().next().unwrap_or_default().to_string();
        Error::invalid(if kind != "cuda" {
            format!("{origin} {spec}: not available (hypersphere has no Metal build; use cpu or cuda)")
        } else if cfg!(feature = "cuda") {
            format!("{origin} {spec}: no usable device ({why}); check the driver and the device index")
        } else {
            format!(
                "{origin} {spec}: not available (this build has the CPU only unless built with `--features cuda`; see README)"
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> RunConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(None, &sets).unwrap()
    }

    #[test]
    fn strings_become_values() {
        let r = Resolved::new(cfg(&["eval.tasks=[\"MR\", \"STSB\"]"]), Some(Path::new("/d")), None).unwrap();
        assert_eq!(r.corpus(), Path::new("/d/books/eltec-eng"));
        assert_eq!(r.tasks(), [Task::MR, Task::STSB]);
        assert!(r.device().is_cpu());
        let all = Resolved::new(cfg(&["eval.tasks=[\"all\"]"]), Some(Path::new("/d")), Some("cpu")).unwrap();
        assert_eq!(all.tasks().len(), Task::ALL.len());
    }

    /// Settings where 0 means "the default" are decoded here, once.
    #[test]
    fn zero_means_default_is_decoded_once() {
        let d = Some(Path::new("/d"));
        let r = Resolved::new(cfg(&["train.steps=0", "train.epochs=3", "data.max_books=0"]), d, None).unwrap();
        assert_eq!((r.budget(), r.max_books(), r.micro_batch_pairs()), (Budget::Epochs(3), None, None));
        assert_eq!(r.eval_max_len(256, 512), 256, "eval.max_len = 0: the model's declared length");
        assert_eq!(r.eval_max_len(1024, 512), 512, "never past the position table");
        let sets = ["train.micro_batch_pairs=16", "eval.max_len=64", "data.max_books=4", "train.steps=9"];
        let r = Resolved::new(cfg(&sets), d, None).unwrap();
        assert_eq!((r.budget(), r.max_books(), r.micro_batch_pairs()), (Budget::Steps(9), Some(4), Some(16)));
        assert_eq!(r.eval_max_len(256, 512), 64);
        // A micro-batch as large as the batch is no micro-batching.
        let r = Resolved::new(cfg(&["train.micro_batch_pairs=64", "train.batch_pairs=64"]), d, None).unwrap();
        assert_eq!(r.micro_batch_pairs(), None);
    }

    #[test]
    fn budgets_never_overflow() {
        assert_eq!(Budget::Epochs(2).steps(1000, 64).unwrap(), 30);
        assert_eq!(Budget::Steps(7).steps(10, 64).unwrap(), 7);
        let e = Budget::Epochs(usize::MAX / 2).steps(1000, 64).unwrap_err().to_string();
        assert!(e.contains("train.epochs"), "{e}");
        assert!(Budget::Epochs(1 << 40).steps(1 << 20, 1).is_err());
    }

    /// Every mistake is found at resolution, naming the setting and the fix.
    #[test]
    fn mistakes_are_named() {
        let err = |r: Result<Resolved>| r.err().expect("should fail").to_string();
        // The default corpus and selection need the data folder.
        let e = err(Resolved::new(cfg(&[]), None, None));
        assert!(e.contains("HYPERSPHERE_DATA"), "{e}");
        let plain = ["data.corpus=/books", "train.select=\"last\""];
        let training = |sets: &[&str]| Resolved::new(cfg(sets), None, None).and_then(|r| r.check_training());
        let e = training(&[plain[0]]).unwrap_err().to_string();
        assert!(e.contains("stsb-dev") && e.contains("--data"), "{e}");
        let e = training(&[plain[0], plain[1], "eval.tasks=[\"MR\"]"]).unwrap_err().to_string();
        assert!(e.contains("eval.tasks") && e.contains("--data"), "{e}");
        training(&plain).unwrap();
        let e = err(Resolved::new(cfg(&[plain[0], plain[1], "eval.tasks=[\"MRR\"]"]), None, None));
        assert!(e.contains("MRR"), "{e}");
        let e = err(Resolved::new(cfg(&[plain[0], plain[1], "model.device=\"tpu\""]), None, None));
        assert!(e.contains("model.device tpu"), "{e}");
        let e = err(Resolved::new(cfg(&[plain[0], plain[1], "model.device=\"tpu\""]), None, Some("gpu")));
        assert!(e.contains("--device gpu"), "{e}");
        // The flag wins over the config.
        assert!(Resolved::new(cfg(&[plain[0], "model.device=\"tpu\""]), None, Some("cpu")).is_ok());
        // A loss whose every weight is 0 trains nothing: training refuses it, naming the keys
        // that train under its kind; commands that only read the config accept it.
        // (The default config trains the mean term and uniformity, and leaves w_align at 0.)
        let no_mean = [plain[0], plain[1], "loss.w_mean=0", "loss.mean_teacher=false"];
        let sets = |more: &[&'static str]| Resolved::new(cfg(&[&no_mean[..], more].concat()), None, None).unwrap();
        let e = sets(&["loss.kind=\"infonce\"", "loss.w_uniform=5"]).check_training().unwrap_err().to_string();
        assert!(e.contains("every loss weight is 0") && e.contains("it weighs InfoNCE"), "{e}");
        assert!(!e.contains("w_uniform") && !e.contains("w_infonce"), "only measured under infonce: {e}");
        let e = sets(&["loss.w_uniform=0"]).check_training().unwrap_err().to_string();
        assert!(e.contains("every loss weight is 0") && e.contains("w_uniform") && !e.contains("InfoNCE"), "{e}");
        // One weight above 0 is enough.
        sets(&[]).check_training().unwrap();
        sets(&["loss.kind=\"infonce\"", "loss.w_align=1"]).check_training().unwrap();
        sets(&["loss.kind=\"mix\"", "loss.w_uniform=0", "loss.w_infonce=1"]).check_training().unwrap();
    }
}
