//! Pairs and sentences from a user's file (`data.pairs`, `data.sentences`): TSV or CSV with a
//! header, JSON Lines, or Parquet (read through the `parquet` crate's Arrow reader), with
//! columns named in the config. Read, checked and tokenized once into a prepared folder in the
//! cache (keyed by the file's sha256, the tokenizer and the columns), then held in memory.
//!
//! A row with an empty or missing field is skipped and counted; so is a repeated row. A
//! missing column, invalid UTF-8 or a malformed line is an error naming the file and the line
//! (or the Parquet row).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::source::{Pair, PairIds, PairSource};
use crate::error::{Error, Result};

/// Bumped when the prepared layout changes.
const FORMAT: u32 = 1;

/// What a file holds and which columns to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wanted {
    /// Anchor and positive columns, and an optional hard-negative column (used when present).
    Pairs { anchor: String, positive: String, negative: String },
    /// One text column (a `.txt` file: one sentence per line).
    Sentences { text: String },
}

impl Wanted {
    /// The column names, required ones first; the last one is optional for pairs.
    fn columns(&self) -> Vec<&str> {
        match self {
            Wanted::Pairs { anchor, positive, negative } => vec![anchor, positive, negative],
            Wanted::Sentences { text } => vec![text],
        }
    }

    fn required(&self) -> usize {
        match self {
            Wanted::Pairs { .. } => 2,
            Wanted::Sentences { .. } => 1,
        }
    }
}

/// A file's format, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Tsv,
    Csv,
    Jsonl,
    Parquet,
    /// One text per line (sentences only).
    Lines,
}

fn format_of(path: &Path, wanted: &Wanted) -> Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    Ok(match ext.as_str() {
        "tsv" | "tab" => Format::Tsv,
        "csv" => Format::Csv,
        "jsonl" | "ndjson" | "json" => Format::Jsonl,
        "parquet" | "pq" => Format::Parquet,
        "txt" | "text" if matches!(wanted, Wanted::Sentences { .. }) => Format::Lines,
        _ => {
            let kinds = match wanted {
                Wanted::Pairs { .. } => ".tsv, .csv, .jsonl or .parquet",
                Wanted::Sentences { .. } => ".txt (one per line), .tsv, .csv, .jsonl or .parquet",
            };
            return Err(Error::data(path, format!("unknown file type `.{ext}`: name it {kinds}")));
        }
    })
}

/// What reading a file gave: each kept row's fields (the optional column's as "" when absent)
/// and what was skipped.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadCounts {
    pub rows: usize,
    pub kept: usize,
    /// Rows with an empty or missing required field, and the first few of their line numbers.
    pub empty: usize,
    pub empty_lines: Vec<usize>,
    /// Rows equal to an earlier row.
    pub duplicate: usize,
}

/// Rows of `wanted`'s columns from `path`, each with its line (or 1-based Parquet row) number.
type Rows = Vec<(usize, Vec<String>)>;

/// Read every row of `path` (any format), skipping and counting empty and repeated rows.
pub fn read_rows(path: &Path, wanted: &Wanted) -> Result<(Vec<Vec<String>>, ReadCounts)> {
    if path.is_dir() {
        return Err(Error::data(path, "is a folder; give a file (.tsv, .csv, .jsonl, .parquet)"));
    }
    let rows = match format_of(path, wanted)? {
        Format::Tsv => delimited(path, wanted, b'\t')?,
        Format::Csv => delimited(path, wanted, b',')?,
        Format::Jsonl => json_lines(path, wanted)?,
        Format::Parquet => parquet_rows(path, wanted)?,
        Format::Lines => {
            let text = super::read_text(path)?;
            text.lines().enumerate().map(|(i, l)| (i + 1, vec![l.trim().to_string()])).collect()
        }
    };
    let mut counts = ReadCounts { rows: rows.len(), ..Default::default() };
    // Repeats found by a 64-bit hash of the row, checked against the row it names (rows whose
    // hashes collide are compared in full): no second copy of every row.
    let (mut seen, mut collided) = (HashMap::<u64, usize>::new(), HashSet::<Vec<String>>::new());
    let mut kept: Vec<Vec<String>> = Vec::with_capacity(rows.len());
    for (line, fields) in rows {
        if fields[..wanted.required()].iter().any(|f| f.trim().is_empty()) {
            counts.empty += 1;
            if counts.empty_lines.len() < 5 {
                counts.empty_lines.push(line);
            }
            continue;
        }
        let repeated = match seen.entry(row_hash(&fields)) {
            Entry::Vacant(v) => {
                v.insert(kept.len());
                false
            }
            Entry::Occupied(o) => kept[*o.get()] == fields || !collided.insert(fields.clone()),
        };
        if repeated {
            counts.duplicate += 1;
            continue;
        }
        kept.push(fields);
    }
    counts.kept = kept.len();
    if kept.is_empty() {
        return Err(Error::data(
            path,
            format!("no usable rows ({} read, {} with an empty field)", counts.rows, counts.empty),
        ));
    }
    Ok((kept, counts))
}

fn row_hash(fields: &[String]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(fields)
}

/// Where each wanted column is among `header`: required ones must be there.
fn positions(path: &Path, wanted: &Wanted, header: &[String]) -> Result<Vec<Option<usize>>> {
    let cols = wanted.columns();
    let found: Vec<Option<usize>> = cols.iter().map(|c| header.iter().position(|h| h.trim() == *c)).collect();
    if let Some(k) = (0..wanted.required()).find(|&k| found[k].is_none()) {
        return Err(Error::data(
            path,
            format!(
                "no column `{}` (columns: {}); rename it, or set data.{}_column to the name the file uses",
                cols[k],
                header.join(", "),
                match (wanted, k) {
                    (Wanted::Sentences { .. }, _) => "text",
                    (_, 0) => "anchor",
                    _ => "positive",
                }
            ),
        ));
    }
    Ok(found)
}

/// TSV or CSV with a header line (quoted fields as RFC 4180 has them).
fn delimited(path: &Path, wanted: &Wanted, delimiter: u8) -> Result<Rows> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .quoting(delimiter == b',')
        .from_path(path)
        .map_err(|e| Error::data(path, e.to_string()))?;
    let bad = |e: csv::Error| {
        let line = e.position().map_or(0, |p| p.line());
        let what = match e.kind() {
            csv::ErrorKind::Utf8 { .. } => "not valid UTF-8; convert the file to UTF-8".to_string(),
            _ => e.to_string(),
        };
        Error::data(path, format!("line {line}: {what}"))
    };
    let header: Vec<String> = reader.headers().map_err(bad)?.iter().map(str::to_string).collect();
    let at = positions(path, wanted, &header)?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(bad)?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let fields = at.iter().map(|p| p.and_then(|i| record.get(i)).unwrap_or("").to_string()).collect();
        out.push((line, fields));
    }
    Ok(out)
}

/// JSON Lines: one object per line; a wanted field must be a string (or absent/null: empty).
fn json_lines(path: &Path, wanted: &Wanted) -> Result<Rows> {
    let text = super::read_text(path)?;
    let cols = wanted.columns();
    let mut out = Vec::new();
    let mut present = vec![false; cols.len()];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .map_err(|e| Error::data(path, format!("line {}: not a JSON object ({e})", i + 1)))?;
        let mut fields = Vec::with_capacity(cols.len());
        for (k, c) in cols.iter().enumerate() {
            fields.push(match object.get(*c) {
                Some(serde_json::Value::String(s)) => {
                    present[k] = true;
                    s.clone()
                }
                None | Some(serde_json::Value::Null) => String::new(),
                Some(other) => {
                    return Err(Error::data(path, format!("line {}: field `{c}` is {other}, not a string", i + 1)))
                }
            });
        }
        out.push((i + 1, fields));
    }
    if let Some(k) = (0..wanted.required()).find(|&k| !present[k]) {
        return Err(Error::data(
            path,
            format!("no line has a field `{}`; rename it, or set the column's name in [data]", cols[k]),
        ));
    }
    Ok(out)
}

/// Parquet through Arrow: the wanted columns as strings (Utf8, LargeUtf8 or Utf8View).
fn parquet_rows(path: &Path, wanted: &Wanted) -> Result<Rows> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: &dyn std::fmt::Display| Error::data(path, format!("not a readable Parquet file: {e}"));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(&e))?;
    let header: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    let at = positions(path, wanted, &header)?;
    let reader = builder.with_batch_size(65536).build().map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let first = out.len();
        let mut columns: Vec<Vec<String>> = Vec::new();
        for (k, p) in at.iter().enumerate() {
            let Some(i) = *p else {
                columns.push(vec![String::new(); batch.num_rows()]);
                continue;
            };
            let col = batch.column(i);
            let value = |r: usize| -> Option<String> {
                if col.is_null(r) {
                    return Some(String::new());
                }
                match col.data_type() {
                    arrow_schema::DataType::Utf8 => Some(col.as_string::<i32>().value(r).to_string()),
                    arrow_schema::DataType::LargeUtf8 => Some(col.as_string::<i64>().value(r).to_string()),
                    arrow_schema::DataType::Utf8View => Some(col.as_string_view().value(r).to_string()),
                    _ => None,
                }
            };
            let mut values = Vec::with_capacity(batch.num_rows());
            for r in 0..batch.num_rows() {
                values.push(value(r).ok_or_else(|| {
                    Error::data(
                        path,
                        format!("column `{}` holds {}, not strings", wanted.columns()[k], col.data_type()),
                    )
                })?);
            }
            columns.push(values);
        }
        for r in 0..batch.num_rows() {
            out.push((first + r + 1, columns.iter().map(|c| c[r].clone()).collect()));
        }
    }
    Ok(out)
}

/// How a file's examples were prepared: what a run must agree with to reuse them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub source: PathBuf,
    pub source_sha256: String,
    pub tokenizer_sha256: String,
    pub wanted: Wanted,
    /// Texts per example: 1 (sentences), 2 (pairs) or 3 (pairs with hard negatives).
    pub per_example: usize,
    pub examples: usize,
    pub counts: ReadCounts,
    /// Seconds spent reading and checking the file, and tokenizing its texts, when prepared.
    pub read_s: f64,
    pub tokenize_s: f64,
}

/// A file's examples, tokenized, in memory: texts and word-piece ids ([CLS]/[SEP] not
/// included), `per_example` of each per example.
pub struct Examples {
    pub manifest: Manifest,
    text: Vec<u8>,
    text_ends: Vec<u64>,
    ids: Vec<u32>,
    id_ends: Vec<u64>,
}

const FILES: [&str; 4] = ["text.bin", "text.idx", "tokens.bin", "tokens.idx"];

impl Examples {
    /// The examples of `path`: from the prepared folder under `cache` when one matches the
    /// file's content, the tokenizer and the columns, else read, tokenized and prepared there
    /// (into a temporary folder renamed at the end: a killed run leaves no half folder).
    pub fn open(
        path: &Path,
        wanted: &Wanted,
        cache: &Path,
        tokenizer_sha256: &str,
        encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
    ) -> Result<Self> {
        let source_sha256 = crate::io::sha256_file(path)?;
        let key = {
            use sha2::{Digest, Sha256};
            let what = format!("{FORMAT}|{source_sha256}|{tokenizer_sha256}|{wanted:?}");
            format!("{:x}", Sha256::digest(what.as_bytes()))
        };
        let stem = path.file_stem().map_or_else(|| "data".into(), |s| s.to_string_lossy().into_owned());
        let dir = cache.join(format!("{stem}-{}", &key[..16]));
        if let Ok(ex) = Self::load(&dir) {
            if ex.manifest.source_sha256 == source_sha256 && ex.manifest.tokenizer_sha256 == tokenizer_sha256 {
                return Ok(ex);
            }
        }
        let t0 = std::time::Instant::now();
        let (rows, counts) = read_rows(path, wanted)?;
        let read_s = t0.elapsed().as_secs_f64();
        let per = match wanted {
            Wanted::Sentences { .. } => 1,
            Wanted::Pairs { .. } if rows.iter().all(|r| !r[2].trim().is_empty()) => 3,
            Wanted::Pairs { .. } => 2,
        };
        let manifest = Manifest {
            format: FORMAT,
            source: path.to_path_buf(),
            source_sha256,
            tokenizer_sha256: tokenizer_sha256.to_string(),
            wanted: wanted.clone(),
            per_example: per,
            examples: rows.len(),
            counts,
            read_s,
            tokenize_s: 0.0,
        };
        let mut ex = Self::from_parts(manifest, &[], Vec::new());
        // Tokenized a chunk at a time into the flat arrays: no per-text id vector for the file.
        for (c, chunk) in rows.chunks(16384).enumerate() {
            let texts: Vec<&str> = chunk.iter().flat_map(|r| r[..per].iter().map(String::as_str)).collect();
            ex.append(&texts, tokenize(path, &texts, encode, c * 16384 * per)?);
        }
        ex.manifest.tokenize_s = t0.elapsed().as_secs_f64() - read_s;
        drop(rows);
        ex.save(&dir)?;
        Ok(ex)
    }

    fn from_parts(manifest: Manifest, texts: &[&str], ids: Vec<Vec<u32>>) -> Self {
        let mut ex = Self { manifest, text: Vec::new(), text_ends: Vec::new(), ids: Vec::new(), id_ends: Vec::new() };
        ex.append(texts, ids);
        ex
    }

    /// Append texts and their ids.
    fn append(&mut self, texts: &[&str], ids: Vec<Vec<u32>>) {
        for (t, i) in texts.iter().zip(ids) {
            self.text.extend_from_slice(t.as_bytes());
            self.text_ends.push(self.text.len() as u64);
            self.ids.extend(i);
            self.id_ends.push(self.ids.len() as u64);
        }
    }

    /// Write the folder under a temporary name, then rename it into place.
    fn save(&self, dir: &Path) -> Result<()> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // Streamed through a buffer: no second copy of the data in memory.
        let write = |name: &str, each: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>| -> Result<()> {
            use std::io::Write;
            let path = tmp.join(name);
            let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            let mut w = std::io::BufWriter::new(file);
            each(&mut w).and_then(|_| w.flush()).map_err(|e| Error::io(&path, e))
        };
        write(FILES[0], &mut |w| w.write_all(&self.text))?;
        write(FILES[1], &mut |w| self.text_ends.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())))?;
        write(FILES[2], &mut |w| self.ids.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())))?;
        write(FILES[3], &mut |w| self.id_ends.iter().try_for_each(|x| w.write_all(&x.to_le_bytes())))?;
        crate::io::write_json(&tmp.join("manifest.json"), &self.manifest)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    }

    /// A prepared folder, checked: every offset in order and inside its data, the text UTF-8.
    fn load(dir: &Path) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json")).map_err(|e| Error::io(dir.join("manifest.json"), e))?,
        )
        .map_err(|e| Error::data(dir.join("manifest.json"), e.to_string()))?;
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::io(dir.join(name), e));
        let u64s = |b: Vec<u8>| {
            b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect::<Vec<u64>>()
        };
        let text = read(FILES[0])?;
        let text_ends = u64s(read(FILES[1])?);
        let ids: Vec<u32> =
            read(FILES[2])?.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let id_ends = u64s(read(FILES[3])?);
        let n = manifest.examples * manifest.per_example;
        let ordered = |ends: &[u64], len: usize| {
            ends.len() == n && ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|&e| e as usize == len)
        };
        if manifest.format != FORMAT
            || !ordered(&text_ends, text.len())
            || !ordered(&id_ends, ids.len())
            || std::str::from_utf8(&text).is_err()
        {
            return Err(Error::data(dir, "damaged or from another version; it is prepared again"));
        }
        Ok(Self { manifest, text, text_ends, ids, id_ends })
    }

    fn span(ends: &[u64], i: usize) -> std::ops::Range<usize> {
        (if i == 0 { 0 } else { ends[i - 1] as usize })..ends[i] as usize
    }

    /// Text `j` of example `k`.
    pub fn text(&self, k: usize, j: usize) -> &str {
        let r = Self::span(&self.text_ends, k * self.manifest.per_example + j);
        std::str::from_utf8(&self.text[r]).unwrap_or_default()
    }

    /// Word-piece ids of text `j` of example `k`.
    pub fn ids(&self, k: usize, j: usize) -> &[u32] {
        &self.ids[Self::span(&self.id_ends, k * self.manifest.per_example + j)]
    }

    pub fn len(&self) -> usize {
        self.manifest.examples
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.examples == 0
    }

    /// Examples held out by a stable hash of the anchor's text: the same anchor is held out
    /// whatever the file's order or the seed. `(train, val)` example indices, in file order.
    pub fn split(&self, val_fraction: f64) -> (Vec<usize>, Vec<usize>) {
        use sha2::{Digest, Sha256};
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for k in 0..self.len() {
            let h = Sha256::digest(self.text(k, 0).as_bytes());
            let u = u64::from_le_bytes(h[..8].try_into().unwrap_or_default()) as f64 / 2f64.powi(64);
            if u < val_fraction {
                val.push(k)
            } else {
                train.push(k)
            }
        }
        (train, val)
    }
}

/// Every text's word pieces on every core; a text the tokenizer refuses is named by its
/// number in the file (`first`: the number of texts before these).
fn tokenize(
    path: &Path,
    texts: &[&str],
    encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
    first: usize,
) -> Result<Vec<Vec<u32>>> {
    use rayon::prelude::*;
    let ids: Vec<Option<Vec<u32>>> = texts.par_iter().map(|t| encode(t)).collect();
    ids.into_iter()
        .enumerate()
        .map(|(i, x)| x.ok_or_else(|| Error::data(path, format!("text {} cannot be tokenized", first + i + 1))))
        .collect()
}

/// Some examples of a file as a pair source: a sentence is its own positive (the dropout view
/// or the teacher gives the second view).
pub struct FilePairs<'a> {
    pub examples: &'a Examples,
    pub rows: &'a [usize],
}

impl FilePairs<'_> {
    fn positive_slot(&self) -> usize {
        usize::from(self.examples.manifest.per_example > 1)
    }
}

impl PairSource for FilePairs<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn has_negatives(&self) -> bool {
        self.examples.manifest.per_example == 3
    }

    fn ids(&self, k: usize) -> Result<PairIds> {
        let (e, r) = (self.examples, self.rows[k]);
        Ok(PairIds {
            anchor: e.ids(r, 0).to_vec(),
            positive: e.ids(r, self.positive_slot()).to_vec(),
            negative: self.has_negatives().then(|| e.ids(r, 2).to_vec()),
        })
    }

    fn max_tokens(&self, k: usize) -> Result<usize> {
        let (e, r) = (self.examples, self.rows[k]);
        Ok((0..e.manifest.per_example).map(|j| e.ids(r, j).len()).max().unwrap_or(0).min(255))
    }

    fn pair(&self, k: usize) -> Result<Pair> {
        let (e, r) = (self.examples, self.rows[k]);
        let mut p = Pair::new(e.text(r, 0), e.text(r, self.positive_slot()));
        p.negative = self.has_negatives().then(|| e.text(r, 2).into());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Wanted {
        Wanted::Pairs { anchor: "anchor".into(), positive: "positive".into(), negative: "negative".into() }
    }

    fn read(name: &str, bytes: &[u8]) -> Result<(Vec<Vec<String>>, ReadCounts)> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        read_rows(&path, &pairs())
    }

    /// TSV, CSV (quoted fields) and JSON Lines give the same rows; empty fields and repeated
    /// rows are skipped and counted, with the lines of the empty ones.
    #[test]
    fn formats_agree_and_skips_are_counted() {
        let tsv = read("a.tsv", b"positive\tanchor\nb one\ta one\n\ta two\nb one\ta one\nb three\ta three\n").unwrap();
        let csv =
            read("a.csv", b"anchor,positive\n\"a one\",b one\na two,\n\"a one\",\"b one\"\na three,b three\n").unwrap();
        let jsonl = read(
            "a.jsonl",
            b"\n{\"anchor\": \"a one\", \"positive\": \"b one\"}\n{\"anchor\": \"a two\"}\n{\"anchor\": \"a one\", \"positive\": \"b one\"}\n{\"anchor\": \"a three\", \"positive\": \"b three\", \"negative\": null}\n",
        )
        .unwrap();
        let want = vec![
            vec!["a one".to_string(), "b one".into(), String::new()],
            vec!["a three".into(), "b three".into(), String::new()],
        ];
        for (rows, counts) in [tsv, csv, jsonl] {
            assert_eq!(rows, want);
            assert_eq!((counts.rows, counts.kept, counts.empty, counts.duplicate), (4, 2, 1, 1), "{counts:?}");
            assert_eq!(counts.empty_lines, [3]);
        }
    }

    /// Bad files are errors naming the file and what to do, or the line.
    #[test]
    fn bad_files_name_the_file_and_line() {
        let cases: [(&str, &[u8], &str); 6] = [
            ("m.tsv", b"anchor\tother\nx\ty\n", "no column `positive` (columns: anchor, other)"),
            ("u.csv", b"anchor,positive\nok,fine\nbad \xff,x\n", "line 3: not valid UTF-8"),
            ("j.jsonl", b"{\"anchor\": \"a\", \"positive\": \"b\"}\n{oops\n", "line 2: not a JSON object"),
            ("n.jsonl", b"{\"anchor\": \"a\", \"positive\": 3}\n", "line 1: field `positive` is 3, not a string"),
            ("e.tsv", b"anchor\tpositive\n\tb\n", "no usable rows"),
            ("x.xlsx", b"whatever", "unknown file type `.xlsx`"),
        ];
        for (name, bytes, want) in cases {
            let err = read(name, bytes).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        }
        let err = read("p.parquet", b"PAR1 not really").unwrap_err().to_string();
        assert!(err.contains("p.parquet") && err.contains("not a readable Parquet file"), "{err}");
    }

    /// The held-out share is decided by the anchor's text alone: the same anchors are held out
    /// whatever the order of the file, about `val_fraction` of them.
    #[test]
    fn the_split_follows_the_anchor_text() {
        let texts: Vec<String> = (0..400).map(|k| format!("sentence {k}")).collect();
        let make = |order: &[usize]| {
            let flat: Vec<&str> = order.iter().flat_map(|&k| [texts[k].as_str(), "p"]).collect();
            let m = Manifest {
                format: FORMAT,
                source: PathBuf::new(),
                source_sha256: String::new(),
                tokenizer_sha256: String::new(),
                wanted: pairs(),
                per_example: 2,
                examples: order.len(),
                counts: ReadCounts::default(),
                read_s: 0.0,
                tokenize_s: 0.0,
            };
            let ex = Examples::from_parts(m, &flat, vec![vec![1]; flat.len()]);
            let (_, val) = ex.split(0.1);
            let mut held: Vec<String> = val.iter().map(|&k| ex.text(k, 0).to_string()).collect();
            held.sort();
            held
        };
        let forward: Vec<usize> = (0..400).collect();
        let backward: Vec<usize> = (0..400).rev().collect();
        let (a, b) = (make(&forward), make(&backward));
        assert_eq!(a, b);
        assert!((20..=60).contains(&a.len()), "{}", a.len());
    }
}
