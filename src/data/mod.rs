//! Book text: loading, sentence splitting, training pairs and the book-level split.

pub mod batch;
pub mod corpus;
pub mod pairs;
pub mod sentences;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use corpus::{read_book, walk_books};
use pairs::{book_pairs, corpus_stats, split_books, CorpusStats, Pair, PairOptions};

/// A UTF-8 text file's contents. A folder, a binary file (NUL bytes) and invalid UTF-8 are
/// errors that name the file and say what to do.
pub fn read_text(path: &Path) -> Result<String> {
    if path.is_dir() {
        return Err(Error::data(path, "is a folder; give a text file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(Error::data(
            path,
            "a binary file (NUL bytes), not text; give UTF-8 text, one paragraph or sentence per line",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Error::data(
            path,
            format!("not valid UTF-8 at byte {at}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
        )
    })
}

/// Training and validation pairs of a corpus, split by whole books.
#[derive(Debug, Default)]
pub struct PairSet {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub val_books: Vec<String>,
    /// Paths the corpus walk did not follow (broken links, loops, repeats; see [`walk_books`]).
    pub skipped: Vec<std::path::PathBuf>,
    pub stats: CorpusStats,
    /// Sentence length in word pieces -> number of sentences (all sentences counted).
    pub token_lengths: BTreeMap<usize, usize>,
}

/// Read the books under `corpus` (a few at a time, in parallel: tokenizing for the length
/// filter is most of the work), pair adjacent sentences and hold out whole books for
/// validation. Only the pairs stay in memory. The result does not depend on the thread count.
pub fn load_pairs(
    corpus: &Path,
    max_books: usize,
    opts: &PairOptions,
    val_fraction: f64,
    seed: u64,
    count_tokens: &(dyn Fn(&str) -> usize + Sync),
) -> Result<PairSet> {
    use rayon::prelude::*;
    // Each file once, by identity: held-out books can never be copies of training books by link.
    let corpus::BookFiles { mut files, skipped } = walk_books(corpus)?;
    if max_books > 0 {
        files.truncate(max_books);
    }
    let (_, val_idx) = split_books(files.len(), val_fraction, seed);
    let books = files
        .par_iter()
        .map(|file| {
            let book = read_book(file)?;
            let mut lengths = BTreeMap::<usize, usize>::new();
            let mut counted = |s: &str| {
                let n = count_tokens(s);
                *lengths.entry(n).or_default() += 1;
                n
            };
            let pairs = book_pairs(&book, opts, &mut counted);
            Ok((book.name.clone(), corpus_stats(std::slice::from_ref(&book)), pairs, lengths))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut token_lengths = BTreeMap::new();
    let (mut train, mut val, mut val_books) = (Vec::new(), Vec::new(), Vec::new());
    let mut stats = CorpusStats::default();
    for (i, (name, s, pairs, lengths)) in books.into_iter().enumerate() {
        stats.books += 1;
        stats.chapters += s.chapters;
        stats.paragraphs += s.paragraphs;
        stats.sentences += s.sentences;
        for (n, c) in lengths {
            *token_lengths.entry(n).or_default() += c;
        }
        if val_idx.binary_search(&i).is_ok() {
            val.extend(pairs);
            val_books.push(name);
        } else {
            train.extend(pairs);
        }
    }
    if train.is_empty() {
        return Err(Error::data(
            corpus,
            format!(
                "no training pairs: {} sentences in {} books, none pairs within {}..={} tokens; check data.min_tokens/max_tokens",
                stats.sentences, stats.books, opts.min_tokens, opts.max_tokens
            ),
        ));
    }
    Ok(PairSet { train, val, val_books, skipped, stats, token_lengths })
}
