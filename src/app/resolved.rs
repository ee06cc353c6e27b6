//! A run's config resolved once: the corpus path expanded, eval task names parsed, the data
//! folder and the device settled. The phases downstream read these values, never the raw
//! strings, and every mistake here is reported before a run folder is touched.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::{RunConfig, Select};
use crate::eval::Task;

/// A checked [`RunConfig`] and what its strings stand for.
pub struct Resolved {
    /// The config as given (what `run.toml` records).
    pub cfg: RunConfig,
    /// `data.corpus`, with `$HYPERSPHERE_DATA` replaced by the data folder.
    pub corpus: PathBuf,
    /// `eval.tasks`, parsed (empty: no downstream evaluation).
    pub tasks: Vec<Task>,
    /// The folder holding `senteval/` and `sts/`; present whenever `[eval]` or
    /// `train.select = "stsb-dev"` needs it.
    pub data: Option<PathBuf>,
    /// Where the model runs: `device` if given (the `--device` flag), else `model.device`.
    pub device: Device,
}

impl Resolved {
    /// Resolve `cfg` against the data folder `data` (what `$HYPERSPHERE_DATA` stands for) and
    /// the device spec `device` (overriding `model.device`).
    pub fn new(cfg: RunConfig, data: Option<&Path>, device: Option<&str>) -> Result<Self> {
        let device = match device {
            Some(spec) => super::device(spec, "--device")?,
            None => super::device(&cfg.model.device, "model.device")?,
        };
        let tasks = crate::eval::parse_tasks(&cfg.eval.tasks).map_err(anyhow::Error::msg)?;
        let corpus = cfg.corpus_path(data)?;
        let data = data.map(Path::to_path_buf);
        Ok(Self { cfg, corpus, tasks, data, device })
    }

    /// Training's needs of the data folder: `[eval]` reads `senteval/` and `sts/`, selection on
    /// STS-B dev reads `sts/`. Checked before a run folder is touched.
    pub fn check_training_data(&self) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        if !self.tasks.is_empty() {
            anyhow::bail!(
                "eval.tasks needs the data folder (senteval/ and sts/): set HYPERSPHERE_DATA or pass --data DIR, or set eval.tasks = []"
            );
        }
        if self.cfg.train.select == Select::StsbDev {
            anyhow::bail!(
                "train.select = \"stsb-dev\" needs the data folder (sts/STSBenchmark/sts-dev.csv): set HYPERSPHERE_DATA or pass --data DIR, or set train.select = \"last\""
            );
        }
        Ok(())
    }

    /// The data folder (see [`Resolved::check_training_data`]).
    pub fn data_dir(&self) -> Result<&Path> {
        self.data.as_deref().context("the data folder is not set: set HYPERSPHERE_DATA or pass --data DIR")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Task;

    fn cfg(sets: &[&str]) -> RunConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::load(None, &sets).unwrap()
    }

    #[test]
    fn strings_become_values() {
        let r = Resolved::new(cfg(&["eval.tasks=[\"MR\", \"STSB\"]"]), Some(Path::new("/d")), None).unwrap();
        assert_eq!(r.corpus, PathBuf::from("/d/books/eltec-eng"));
        assert_eq!(r.tasks, vec![Task::MR, Task::STSB]);
        assert!(r.device.is_cpu());
        let all = Resolved::new(cfg(&["eval.tasks=[\"all\"]"]), Some(Path::new("/d")), Some("cpu")).unwrap();
        assert_eq!(all.tasks.len(), Task::ALL.len());
    }

    /// Every mistake is found at resolution, naming the setting and the fix.
    #[test]
    fn mistakes_are_named() {
        let err = |r: Result<Resolved>| format!("{:#}", r.err().expect("should fail"));
        // The default corpus and selection need the data folder.
        let e = err(Resolved::new(cfg(&[]), None, None));
        assert!(e.contains("HYPERSPHERE_DATA"), "{e}");
        let plain = ["data.corpus=/books", "train.select=\"last\""];
        let training = |sets: &[&str]| Resolved::new(cfg(sets), None, None).and_then(|r| r.check_training_data());
        let e = format!("{:#}", training(&[plain[0]]).unwrap_err());
        assert!(e.contains("stsb-dev") && e.contains("--data"), "{e}");
        let e = format!("{:#}", training(&[plain[0], plain[1], "eval.tasks=[\"MR\"]"]).unwrap_err());
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
    }
}
