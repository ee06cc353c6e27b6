//! Training pairs (adjacent sentences), the book-level train/validation split, and corpus counts.
//!
//! Neighbouring sentences are the positives for the alignment loss; validation holds out whole
//! books so that no validation sentence has a neighbour in training.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::corpus::Book;

/// Which neighbours make pairs. Default (the one place it is set; `data.*` in configs starts
/// from it): across paragraphs, 4 to 64 word pieces.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Also pair the last sentence of a paragraph with the first of the next.
    pub cross_paragraph: bool,
    pub min_tokens: usize,
    pub max_tokens: usize,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions { cross_paragraph: true, min_tokens: 4, max_tokens: 64 }
    }
}

/// Consecutive sentences of one chapter: within a paragraph, and (if `cross_paragraph`) the last
/// sentence of a paragraph with the first of the next; never across chapters or books.
/// Both sentences must have `min_tokens <= count_tokens(s) <= max_tokens`; `count_tokens` is
/// called once per sentence, in book order. Each pair is its first sentence's number in book
/// order (its positive is the next) and the longer sentence's word pieces.
pub fn pair_indices(
    book: &Book,
    opts: &PairOptions,
    count_tokens: &mut dyn FnMut(&Arc<str>) -> usize,
) -> Vec<(usize, u32)> {
    let mut pairs = Vec::new();
    let mut index = 0;
    for chapter in &book.chapters {
        // (index of its paragraph, its word pieces, within the length limits)
        let mut prev: Option<(usize, usize, bool)> = None;
        for (p, paragraph) in chapter.paragraphs.iter().enumerate() {
            for s in paragraph {
                let n = count_tokens(s);
                let ok = (opts.min_tokens..=opts.max_tokens).contains(&n);
                if let Some((pa, na, a_ok)) = prev {
                    if a_ok && ok && (pa == p || opts.cross_paragraph) {
                        pairs.push((index - 1, u32::try_from(na.max(n)).unwrap_or(u32::MAX)));
                    }
                }
                prev = Some((p, n, ok));
                index += 1;
            }
        }
    }
    pairs
}

/// Hold out whole books for validation: `(train, val)` indices into `0..n_books`, each sorted.
///
/// `n_val = round(n_books * val_fraction)` (fraction clamped to 0..=1), at least 1 when the
/// fraction is positive and there are 2+ books, and never all books. Same seed, same split.
pub fn split_books(n_books: usize, val_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let fraction = if val_fraction.is_nan() { 0.0 } else { val_fraction.clamp(0.0, 1.0) };
    let mut n_val = (n_books as f64 * fraction).round() as usize;
    if fraction > 0.0 && n_books >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n_books.saturating_sub(1));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut val = rand::seq::index::sample(&mut rng, n_books, n_val).into_vec();
    val.sort_unstable();
    let train = (0..n_books).filter(|i| val.binary_search(i).is_err()).collect();
    (train, val)
}

/// Counts over a set of books.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CorpusStats {
    pub books: usize,
    pub chapters: usize,
    pub paragraphs: usize,
    pub sentences: usize,
}

pub fn corpus_stats(books: &[Book]) -> CorpusStats {
    let mut stats = CorpusStats { books: books.len(), ..Default::default() };
    for chapter in books.iter().flat_map(|b| &b.chapters) {
        stats.chapters += 1;
        stats.paragraphs += chapter.paragraphs.len();
        stats.sentences += chapter.paragraphs.iter().map(Vec::len).sum::<usize>();
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::super::corpus::parse_book;
    use super::*;
    use std::path::Path;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn pairs_of(text: &str, opts: &PairOptions) -> Vec<(String, String)> {
        let book = parse_book("t", Path::new("t.txt"), text).unwrap();
        let mut seen = Vec::new();
        let pairs = pair_indices(&book, opts, &mut |s| {
            seen.push(s.to_string());
            words(s)
        });
        assert_eq!(seen.len(), corpus_stats(std::slice::from_ref(&book)).sentences);
        // Each pair carries the longer count its sentences were filtered by.
        for &(i, n) in &pairs {
            assert_eq!(n as usize, words(&seen[i]).max(words(&seen[i + 1])));
        }
        pairs.into_iter().map(|(i, _)| (seen[i].clone(), seen[i + 1].clone())).collect()
    }

    const TEXT: &str =
        "Ann woke up. She was cold.\nThe fire had gone out.\n\nCHAPTER II.\nBen came at noon. He brought wood.\n";

    fn any() -> PairOptions {
        PairOptions { min_tokens: 0, max_tokens: usize::MAX, ..Default::default() }
    }

    #[test]
    fn pairs_stop_at_chapters() {
        let p = pairs_of(TEXT, &any());
        let want = [
            ("Ann woke up.", "She was cold."),
            ("She was cold.", "The fire had gone out."),
            ("Ben came at noon.", "He brought wood."),
        ];
        assert_eq!(p, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn within_paragraph_only() {
        let opts = PairOptions { cross_paragraph: false, ..any() };
        let p = pairs_of(TEXT, &opts);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].1, "She was cold.");
        assert_eq!(p[1].0, "Ben came at noon.");
    }

    #[test]
    fn length_filter() {
        // Word counts: 3, 3, 5 | 4, 3.
        let opts = PairOptions { min_tokens: 3, max_tokens: 4, ..any() };
        let want = [("Ann woke up.", "She was cold."), ("Ben came at noon.", "He brought wood.")];
        assert_eq!(pairs_of(TEXT, &opts), want.map(|(a, b)| (a.to_string(), b.to_string())));
        let opts = PairOptions { min_tokens: 1, max_tokens: 3, ..any() };
        assert_eq!(pairs_of(TEXT, &opts), [("Ann woke up.".to_string(), "She was cold.".to_string())]);
    }

    #[test]
    fn split_is_deterministic_and_sorted() {
        let (t, v) = split_books(50, 0.1, 7);
        assert_eq!((t.len(), v.len()), (45, 5));
        assert_eq!(split_books(50, 0.1, 7), (t.clone(), v.clone()));
        assert_ne!(split_books(50, 0.1, 8).1, v);
        assert!(t.windows(2).all(|w| w[0] < w[1]) && v.windows(2).all(|w| w[0] < w[1]));
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn split_edge_cases() {
        assert_eq!(split_books(1, 0.5, 1), (vec![0], vec![]));
        assert_eq!(split_books(0, 0.5, 1), (vec![], vec![]));
        assert_eq!(split_books(5, 0.0, 1), ((0..5).collect(), vec![]));
        assert_eq!(split_books(5, 1.0, 1).0.len(), 1);
        assert_eq!(split_books(3, 0.01, 1).1.len(), 1);
        assert_eq!(split_books(2, 0.5, 1).1.len(), 1);
        assert_eq!(split_books(4, f64::NAN, 1).1.len(), 0);
    }

    #[test]
    fn stats() {
        let book = parse_book("t", Path::new("t.txt"), TEXT).unwrap();
        let s = corpus_stats(&[book.clone(), book]);
        assert_eq!(s, CorpusStats { books: 2, chapters: 4, paragraphs: 6, sentences: 10 });
    }
}
