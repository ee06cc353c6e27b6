//! Where training examples come from. A pair source is a set of examples by index: the trainer,
//! validation and the report read every source through [`PairSource`], so a new kind of data
//! (the adjacent sentences of books, a file of pairs) is one file implementing it plus its
//! config key.

use std::sync::Arc;

use crate::error::Result;

/// An example as text: an anchor, its positive and, where the source has one, a hard negative.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub anchor: Arc<str>,
    pub positive: Arc<str>,
    pub negative: Option<Arc<str>>,
}

impl Pair {
    pub fn new(anchor: impl Into<Arc<str>>, positive: impl Into<Arc<str>>) -> Self {
        Self { anchor: anchor.into(), positive: positive.into(), negative: None }
    }
}

/// An example's word-piece ids ([CLS] and [SEP] not included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairIds {
    pub anchor: Vec<u32>,
    pub positive: Vec<u32>,
    pub negative: Option<Vec<u32>>,
}

/// A set of examples, `0..len()`.
pub trait PairSource: Sync {
    /// How many examples.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every example has a hard negative.
    fn has_negatives(&self) -> bool {
        false
    }

    /// Example `k`'s word-piece ids.
    fn ids(&self, k: usize) -> Result<PairIds>;

    /// The word pieces of example `k`'s longest text, capped at 255: what batches are bucketed by.
    fn max_tokens(&self, k: usize) -> Result<usize>;

    /// Example `k` as text.
    fn pair(&self, k: usize) -> Result<Pair>;
}
