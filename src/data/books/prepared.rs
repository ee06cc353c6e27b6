//! A corpus prepared once: sentences split and tokenized into flat, offset-indexed files, and the
//! pairs indexed, so a run starts in seconds on a corpus of any size and holds no strings.
//!
//! A prepared folder (integers little-endian):
//! - `manifest.json`: the format, the tokenizer's sha256, the pairing options, each book's
//!   source file (size, sha256) and its sentence and pair ranges, the token-length histogram.
//!   Written last, atomically: a folder without it is not (yet) a prepared corpus.
//! - `text.bin` + `text.idx` (u64, sentences + 1 offsets): every sentence's UTF-8 text.
//! - `tokens.bin` (u32 ids) + `tokens.idx` (u64, sentences + 1): the word pieces ([CLS] and
//!   [SEP] not included) of each sentence within the pairs' length limits; others are empty.
//! - `pairs.bin` (u64): each pair's first sentence (its positive is the next sentence), in book
//!   order; `pair_tokens.bin` (u8): the longer sentence's word pieces, what batches bucket by.
//! - `progress.jsonl`, while preparing: a line per finished chunk of books with their entries
//!   and the files' lengths after them, so a killed `prepare` goes on from there.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pairs::{split_books, CorpusStats, PairOptions};
use crate::error::{Error, Result};

/// Bumped when the layout or the sentence splitter changes what a folder holds.
pub const FORMAT: u32 = 1;
pub(super) const MANIFEST: &str = "manifest.json";
pub(super) const PROGRESS: &str = "progress.jsonl";
/// The data files, in the order their lengths are recorded.
pub(super) const FILES: [&str; 6] =
    ["text.bin", "text.idx", "tokens.bin", "tokens.idx", "pairs.bin", "pair_tokens.bin"];

/// How a prepared folder was made: what a run must agree with to use it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recipe {
    pub format: u32,
    /// sha256 of the tokenizer file the ids come from.
    pub tokenizer_sha256: String,
    pub cross_paragraph: bool,
    pub min_tokens: usize,
    pub max_tokens: usize,
}

impl Recipe {
    pub fn new(tokenizer_sha256: String, opts: &PairOptions) -> Self {
        let (cross_paragraph, min_tokens, max_tokens) = (opts.cross_paragraph, opts.min_tokens, opts.max_tokens);
        Self { format: FORMAT, tokenizer_sha256, cross_paragraph, min_tokens, max_tokens }
    }
}

/// One book of a prepared corpus.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BookEntry {
    pub name: String,
    /// The source file: its path, size in bytes, modification time (ns since 1970) and sha256.
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: u64,
    pub sha256: String,
    pub chapters: usize,
    pub paragraphs: usize,
    /// Its sentences `[first, end)` and pairs `[first, end)`, as global indices.
    pub sentences: [u64; 2],
    pub pairs: [u64; 2],
}

/// What `manifest.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub recipe: Recipe,
    /// The corpus path it was prepared from.
    pub source: PathBuf,
    pub books: Vec<BookEntry>,
    /// Paths the corpus walk did not follow (broken links, loops, repeats).
    pub skipped: Vec<PathBuf>,
    /// Word pieces per sentence -> sentences, over the whole corpus.
    pub token_lengths: BTreeMap<usize, usize>,
}

/// Whether `dir` is a prepared corpus (it has a manifest).
pub fn is_prepared(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// The cache folder name for `corpus` (an absolute path) prepared with `recipe`.
pub fn cache_key(corpus: &Path, recipe: &Recipe) -> String {
    use sha2::{Digest, Sha256};
    let name = corpus.file_name().map_or_else(|| "corpus".into(), |n| n.to_string_lossy().into_owned());
    let what = format!("{}\n{}", corpus.display(), serde_json::to_string(recipe).unwrap_or_default());
    let hash = format!("{:x}", Sha256::digest(what.as_bytes()));
    format!("{name}-{}", &hash[..16])
}

pub(super) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::data(&path, format!("not a prepared-corpus manifest ({e}); prepare the corpus again")))
}

/// Refuse a prepared folder made with another tokenizer, other options or another format.
pub(super) fn check_recipe(dir: &Path, found: &Recipe, wanted: &Recipe) -> Result<()> {
    let why = if found.format != wanted.format {
        format!("format {} (this hypersphere reads {})", found.format, wanted.format)
    } else if found.tokenizer_sha256 != wanted.tokenizer_sha256 {
        "another tokenizer (its sha256 differs from the model's)".to_string()
    } else if (found.cross_paragraph, found.min_tokens, found.max_tokens)
        != (wanted.cross_paragraph, wanted.min_tokens, wanted.max_tokens)
    {
        format!(
            "other pairing options (cross_paragraph {}, tokens {}..={}; the run wants {}, {}..={})",
            found.cross_paragraph,
            found.min_tokens,
            found.max_tokens,
            wanted.cross_paragraph,
            wanted.min_tokens,
            wanted.max_tokens
        )
    } else {
        return Ok(());
    };
    Err(Error::data(
        dir,
        format!("prepared with {why}; prepare the corpus again for this model and data settings (hypersphere prepare CORPUS --out NEW_DIR with the run's --config/--set)"),
    ))
}

/// How to rebuild a damaged prepared folder, for error messages.
fn rebuild(dir: &Path) -> String {
    format!(
        "the prepared corpus is damaged; prepare it again (hypersphere prepare CORPUS --out {} --force; a copy in hypersphere's cache is rebuilt when its folder is deleted)",
        dir.display()
    )
}

/// A prepared corpus, open for reading. The files are read in place by offset (`pread`), not
/// mapped: a mapping would count every page around each scattered read in the process's
/// resident memory (measured: about 20 MB more per step on the 100x corpus), while a read
/// copies only the bytes asked for and leaves the rest to the page cache.
///
/// Every read is checked (offsets in order and inside their file, pair anchors inside the
/// corpus, text UTF-8, ids below the vocabulary size when it is known): whatever the bytes, a
/// damaged folder gives an error naming the file, never a panic.
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: Vec<(File, u64)>,
    /// Ids must be below this (the model's vocabulary size), when set.
    vocab: Option<u32>,
}

impl Prepared {
    /// Open the prepared corpus in `dir`, checking it was made with `recipe`.
    pub fn open(dir: &Path, recipe: &Recipe) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        check_recipe(dir, &manifest.recipe, recipe)?;
        Self::from_files(dir, manifest)
    }

    /// Open the prepared corpus in `dir` whatever its recipe, for reading its text (its format
    /// must still be this one).
    pub fn open_any(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let same_format = Recipe { format: FORMAT, ..manifest.recipe.clone() };
        check_recipe(dir, &manifest.recipe, &same_format)?;
        Self::from_files(dir, manifest)
    }

    /// Check every id read against the model's vocabulary size.
    pub fn with_vocab(mut self, vocab_size: usize) -> Self {
        self.vocab = u32::try_from(vocab_size).ok();
        self
    }

    fn from_files(dir: &Path, manifest: Manifest) -> Result<Self> {
        let mut files = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            files.push((file, len));
        }
        let p = Self { dir: dir.to_path_buf(), manifest, files, vocab: None };
        let (sentences, pairs) = p.manifest.books.last().map_or((0, 0), |b| (b.sentences[1], b.pairs[1]));
        let want = [8 * (sentences + 1), 8 * (sentences + 1), 8 * pairs, pairs];
        for (k, (file, want)) in [1, 3, 4, 5].into_iter().zip(want).enumerate() {
            if p.files[file].1 != want {
                let what = ["sentences + 1 offsets", "sentences + 1 offsets", "pairs x 8 bytes", "pairs bytes"][k];
                return Err(p.damaged(
                    file,
                    format!("{} bytes where the manifest implies {want} ({what}; truncated?)", p.files[file].1),
                ));
            }
        }
        Ok(p)
    }

    /// An error naming data file `file` and saying how to rebuild the folder.
    fn damaged(&self, file: usize, what: impl std::fmt::Display) -> Error {
        Error::data(self.dir.join(FILES[file]), format!("{what}: {}", rebuild(&self.dir)))
    }

    /// `len` bytes of data file `file` from `offset`, which must lie inside the file.
    fn read(&self, file: usize, offset: u64, len: u64) -> Result<Vec<u8>> {
        let (handle, size) = &self.files[file];
        if offset.checked_add(len).is_none_or(|end| end > *size) {
            return Err(self.damaged(file, format!("{len} bytes at offset {offset} run past its end ({size} bytes)")));
        }
        let mut buf = vec![0u8; len as usize];
        crate::io::read_exact_at(handle, &mut buf, offset).map_err(|e| {
            Error::data(self.dir.join(FILES[file]), format!("{e}; the prepared corpus changed or the disk failed"))
        })?;
        Ok(buf)
    }

    fn u64_at(&self, file: usize, i: u64) -> Result<u64> {
        let b = self.read(file, i.saturating_mul(8), 8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// Sentence `i`'s span in data file `data` from index file `index` (in units of `unit`
    /// bytes): in order and inside the data file.
    fn span(&self, index: usize, data: usize, i: u64, unit: u64) -> Result<(u64, u64)> {
        if i >= self.sentences() {
            return Err(self.damaged(index, format!("sentence {i} asked for, the corpus has {}", self.sentences())));
        }
        let (a, b) = (self.u64_at(index, i)?, self.u64_at(index, i + 1)?);
        if a > b || b.checked_mul(unit).is_none_or(|end| end > self.files[data].1) {
            return Err(self.damaged(index, format!("sentence {i} spans {a}..{b}, outside {}", FILES[data])));
        }
        Ok((a, b))
    }

    /// Bytes of the data files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.files.iter().map(|(_, len)| len).sum()
    }

    /// Sentences in the corpus.
    pub fn sentences(&self) -> u64 {
        (self.files[1].1 / 8).saturating_sub(1)
    }

    /// Sentence `i`'s text.
    pub fn text(&self, i: u64) -> Result<String> {
        let (a, b) = self.span(1, 0, i, 1)?;
        String::from_utf8(self.read(0, a, b - a)?)
            .map_err(|e| self.damaged(0, format!("sentence {i} is not UTF-8 ({e})")))
    }

    /// Sentence `i`'s word-piece ids (empty outside the pairs' length limits).
    pub fn ids(&self, i: u64) -> Result<Vec<u32>> {
        let (a, b) = self.span(3, 2, i, 4)?;
        let bytes = self.read(2, 4 * a, 4 * (b - a))?;
        let ids: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        match (self.vocab, ids.iter().max()) {
            (Some(v), Some(&m)) if m >= v => {
                Err(self.damaged(2, format!("sentence {i} has id {m}, the vocabulary has {v} (another tokenizer?)")))
            }
            _ => Ok(ids),
        }
    }

    /// Pair `p`'s first sentence (the second is the next one).
    pub fn pair_anchor(&self, p: u64) -> Result<u64> {
        let a = self.u64_at(4, p)?;
        if a.checked_add(1).is_none_or(|b| b >= self.sentences()) {
            return Err(
                self.damaged(4, format!("pair {p} starts at sentence {a}, the corpus has {}", self.sentences()))
            );
        }
        Ok(a)
    }

    /// Pair `p`'s longer sentence's word pieces (at most 255).
    pub fn pair_tokens(&self, p: u64) -> Result<u32> {
        Ok(self.read(5, p, 1)?[0] as u32)
    }

    /// Read every sentence and pair once, checking everything the reads check: a damaged
    /// folder is found before training instead of in the middle (`pairs --stats`,
    /// `prepare --verify`).
    pub fn verify(&self) -> Result<()> {
        for i in 0..self.sentences() {
            self.text(i)?;
            self.ids(i)?;
        }
        let pairs = self.manifest.books.last().map_or(0, |b| b.pairs[1]);
        for p in 0..pairs {
            self.pair_anchor(p)?;
        }
        Ok(())
    }

    /// Counts over the first `max_books` books (None: all).
    pub fn stats(&self, max_books: Option<usize>) -> CorpusStats {
        let books = self.books(max_books);
        CorpusStats {
            books: books.len(),
            chapters: books.iter().map(|b| b.chapters).sum(),
            paragraphs: books.iter().map(|b| b.paragraphs).sum(),
            sentences: books.iter().map(|b| (b.sentences[1] - b.sentences[0]) as usize).sum(),
        }
    }

    /// The first `max_books` books (None: all).
    pub fn books(&self, max_books: Option<usize>) -> &[BookEntry] {
        let n = max_books.map_or(self.manifest.books.len(), |m| m.min(self.manifest.books.len()));
        &self.manifest.books[..n]
    }

    /// Hold out whole books for validation, as [`split_books`] chooses them.
    pub fn split(&self, max_books: Option<usize>, val_fraction: f64, seed: u64) -> Split {
        let books = self.books(max_books);
        let (train, val) = split_books(books.len(), val_fraction, seed);
        let ranges = |idx: &[usize]| PairRanges::new(idx.iter().map(|&i| books[i].pairs));
        Split {
            train: ranges(&train),
            val: ranges(&val),
            val_books: val.iter().map(|&i| books[i].name.clone()).collect(),
        }
    }
}

/// Some books' pairs as one index space: the k-th pair of the concatenation.
#[derive(Clone, Debug, Default)]
pub struct PairRanges {
    /// (first global pair, pairs before this range).
    ranges: Vec<(u64, u64)>,
    len: u64,
}

impl PairRanges {
    fn new(ranges: impl Iterator<Item = [u64; 2]>) -> Self {
        let mut out = PairRanges::default();
        for [a, b] in ranges.filter(|[a, b]| b > a) {
            out.ranges.push((a, out.len));
            out.len += b - a;
        }
        out
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The global pair index of the k-th pair (`k < len()`).
    pub fn global(&self, k: usize) -> u64 {
        let k = k as u64;
        let r = self.ranges.partition_point(|&(_, before)| before <= k).saturating_sub(1);
        let (first, before) = self.ranges.get(r).copied().unwrap_or_default();
        first + (k - before)
    }
}

/// A book-level split of a prepared corpus's pairs.
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub train: PairRanges,
    pub val: PairRanges,
    pub val_books: Vec<String>,
}
