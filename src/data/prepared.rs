//! A corpus prepared once: sentences split and tokenized into memory-mapped files, and the
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
//! - `progress.json`, while preparing: the books done and the files' lengths after them, so a
//!   killed `prepare` goes on from there.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::corpus::{parse_book, walk_books};
use super::pairs::{pair_indices, split_books, CorpusStats, PairOptions};
use crate::error::{Error, Result};

/// Bumped when the layout or the sentence splitter changes what a folder holds.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const PROGRESS: &str = "progress.json";
/// The data files, in the order their lengths are recorded.
const FILES: [&str; 6] = ["text.bin", "text.idx", "tokens.bin", "tokens.idx", "pairs.bin", "pair_tokens.bin"];

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

/// A killed prepare's state: the books written and each data file's length after them.
#[derive(Serialize, Deserialize)]
struct Progress {
    recipe: Recipe,
    /// The book files to prepare (path, size), so a changed corpus starts over.
    files: Vec<(PathBuf, u64)>,
    books: Vec<BookEntry>,
    lengths: [u64; 6],
    token_lengths: BTreeMap<usize, usize>,
}

/// Whether `dir` is a prepared corpus (it has a manifest).
pub fn is_prepared(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// A file's modification time in nanoseconds since 1970 (0 where the OS has none).
fn modified_ns(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let since = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(since.map_or(0, |d| d.as_nanos() as u64))
}

/// The cache folder name for `corpus` (an absolute path) prepared with `recipe`.
pub fn cache_key(corpus: &Path, recipe: &Recipe) -> String {
    use sha2::{Digest, Sha256};
    let name = corpus.file_name().map_or_else(|| "corpus".into(), |n| n.to_string_lossy().into_owned());
    let what = format!("{}\n{}", corpus.display(), serde_json::to_string(recipe).unwrap_or_default());
    let hash = format!("{:x}", Sha256::digest(what.as_bytes()));
    format!("{name}-{}", &hash[..16])
}

/// Delete a cached prepared corpus whose source books changed (added, removed, resized or
/// modified since), so that it is prepared again; a folder being prepared is left alone.
pub fn discard_if_stale(dir: &Path) -> Result<()> {
    let Ok(m) = read_manifest(dir) else { return Ok(()) };
    let now: Option<Vec<(PathBuf, u64, u64)>> = walk_books(&m.source).ok().and_then(|w| {
        w.files
            .into_iter()
            .map(|p| {
                let size = std::fs::metadata(&p).ok()?.len();
                let modified = modified_ns(&p).ok()?;
                Some((p, size, modified))
            })
            .collect()
    });
    let then: Vec<(PathBuf, u64, u64)> = m.books.iter().map(|b| (b.path.clone(), b.bytes, b.modified)).collect();
    if now.as_ref() != Some(&then) {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// One book split and tokenized, ready to append.
struct BookData {
    entry: BookEntry,
    texts: Vec<std::sync::Arc<str>>,
    /// Ids of the sentences within the length limits (None: outside them).
    ids: Vec<Option<Vec<u32>>>,
    /// (first sentence within the book, longer sentence's word pieces).
    pairs: Vec<(usize, u32)>,
    token_lengths: BTreeMap<usize, usize>,
}

/// Read, split and tokenize one book file.
fn process_book(
    path: &Path,
    opts: &PairOptions,
    encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
) -> Result<BookData> {
    use sha2::{Digest, Sha256};
    let modified = modified_ns(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (sha256, size) = (format!("{:x}", Sha256::digest(&bytes)), bytes.len() as u64);
    let text = super::text_from_bytes(path, bytes)?;
    let name = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let book = parse_book(&name, path, &text)?;
    let stats = super::pairs::corpus_stats(std::slice::from_ref(&book));
    let mut token_lengths = BTreeMap::new();
    let (mut texts, mut ids) = (Vec::with_capacity(stats.sentences), Vec::with_capacity(stats.sentences));
    let pairs = pair_indices(&book, opts, &mut |s| {
        let encoded = encode(s);
        let n = encoded.as_ref().map_or(usize::MAX, Vec::len);
        *token_lengths.entry(n).or_default() += 1;
        texts.push(s.clone());
        ids.push(encoded.filter(|_| (opts.min_tokens..=opts.max_tokens).contains(&n)));
        n
    });
    let entry = BookEntry {
        name,
        path: path.to_path_buf(),
        bytes: size,
        modified,
        sha256,
        chapters: stats.chapters,
        paragraphs: stats.paragraphs,
        sentences: [0, 0],
        pairs: [0, 0],
    };
    Ok(BookData { entry, texts, ids, pairs, token_lengths })
}

/// Appends books to the data files, tracking global sentence and pair counts.
struct Writer {
    files: Vec<BufWriter<File>>,
    lengths: [u64; 6],
    sentences: u64,
    pairs: u64,
    tokens: u64,
}

impl Writer {
    /// Open the data files in `dir` at `lengths` (truncating anything after: a killed run's
    /// partial chunk), or empty ones.
    fn open(dir: &Path, lengths: [u64; 6]) -> Result<Self> {
        let mut files = Vec::new();
        for (name, &len) in FILES.iter().zip(&lengths) {
            let path = dir.join(name);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            file.set_len(len).map_err(|e| Error::io(&path, e))?;
            files.push(BufWriter::with_capacity(1 << 20, file));
        }
        let mut w = Self { files, lengths, sentences: 0, pairs: lengths[4] / 8, tokens: lengths[2] / 4 };
        if lengths == [0; 6] {
            // Each index starts with offset 0.
            w.put(1, &0u64.to_le_bytes())?;
            w.put(3, &0u64.to_le_bytes())?;
        }
        w.sentences = w.lengths[1] / 8 - 1;
        Ok(w)
    }

    fn put(&mut self, file: usize, bytes: &[u8]) -> Result<()> {
        self.files[file].write_all(bytes).map_err(|e| Error::io(Path::new(FILES[file]), e))?;
        self.lengths[file] += bytes.len() as u64;
        Ok(())
    }

    /// Append one book; returns its entry with global ranges.
    fn book(&mut self, b: BookData) -> Result<BookEntry> {
        let first = self.sentences;
        for (text, ids) in b.texts.iter().zip(&b.ids) {
            self.put(0, text.as_bytes())?;
            self.put(1, &self.lengths[0].to_le_bytes())?;
            for id in ids.iter().flatten() {
                self.put(2, &id.to_le_bytes())?;
                self.tokens += 1;
            }
            self.put(3, &self.tokens.to_le_bytes())?;
            self.sentences += 1;
        }
        let first_pair = self.pairs;
        for &(s, n) in &b.pairs {
            self.put(4, &(first + s as u64).to_le_bytes())?;
            self.put(5, &[n.min(255) as u8])?;
            self.pairs += 1;
        }
        Ok(BookEntry { sentences: [first, self.sentences], pairs: [first_pair, self.pairs], ..b.entry })
    }

    fn flush(&mut self) -> Result<()> {
        for (f, name) in self.files.iter_mut().zip(FILES) {
            f.flush().map_err(|e| Error::io(Path::new(name), e))?;
        }
        Ok(())
    }
}

/// Split and tokenize the books under `corpus` into `dir`, a few books at a time in parallel;
/// `encode` gives a sentence's word-piece ids (None when it cannot be tokenized). A folder
/// already holding this corpus with this recipe is returned as it is; one holding another
/// recipe is refused. After a kill, the next call goes on from the last finished chunk.
/// `progress(books done, books)` is called after each chunk.
pub fn prepare(
    corpus: &Path,
    dir: &Path,
    recipe: &Recipe,
    opts: &PairOptions,
    encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    use rayon::prelude::*;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _lock = lock(dir)?;
    if is_prepared(dir) {
        let m = read_manifest(dir)?;
        check_recipe(dir, &m.recipe, recipe)?;
        return Ok(m);
    }
    let walk = walk_books(corpus)?;
    let files = walk
        .files
        .iter()
        .map(|p| Ok((p.clone(), std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len())))
        .collect::<Result<Vec<_>>>()?;
    let resumed = read_progress(dir).filter(|p| p.recipe == *recipe && p.files == files);
    let (mut books, lengths, mut token_lengths) = match resumed {
        Some(p) => (p.books, p.lengths, p.token_lengths),
        None => (Vec::new(), [0; 6], BTreeMap::new()),
    };
    let mut writer = Writer::open(dir, lengths)?;
    let chunk = 4 * rayon::current_num_threads().max(1);
    for paths in walk.files[books.len()..].chunks(chunk) {
        let done = paths.par_iter().map(|p| process_book(p, opts, encode)).collect::<Result<Vec<_>>>()?;
        for b in done {
            for (&n, &c) in &b.token_lengths {
                *token_lengths.entry(n).or_default() += c;
            }
            books.push(writer.book(b)?);
        }
        writer.flush()?;
        let p = Progress {
            recipe: recipe.clone(),
            files: files.clone(),
            books: books.clone(),
            lengths: writer.lengths,
            token_lengths: token_lengths.clone(),
        };
        crate::atomic::write_atomic(&dir.join(PROGRESS), &json(&p)?)?;
        progress(books.len(), files.len());
    }
    let manifest =
        Manifest { recipe: recipe.clone(), source: corpus.to_path_buf(), books, skipped: walk.skipped, token_lengths };
    crate::atomic::write_atomic(&dir.join(MANIFEST), &json(&manifest)?)?;
    let _ = std::fs::remove_file(dir.join(PROGRESS));
    Ok(manifest)
}

/// Hold `dir`'s lock file, waiting for another process preparing the same folder to finish.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("waiting for another process preparing {}", dir.display());
            file.lock().map_err(|e| Error::io(&path, e))?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    Ok(file)
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::Invalid(format!("serializing a manifest: {e}")))
}

fn read_progress(dir: &Path) -> Option<Progress> {
    serde_json::from_slice(&std::fs::read(dir.join(PROGRESS)).ok()?).ok()
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::data(&path, format!("not a prepared-corpus manifest ({e}); prepare the corpus again")))
}

/// Refuse a prepared folder made with another tokenizer, other options or another format.
fn check_recipe(dir: &Path, found: &Recipe, wanted: &Recipe) -> Result<()> {
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

/// A prepared corpus, mapped.
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    maps: Vec<Mmap>,
}

impl Prepared {
    /// Map the prepared corpus in `dir`, checking it was made with `recipe`.
    pub fn open(dir: &Path, recipe: &Recipe) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        check_recipe(dir, &manifest.recipe, recipe)?;
        Self::map(dir, manifest)
    }

    /// Map the prepared corpus in `dir` whatever its recipe, for reading its text (its format
    /// must still be this one).
    pub fn open_any(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let same_format = Recipe { format: FORMAT, ..manifest.recipe.clone() };
        check_recipe(dir, &manifest.recipe, &same_format)?;
        Self::map(dir, manifest)
    }

    fn map(dir: &Path, manifest: Manifest) -> Result<Self> {
        let mut maps = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // Safety: the files are written once, before the manifest, and never modified after.
            maps.push(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?);
        }
        let p = Self { dir: dir.to_path_buf(), manifest, maps };
        let (sentences, pairs) = p.manifest.books.last().map_or((0, 0), |b| (b.sentences[1], b.pairs[1]));
        let sizes = [p.maps[1].len() as u64, p.maps[3].len() as u64, p.maps[4].len() as u64, p.maps[5].len() as u64];
        if sizes != [8 * (sentences + 1), 8 * (sentences + 1), 8 * pairs, pairs] {
            return Err(Error::data(
                dir,
                "the data files do not match the manifest (truncated?); prepare the corpus again",
            ));
        }
        Ok(p)
    }

    fn u64_at(&self, file: usize, i: u64) -> u64 {
        let at = 8 * i as usize;
        u64::from_le_bytes(self.maps[file][at..at + 8].try_into().expect("8 bytes"))
    }

    /// Bytes of the data files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Sentences in the corpus.
    pub fn sentences(&self) -> u64 {
        self.maps[1].len() as u64 / 8 - 1
    }

    /// Sentence `i`'s text.
    pub fn text(&self, i: u64) -> &str {
        let (a, b) = (self.u64_at(1, i) as usize, self.u64_at(1, i + 1) as usize);
        // Written from a `str`, sentence by sentence.
        std::str::from_utf8(&self.maps[0][a..b]).unwrap_or("")
    }

    /// Sentence `i`'s word-piece ids (empty outside the pairs' length limits).
    pub fn ids(&self, i: u64) -> Vec<u32> {
        let (a, b) = (self.u64_at(3, i) as usize, self.u64_at(3, i + 1) as usize);
        self.maps[2][4 * a..4 * b].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    /// Pair `p`'s first sentence (the second is the next one).
    pub fn pair_anchor(&self, p: u64) -> u64 {
        self.u64_at(4, p)
    }

    /// Pair `p`'s longer sentence's word pieces (at most 255).
    pub fn pair_tokens(&self, p: u64) -> u32 {
        self.maps[5][p as usize] as u32
    }

    /// Counts over the first `max_books` books (0: all).
    pub fn stats(&self, max_books: usize) -> CorpusStats {
        let books = self.books(max_books);
        CorpusStats {
            books: books.len(),
            chapters: books.iter().map(|b| b.chapters).sum(),
            paragraphs: books.iter().map(|b| b.paragraphs).sum(),
            sentences: books.iter().map(|b| (b.sentences[1] - b.sentences[0]) as usize).sum(),
        }
    }

    /// The first `max_books` books (0: all).
    pub fn books(&self, max_books: usize) -> &[BookEntry] {
        let n = if max_books == 0 { self.manifest.books.len() } else { max_books.min(self.manifest.books.len()) };
        &self.manifest.books[..n]
    }

    /// Hold out whole books for validation, as [`split_books`] chooses them.
    pub fn split(&self, max_books: usize, val_fraction: f64, seed: u64) -> Split {
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

    /// The global pair index of the k-th pair.
    pub fn global(&self, k: usize) -> u64 {
        let k = k as u64;
        let r = self.ranges.partition_point(|&(_, before)| before <= k) - 1;
        let (first, before) = self.ranges[r];
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

/// Some pairs of a prepared corpus by index (`0..len()`): a training or held-out set.
#[derive(Clone, Copy)]
pub struct PairView<'a> {
    pub corpus: &'a Prepared,
    pub ranges: &'a PairRanges,
}

impl PairView<'_> {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Pair `k`'s longer sentence's word pieces (at most 255): what batches bucket by.
    pub fn max_tokens(&self, k: usize) -> usize {
        self.corpus.pair_tokens(self.ranges.global(k)) as usize
    }

    /// Pair `k`'s two sentences' word-piece ids ([CLS]/[SEP] not included).
    pub fn ids(&self, k: usize) -> [Vec<u32>; 2] {
        let a = self.corpus.pair_anchor(self.ranges.global(k));
        [self.corpus.ids(a), self.corpus.ids(a + 1)]
    }

    /// Pair `k` as text.
    pub fn pair(&self, k: usize) -> super::pairs::Pair {
        let a = self.corpus.pair_anchor(self.ranges.global(k));
        let [x, y] = [a, a + 1].map(|i| self.corpus.ids(i).len() as u32);
        super::pairs::Pair {
            anchor: self.corpus.text(a).into(),
            positive: self.corpus.text(a + 1).into(),
            tokens: [x, y],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::read_book;

    /// `n` small books of generated text: chapters, paragraphs, sentences of varied length.
    fn books(dir: &Path, n: usize) -> PathBuf {
        let root = dir.join("books");
        std::fs::create_dir_all(&root).unwrap();
        for b in 0..n {
            let mut text = String::new();
            for c in 0..2 {
                if c > 0 {
                    text += "\nCHAPTER TWO\n";
                }
                for p in 0..3 {
                    let sentences: Vec<String> = (0..4)
                        .map(|s| format!("Book {b} part {c} says {} things here.", "many ".repeat((b + p + s) % 5)))
                        .collect();
                    text += &(sentences.join(" ") + "\n");
                }
            }
            std::fs::write(root.join(format!("book{b:02}.txt")), text).unwrap();
        }
        root
    }

    fn words(s: &str) -> Option<Vec<u32>> {
        Some(s.split_whitespace().map(|w| w.len() as u32).collect())
    }

    fn opts() -> PairOptions {
        PairOptions { min_tokens: 1, max_tokens: 8, ..Default::default() }
    }

    fn recipe() -> Recipe {
        Recipe::new("tok".into(), &opts())
    }

    /// Every book's sentences, ids and pairs read back as the in-memory reader makes them.
    #[test]
    fn prepared_corpus_matches_the_books() {
        let tmp = tempfile::tempdir().unwrap();
        let root = books(tmp.path(), 5);
        let dir = tmp.path().join("prepared");
        prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        let p = Prepared::open(&dir, &recipe()).unwrap();
        assert_eq!(p.manifest.books.len(), 5);
        for (entry, file) in p.manifest.books.iter().zip(walk_books(&root).unwrap().files) {
            let book = read_book(&file).unwrap();
            let texts: Vec<String> =
                book.chapters.iter().flat_map(|c| c.paragraphs.iter().flatten()).map(|s| s.to_string()).collect();
            let [first, end] = entry.sentences;
            assert_eq!(end - first, texts.len() as u64);
            for (i, t) in texts.iter().enumerate() {
                let at = first + i as u64;
                assert_eq!(p.text(at), t);
                let n = words(t).unwrap().len();
                let want = if (1..=8).contains(&n) { words(t).unwrap() } else { Vec::new() };
                assert_eq!(p.ids(at), want, "{t}");
            }
            let want = pair_indices(&book, &opts(), &mut |s| words(s).unwrap().len());
            let got: Vec<(usize, u32)> = (entry.pairs[0]..entry.pairs[1])
                .map(|g| ((p.pair_anchor(g) - first) as usize, p.pair_tokens(g)))
                .collect();
            assert_eq!(got, want);
            assert!(!got.is_empty());
        }
        // The split holds out whole books; the views count the books' pairs.
        let split = p.split(0, 0.4, 3);
        assert_eq!(split.val_books.len(), 2);
        let total: u64 = p.manifest.books.iter().map(|b| b.pairs[1] - b.pairs[0]).sum();
        assert_eq!((split.train.len() + split.val.len()) as u64, total);
        let val = PairView { corpus: &p, ranges: &split.val };
        let held: Vec<String> =
            split.val_books.iter().map(|n| format!("Book {} ", n[4..].parse::<usize>().unwrap())).collect();
        assert!(!val.is_empty());
        for k in 0..val.len() {
            let pair = val.pair(k);
            assert!(held.iter().any(|h| pair.anchor.starts_with(h.as_str()) && pair.positive.starts_with(h.as_str())));
        }
    }

    /// A prepare stopped after its first chunk of books goes on from there and writes exactly
    /// what an uninterrupted one writes.
    #[test]
    fn a_killed_prepare_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = books(tmp.path(), 4 * rayon::current_num_threads().max(1) * 2 + 3);
        let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
        prepare(&root, &whole, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prepare(&root, &cut, &recipe(), &opts(), &words, &mut |done, _| panic!("killed after {done} books"))
        }));
        assert!(stopped.is_err());
        assert!(!is_prepared(&cut) && cut.join(PROGRESS).is_file());
        let mut calls = Vec::new();
        prepare(&root, &cut, &recipe(), &opts(), &words, &mut |done, _| calls.push(done)).unwrap();
        assert!(calls[0] > 4 * rayon::current_num_threads().max(1), "resumed from the start: {calls:?}");
        for name in FILES.iter().chain([&MANIFEST]) {
            let (a, b) = (std::fs::read(whole.join(name)).unwrap(), std::fs::read(cut.join(name)).unwrap());
            assert!(a == b, "{name} differs");
        }
        assert!(!cut.join(PROGRESS).exists());
    }

    /// A prepared folder is refused for another tokenizer or other options, naming the
    /// difference; a cached one is discarded when a book changes.
    #[test]
    fn mismatches_are_refused_and_stale_caches_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let root = books(tmp.path(), 2);
        let dir = tmp.path().join("prepared");
        prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        let other_tok = Recipe::new("other".into(), &opts());
        let e = Prepared::open(&dir, &other_tok).err().unwrap().to_string();
        assert!(e.contains("another tokenizer") && e.contains("prepare"), "{e}");
        let wider = PairOptions { max_tokens: 64, ..opts() };
        let e = prepare(&root, &dir, &Recipe::new("tok".into(), &wider), &wider, &words, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1..=8") && e.contains("1..=64"), "{e}");
        assert!(Prepared::open_any(&dir).is_ok());
        // Unchanged books keep the cache; a changed one drops it.
        discard_if_stale(&dir).unwrap();
        assert!(is_prepared(&dir));
        std::fs::write(root.join("book00.txt"), "A new text. With two sentences.\n").unwrap();
        discard_if_stale(&dir).unwrap();
        assert!(!dir.exists());
    }
}
