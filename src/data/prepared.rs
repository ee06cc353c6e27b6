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
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::corpus::{parse_book, walk_books};
use super::pairs::{pair_indices, split_books, CorpusStats, PairOptions};
use crate::error::{Error, Result};

/// Bumped when the layout or the sentence splitter changes what a folder holds.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const PROGRESS: &str = "progress.jsonl";
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

/// The first line of `progress.jsonl`: what is being prepared, so a changed corpus or recipe
/// starts over.
#[derive(Serialize, Deserialize, PartialEq)]
struct ProgressHeader {
    recipe: Recipe,
    /// sha256 over the book files' paths and sizes.
    files: String,
}

/// One line of `progress.jsonl` per finished chunk of books: their entries, the histogram of
/// their sentences' lengths, and each data file's length after them.
#[derive(Serialize, Deserialize)]
struct ProgressChunk {
    books: Vec<BookEntry>,
    token_lengths: BTreeMap<usize, usize>,
    lengths: [u64; 6],
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

/// Whether the books `m` was prepared from changed since (added, removed, resized or modified).
fn is_stale(m: &Manifest) -> bool {
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
    now.as_ref() != Some(&then)
}

/// Remove a prepared folder's files, the manifest first (so it no longer counts as prepared);
/// the lock file stays, held by the caller.
fn clear(dir: &Path) -> Result<()> {
    for name in [MANIFEST, PROGRESS].iter().chain(FILES.iter()) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
            _ => {}
        }
    }
    Ok(())
}

/// One book split and tokenized, serialised for appending: offsets are relative to the book.
struct BookData {
    entry: BookEntry,
    text: Vec<u8>,
    /// End of each sentence in `text`.
    text_ends: Vec<u64>,
    /// Little-endian u32 ids of the sentences within the length limits.
    ids: Vec<u8>,
    /// Ids up to the end of each sentence.
    id_ends: Vec<u64>,
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
    let (mut out_text, mut text_ends) = (Vec::with_capacity(text.len()), Vec::with_capacity(stats.sentences));
    let (mut ids, mut id_ends) = (Vec::new(), Vec::with_capacity(stats.sentences));
    let pairs = pair_indices(&book, opts, &mut |s| {
        let encoded = encode(s);
        let n = encoded.as_ref().map_or(usize::MAX, Vec::len);
        *token_lengths.entry(n).or_default() += 1;
        out_text.extend_from_slice(s.as_bytes());
        text_ends.push(out_text.len() as u64);
        if (opts.min_tokens..=opts.max_tokens).contains(&n) {
            ids.extend(encoded.iter().flatten().flat_map(|id| id.to_le_bytes()));
        }
        id_ends.push(ids.len() as u64 / 4);
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
    Ok(BookData { entry, text: out_text, text_ends, ids, id_ends, pairs, token_lengths })
}

/// Appends books to the data files, tracking global sentence and pair counts.
struct Writer {
    files: Vec<BufWriter<File>>,
    lengths: [u64; 6],
}

impl Writer {
    /// Open the data files in `dir` at `lengths` (cutting off anything after: a killed run's
    /// partial chunk), or new ones.
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
        let mut w = Self { files, lengths };
        if lengths == [0; 6] {
            // Each index starts with offset 0.
            w.put(1, &0u64.to_le_bytes())?;
            w.put(3, &0u64.to_le_bytes())?;
        }
        Ok(w)
    }

    fn put(&mut self, file: usize, bytes: &[u8]) -> Result<()> {
        self.files[file].write_all(bytes).map_err(|e| Error::io(Path::new(FILES[file]), e))?;
        self.lengths[file] += bytes.len() as u64;
        Ok(())
    }

    /// Append one book; returns its entry with global ranges.
    fn book(&mut self, b: BookData) -> Result<BookEntry> {
        let (text_base, id_base) = (self.lengths[0], self.lengths[2] / 4);
        let (first, first_pair) = (self.lengths[1] / 8 - 1, self.lengths[4] / 8);
        let offsets =
            |base: u64, ends: &[u64]| -> Vec<u8> { ends.iter().flat_map(|e| (base + e).to_le_bytes()).collect() };
        self.put(0, &b.text)?;
        self.put(1, &offsets(text_base, &b.text_ends))?;
        self.put(2, &b.ids)?;
        self.put(3, &offsets(id_base, &b.id_ends))?;
        let anchors: Vec<u8> = b.pairs.iter().flat_map(|&(s, _)| (first + s as u64).to_le_bytes()).collect();
        self.put(4, &anchors)?;
        self.put(5, &b.pairs.iter().map(|&(_, n)| n.min(255) as u8).collect::<Vec<_>>())?;
        let sentences = [first, first + b.text_ends.len() as u64];
        Ok(BookEntry { sentences, pairs: [first_pair, first_pair + b.pairs.len() as u64], ..b.entry })
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
/// already holding this corpus with this recipe is returned as it is, or prepared again if its
/// books changed since; one holding another recipe or another corpus is refused. After a kill,
/// the next call goes on from the last finished chunk. Everything happens under the folder's
/// lock, so processes preparing the same folder at once take turns.
/// `progress(books done, books)` is called after each chunk.
pub fn prepare(
    corpus: &Path,
    dir: &Path,
    recipe: &Recipe,
    opts: &PairOptions,
    encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _lock = lock(dir)?;
    if is_prepared(dir) {
        let m = read_manifest(dir)?;
        check_recipe(dir, &m.recipe, recipe)?;
        if m.source != corpus {
            let why = format!(
                "holds a prepared copy of {}, not of {}: choose another folder",
                m.source.display(),
                corpus.display()
            );
            return Err(Error::data(dir, why));
        }
        if !is_stale(&m) {
            return Ok(m);
        }
        eprintln!("{}: the books changed since it was prepared; preparing it again", dir.display());
        clear(dir)?;
    }
    let walk = walk_books(corpus)?;
    let header = ProgressHeader { recipe: recipe.clone(), files: files_hash(&walk.files)? };
    let ProgressChunk { mut books, mut token_lengths, lengths } = read_progress(dir, &header);
    let mut writer = Writer::open(dir, lengths)?;
    let mut log = progress_log(dir, &header, books.is_empty())?;
    let (start, total) = (books.len(), walk.files.len());
    // After each chunk of books, one line in the progress log says how far the files go.
    let chunk = 8 * rayon::current_num_threads().max(1);
    let mut line = ProgressChunk { books: Vec::new(), token_lengths: BTreeMap::new(), lengths: [0; 6] };
    in_order(
        &walk.files[start..],
        |p| process_book(p, opts, encode),
        |i, b| {
            for (&n, &c) in &b.token_lengths {
                *line.token_lengths.entry(n).or_default() += c;
                *token_lengths.entry(n).or_default() += c;
            }
            line.books.push(writer.book(b)?);
            if line.books.len() == chunk || start + i + 1 == total {
                writer.flush()?;
                line.lengths = writer.lengths;
                let mut text = serde_json::to_string(&line).map_err(|e| Error::Invalid(e.to_string()))?;
                text.push('\n');
                log.write_all(text.as_bytes())
                    .and_then(|_| log.flush())
                    .map_err(|e| Error::io(dir.join(PROGRESS), e))?;
                books.append(&mut line.books);
                line.token_lengths.clear();
                progress(books.len(), total);
            }
            Ok(())
        },
    )?;
    drop(log);
    let manifest =
        Manifest { recipe: recipe.clone(), source: corpus.to_path_buf(), books, skipped: walk.skipped, token_lengths };
    crate::atomic::write_atomic(&dir.join(MANIFEST), &json(&manifest)?)?;
    let _ = std::fs::remove_file(dir.join(PROGRESS));
    Ok(manifest)
}

/// `work` on every item on as many threads as rayon uses, each taking the next item when it is free
/// (no barrier between chunks: books differ in size), and `write` on the results in item order
/// on this thread. Workers stay at most a few items ahead of the writer, so memory stays
/// bounded; the first error stops everything.
fn in_order<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> Result<R> + Sync,
    mut write: impl FnMut(usize, R) -> Result<()>,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Condvar, Mutex};
    let threads = rayon::current_num_threads().max(1);
    let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
    let written = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<R>)>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, written, work) = (&next, &stop, &written, &work);
            s.spawn(move || loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= items.len() || stop.load(SeqCst) {
                    break;
                }
                let mut done = written.0.lock().unwrap_or_else(|e| e.into_inner());
                while i >= *done + 4 * threads && !stop.load(SeqCst) {
                    done = written.1.wait(done).unwrap_or_else(|e| e.into_inner());
                }
                drop(done);
                if tx.send((i, work(&items[i]))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        // However the writer ends (an error, a panic), the workers are released and stop.
        struct Release<'a>(&'a AtomicBool, &'a (Mutex<usize>, Condvar));
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                // Under the lock, so a worker between its check and its wait cannot miss it.
                let _held = self.1 .0.lock();
                self.0.store(true, SeqCst);
                self.1 .1.notify_all();
            }
        }
        let _release = Release(&stop, &written);
        let mut result = Ok(());
        let mut waiting = BTreeMap::new();
        for (i, r) in rx.iter() {
            waiting.insert(i, r);
            let mut done = *written.0.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(r) = waiting.remove(&done) {
                result = r.and_then(|r| write(done, r));
                if result.is_err() {
                    break;
                }
                done += 1;
            }
            {
                let mut held = written.0.lock().unwrap_or_else(|e| e.into_inner());
                *held = done;
                if result.is_err() {
                    stop.store(true, SeqCst);
                }
            }
            written.1.notify_all();
            if result.is_err() {
                break;
            }
        }
        result
    })
}

/// sha256 over the files' paths and sizes.
fn files_hash(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in files {
        let size = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
        h.update(format!("{}\t{size}\n", p.display()).as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// What an earlier, killed prepare of the same books with the same recipe finished: its books,
/// their length histogram and the data files' lengths after them (nothing otherwise). A line
/// cut short by the kill and anything after it are ignored.
fn read_progress(dir: &Path, header: &ProgressHeader) -> ProgressChunk {
    let mut done = ProgressChunk { books: Vec::new(), token_lengths: BTreeMap::new(), lengths: [0; 6] };
    let Ok(text) = std::fs::read_to_string(dir.join(PROGRESS)) else { return done };
    let mut lines = text.lines();
    if lines.next().and_then(|l| serde_json::from_str::<ProgressHeader>(l).ok()).as_ref() != Some(header) {
        return done;
    }
    for chunk in lines.map_while(|l| serde_json::from_str::<ProgressChunk>(l).ok()) {
        done.books.extend(chunk.books);
        for (n, c) in chunk.token_lengths {
            *done.token_lengths.entry(n).or_default() += c;
        }
        done.lengths = chunk.lengths;
    }
    done
}

/// The progress log, started afresh (header line) or opened to append after its last complete
/// line.
fn progress_log(dir: &Path, header: &ProgressHeader, fresh: bool) -> Result<File> {
    let path = dir.join(PROGRESS);
    let err = |e| Error::io(&path, e);
    if fresh {
        let mut text = serde_json::to_string(header).map_err(|e| Error::Invalid(e.to_string()))?;
        text.push('\n');
        std::fs::write(&path, text).map_err(err)?;
    } else {
        // Drop a line cut short by a kill, so appended lines start on a line of their own.
        let text = std::fs::read_to_string(&path).map_err(err)?;
        let keep: usize = text
            .split_inclusive('\n')
            .take_while(|l| l.ends_with('\n') && serde_json::from_str::<serde_json::Value>(l).is_ok())
            .map(str::len)
            .sum();
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(keep as u64)).map_err(err)?;
    }
    std::fs::OpenOptions::new().append(true).open(&path).map_err(err)
}

/// Fill `buf` from `file` at `offset`, without moving a shared cursor (threads may read at once).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], offset + done as u64)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
        Ok(())
    }
}

/// Hold `dir`'s lock file, waiting for another process preparing the same folder to finish.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = crate::run_dir::lock_file(&path)?;
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

/// A prepared corpus, open for reading. The files are read in place by offset (`pread`), not
/// mapped: a mapping would count every page around each scattered read in the process's
/// resident memory (measured: about 20 MB more per step on the 100x corpus), while a read
/// copies only the bytes asked for and leaves the rest to the page cache.
pub struct Prepared {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: Vec<(File, u64)>,
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

    fn from_files(dir: &Path, manifest: Manifest) -> Result<Self> {
        let mut files = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            files.push((file, len));
        }
        let p = Self { dir: dir.to_path_buf(), manifest, files };
        let (sentences, pairs) = p.manifest.books.last().map_or((0, 0), |b| (b.sentences[1], b.pairs[1]));
        let sizes = [p.files[1].1, p.files[3].1, p.files[4].1, p.files[5].1];
        if sizes != [8 * (sentences + 1), 8 * (sentences + 1), 8 * pairs, pairs] {
            return Err(Error::data(
                dir,
                "the data files do not match the manifest (truncated?); prepare the corpus again",
            ));
        }
        Ok(p)
    }

    /// `len` bytes of data file `file` from `offset`. The files were checked against the
    /// manifest when opened; a read failing now means they changed or the disk failed.
    fn read(&self, file: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let got = read_exact_at(&self.files[file].0, &mut buf, offset);
        if let Err(e) = got {
            panic!(
                "{}: {e}; the prepared corpus changed or the disk failed: prepare it again",
                self.dir.join(FILES[file]).display()
            );
        }
        buf
    }

    fn u64_at(&self, file: usize, i: u64) -> u64 {
        u64::from_le_bytes(self.read(file, 8 * i, 8).try_into().expect("8 bytes"))
    }

    /// Bytes of the data files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.files.iter().map(|(_, len)| len).sum()
    }

    /// Sentences in the corpus.
    pub fn sentences(&self) -> u64 {
        self.files[1].1 / 8 - 1
    }

    /// Sentence `i`'s text.
    pub fn text(&self, i: u64) -> String {
        let (a, b) = (self.u64_at(1, i), self.u64_at(1, i + 1));
        // Written from a `str`, sentence by sentence.
        String::from_utf8(self.read(0, a, (b - a) as usize)).unwrap_or_default()
    }

    /// Sentence `i`'s word-piece ids (empty outside the pairs' length limits).
    pub fn ids(&self, i: u64) -> Vec<u32> {
        let (a, b) = (self.u64_at(3, i), self.u64_at(3, i + 1));
        let bytes = self.read(2, 4 * a, 4 * (b - a) as usize);
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    /// Pair `p`'s first sentence (the second is the next one).
    pub fn pair_anchor(&self, p: u64) -> u64 {
        self.u64_at(4, p)
    }

    /// Pair `p`'s longer sentence's word pieces (at most 255).
    pub fn pair_tokens(&self, p: u64) -> u32 {
        self.read(5, p, 1)[0] as u32
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
        super::pairs::Pair { anchor: self.corpus.text(a).into(), positive: self.corpus.text(a + 1).into() }
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
                assert_eq!(&p.text(at), t);
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
        let root = books(tmp.path(), 8 * rayon::current_num_threads().max(1) * 2 + 3);
        let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
        prepare(&root, &whole, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prepare(&root, &cut, &recipe(), &opts(), &words, &mut |done, _| panic!("killed after {done} books"))
        }));
        assert!(stopped.is_err());
        assert!(!is_prepared(&cut) && cut.join(PROGRESS).is_file());
        let mut calls = Vec::new();
        prepare(&root, &cut, &recipe(), &opts(), &words, &mut |done, _| calls.push(done)).unwrap();
        assert!(calls[0] > 8 * rayon::current_num_threads().max(1), "resumed from the start: {calls:?}");
        for name in FILES.iter().chain([&MANIFEST]) {
            let (a, b) = (std::fs::read(whole.join(name)).unwrap(), std::fs::read(cut.join(name)).unwrap());
            assert!(a == b, "{name} differs");
        }
        assert!(!cut.join(PROGRESS).exists());
    }

    /// A prepared folder is refused for another tokenizer or other options, naming the
    /// difference; a cached one is discarded when a book changes.
    #[test]
    fn mismatches_are_refused_and_stale_folders_prepared_again() {
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
        // Unchanged books keep the folder; a changed one has it prepared again.
        let before = read_manifest(&dir).unwrap();
        assert_eq!(
            prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| panic!("prepared again")).unwrap(),
            before
        );
        std::fs::write(root.join("book00.txt"), "A new text. With two sentences.\n").unwrap();
        let after = prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        assert_ne!(after.books[0].sha256, before.books[0].sha256);
        assert_eq!(Prepared::open(&dir, &recipe()).unwrap().manifest, after);
        // Another corpus into the same folder is refused.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("b.txt"), "One sentence here. And one more.\n").unwrap();
        let e = prepare(&other, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).err().unwrap().to_string();
        assert!(e.contains("another folder"), "{e}");
    }

    /// Processes preparing the same stale folder at once take turns under its lock: each gets
    /// the whole, new corpus (the stale check used to run before the lock, and one process
    /// could delete the files the other was writing).
    #[test]
    fn concurrent_prepares_of_a_stale_folder_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = books(tmp.path(), 6);
        let dir = tmp.path().join("prepared");
        prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap();
        std::fs::write(root.join("book00.txt"), "A new text. With two sentences.\n").unwrap();
        let results: Vec<Manifest> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| prepare(&root, &dir, &recipe(), &opts(), &words, &mut |_, _| {}).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|m| *m == results[0]));
        assert_eq!(Prepared::open(&dir, &recipe()).unwrap().manifest, results[0]);
        assert!(!is_stale(&results[0]));
    }
}
