//! `BOOKS-NEXT`, the in-domain task: finding the next sentence of a book among all held-out
//! sentences. Every held-out pair's first sentence is a query; the documents are the distinct
//! texts of every held-out sentence; a query's one relevant document is its next sentence, and
//! a document with the query's own text is left out. Scored like a BEIR set (nDCG@10, MRR@10,
//! Recall@10 and @100).

use super::beir::{Beir, Interner};
use crate::data::source::PairSource;
use crate::error::{Error, Result};

/// The task's name in `eval.tasks`, `eval --tasks` and the tables.
pub const NAME: &str = "BOOKS-NEXT";

/// Whether `name` names this task (case and dashes ignored, as for the other tasks).
pub fn is_named(name: &str) -> bool {
    name.trim().replace('-', "").eq_ignore_ascii_case("booksnext")
}

/// The task over `pairs` (a run's held-out pairs): every pair's anchor is a query and its
/// positive the relevant document. A pair whose two sentences are the same text has no
/// document to find and is left out.
pub fn books_next(pairs: &dyn PairSource) -> Result<Beir> {
    let mut texts = Interner::default();
    let (mut queries, mut relevant) = (Vec::new(), Vec::new());
    for k in 0..pairs.len() {
        let p = pairs.pair(k)?;
        let (q, d) = (texts.id(p.anchor.to_string()), texts.id(p.positive.to_string()));
        if q != d {
            queries.push(q);
            relevant.push(vec![d]);
        }
    }
    if queries.is_empty() {
        return Err(Error::invalid(format!("{NAME}: no held-out pairs of two different sentences to score")));
    }
    let docs = (0..texts.texts.len()).collect();
    Ok(Beir { name: NAME.into(), texts: texts.texts, docs, queries, relevant, skip_own_text: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{Pair, PairIds};
    use crate::eval::beir::InMemory;

    /// Adjacent sentences s0..s3 of a book, as pairs (s0,s1), (s1,s2), (s2,s3), plus a pair of
    /// one repeated text.
    struct Adjacent(Vec<(&'static str, &'static str)>);

    impl PairSource for Adjacent {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn ids(&self, _: usize) -> Result<PairIds> {
            unreachable!("not read by the task")
        }
        fn max_tokens(&self, _: usize) -> Result<usize> {
            Ok(1)
        }
        fn pair(&self, k: usize) -> Result<Pair> {
            Ok(Pair::new(self.0[k].0, self.0[k].1))
        }
    }

    /// Each sentence is nearest to the next one, but nearer still to itself: the query's own
    /// text is left out, so every query finds its next sentence first.
    #[test]
    fn finds_the_next_sentence_and_skips_itself() {
        let src = Adjacent(vec![("s0", "s1"), ("s1", "s2"), ("s2", "s3"), ("Yes.", "Yes.")]);
        let set = books_next(&src).unwrap();
        assert_eq!(set.texts, ["s0", "s1", "s2", "s3", "Yes."]);
        assert_eq!(set.queries, [0, 1, 2]);
        assert_eq!(set.relevant, [vec![1], vec![2], vec![3]]);
        let v = |deg: f32| [deg.to_radians().cos(), deg.to_radians().sin()];
        // Gaps shrink, so each sentence is nearer the next than the one before; "Yes." is far.
        let rows: Vec<f32> = [0.0, 20.0, 35.0, 45.0, 180.0].into_iter().flat_map(v).collect();
        let r = set.score(&InMemory(&rows, 2), 2).unwrap();
        assert_eq!((r.n_test, r.n_train), (3, 5));
        assert!((r.metrics[0].1 - 100.0).abs() < 1e-9, "{:?}", r.metrics);
        // Without the skip, every query finds itself first, its next sentence second.
        let plain = Beir { skip_own_text: false, ..set };
        let r = plain.score(&InMemory(&rows, 2), 2).unwrap();
        let want = 100.0 / 3f64.log2();
        assert!((r.metrics[0].1 - want).abs() < 1e-9, "{:?}", r.metrics);
        assert!(is_named("books-next") && is_named("BooksNext") && !is_named("books"));
    }
}
