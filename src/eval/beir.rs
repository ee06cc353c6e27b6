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

/// Distinct texts, numbered in first-seen order. Indexed by a 64-bit hash of the text, so each
/// text is held once; a text whose hash an earlier, different text has goes to a second index
/// keyed by the text itself.
#[derive(Default)]
pub struct Interner {
    index: HashMap<u64, usize>,
    collided: HashMap<String, usize>,
    pub texts: Vec<String>,
}

impl Interner {
    pub fn id(&mut self, text: String) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(&text);
        self.id_hashed(text, h)
    }

    fn id_hashed(&mut self, text: String, h: u64) -> usize {
        let n = self.texts.len();
        match self.index.get(&h) {
            None => {
                self.index.insert(h, n);
            }
            Some(&i) if self.texts[i] == text => return i,
            Some(_) => match self.collided.get(&text) {
                Some(&i) => return i,
                None => {
                    self.collided.insert(text.clone(), n);
                }
            },
        }
        self.texts.push(text);
        n
    }
}

/// Each non-empty line of a JSON Lines file as an object, handed to `each` with its line
/// number, one at a time: the file is streamed, never held whole (a million documents).
fn json_lines(
    path: &Path,
    each: &mut dyn FnMut(usize, serde_json::Map<String, serde_json::Value>) -> Result<()>,
) -> Result<()> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    for i in 1.. {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(|e| Error::io(path, e))? == 0 {
            break;
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|_| Error::data(path, format!("line {i}: not valid UTF-8; convert the file to UTF-8")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(o)) => each(i, o)?,
            Ok(_) => return Err(Error::data(path, format!("line {i}: expected a JSON object"))),
            Err(e) => return Err(Error::data(path, format!("line {i}: {e}"))),
        }
    }
    Ok(())
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

/// Record ids, numbered in file order, in one buffer with a 64-bit hash index (a million ids
/// cost a few bytes each, not a `String` each).
#[derive(Default)]
struct Ids {
    buf: String,
    ends: Vec<usize>,
    index: HashMap<u64, usize>,
    collided: HashMap<String, usize>,
}

impl Ids {
    fn hash(id: &str) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id)
    }

    fn at(&self, i: usize) -> &str {
        &self.buf[if i == 0 { 0 } else { self.ends[i - 1] }..self.ends[i]]
    }

    fn get(&self, id: &str) -> Option<usize> {
        match self.index.get(&Self::hash(id)) {
            Some(&i) if self.at(i) == id => Some(i),
            Some(_) => self.collided.get(id).copied(),
            None => None,
        }
    }

    /// Number `id`, or None when it was numbered before.
    fn insert(&mut self, id: &str) -> Option<usize> {
        if self.get(id).is_some() {
            return None;
        }
        let n = self.ends.len();
        match self.index.entry(Self::hash(id)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(n);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(id.to_string(), n);
            }
        }
        self.buf.push_str(id);
        self.ends.push(self.buf.len());
        Some(n)
    }
}

/// Ids and texts of a JSON Lines file, ids unique; each text numbered by `texts` as it is read.
fn records(path: &Path, with_title: bool, texts: &mut Interner) -> Result<(Ids, Vec<usize>)> {
    let (mut ids, mut rows) = (Ids::default(), Vec::new());
    json_lines(path, &mut |line, o| {
        let id = field(path, line, &o, "_id", false)?;
        let text = field(path, line, &o, "text", false)?;
        let title = if with_title { field(path, line, &o, "title", true)? } else { String::new() };
        let joined = if title.trim().is_empty() { text } else { format!("{} {}", title.trim(), text) };
        if ids.insert(&id).is_none() {
            return Err(Error::data(path, format!("line {line}: _id {id:?} appears twice")));
        }
        rows.push(texts.id(joined));
        Ok(())
    })?;
    if rows.is_empty() {
        return Err(Error::data(path, "no records"));
    }
    Ok((ids, rows))
}

/// Where a retrieval set's embeddings come from: rows by index, a range at a time (a file read
/// in place, or rows in memory).
pub trait Rows {
    fn rows(&self, first: usize, count: usize) -> Result<Vec<f32>>;
}

impl Rows for crate::embedding_file::EmbeddingRows {
    fn rows(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        crate::embedding_file::EmbeddingRows::rows(self, first, count)
    }
}

/// Rows held in memory: `.0` flat, `.1` values per row.
pub struct InMemory<'a>(pub &'a [f32], pub usize);

impl Rows for InMemory<'_> {
    fn rows(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        let d = self.1;
        self.0
            .get(first * d..(first + count) * d)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| Error::invalid(format!("rows {first}..{} of {}", first + count, self.0.len() / d.max(1))))
    }
}

/// Documents searched per read.
const DOCS_PER_READ: usize = 65536;

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
        // Documents are numbered first, so distinct documents are texts 0..n in order.
        let mut texts = Interner::default();
        let (doc_ids, docs) = records(&dir.join("corpus.jsonl"), true, &mut texts)?;
        // Queries join the table only when judged (a BEIR file may hold every split's).
        let mut asked = Interner::default();
        let (query_ids, query_texts) = records(&dir.join("queries.jsonl"), false, &mut asked)?;
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
            let q = query_ids.get(f[0]).ok_or_else(|| at(format!("query {:?} is not in queries.jsonl", f[0])))?;
            let d = doc_ids.get(f[1]).ok_or_else(|| at(format!("document {:?} is not in corpus.jsonl", f[1])))?;
            let score: f64 = f[2].trim().parse().map_err(|_| at(format!("score {:?} is not a number", f[2])))?;
            if score > 0.0 && !relevant[q].contains(&d) {
                relevant[q].push(d);
            }
        }
        let judged: Vec<usize> = (0..query_texts.len()).filter(|&q| !relevant[q].is_empty()).collect();
        if judged.is_empty() {
            return Err(Error::data(&qrels, "no query has a relevant document (score > 0)"));
        }
        let queries = judged.iter().map(|&q| texts.id(asked.texts[query_texts[q]].clone())).collect();
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
        super::parse_named("--retrieval", specs, Self::parse, |s| &s.name)
    }

    /// The scores (x 100) given the unit-vector embeddings of `texts` (row `i` is text `i`'s,
    /// `dim` values each): the queries' rows are read, then the documents' a block at a time,
    /// so memory is the queries, their hits and one block, whatever the number of documents.
    pub fn score(&self, rows: &dyn Rows, dim: usize) -> Result<TaskResult> {
        let start = Instant::now();
        let mut queries = Vec::with_capacity(self.queries.len() * dim);
        for &t in &self.queries {
            queries.extend(rows.rows(t, 1)?);
        }
        let mut search = crate::retrieval::TopK::new(&queries, dim, 100);
        let skip = |q: usize, d: usize| self.skip_own_text && self.docs[d] == self.queries[q];
        // Documents that are the first texts in order (distinct documents) are read as ranges.
        let in_place = self.docs.iter().enumerate().all(|(i, &t)| i == t);
        for first in (0..self.docs.len()).step_by(DOCS_PER_READ) {
            let count = DOCS_PER_READ.min(self.docs.len() - first);
            let block = match in_place {
                true => rows.rows(first, count)?,
                false => {
                    let mut b = Vec::with_capacity(count * dim);
                    for &t in &self.docs[first..first + count] {
                        b.extend(rows.rows(t, 1)?);
                    }
                    b
                }
            };
            search.add(&block, first, &skip);
        }
        let r = crate::retrieval::score(&search.finish(), &self.relevant, self.docs.len());
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
        let r = set.score(&InMemory(&rows, 2), 2).unwrap();
        // q2 ranks "Ships a boat" (0.8) and "rain" (0.96) above "a cat" (0.6): third.
        let ndcg = (1.0 + 1.0 / 4f64.log2()) / 2.0;
        assert!((r.metrics[0].1 - 100.0 * ndcg).abs() < 1e-9, "{:?}", r.metrics);
        assert!((r.metrics[1].1 - 100.0 * (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-9);
        assert_eq!((r.metrics[2].1, r.metrics[3].1), (100.0, 100.0));
    }

    /// Ids whose hashes collide stay distinct; a repeated id is refused.
    #[test]
    fn ids_resolve_collisions_and_refuse_repeats() {
        let mut ids = Ids::default();
        assert_eq!((ids.insert("d1"), ids.insert("d22"), ids.insert("d1")), (Some(0), Some(1), None));
        assert_eq!((ids.get("d22"), ids.get("d3")), (Some(1), None));
        // A forced collision: an entry under another id's hash goes to the second index.
        ids.index.insert(Ids::hash("zz"), 0);
        assert_eq!((ids.insert("zz"), ids.get("zz"), ids.get("d1")), (Some(2), Some(2), Some(0)));
    }

    /// Texts whose hashes collide stay distinct, and each is found again.
    #[test]
    fn interner_resolves_hash_collisions() {
        let mut t = Interner::default();
        assert_eq!((t.id_hashed("a".into(), 1), t.id_hashed("b".into(), 1), t.id_hashed("c".into(), 2)), (0, 1, 2));
        assert_eq!((t.id_hashed("b".into(), 1), t.id_hashed("a".into(), 1), t.id_hashed("c".into(), 2)), (1, 0, 2));
        assert_eq!(t.texts, ["a", "b", "c"]);
        let mut real = Interner::default();
        assert_eq!((real.id("x".into()), real.id("y".into()), real.id("x".into())), (0, 1, 0));
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
