//! Downstream evaluation of sentence embeddings, SentEval-style: logistic-regression probes on
//! MR, CR, SUBJ, MPQA, SST-2, TREC, MRPC and cosine-similarity Spearman on STS-B.
//!
//! The embedding itself is the caller's: it asks [`task_sentences`] for the texts, embeds each
//! once, then hands a lookup to [`run_task`]. Everything here is CPU-only Rust.

pub mod beir;
pub mod books_next;
pub mod dev;
pub mod logreg;
pub mod protocol;
pub mod runner;
pub mod stats;
pub mod tasks;

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use protocol::{Penalty, INNER_FOLDS, OUTER_FOLDS};
use tasks::{Labelled, Scored, TaskData};

/// A downstream task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Task {
    MR,
    CR,
    SUBJ,
    MPQA,
    SST2,
    TREC,
    MRPC,
    STSB,
}

/// One task's row: everything about it but its protocol (which follows from its data's kind).
pub struct TaskSpec {
    pub task: Task,
    /// Display name, e.g. "SST-2".
    pub name: &'static str,
    /// The identifier results are stored under (`eval.json`, `report.json`).
    pub id: &'static str,
    /// Reads its files under the data folder.
    pub load: fn(&Path) -> Result<TaskData>,
    /// Published scores (percent) to compare with, from the data README: SentEval accuracy for
    /// the classification tasks (Gao et al. 2021, Table E.1), Spearman x100 on STS-B test.
    pub reference: &'static [(&'static str, f64)],
}

const SENTEVAL: [&str; 2] = ["BERT-base mean", "SimCSE-BERT-base"];

/// Every task, one row each: adding a task is a variant and a row (and a loader in
/// [`tasks`] for a new file format).
pub const TASKS: [TaskSpec; 8] = [
    TaskSpec {
        task: Task::MR,
        name: "MR",
        id: "MR",
        load: tasks::mr,
        reference: &[(SENTEVAL[0], 78.66), (SENTEVAL[1], 81.18)],
    },
    TaskSpec {
        task: Task::CR,
        name: "CR",
        id: "CR",
        load: tasks::cr,
        reference: &[(SENTEVAL[0], 86.25), (SENTEVAL[1], 86.46)],
    },
    TaskSpec {
        task: Task::SUBJ,
        name: "SUBJ",
        id: "SUBJ",
        load: tasks::subj,
        reference: &[(SENTEVAL[0], 94.37), (SENTEVAL[1], 94.45)],
    },
    TaskSpec {
        task: Task::MPQA,
        name: "MPQA",
        id: "MPQA",
        load: tasks::mpqa,
        reference: &[(SENTEVAL[0], 88.66), (SENTEVAL[1], 88.88)],
    },
    TaskSpec {
        task: Task::SST2,
        name: "SST-2",
        id: "SST2",
        load: tasks::sst2,
        reference: &[(SENTEVAL[0], 84.40), (SENTEVAL[1], 85.50)],
    },
    TaskSpec {
        task: Task::TREC,
        name: "TREC",
        id: "TREC",
        load: tasks::trec_task,
        reference: &[(SENTEVAL[0], 92.80), (SENTEVAL[1], 89.80)],
    },
    TaskSpec {
        task: Task::MRPC,
        name: "MRPC",
        id: "MRPC",
        load: tasks::mrpc_task,
        reference: &[(SENTEVAL[0], 69.54), (SENTEVAL[1], 74.43)],
    },
    TaskSpec {
        task: Task::STSB,
        name: "STS-B",
        id: "STSB",
        load: tasks::stsb_task,
        reference: &[
            ("BERT-base first-last avg", 59.04),
            ("BERT-base first-last avg + whitening", 71.34),
            ("SimCSE-BERT-base", 76.85),
        ],
    },
];

impl Task {
    pub const ALL: [Task; 8] =
        [Task::MR, Task::CR, Task::SUBJ, Task::MPQA, Task::SST2, Task::TREC, Task::MRPC, Task::STSB];

    /// The task's row in [`TASKS`].
    pub fn spec(self) -> &'static TaskSpec {
        TASKS.iter().find(|s| s.task == self).expect("every task has a row")
    }

    /// Display name, e.g. "SST-2".
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The identifier results are stored under (`eval.json`, `report.json`).
    pub fn id(self) -> &'static str {
        self.spec().id
    }

    /// Case-insensitive name, with or without the hyphen ("sst-2", "SST2", "stsb", ...).
    pub fn parse(s: &str) -> Option<Task> {
        let key = s.trim().replace('-', "").to_ascii_uppercase();
        Task::ALL.into_iter().find(|t| t.name().replace('-', "") == key)
    }

    /// Published scores to compare with (see [`TaskSpec::reference`]).
    pub fn reference(self) -> Vec<(&'static str, f64)> {
        self.spec().reference.to_vec()
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One task's scores.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskResult {
    /// A built-in task's identifier (`STSB`, `SST2`, ...) or the name of a user STS set.
    pub task: String,
    /// Percentages: ("accuracy", ..) and, when a penalty was searched, ("dev_accuracy", ..) (its
    /// inner-CV or dev accuracy); MRPC adds ("f1", ..); STS-B has ("spearman_dev", ..), ("spearman_test", ..).
    pub metrics: Vec<(String, f64)>,
    /// Training examples (CV tasks: the whole pool; STS-B: 0).
    pub n_train: usize,
    /// Test examples (CV tasks: the whole pool, each tested once; STS-B: test pairs).
    pub n_test: usize,
    /// Wall-clock seconds of [`run_task`] (loading and classifier; embedding excluded).
    pub seconds: f64,
}

/// A user's scored sentence pairs (`eval --sts NAME=FILE`), scored like STS-B: Spearman x 100
/// of the cosine against the gold score.
#[derive(Debug, Clone)]
pub struct UserSts {
    pub name: String,
    pub data: Scored,
}

/// Every `FLAG NAME=...` spec, parsed by `parse`; a name given twice is an error (its results
/// would overwrite each other).
pub fn parse_named<T>(
    flag: &str,
    specs: &[String],
    parse: impl Fn(&str) -> Result<T>,
    name: impl Fn(&T) -> &str,
) -> Result<Vec<T>> {
    let mut out: Vec<T> = Vec::with_capacity(specs.len());
    for spec in specs {
        let set = parse(spec)?;
        if out.iter().any(|s| name(s) == name(&set)) {
            return Err(Error::Invalid(format!("{flag} {spec}: the name {} is given twice", name(&set))));
        }
        out.push(set);
    }
    Ok(out)
}

impl UserSts {
    /// Parse `NAME=FILE` and read the file: tab-separated sentence1, sentence2, score (any
    /// real scale), one pair per line; a first line whose score is not a number is a header.
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, file) = spec.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("--sts {spec}: expected NAME=FILE (tab-separated sentence1, sentence2, score)"))
        })?;
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(Error::Invalid(format!("--sts {spec}: the name must be one word")));
        }
        if Task::parse(name).is_some() {
            return Err(Error::Invalid(format!("--sts {spec}: {name} is a built-in task; pick another name")));
        }
        Ok(Self { name: name.to_string(), data: tasks::scored_pairs(std::path::Path::new(file))? })
    }

    /// Every `--sts NAME=FILE`, parsed.
    pub fn parse_all(specs: &[String]) -> Result<Vec<Self>> {
        parse_named("--sts", specs, Self::parse, |s| &s.name)
    }

    /// Distinct sentences of both sides, first-seen order.
    pub fn sentences(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.data.pairs.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).filter(|s| seen.insert(s.clone())).collect()
    }

    /// Spearman x 100 given a lookup from sentence to embedding.
    pub fn score<'e>(&self, embed: &dyn Fn(&str) -> Option<&'e [f32]>) -> Result<TaskResult> {
        let start = Instant::now();
        Ok(TaskResult {
            task: self.name.clone(),
            metrics: vec![("spearman".into(), sts_spearman(&self.name, &self.data, embed)?)],
            n_train: 0,
            n_test: self.data.pairs.len(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Examples per split in quick mode.
pub const QUICK_N: usize = 1000;
/// Fixed seed of the quick-mode subset (independent of the run's seed, so the subset is fixed).
const QUICK_SEED: u64 = 0x05EE_D5E7;

/// The first [`QUICK_N`] indices of `0..n` after a shuffle seeded with [`QUICK_SEED`] (all if fewer).
fn quick_indices(n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(QUICK_SEED));
    idx.truncate(QUICK_N);
    idx
}

fn quick_labelled<X: Clone>(d: &Labelled<X>) -> Labelled<X> {
    d.select(&quick_indices(d.len()))
}

fn quick_scored(d: &Scored) -> Scored {
    let idx = quick_indices(d.scores.len());
    Scored {
        pairs: idx.iter().map(|&i| d.pairs[i].clone()).collect(),
        scores: idx.iter().map(|&i| d.scores[i]).collect(),
    }
}

/// The task's data as the protocol uses it (quick: subsets, no SST-2 dev, no STS-B train).
fn task_data(task: Task, root: &Path, quick: bool) -> Result<TaskData> {
    let data = (task.spec().load)(root)?;
    Ok(match data {
        TaskData::Similarity { dev, test, .. } if quick => {
            TaskData::Similarity { train: Scored::default(), dev: quick_scored(&dev), test: quick_scored(&test) }
        }
        TaskData::Similarity { dev, test, .. } => TaskData::Similarity { train: Scored::default(), dev, test },
        d if !quick => d,
        TaskData::CrossVal { data, classes } => TaskData::CrossVal { data: quick_labelled(&data), classes },
        TaskData::Split { train, test, classes, .. } => {
            TaskData::Split { train: quick_labelled(&train), dev: None, test: quick_labelled(&test), classes }
        }
        TaskData::Pairs { train, test } => {
            TaskData::Pairs { train: quick_labelled(&train), test: quick_labelled(&test) }
        }
    })
}

/// The texts a task needs embedded, deduplicated (first-seen order), so the caller embeds each
/// once. May contain "" (CR and MPQA have empty lines, kept as SentEval does).
pub fn task_sentences(task: Task, root: &Path, quick: bool) -> Result<Vec<String>> {
    let flat = |p: Vec<(String, String)>| p.into_iter().flat_map(|(a, b)| [a, b]);
    let mut all: Vec<String> = match task_data(task, root, quick)? {
        TaskData::CrossVal { data, .. } => data.x,
        TaskData::Split { train, dev, test, .. } => {
            train.x.into_iter().chain(dev.into_iter().flat_map(|d| d.x)).chain(test.x).collect()
        }
        TaskData::Pairs { train, test } => flat(train.x).chain(flat(test.x)).collect(),
        TaskData::Similarity { dev, test, .. } => flat(dev.pairs).chain(flat(test.pairs)).collect(),
    };
    let mut seen = std::collections::HashSet::new();
    all.retain(|s| seen.insert(s.clone()));
    Ok(all)
}

/// Embeddings of `texts`, all of one non-zero dimension.
fn lookup<'e>(
    task: &dyn std::fmt::Display,
    texts: &[&str],
    embed: &dyn Fn(&str) -> Option<&'e [f32]>,
) -> Result<Vec<&'e [f32]>> {
    let rows = texts
        .iter()
        .map(|s| embed(s).ok_or_else(|| Error::Invalid(format!("{task}: no embedding for sentence {s:?}"))))
        .collect::<Result<Vec<_>>>()?;
    let dim = rows.first().map_or(0, |r| r.len());
    if dim == 0 || rows.iter().any(|r| r.len() != dim) {
        return Err(Error::Invalid(format!("{task}: embeddings are empty or differ in dimension")));
    }
    Ok(rows)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Embeddings of both sides of each pair.
type Sides<'e> = (Vec<&'e [f32]>, Vec<&'e [f32]>);
fn lookup_pairs<'e>(
    task: &dyn std::fmt::Display,
    pairs: &[(String, String)],
    embed: &dyn Fn(&str) -> Option<&'e [f32]>,
) -> Result<Sides<'e>> {
    let (a, b): (Vec<&str>, Vec<&str>) = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).unzip();
    let (a, b) = (lookup(task, &a, embed)?, lookup(task, &b, embed)?);
    if a.first().map(|r| r.len()) != b.first().map(|r| r.len()) {
        return Err(Error::Invalid(format!("{task}: embeddings differ in dimension")));
    }
    Ok((a, b))
}

/// MRPC pair features `[u, v, |u−v|, u·v]` (element-wise), flattened row-major, and their width.
fn pair_features<'e>(
    task: &dyn std::fmt::Display,
    pairs: &[(String, String)],
    embed: &dyn Fn(&str) -> Option<&'e [f32]>,
) -> Result<(Vec<f32>, usize)> {
    let (a, b) = lookup_pairs(task, pairs, embed)?;
    let dim = a.first().map_or(0, |r| r.len());
    let mut out = Vec::with_capacity(pairs.len() * 4 * dim);
    for (u, v) in a.iter().zip(&b) {
        out.extend_from_slice(u);
        out.extend_from_slice(v);
        out.extend(u.iter().zip(*v).map(|(x, y)| (x - y).abs()));
        out.extend(u.iter().zip(*v).map(|(x, y)| x * y));
    }
    Ok((out, 4 * dim))
}

/// Spearman ×100 between the pairs' cosine similarities and the gold scores.
/// Spearman x 100 of the cosine of each pair's embeddings against the gold scores: how every
/// STS set is scored (STS-B, the user's `--sts` files, STS-B dev during training).
pub fn sts_spearman<'e>(
    task: &dyn std::fmt::Display,
    d: &Scored,
    embed: &dyn Fn(&str) -> Option<&'e [f32]>,
) -> Result<f64> {
    let (a, b) = lookup_pairs(task, &d.pairs, embed)?;
    let cos: Vec<f64> = a.iter().zip(&b).map(|(u, v)| protocol::cosine(u, v)).collect();
    Ok(100.0 * stats::spearman(&cos, &d.scores))
}

/// Run `task`'s protocol, given a lookup from sentence to its embedding (every text of
/// [`task_sentences`] must be found). Folds and searches are seeded by `seed` (`StdRng`).
///
/// Protocols (λ: L2 penalty from [`protocol::PENALTIES`], features standardised per training set):
/// - MR, CR, SUBJ, MPQA: stratified 10-fold CV; on each training fold λ is chosen by inner
///   stratified 5-fold CV, refitted, scored on the held-out fold; mean test accuracy.
/// - SST-2: λ chosen by dev accuracy; test accuracy.
/// - TREC (6 coarse classes): λ by stratified 5-fold CV on train; test accuracy.
/// - MRPC: features `[u, v, |u−v|, u·v]`, λ by stratified 5-fold CV on train; test accuracy and F1
///   of class 1 (paraphrase).
/// - STS-B: cosine similarity against the gold score, Spearman ×100 on dev and test; no training.
///
/// `quick` (smoke tests): every split cut to its first [`QUICK_N`] = 1000 examples after a shuffle
/// with a fixed seed (the same subset whatever `seed`); CV tasks use 5-fold CV; no penalty search
/// anywhere (λ = [`protocol::QUICK_PENALTY`]); SST-2's dev set and STS-B's train set are unused.
/// With 384-d features every task then takes well under a second of classifier time.
pub fn run_task<'e>(
    task: Task,
    root: &Path,
    quick: bool,
    embed: &dyn Fn(&str) -> Option<&'e [f32]>,
    seed: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<TaskResult> {
    let start = Instant::now();
    let data = task_data(task, root, quick)?;
    let pct = |name: &str, v: f64| (name.to_string(), 100.0 * v);
    let mut metrics = Vec::new();
    let (n_train, n_test) = match &data {
        TaskData::CrossVal { data, classes } => {
            let rows = lookup(&task, &strs(&data.x), embed)?;
            let (k, inner) = if quick { (5, None) } else { (OUTER_FOLDS, Some(INNER_FOLDS)) };
            progress(&format!("{task}: {k}-fold CV on {} examples", data.len()));
            let mut done = 0;
            let out = protocol::cross_validate(&rows, &data.y, *classes, k, inner, seed, &mut |_| {
                done += 1;
                progress(&format!("{task}: fold {done}/{k} done"));
            })?;
            metrics.push(pct("accuracy", out.accuracy));
            metrics.extend(out.dev_accuracy.map(|d| pct("dev_accuracy", d)));
            progress(&format!("{task}: penalties chosen per fold {:?}", out.lambdas));
            (data.len(), data.len())
        }
        TaskData::Split { train, dev, test, classes } => {
            let rows = lookup(&task, &strs(&train.x), embed)?;
            let test_rows = lookup(&task, &strs(&test.x), embed)?;
            let dev_rows = match dev {
                Some(d) => Some(lookup(&task, &strs(&d.x), embed)?),
                None => None,
            };
            let select = match (&dev_rows, dev, quick) {
                (_, _, true) => Penalty::Fixed(protocol::QUICK_PENALTY),
                (Some(r), Some(d), _) => Penalty::Dev(r, &d.y),
                _ => Penalty::KFold(INNER_FOLDS),
            };
            progress(&format!("{task}: training on {} examples", train.len()));
            let fit = protocol::train_test(&rows, &train.y, *classes, &test_rows, select, seed)?;
            metrics.push(pct("accuracy", stats::accuracy(&fit.pred, &test.y)));
            metrics.extend(fit.dev_accuracy.map(|d| pct("dev_accuracy", d)));
            progress(&format!("{task}: penalty {}", fit.lambda));
            (train.len(), test.len())
        }
        TaskData::Pairs { train, test } => {
            let (f_train, dim) = pair_features(&task, &train.x, embed)?;
            let (f_test, _) = pair_features(&task, &test.x, embed)?;
            let rows: Vec<&[f32]> = f_train.chunks_exact(dim).collect();
            let test_rows: Vec<&[f32]> = f_test.chunks_exact(dim).collect();
            let select = if quick { Penalty::Fixed(protocol::QUICK_PENALTY) } else { Penalty::KFold(INNER_FOLDS) };
            progress(&format!("{task}: training on {} pairs ({dim} features)", train.len()));
            let fit = protocol::train_test(&rows, &train.y, 2, &test_rows, select, seed)?;
            metrics.push(pct("accuracy", stats::accuracy(&fit.pred, &test.y)));
            metrics.push(pct("f1", stats::f1(&fit.pred, &test.y, 1)));
            metrics.extend(fit.dev_accuracy.map(|d| pct("dev_accuracy", d)));
            progress(&format!("{task}: penalty {}", fit.lambda));
            (train.len(), test.len())
        }
        TaskData::Similarity { dev, test, .. } => {
            metrics.push(("spearman_dev".to_string(), sts_spearman(&task, dev, embed)?));
            metrics.push(("spearman_test".to_string(), sts_spearman(&task, test, embed)?));
            (0, test.scores.len())
        }
    };
    Ok(TaskResult { task: task.id().into(), metrics, n_train, n_test, seconds: start.elapsed().as_secs_f64() })
}

/// The tasks named (`all`, or names, comma-separated or one per entry), in the order given
/// without repeats, or an error naming the unknown one.
pub fn parse_tasks(names: &[String]) -> Result<Vec<Task>> {
    if names.iter().any(|n| n.eq_ignore_ascii_case("all")) {
        return Ok(Task::ALL.to_vec());
    }
    let mut tasks = Vec::new();
    // BOOKS-NEXT is not a data-folder task: the caller builds it from a corpus.
    let named = names.iter().flat_map(|n| n.split(',')).map(str::trim);
    for n in named.filter(|n| !n.is_empty() && !books_next::is_named(n)) {
        let t = Task::parse(n).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown eval task `{n}` (use MR, CR, SUBJ, MPQA, SST2, TREC, MRPC, STSB, BOOKS-NEXT or all)"
            ))
        })?;
        if !tasks.contains(&t) {
            tasks.push(t);
        }
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Named specs keep their order; the second use of a name is refused, naming the flag and
    /// the spec; a parse error passes through.
    #[test]
    fn named_specs_refuse_a_name_twice() {
        let parse = |s: &str| match s.split_once('=') {
            Some((n, v)) => Ok((n.to_string(), v.to_string())),
            None => Err(Error::Invalid(format!("no '=' in {s}"))),
        };
        let specs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = parse_named("--retrieval", &specs(&["a=1", "b=2"]), parse, |p| &p.0).unwrap();
        assert_eq!(ok, [("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]);
        let twice = parse_named("--retrieval", &specs(&["a=1", "b=2", "a=3"]), parse, |p| &p.0).unwrap_err();
        assert_eq!(twice.to_string(), Error::Invalid("--retrieval a=3: the name a is given twice".into()).to_string());
        assert!(parse_named("--sts", &specs(&["a"]), parse, |p| &p.0).is_err());
    }

    #[test]
    fn task_names_parse() {
        for t in Task::ALL {
            assert_eq!(Task::parse(t.name()), Some(t));
            assert_eq!(Task::parse(&t.name().to_lowercase()), Some(t));
            assert!(!t.reference().is_empty());
        }
        assert_eq!(Task::parse("sst2"), Some(Task::SST2));
        assert_eq!(Task::parse("Sts-B"), Some(Task::STSB));
        assert_eq!(Task::parse("stsb"), Some(Task::STSB));
        assert_eq!(Task::parse("sick"), None);
        assert_eq!(Task::STSB.reference()[2], ("SimCSE-BERT-base", 76.85));
        let json = serde_json::to_string(&Task::SST2).unwrap();
        assert_eq!(serde_json::from_str::<Task>(&json).unwrap(), Task::SST2);
    }

    /// Hashed bag of words: each token adds ±1 to one of `dim` buckets (FNV-1a), L2-normalised.
    fn bag_of_words(s: &str, dim: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; dim];
        for w in s.split_whitespace() {
            let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            v[(h % dim as u64) as usize] += if h >> 63 == 1 { 1.0 } else { -1.0 };
        }
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n.max(1e-12));
        v
    }

    /// Embedding-like stand-in: a 4096-bucket bag of words mapped to 384 dims by a fixed random
    /// matrix with a decaying spectrum (variance ∝ 1/i, randomly rotated) plus a shared offset,
    /// then L2-normalised: correlated, anisotropic coordinates, as real embeddings have.
    fn embedder() -> impl Fn(&str) -> Vec<f32> {
        use nalgebra::{DMatrix, DVector};
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(3);
        let rot = DMatrix::<f64>::from_fn(384, 384, |_, _| rng.gen_range(-1.0..1.0)).qr().q();
        let spectrum = DMatrix::from_diagonal(&DVector::from_fn(384, |i, _| 1.0 / (i as f64 + 1.0).sqrt()));
        let proj =
            (rot * spectrum * DMatrix::<f64>::from_fn(384, 4096, |_, _| rng.gen_range(-1.0..1.0))).map(|v| v as f32);
        move |s| {
            let bow = bag_of_words(s, 4096);
            let mut v: Vec<f32> = proj.column(0).iter().map(|c| 0.5 * c).collect();
            for (j, &b) in bow.iter().enumerate().filter(|(_, b)| **b != 0.0) {
                v.iter_mut().zip(proj.column(j).iter()).for_each(|(x, c)| *x += b * c);
            }
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n.max(1e-12)).collect()
        }
    }

    /// Run every task with [`embedder`] features: each scores above chance.
    fn bow_run(root: &Path, quick: bool) {
        let embedder = embedder();
        for task in Task::ALL {
            let sents = task_sentences(task, root, quick).unwrap();
            let map: HashMap<String, Vec<f32>> = sents.iter().map(|s| (s.clone(), embedder(s))).collect();
            let embed = |s: &str| map.get(s).map(|v| v.as_slice());
            let r = run_task(task, root, quick, &embed, 1, &mut |_| {}).unwrap();
            assert!(r.n_test > 0, "{}: no test examples", task.name());
            let main = r.metrics[if task == Task::STSB { 1 } else { 0 }].1;
            assert!(main.is_finite() && main > 20.0, "{task}: {main}");
        }
    }

    #[test]
    fn quick_run_on_real_data() {
        let root = crate::test_data::root();
        assert_eq!(task_sentences(Task::MR, &root, true).unwrap().len(), QUICK_N);
        let sst = task_sentences(Task::SST2, &root, false).unwrap();
        assert!(sst.len() < 67349 + 872 + 1821 && sst.len() > 60000);
        bow_run(&root, true);
    }

    /// The full protocol on all tasks (slow: a few minutes); `cargo test --release -- --ignored`.
    #[test]
    #[ignore]
    fn full_run_on_real_data() {
        let root = crate::test_data::root();
        bow_run(&root, false);
    }

    #[test]
    fn fixture_run_and_missing_embedding() {
        let root = tasks::tests::temp_root("run");
        let dir = root.join("senteval/MR");
        std::fs::create_dir_all(&dir).unwrap();
        let pos: String = (0..40).map(|i| format!("warm bright joyful tune number {i}\n")).collect();
        let neg: String = (0..40).map(|i| format!("cold grey gloomy rain number {i}\n")).collect();
        std::fs::write(dir.join("rt-polarity.pos"), pos).unwrap();
        std::fs::write(dir.join("rt-polarity.neg"), neg).unwrap();
        let sents = task_sentences(Task::MR, &root, false).unwrap();
        assert_eq!(sents.len(), 80);
        let map: HashMap<String, Vec<f32>> = sents.iter().map(|s| (s.clone(), bag_of_words(s, 64))).collect();
        let embed = |s: &str| map.get(s).map(|v| v.as_slice());
        let mut log = Vec::new();
        let r = run_task(Task::MR, &root, false, &embed, 5, &mut |m| log.push(m.to_string())).unwrap();
        assert_eq!(r.metrics[0], ("accuracy".to_string(), 100.0));
        assert_eq!((r.n_train, r.n_test), (80, 80));
        assert!(log.iter().any(|m| m.contains("fold 10/10")), "{log:?}");
        let none = |_: &str| -> Option<&[f32]> { None };
        let err = run_task(Task::MR, &root, false, &none, 5, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("no embedding"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
