//! Books as a pair source: plain-text books split into chapters, paragraphs and sentences,
//! prepared once into offset-indexed files (`prepared`, written by `build`), and their adjacent
//! sentences as training pairs, with whole books held out for validation.

pub mod build;
pub mod corpus;
pub mod pairs;
pub mod prepared;
pub mod sentences;

use crate::data::source::{Pair, PairIds, PairSource};
use crate::error::Result;
use prepared::{PairRanges, Prepared};

/// Some adjacent-sentence pairs of a prepared corpus by index (`0..len()`): a training or
/// held-out set.
#[derive(Clone, Copy)]
pub struct BookPairs<'a> {
    corpus: &'a Prepared,
    ranges: &'a PairRanges,
}

impl<'a> BookPairs<'a> {
    pub fn new(corpus: &'a Prepared, ranges: &'a PairRanges) -> Self {
        Self { corpus, ranges }
    }

    /// Pair `k`'s first sentence (its positive is the next one).
    fn anchor(&self, k: usize) -> Result<u64> {
        self.corpus.pair_anchor(self.ranges.global(k))
    }
}

impl PairSource for BookPairs<'_> {
    fn len(&self) -> usize {
        self.ranges.len()
    }

    fn ids(&self, k: usize) -> Result<PairIds> {
        let a = self.anchor(k)?;
        Ok(PairIds { anchor: self.corpus.ids(a)?, positive: self.corpus.ids(a + 1)?, negative: None })
    }

    fn max_tokens(&self, k: usize) -> Result<usize> {
        Ok(self.corpus.pair_tokens(self.ranges.global(k))? as usize)
    }

    fn pair(&self, k: usize) -> Result<Pair> {
        let a = self.anchor(k)?;
        Ok(Pair::new(self.corpus.text(a)?, self.corpus.text(a + 1)?))
    }
}
