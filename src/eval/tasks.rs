//! Loaders for the SentEval classification tasks and STS-B, from `<root>/senteval/...` and
//! `<root>/sts/STSBenchmark/...` (layout and formats: the data folder's README).
//!
//! Conventions, chosen to match SentEval:
//! - Text is whitespace-normalised (split on whitespace, joined by single spaces), as SentEval's
//!   `line.split()` followed by `' '.join(...)` in the batcher; this also drops SST-2's trailing space.
//! - Empty lines in the one-sentence-per-line files (CR: 4, MPQA: 3) are kept as examples with
//!   the empty sentence, because SentEval counts them (CR 3775, MPQA 10606): the caller embeds "".
//! - Files are read as UTF-8; a file that is not valid UTF-8 is decoded as Latin-1 (every byte
//!   one char, as SentEval opens MR/CR/SUBJ/MPQA) rather than failing. All files shipped in the
//!   data folder are valid UTF-8 today.
//! - Any other deviation (missing file, wrong field count, bad label or score) is an
//!   `Error::Data` naming the file and 1-based line; so is data a classifier cannot be scored
//!   on (one class only, fewer examples than the protocol's folds, an empty test set), which
//!   would otherwise score 100.00.

use std::path::{Path, PathBuf};

use super::protocol::{INNER_FOLDS, OUTER_FOLDS};
use crate::error::{Error, Result};

/// TREC coarse classes, in label order.
pub const TREC_CLASSES: [&str; 6] = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"];

/// Labelled examples: `x[i]` has class `y[i]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labelled<X> {
    pub x: Vec<X>,
    pub y: Vec<usize>,
}

impl<X: Clone> Labelled<X> {
    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Self {
        Labelled { x: idx.iter().map(|&i| self.x[i].clone()).collect(), y: idx.iter().map(|&i| self.y[i]).collect() }
    }
    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
}

/// Sentence pairs with a gold similarity score (STS-B, 0–5).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scored {
    pub pairs: Vec<(String, String)>,
    pub scores: Vec<f64>,
}

/// A task's data, by protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskData {
    /// One pool for k-fold CV (MR, CR, SUBJ, MPQA).
    CrossVal { data: Labelled<String>, classes: usize },
    /// Train / optional dev / test sentences (SST-2 with dev, TREC without).
    Split { train: Labelled<String>, dev: Option<Labelled<String>>, test: Labelled<String>, classes: usize },
    /// Train / test sentence pairs (MRPC; label 1 = paraphrase).
    Pairs { train: Labelled<(String, String)>, test: Labelled<(String, String)> },
    /// STS-B: similarity-scored pairs (train only loaded for completeness; unused by the protocol).
    Similarity { train: Scored, dev: Scored, test: Scored },
}

/// Whitespace-normalised text.
fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The file's lines (UTF-8, else Latin-1), without a final empty line after the last newline.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    };
    Ok(text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect())
}

fn bad(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::data(path, format!("line {line}: {msg}"))
}

/// Tab-separated fields of each line after `skip` header lines; each must have at least `min`
/// (and, when `exact`, exactly `min`) fields. Yields (1-based line number, fields).
fn tsv(path: &Path, skip: usize, min: usize, exact: bool) -> Result<Vec<(usize, Vec<String>)>> {
    read_lines(path)?
        .into_iter()
        .enumerate()
        .skip(skip)
        .map(|(i, l)| {
            let f: Vec<String> = l.split('\t').map(str::to_string).collect();
            if f.len() < min || (exact && f.len() != min) {
                let want = if exact { format!("{min}") } else { format!("at least {min}") };
                return Err(bad(path, i + 1, format!("expected {want} tab-separated fields, found {}", f.len())));
            }
            Ok((i + 1, f))
        })
        .collect()
}

fn label01(path: &Path, line: usize, s: &str) -> Result<usize> {
    match s.trim() {
        "0" => Ok(0),
        "1" => Ok(1),
        other => Err(bad(path, line, format!("label must be 0 or 1, found {other:?}"))),
    }
}

/// Two one-sentence-per-line files: class 0 from `neg`, class 1 from `pos` (empty lines kept);
/// each must hold at least one example per outer fold.
fn polarity(neg: &Path, pos: &Path) -> Result<Labelled<String>> {
    let mut out = Labelled::default();
    for (label, path) in [(0, neg), (1, pos)] {
        let lines = read_lines(path)?;
        if lines.len() < OUTER_FOLDS {
            return Err(Error::data(
                path,
                format!(
                    "{} examples of class {label}; the {OUTER_FOLDS}-fold protocol needs at least {OUTER_FOLDS} of each class (is the file truncated?)",
                    lines.len()
                ),
            ));
        }
        for line in lines {
            out.x.push(norm(&line));
            out.y.push(label);
        }
    }
    Ok(out)
}

/// A training set a classifier can be fitted and tuned on: two classes or more, and at least
/// one example per penalty-search fold.
fn trainable<X>(path: &Path, data: Labelled<X>) -> Result<Labelled<X>> {
    let mut classes: Vec<usize> = data.y.clone();
    classes.sort_unstable();
    classes.dedup();
    if classes.len() < 2 {
        let what = classes.first().map_or("no examples".to_string(), |c| format!("only class {c}"));
        return Err(Error::data(path, format!("{what}: a classifier needs examples of two classes or more")));
    }
    if data.y.len() < INNER_FOLDS {
        return Err(Error::data(
            path,
            format!("{} examples, fewer than the {INNER_FOLDS} folds of the penalty search", data.y.len()),
        ));
    }
    Ok(data)
}

/// A test (or dev) set with at least one example.
fn scorable<X>(path: &Path, data: Labelled<X>) -> Result<Labelled<X>> {
    match data.y.is_empty() {
        true => Err(Error::data(path, "no examples to score")),
        false => Ok(data),
    }
}

/// SST-2: `sentence<TAB>0|1`.
fn sst(path: &Path) -> Result<Labelled<String>> {
    let mut out = Labelled::default();
    for (line, f) in tsv(path, 0, 2, true)? {
        out.y.push(label01(path, line, &f[1])?);
        out.x.push(norm(&f[0]));
    }
    Ok(out)
}

/// TREC: `COARSE:fine question words`; the class is the coarse part.
fn trec(path: &Path) -> Result<Labelled<String>> {
    let mut out = Labelled::default();
    for (i, line) in read_lines(path)?.iter().enumerate() {
        let (label, text) = line.split_once(' ').unwrap_or((line, ""));
        let coarse = label.split_once(':').map(|(c, _)| c);
        let class = coarse.and_then(|c| TREC_CLASSES.iter().position(|k| *k == c));
        let class = class.ok_or_else(|| bad(path, i + 1, format!("expected COARSE:fine label, found {label:?}")))?;
        if text.trim().is_empty() {
            return Err(bad(path, i + 1, "no question after the label"));
        }
        out.x.push(norm(text));
        out.y.push(class);
    }
    Ok(out)
}

/// MRPC: header, then `label<TAB>id1<TAB>id2<TAB>s1<TAB>s2`.
fn mrpc(path: &Path) -> Result<Labelled<(String, String)>> {
    let mut out = Labelled::default();
    for (line, f) in tsv(path, 1, 5, true)? {
        out.y.push(label01(path, line, &f[0])?);
        out.x.push((norm(&f[3]), norm(&f[4])));
    }
    Ok(out)
}

/// STS-B: genre, file, year, id, score, s1, s2 [, extra fields ignored].
pub fn stsb(path: &Path) -> Result<Scored> {
    let mut out = Scored::default();
    for (line, f) in tsv(path, 0, 7, false)? {
        let score: f64 = f[4]
            .trim()
            .parse()
            .ok()
            .filter(|s| (0.0..=5.0).contains(s))
            .ok_or_else(|| bad(path, line, format!("score must be a number in 0..5, found {:?}", f[4])))?;
        out.scores.push(score);
        out.pairs.push((norm(&f[5]), norm(&f[6])));
    }
    Ok(out)
}

/// User scored pairs: sentence1, sentence2, score, tab-separated; a first line whose score is
/// not a number is a header. Scores may be on any scale (only their ranking is used).
pub fn scored_pairs(path: &Path) -> Result<Scored> {
    let mut out = Scored::default();
    for (line, f) in tsv(path, 0, 3, false)? {
        match f[2].trim().parse::<f64>() {
            Ok(score) if score.is_finite() => {
                out.scores.push(score);
                out.pairs.push((norm(&f[0]), norm(&f[1])));
            }
            // A header: a first line whose third field is not a number (NaN or inf is one).
            Err(_) if line == 1 => {}
            _ => {
                return Err(bad(
                    path,
                    line,
                    format!("the third field must be a finite score (a number), found {:?}", f[2]),
                ))
            }
        }
    }
    if out.pairs.len() < 3 {
        return Err(Error::data(path, "needs at least 3 scored pairs (sentence1 TAB sentence2 TAB score per line)"));
    }
    if out.scores.iter().all(|&x| x == out.scores[0]) {
        return Err(Error::data(path, "every score is the same: a rank correlation with them is undefined"));
    }
    Ok(out)
}

fn senteval(root: &Path, dir: &str, file: &str) -> PathBuf {
    root.join("senteval").join(dir).join(file)
}

fn cross_val(root: &Path, dir: &str, neg: &str, pos: &str) -> Result<TaskData> {
    Ok(TaskData::CrossVal { data: polarity(&senteval(root, dir, neg), &senteval(root, dir, pos))?, classes: 2 })
}

pub(crate) fn mr(root: &Path) -> Result<TaskData> {
    cross_val(root, "MR", "rt-polarity.neg", "rt-polarity.pos")
}

pub(crate) fn cr(root: &Path) -> Result<TaskData> {
    cross_val(root, "CR", "custrev.neg", "custrev.pos")
}

pub(crate) fn subj(root: &Path) -> Result<TaskData> {
    cross_val(root, "SUBJ", "subj.objective", "subj.subjective")
}

pub(crate) fn mpqa(root: &Path) -> Result<TaskData> {
    cross_val(root, "MPQA", "mpqa.neg", "mpqa.pos")
}

pub(crate) fn sst2(root: &Path) -> Result<TaskData> {
    let se = |f: &str| senteval(root, "SST2", f);
    let (train, dev, test) = (se("sentiment-train"), se("sentiment-dev"), se("sentiment-test"));
    Ok(TaskData::Split {
        train: trainable(&train, sst(&train)?)?,
        dev: Some(scorable(&dev, sst(&dev)?)?),
        test: scorable(&test, sst(&test)?)?,
        classes: 2,
    })
}

pub(crate) fn trec_task(root: &Path) -> Result<TaskData> {
    let (train, test) = (senteval(root, "TREC", "train_5500.label"), senteval(root, "TREC", "TREC_10.label"));
    Ok(TaskData::Split {
        train: trainable(&train, trec(&train)?)?,
        dev: None,
        test: scorable(&test, trec(&test)?)?,
        classes: TREC_CLASSES.len(),
    })
}

pub(crate) fn mrpc_task(root: &Path) -> Result<TaskData> {
    let (train, test) =
        (senteval(root, "MRPC", "msr_paraphrase_train.txt"), senteval(root, "MRPC", "msr_paraphrase_test.txt"));
    Ok(TaskData::Pairs { train: trainable(&train, mrpc(&train)?)?, test: scorable(&test, mrpc(&test)?)? })
}

pub(crate) fn stsb_task(root: &Path) -> Result<TaskData> {
    let dir = root.join("sts").join("STSBenchmark");
    Ok(TaskData::Similarity {
        train: stsb(&dir.join("sts-train.csv"))?,
        dev: stsb(&dir.join("sts-dev.csv"))?,
        test: stsb(&dir.join("sts-test.csv"))?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::Task;

    fn load(task: Task, root: &Path) -> Result<TaskData> {
        (task.spec().load)(root)
    }

    /// A fresh temporary folder laid out as a data root.
    pub(crate) fn temp_root(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("hypersphere-eval-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn real_data_counts() {
        let root = crate::test_data::root();
        let cv = |t| match load(t, &root).unwrap() {
            TaskData::CrossVal { data, .. } => {
                (data.y.iter().filter(|&&c| c == 1).count(), data.y.iter().filter(|&&c| c == 0).count())
            }
            _ => panic!("{t:?}"),
        };
        assert_eq!(cv(Task::MR), (5331, 5331));
        assert_eq!(cv(Task::CR), (2407, 1368));
        assert_eq!(cv(Task::SUBJ), (5000, 5000));
        assert_eq!(cv(Task::MPQA), (3312, 7294));
        match load(Task::CR, &root).unwrap() {
            TaskData::CrossVal { data, .. } => {
                assert_eq!(data.x.iter().filter(|s| s.is_empty()).count(), 4)
            }
            _ => panic!(),
        }
        match load(Task::SST2, &root).unwrap() {
            TaskData::Split { train, dev: Some(dev), test, classes } => {
                assert_eq!((train.len(), dev.len(), test.len(), classes), (67349, 872, 1821, 2));
                assert!(train.x.iter().all(|s| !s.ends_with(' ')));
            }
            _ => panic!(),
        }
        match load(Task::TREC, &root).unwrap() {
            TaskData::Split { train, dev: None, test, classes } => {
                assert_eq!((train.len(), test.len(), classes), (5452, 500, 6));
                let counts: Vec<usize> = (0..6).map(|c| train.y.iter().filter(|&&v| v == c).count()).collect();
                assert_eq!(counts, vec![86, 1162, 1250, 1223, 835, 896]);
            }
            _ => panic!(),
        }
        match load(Task::MRPC, &root).unwrap() {
            TaskData::Pairs { train, test } => {
                assert_eq!((train.len(), test.len()), (4076, 1725));
                assert_eq!((train.y.iter().sum::<usize>(), test.y.iter().sum::<usize>()), (2753, 1147));
            }
            _ => panic!(),
        }
        match load(Task::STSB, &root).unwrap() {
            TaskData::Similarity { train, dev, test } => {
                assert_eq!((train.pairs.len(), dev.pairs.len(), test.pairs.len()), (5749, 1500, 1379));
                assert!(test.scores.iter().all(|s| (0.0..=5.0).contains(s)));
            }
            _ => panic!(),
        }
    }

    #[test]
    fn fixtures_parse() {
        let root = temp_root("ok");
        // Enough examples for the protocols' folds: the lines below, then fillers.
        let fill =
            |n: usize, text: &str| -> Vec<u8> { (0..n).flat_map(|i| format!("{text} {i}\n").into_bytes()).collect() };
        let neg = [&b"the zipper broke twice\n\nbattery  is weak \n"[..], &fill(7, "dull")].concat();
        write(&root, "senteval/CR/custrev.neg", &neg);
        write(&root, "senteval/CR/custrev.pos", &[&b"caf\xe9 mode is lovely\n"[..], &fill(9, "fine")].concat());
        write(
            &root,
            "senteval/TREC/train_5500.label",
            &[
                &b"NUM:date When did the kettle boil ?\nHUM:ind Who painted the shed ?\n"[..],
                &fill(3, "LOC:city Where"),
            ]
            .concat(),
        );
        write(&root, "senteval/TREC/TREC_10.label", b"LOC:city Where is the lighthouse ?\n");
        write(
            &root,
            "senteval/MRPC/msr_paraphrase_train.txt",
            &[
                &b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tThe cat sat.\tA cat was sitting.\n"[..],
                &fill(4, "0\t5\t6\tA.\tB."),
            ]
            .concat(),
        );
        write(
            &root,
            "senteval/MRPC/msr_paraphrase_test.txt",
            b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t3\t4\tIt rained.\tThe sun shone.\n",
        );
        let sts = b"g\tf\t2020\t1\t3.5\tA dog runs.\tA dog is running.\textra\tmore\ng\tf\t2020\t2\t0\tRed.\tBlue.\n";
        for s in ["train", "dev", "test"] {
            write(&root, &format!("sts/STSBenchmark/sts-{s}.csv"), sts);
        }
        match load(Task::CR, &root).unwrap() {
            TaskData::CrossVal { data, classes: 2 } => {
                // Latin-1 fallback for the non-UTF-8 file; empty line kept; whitespace normalised.
                assert_eq!(data.x[..3], ["the zipper broke twice", "", "battery is weak"]);
                assert_eq!(data.x[10], "café mode is lovely");
                assert_eq!(data.y, [vec![0; 10], vec![1; 10]].concat());
            }
            other => panic!("{other:?}"),
        }
        match load(Task::TREC, &root).unwrap() {
            TaskData::Split { train, test, .. } => {
                assert_eq!(train.y, vec![5, 3, 4, 4, 4]);
                assert_eq!(train.x[0], "When did the kettle boil ?");
                assert_eq!(test.y, vec![4]);
            }
            other => panic!("{other:?}"),
        }
        match load(Task::MRPC, &root).unwrap() {
            TaskData::Pairs { train, test } => {
                assert_eq!(train.x[0], ("The cat sat.".to_string(), "A cat was sitting.".to_string()));
                assert_eq!((train.y.clone(), test.y.clone()), (vec![1, 0, 0, 0, 0], vec![0]));
            }
            other => panic!("{other:?}"),
        }
        match load(Task::STSB, &root).unwrap() {
            TaskData::Similarity { test, .. } => {
                assert_eq!(test.scores, vec![3.5, 0.0]);
                assert_eq!(test.pairs[0].1, "A dog is running.");
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Data a classifier cannot be scored on is an error naming the file, not a perfect score:
    /// an empty class file, a short one, one class in a training set, an empty test set.
    #[test]
    fn unscorable_data_names_the_file() {
        let root = temp_root("unscorable");
        let lines = |n: usize, text: &str| -> String { (0..n).map(|i| format!("{text} {i}\n")).collect() };
        write(&root, "senteval/MR/rt-polarity.neg", lines(12, "grim").as_bytes());
        write(&root, "senteval/MR/rt-polarity.pos", b"");
        let err = load(Task::MR, &root).unwrap_err().to_string();
        assert!(err.contains("rt-polarity.pos") && err.contains("0 examples of class 1"), "{err}");
        write(&root, "senteval/MR/rt-polarity.pos", lines(9, "glad").as_bytes());
        let err = load(Task::MR, &root).unwrap_err().to_string();
        assert!(err.contains("rt-polarity.pos") && err.contains("9 examples"), "{err}");
        write(&root, "senteval/MR/rt-polarity.pos", lines(10, "glad").as_bytes());
        assert!(load(Task::MR, &root).is_ok());
        let one_class: String = (0..8).map(|i| format!("film {i}\t1\n")).collect();
        write(&root, "senteval/SST2/sentiment-train", one_class.as_bytes());
        write(&root, "senteval/SST2/sentiment-dev", b"a\t0\n");
        write(&root, "senteval/SST2/sentiment-test", b"b\t1\n");
        let err = load(Task::SST2, &root).unwrap_err().to_string();
        assert!(err.contains("sentiment-train") && err.contains("only class 1"), "{err}");
        write(&root, "senteval/SST2/sentiment-train", b"a\t0\nb\t1\n");
        let err = load(Task::SST2, &root).unwrap_err().to_string();
        assert!(err.contains("sentiment-train") && err.contains("fewer than the 5 folds"), "{err}");
        write(&root, "senteval/SST2/sentiment-train", format!("{one_class}c\t0\n").as_bytes());
        write(&root, "senteval/SST2/sentiment-test", b"");
        let err = load(Task::SST2, &root).unwrap_err().to_string();
        assert!(err.contains("sentiment-test") && err.contains("no examples"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_and_malformed_files_name_file_and_line() {
        let root = temp_root("bad");
        let err = load(Task::MR, &root).unwrap_err().to_string();
        assert!(err.contains("rt-polarity.neg"), "{err}");
        let cases: [(&str, &[u8], Task, &str); 5] = [
            ("senteval/SST2/sentiment-train", b"good film\t1\nno label here\n", Task::SST2, "sentiment-train: line 2"),
            (
                "senteval/SST2/sentiment-train",
                b"good film\t1\nbad film\t2\n",
                Task::SST2,
                "line 2: label must be 0 or 1",
            ),
            (
                "senteval/TREC/train_5500.label",
                b"NUM:date When ?\nWHAT:x Why ?\n",
                Task::TREC,
                "train_5500.label: line 2",
            ),
            (
                "senteval/MRPC/msr_paraphrase_train.txt",
                b"header\n1\t1\t2\tonly one\n",
                Task::MRPC,
                "msr_paraphrase_train.txt: line 2",
            ),
            ("sts/STSBenchmark/sts-train.csv", b"g\tf\ty\t1\tsix\ta\tb\n", Task::STSB, "sts-train.csv: line 1: score"),
        ];
        for (rel, bytes, task, want) in cases {
            write(&root, rel, bytes);
            let err = load(task, &root).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
