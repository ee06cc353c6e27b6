//! Preparing a corpus of books (see [`super::prepared`] for the folder's layout): every book
//! read, split into sentences and tokenized on every core, appended in order, with a progress
//! log that lets a killed `prepare` go on where it stopped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::corpus::{parse_book, walk_books};
use super::pairs::{pair_indices, PairOptions};
use super::prepared::{
    check_recipe, is_prepared, read_manifest, BookEntry, Manifest, Recipe, FILES, MANIFEST, PROGRESS,
};
use crate::error::{Error, Result};
use crate::io::Lock;
use crate::progress::Progress;

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

/// A file's modification time in nanoseconds since 1970 (0 where the OS has none).
fn modified_ns(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let since = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(since.map_or(0, |d| d.as_nanos() as u64))
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

/// Refuse a folder that holds anything but a prepared corpus or its partial state: preparing
/// into a folder of books (or anything else) would mix our files with them.
fn check_only_ours(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let ours = |name: &str| [MANIFEST, PROGRESS, ".lock"].contains(&name) || FILES.contains(&name);
    let foreign: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| !(ours(n) || n.starts_with('.') && n.ends_with(".tmp")))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
    Err(Error::data(
        dir,
        format!(
            "holds other files ({}{}), not a prepared corpus: give --out a new or empty folder",
            shown.join(", "),
            if foreign.len() > 3 { ", ..." } else { "" }
        ),
    ))
}

/// Empty a prepared folder (under its lock) so the next `prepare` starts from scratch
/// (`prepare --force`): for a damaged folder, or books edited without a change of size or time.
/// A folder holding anything else is refused; a missing one is fine.
pub fn clear_for_rebuild(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    check_only_ours(dir)?;
    let _lock = Lock::take(&dir.join(".lock"), &mut || {})?;
    clear(dir)
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
    let text = crate::data::text_from_bytes(path, bytes)?;
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
/// `progress` hears the books done after each chunk, and notes (a wait, a stale folder).
pub fn prepare(
    corpus: &Path,
    dir: &Path,
    recipe: &Recipe,
    opts: &PairOptions,
    encode: &(dyn Fn(&str) -> Option<Vec<u32>> + Sync),
    progress: &dyn Progress,
) -> Result<Manifest> {
    check_only_ours(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut waiting = || progress.line(&format!("waiting for another process preparing {}", dir.display()));
    let _lock = Lock::take(&dir.join(".lock"), &mut waiting)?;
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
        progress.line(&format!("{}: the books changed since it was prepared; preparing it again", dir.display()));
        clear(dir)?;
    }
    let walk = walk_books(corpus)?;
    let header = ProgressHeader { recipe: recipe.clone(), files: files_hash(&walk.files)? };
    let ProgressChunk { mut books, mut token_lengths, lengths } = read_progress(dir, &header);
    let mut writer = Writer::open(dir, lengths)?;
    let mut log = progress_log(dir, &header, books.is_empty())?;
    let (start, total) = (books.len(), walk.files.len());
    progress.start(&format!("preparing {}", corpus.display()), start as u64, total as u64);
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
                let mut text = serde_json::to_string(&line).map_err(|e| Error::json(dir.join(PROGRESS), e))?;
                text.push('\n');
                log.write_all(text.as_bytes())
                    .and_then(|_| log.flush())
                    .map_err(|e| Error::io(dir.join(PROGRESS), e))?;
                books.append(&mut line.books);
                line.token_lengths.clear();
                progress.advance(books.len() as u64, "books");
            }
            Ok(())
        },
    )?;
    drop(log);
    progress.finish();
    let manifest =
        Manifest { recipe: recipe.clone(), source: corpus.to_path_buf(), books, skipped: walk.skipped, token_lengths };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::json(dir.join(MANIFEST), e))?;
    crate::io::write_atomic(&dir.join(MANIFEST), &json)?;
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
        let mut text = serde_json::to_string(header).map_err(|e| Error::json(&path, e))?;
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

#[cfg(test)]
mod tests {
    use super::super::corpus::read_book;
    use super::super::prepared::Prepared;
    use super::super::BookPairs;
    use super::*;
    use crate::data::source::{Pair, PairSource};
    use crate::progress::Quiet;
    use std::sync::Mutex;

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

    /// Stops a prepare (a panic, as a kill would) at its first finished chunk.
    struct Kill;
    impl Progress for Kill {
        fn advance(&self, done: u64, _: &str) {
            panic!("killed after {done} books")
        }
    }

    /// Records the books done after each chunk.
    #[derive(Default)]
    struct Done(Mutex<Vec<u64>>);
    impl Progress for Done {
        fn advance(&self, done: u64, _: &str) {
            self.0.lock().unwrap().push(done);
        }
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
        prepare(&root, &dir, &recipe(), &opts(), &words, &Quiet).unwrap();
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
                assert_eq!(&p.text(at).unwrap(), t);
                let n = words(t).unwrap().len();
                let want = if (1..=8).contains(&n) { words(t).unwrap() } else { Vec::new() };
                assert_eq!(p.ids(at).unwrap(), want, "{t}");
            }
            let want = pair_indices(&book, &opts(), &mut |s| words(s).unwrap().len());
            let got: Vec<(usize, u32)> = (entry.pairs[0]..entry.pairs[1])
                .map(|g| ((p.pair_anchor(g).unwrap() - first) as usize, p.pair_tokens(g).unwrap()))
                .collect();
            assert_eq!(got, want);
            assert!(!got.is_empty());
        }
        // The split holds out whole books; the views count the books' pairs.
        let split = p.split(None, 0.4, 3);
        assert_eq!(split.val_books.len(), 2);
        let total: u64 = p.manifest.books.iter().map(|b| b.pairs[1] - b.pairs[0]).sum();
        assert_eq!((split.train.len() + split.val.len()) as u64, total);
        let val = BookPairs::new(&p, &split.val);
        let held: Vec<String> =
            split.val_books.iter().map(|n| format!("Book {} ", n[4..].parse::<usize>().unwrap())).collect();
        assert!(!val.is_empty());
        for k in 0..val.len() {
            let pair: Pair = val.pair(k).unwrap();
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
        prepare(&root, &whole, &recipe(), &opts(), &words, &Quiet).unwrap();
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prepare(&root, &cut, &recipe(), &opts(), &words, &Kill)
        }));
        assert!(stopped.is_err());
        assert!(!is_prepared(&cut) && cut.join(PROGRESS).is_file());
        let done = Done::default();
        prepare(&root, &cut, &recipe(), &opts(), &words, &done).unwrap();
        let calls = done.0.into_inner().unwrap();
        assert!(calls[0] > 8 * rayon::current_num_threads().max(1) as u64, "resumed from the start: {calls:?}");
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
        prepare(&root, &dir, &recipe(), &opts(), &words, &Quiet).unwrap();
        let other_tok = Recipe::new("other".into(), &opts());
        let e = Prepared::open(&dir, &other_tok).err().unwrap().to_string();
        assert!(e.contains("another tokenizer") && e.contains("prepare"), "{e}");
        let wider = PairOptions { max_tokens: 64, ..opts() };
        let e =
            prepare(&root, &dir, &Recipe::new("tok".into(), &wider), &wider, &words, &Quiet).err().unwrap().to_string();
        assert!(e.contains("1..=8") && e.contains("1..=64"), "{e}");
        assert!(Prepared::open_any(&dir).is_ok());
        // Unchanged books keep the folder; a changed one has it prepared again.
        let before = read_manifest(&dir).unwrap();
        assert_eq!(prepare(&root, &dir, &recipe(), &opts(), &words, &Kill).unwrap(), before);
        std::fs::write(root.join("book00.txt"), "A new text. With two sentences.\n").unwrap();
        let after = prepare(&root, &dir, &recipe(), &opts(), &words, &Quiet).unwrap();
        assert_ne!(after.books[0].sha256, before.books[0].sha256);
        assert_eq!(Prepared::open(&dir, &recipe()).unwrap().manifest, after);
        // Another corpus into the same folder is refused.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("b.txt"), "One sentence here. And one more.\n").unwrap();
        let e = prepare(&other, &dir, &recipe(), &opts(), &words, &Quiet).err().unwrap().to_string();
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
        prepare(&root, &dir, &recipe(), &opts(), &words, &Quiet).unwrap();
        std::fs::write(root.join("book00.txt"), "A new text. With two sentences.\n").unwrap();
        let results: Vec<Manifest> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| prepare(&root, &dir, &recipe(), &opts(), &words, &Quiet).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|m| *m == results[0]));
        assert_eq!(Prepared::open(&dir, &recipe()).unwrap().manifest, results[0]);
        assert!(!is_stale(&results[0]));
    }
}
