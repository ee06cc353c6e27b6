//! Book text: loading, sentence splitting, training pairs and the book-level split.

pub mod batch;
pub mod corpus;
pub mod pairs;
pub mod sentences;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use corpus::{list_book_files, read_book};
use pairs::{book_pairs, corpus_stats, split_books, CorpusStats, Pair, PairOptions};

/// Training and validation pairs of a corpus, split by whole books.
#[derive(Debug, Default)]
pub struct PairSet {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub val_books: Vec<String>,
    pub stats: CorpusStats,
    /// Sentence length in word pieces -> number of sentences (all sentences counted).
    pub token_lengths: BTreeMap<usize, usize>,
}

/// Read the books under `corpus` one at a time (only their pairs stay in memory), pair
/// adjacent sentences and hold out whole books for validation.
pub fn load_pairs(
    corpus: &Path,
    max_books: usize,
    opts: &PairOptions,
    val_fraction: f64,
    seed: u64,
    count_tokens: &mut dyn FnMut(&str) -> usize,
) -> Result<PairSet> {
    let mut files = list_book_files(corpus)?;
    if max_books > 0 {
        files.truncate(max_books);
    }
    let (_, val_idx) = split_books(files.len(), val_fraction, seed);
    let mut token_lengths = BTreeMap::new();
    let mut counted = |s: &str| {
        let n = count_tokens(s);
        *token_lengths.entry(n).or_default() += 1;
        n
    };
    let (mut train, mut val, mut val_books) = (Vec::new(), Vec::new(), Vec::new());
    let mut stats = CorpusStats::default();
    for (i, file) in files.iter().enumerate() {
        let book = read_book(file)?;
        let s = corpus_stats(std::slice::from_ref(&book));
        stats.books += 1;
        stats.chapters += s.chapters;
        stats.paragraphs += s.paragraphs;
        stats.sentences += s.sentences;
        let pairs = book_pairs(&book, opts, &mut counted);
        if val_idx.binary_search(&i).is_ok() {
            val.extend(pairs);
            val_books.push(book.name);
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
    Ok(PairSet { train, val, val_books, stats, token_lengths })
}
