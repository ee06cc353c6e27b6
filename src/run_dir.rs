//! A run folder (`runs/<name>/`): one writer at a time, a fresh start that sets an old run
//! aside before writing anything, and resumes that may change only what keeps the run whole.

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::error::{Error, Result};

/// The lock file inside a run folder; it holds the writer's process id.
const LOCK: &str = ".lock";

/// Settings a resume may change: they set how far the run goes and how often it reports, not
/// what its steps compute (the device changes only rounding). Anything else would make the
/// checkpoints and the config disagree.
pub const RESUMABLE: [&str; 7] = [
    "model.device",
    "train.steps",
    "train.epochs",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.max_bad_steps",
];

/// The exclusive lock on a run folder, held until dropped.
pub type RunLock = crate::io::Lock;

/// Lock `dir` (created if missing) for this process, or fail naming the process that holds it.
pub fn lock(dir: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK);
    crate::io::Lock::try_take(&path)?.ok_or_else(|| {
        let who = crate::io::Lock::holder(&path);
        Error::data(
            dir,
            format!("run folder in use by {who} (another finetune); wait for it to finish or stop it, or pick another name (--set name=...)"),
        )
    })
}

/// Whether `dir` holds anything besides its lock file.
pub fn has_run(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != LOCK)))
}

/// Start a new run in `dir` and lock it. An earlier run there is refused, or with `force`
/// renamed to `<dir>.old-<unix seconds>` first (returned), so nothing of it mixes with the new
/// run and nothing is lost if the new one is killed.
pub fn start_fresh(dir: &Path, force: bool) -> Result<(RunLock, Option<PathBuf>)> {
    let old = lock(dir)?;
    if !has_run(dir) {
        return Ok((old, None));
    }
    if !force {
        return Err(Error::data(
            dir,
            "run folder is not empty: pick another name (--set name=...), --resume it, or pass --force (the old run is moved aside)",
        ));
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    let aside = dir.with_file_name(format!("{name}.old-{secs}"));
    std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
    drop(old);
    let _ = std::fs::remove_file(aside.join(LOCK));
    Ok((lock(dir)?, Some(aside)))
}

/// `dir` is a run folder written by finetune (it has `run.toml`); checked without touching it.
pub fn check_resumable(dir: &Path) -> Result<()> {
    let path = dir.join("run.toml");
    match path.is_file() {
        true => Ok(()),
        false => Err(Error::data(&path, "not found: --resume takes a run folder written by finetune")),
    }
}

/// One setting a resume changed: key, old value, new value (TOML).
pub type Change = (String, String, String);

/// The config of the run in `dir` with `overrides` applied, and what they change. Changes to
/// keys outside [`RESUMABLE`] are refused; allowed ones are written to `run.toml` (with a
/// comment recording them), so the next resume reads the config that actually ran.
pub fn resume_config(dir: &Path, overrides: &[String]) -> Result<(RunConfig, Vec<Change>)> {
    check_resumable(dir)?;
    let path = dir.join("run.toml");
    let saved = RunConfig::load(Some(&path), &[])?;
    let cfg = RunConfig::load(Some(&path), overrides)?;
    let changes = diff(&saved, &cfg)?;
    let refused: Vec<String> = changes
        .iter()
        .filter(|(k, ..)| !RESUMABLE.contains(&k.as_str()))
        .map(|(k, a, b)| format!("{k} ({a} -> {b})"))
        .collect();
    if !refused.is_empty() {
        return Err(Error::Config {
            path,
            msg: format!(
                "--resume cannot change {}: the run's checkpoints were made with the saved values; start a new run instead (--set name=...). A resume may change only {}",
                refused.join(", "),
                RESUMABLE.join(", ")
            ),
        });
    }
    if !changes.is_empty() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let header: String = text.lines().take_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        let note: String = changes.iter().map(|(k, a, b)| format!("# resumed with {k} = {b} (was {a})\n")).collect();
        let body = toml::to_string_pretty(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::io::write_atomic(&path, format!("{header}{note}{body}").as_bytes())?;
    }
    Ok((cfg, changes))
}

/// The dotted keys whose values differ between two configs.
fn diff(a: &RunConfig, b: &RunConfig) -> Result<Vec<Change>> {
    let flat = |c: &RunConfig| -> Result<Vec<(String, String)>> {
        let v = toml::Value::try_from(c).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        Ok(out)
    };
    let (fa, fb) = (flat(a)?, flat(b)?);
    let old: std::collections::BTreeMap<_, _> = fa.into_iter().collect();
    Ok(fb
        .into_iter()
        .filter_map(|(k, v)| match old.get(&k) {
            Some(o) if *o == v => None,
            o => Some((k, o.cloned().unwrap_or_default(), v)),
        })
        .collect())
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        v => out.push((prefix.to_string(), v.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hs-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = temp("lock");
        let held = lock(&dir).unwrap();
        let e = lock(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("process {}", std::process::id())) && e.contains("in use"), "{e}");
        drop(held);
        lock(&dir).unwrap();
        assert!(!has_run(&dir), "the lock file alone is not a run");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn force_moves_the_old_run_aside_before_anything_is_written() {
        let dir = temp("force");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("report.json"), "{}").unwrap();
        let e = start_fresh(&dir, false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--force"), "{e}");
        assert!(dir.join("report.json").is_file(), "a refused start touches nothing");
        let (_lock, aside) = start_fresh(&dir, true).unwrap();
        let aside = aside.unwrap();
        assert!(aside.join("report.json").is_file() && !aside.join(LOCK).exists());
        assert!(!has_run(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&aside).unwrap();
    }

    #[test]
    fn resume_changes_only_what_keeps_the_run_whole_and_records_it() {
        let dir = temp("resume");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = RunConfig::default();
        let text = format!("# resolved config\n{}", toml::to_string_pretty(&cfg).unwrap());
        std::fs::write(dir.join("run.toml"), &text).unwrap();
        let (same, none) = resume_config(&dir, &[]).unwrap();
        assert!(none.is_empty() && same == cfg);
        let e = resume_config(&dir, &["model.pooling=\"mean\"".into(), "loss.t=5".into()]).unwrap_err().to_string();
        assert!(e.contains("model.pooling") && e.contains("loss.t (2.0 -> 5.0)") && e.contains("train.steps"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("run.toml")).unwrap(), text, "a refused resume rewrites nothing");
        let steps = cfg.train.steps + 4;
        let (got, changes) = resume_config(&dir, &[format!("train.steps={steps}")]).unwrap();
        assert_eq!(got.train.steps, steps);
        assert_eq!(changes, vec![("train.steps".into(), cfg.train.steps.to_string(), steps.to_string())]);
        // The next resume reads the new budget, and the file says what changed.
        let (again, none) = resume_config(&dir, &[]).unwrap();
        assert!(none.is_empty() && again.train.steps == steps);
        let saved = std::fs::read_to_string(dir.join("run.toml")).unwrap();
        assert!(saved.starts_with("# resolved config\n# resumed with train.steps"), "{saved}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
