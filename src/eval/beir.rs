//! A user's retrieval set in the BEIR layout (`eval --retrieval NAME=DIR`): `corpus.jsonl`
//! (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and `qrels/test.tsv`
//! (`query-id`, `corpus-id`, `score`, after a header line). Scored as BEIR scores it: exact
//! cosine search, nDCG@10, MRR@10, Recall@10 and Recall@100 (x 100) over the queries that have
//! relevance judgements; a document's text is its title and text joined by a space.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::tasks::read_lines;
use super::{Task, TaskResult};
use crate::error::{Error, Result};

/// A retrieval set read and checked: documents and queries as indices into its distinct
/// texts, so each text is embedded once and the documents' rows are used in place.
#[derive(Debug, Clone)]
pub struct Beir {
    pub name: String,
    /// The distinct texts of the documents (title and text) and queries, documents first.
    pub texts: Vec<String>,
    /// Each document's text, in file order.
    pub docs: Vec<usize>,
    /// Each query's text: the queries with at least one relevant document, in file order.
    pub queries: Vec<usize>,
    /// Each query's relevant documents (indices into `docs`, score > 0).
    pub relevant: Vec<Vec<usize>>,
    /// Leave out, for each query, a document whose text is the query's own (next-sentence
    /// retrieval, where every sentence is also a document).
    pub skip_own_text: bool,
}

/// Distinct texts, numbered in first-seen order.
#[derive(Default)]
pub struct Interner {
    index: HashMap<String, usize>,
    pub texts: Vec<String>,
}

impl Interner {
    pub fn id(&mut self, text: String) -> usize {
        if let Some(&i) = self.index.get(&text) {
            return i;
        }
        self.texts.push(text.clone());
        self.index.insert(text, self.texts.len() - 1);
        self.texts.len() - 1
    }
}

/// `(line number, object)` of each non-empty line of a JSON Lines file.
fn json_lines(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, serde_json::Value>)>> {
    let mut out = Vec::new();
    for (i, line) in read_lines(path)?.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(o)) => out.push((i + 1, o)),
            Ok(_) => return Err(Error::data(path, format!("line {}: expected a JSON object", i + 1))),
            Err(e) => return Err(Error::data(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

/// Field `key` of a JSON object as a string (an id may be a number); `optional` gives "" when absent.
fn field(
    path: &Path,
    line: usize,
    o: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    optional: bool,
) -> Result<String> {
    match o.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        None | Some(serde_json::Value::Null) if optional => Ok(String::new()),
        _ => Err(Error::data(path, format!("line {line}: no string field \"{key}\""))),
    }
}

/// Ids and texts of a JSON Lines file, ids unique.
fn records(path: &Path, with_title: bool) -> Result<(HashMap<String, usize>, Vec<String>)> {
    let (mut ids, mut texts) = (HashMap::new(), Vec::new());
    for (line, o) in json_lines(path)? {
        let id = field(path, line, &o, "_id", false)?;
        let text = field(path, line, &o, "text", false)?;
        let title = if with_title { field(path, line, &o, "title", true)? } else { String::new() };
        let joined = if title.trim().is_empty() { text } else { format!("{} {}", title.trim(), text) };
        if ids.insert(id.clone(), texts.len()).is_some() {
            return Err(Error::data(path, format!("line {line}: _id {id:?} appears twice")));
        }
        texts.push(joined);
    }
    if texts.is_empty() {
        return Err(Error::data(path, "no records"));
    }
    Ok((ids, texts))
}

impl Beir {
    /// Parse `NAME=DIR` and read and check the folder: malformed lines, duplicate ids and
    /// judgements naming unknown ids are errors naming the file and line.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |msg: &str| Error::Invalid(format!("--retrieval {spec}: {msg}"));
        let (name, dir) = spec.split_once('=').ok_or_else(|| bad("expected NAME=DIR (a BEIR folder)"))?;
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad("the name must be one word"));
        }
        if Task::parse(name).is_some() {
            return Err(bad("that is a built-in task's name; pick another"));
        }
        let dir = PathBuf::from(dir);
        let (doc_ids, doc_texts) = records(&dir.join("corpus.jsonl"), true)?;
        let (query_ids, mut query_texts) = records(&dir.join("queries.jsonl"), false)?;
        let qrels = dir.join("qrels").join("test.tsv");
        let mut relevant: Vec<Vec<usize>> = vec![Vec::new(); query_texts.len()];
        for (i, line) in read_lines(&qrels)?.iter().enumerate().skip(1).filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            let at = |msg: String| Error::data(&qrels, format!("line {}: {msg}", i + 1));
            if f.len() < 3 {
                return Err(at(format!(
                    "expected query-id, corpus-id, score (tab-separated), found {} fields",
                    f.len()
                )));
            }
            let q = *query_ids.get(f[0]).ok_or_else(|| at(format!("query {:?} is not in queries.jsonl", f[0])))?;
            let d = *doc_ids.get(f[1]).ok_or_else(|| at(format!("document {:?} is not in corpus.jsonl", f[1])))?;
            let score: f64 = f[2].trim().parse().map_err(|_| at(format!("score {:?} is not a number", f[2])))?;
            if score > 0.0 && !relevant[q].contains(&d) {
                relevant[q].push(d);
            }
        }
        let judged: Vec<usize> = (0..query_texts.len()).filter(|&q| !relevant[q].is_empty()).collect();
        if judged.is_empty() {
            return Err(Error::data(&qrels, "no query has a relevant document (score > 0)"));
        }
        let mut texts = Interner::default();
        let docs = doc_texts.into_iter().map(|t| texts.id(t)).collect();
        let queries = judged.iter().map(|&q| texts.id(std::mem::take(&mut query_texts[q]))).collect();
        Ok(Self {
            name: name.to_string(),
            texts: texts.texts,
            docs,
            queries,
            relevant: judged.iter().map(|&q| std::mem::take(&mut relevant[q])).collect(),
            skip_own_text: false,
        })
    }

    /// Every `--retrieval NAME=DIR`; a name given twice is an error.
    pub fn parse_all(specs: &[String]) -> Result<Vec<Self>> {
        let mut out: Vec<Self> = Vec::with_capacity(specs.len());
        for spec in specs {
            let set = Self::parse(spec)?;
            if out.iter().any(|s| s.name == set.name) {
                return Err(Error::Invalid(format!("--retrieval {spec}: the name {} is given twice", set.name)));
            }
            out.push(set);
        }
        Ok(out)
    }

    /// The scores (x 100) given the unit-vector embeddings of `texts`, row by row, `dim`
    /// values each. Where the documents are the first texts in order (every set whose
    /// documents are distinct), their rows are searched in place, not copied.
    pub fn score(&self, rows: &[f32], dim: usize) -> Result<TaskResult> {
        let start = Instant::now();
        if rows.len() != self.texts.len() * dim {
            return Err(Error::invalid(format!(
                "{}: {} embedding values for {} texts of {dim}",
                self.name,
                rows.len(),
                self.texts.len()
            )));
        }
        let gather =
            |ids: &[usize]| -> Vec<f32> { ids.iter().flat_map(|&i| &rows[i * dim..(i + 1) * dim]).copied().collect() };
        let in_place = self.docs.iter().enumerate().all(|(i, &t)| i == t);
        let copied;
        let docs = match in_place {
            true => &rows[..self.docs.len() * dim],
            false => {
                copied = gather(&self.docs);
                &copied[..]
            }
        };
        let queries = gather(&self.queries);
        let skip = |q: usize, d: usize| self.skip_own_text && self.docs[d] == self.queries[q];
        let ranked = crate::retrieval::top_k(&queries, docs, dim, 100, &skip);
        let r = crate::retrieval::score(&ranked, &self.relevant, self.docs.len());
        Ok(TaskResult {
            task: self.name.clone(),
            metrics: vec![
                ("ndcg_at_10".into(), 100.0 * r.ndcg_at_10),
                ("mrr_at_10".into(), 100.0 * r.mrr_at_10),
                ("recall_at_10".into(), 100.0 * r.recall_at_10),
                ("recall_at_100".into(), 100.0 * r.recall_at_100),
            ],
            n_train: self.docs.len(),
            n_test: self.queries.len(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn folder(qrels: &str) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"title\": \"Ships\", \"text\": \"a boat\"}\n{\"_id\": \"d2\", \"text\": \"a cat\"}\n{\"_id\": 3, \"title\": \"\", \"text\": \"rain\"}\n",
        );
        write(tmp.path(), "queries.jsonl", "{\"_id\": \"q1\", \"text\": \"sea\"}\n{\"_id\": \"q2\", \"text\": \"pets\"}\n{\"_id\": \"q3\", \"text\": \"unjudged\"}\n");
        write(tmp.path(), "qrels/test.tsv", qrels);
        tmp
    }

    /// Known answers: q1's relevant document ranks first, q2's second; unjudged queries and
    /// zero-score judgements are left out; titles are joined to texts.
    #[test]
    fn scores_a_small_folder() {
        let tmp = folder("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\t3\t0\n");
        let set = Beir::parse(&format!("mine={}", tmp.path().display())).unwrap();
        assert_eq!(set.texts, ["Ships a boat", "a cat", "rain", "sea", "pets"]);
        assert_eq!((&set.docs[..], &set.queries[..]), (&[0, 1, 2][..], &[3, 4][..]));
        assert_eq!(set.relevant, [vec![0], vec![1]]);
        let vecs: HashMap<&str, [f32; 2]> = [
            ("Ships a boat", [1.0, 0.0]),
            ("a cat", [0.0, 1.0]),
            ("rain", [0.6, 0.8]),
            ("sea", [1.0, 0.0]),
            ("pets", [0.8, 0.6]),
        ]
        .into_iter()
        .collect();
        let rows: Vec<f32> = set.texts.iter().flat_map(|t| vecs[t.as_str()]).collect();
        let r = set.score(&rows, 2).unwrap();
        // q2 ranks "Ships a boat" (0.8) and "rain" (0.96) above "a cat" (0.6): third.
        let ndcg = (1.0 + 1.0 / 4f64.log2()) / 2.0;
        assert!((r.metrics[0].1 - 100.0 * ndcg).abs() < 1e-9, "{:?}", r.metrics);
        assert!((r.metrics[1].1 - 100.0 * (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-9);
        assert_eq!((r.metrics[2].1, r.metrics[3].1), (100.0, 100.0));
    }

    /// Bad folders name the file and line before anything is embedded.
    #[test]
    fn bad_folders_name_file_and_line() {
        let cases = [
            ("query-id\tcorpus-id\tscore\nq1\tnope\t1\n", "test.tsv", "line 2: document \"nope\""),
            ("query-id\tcorpus-id\tscore\nqx\td1\t1\n", "test.tsv", "query \"qx\""),
            ("query-id\tcorpus-id\tscore\nq1\td1\n", "test.tsv", "line 2: expected"),
            ("query-id\tcorpus-id\tscore\nq1\td1\t0\n", "test.tsv", "no query has a relevant"),
        ];
        for (qrels, file, want) in cases {
            let tmp = folder(qrels);
            let err = Beir::parse(&format!("x={}", tmp.path().display())).unwrap_err().to_string();
            assert!(err.contains(file) && err.contains(want), "{err}");
        }
        let tmp = folder("query-id\tcorpus-id\tscore\nq1\td1\t1\n");
        write(tmp.path(), "corpus.jsonl", "{\"_id\": \"d1\", \"text\": \"a\"}\n{\"_id\": \"d1\", \"text\": \"b\"}\n");
        let err = Beir::parse(&format!("x={}", tmp.path().display())).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl") && err.contains("line 2") && err.contains("twice"), "{err}");
        write(tmp.path(), "corpus.jsonl", "{\"_id\": \"d1\", \"text\": \"a\"}\nnot json\n");
        let err = Beir::parse(&format!("x={}", tmp.path().display())).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl") && err.contains("line 2"), "{err}");
        let err = Beir::parse(&format!("STSB={}", tmp.path().display())).unwrap_err().to_string();
        assert!(err.contains("built-in"), "{err}");
    }
}
