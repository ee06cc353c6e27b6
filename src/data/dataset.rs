//! What a run trains on, as one value: books or a file, split into training and held-out
//! examples, each side read through [`PairSource`].

use crate::data::books::prepared::{Prepared, Split};
use crate::data::books::BookPairs;
use crate::data::files::{Examples, FilePairs};
use crate::data::source::PairSource;

/// A run's examples, split into the ones it trains on and the held-out ones it validates and
/// reports on (never trained on): books with whole books held out, or a file with a share of
/// its examples (or a second file) held out.
// One per run: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Dataset {
    Books { corpus: Prepared, split: Split },
    File { train: Examples, val: Option<Examples>, train_rows: Vec<usize>, val_rows: Vec<usize> },
}

impl Dataset {
    pub fn train(&self) -> Box<dyn PairSource + '_> {
        match self {
            Dataset::Books { corpus, split } => Box::new(BookPairs::new(corpus, &split.train)),
            Dataset::File { train, train_rows, .. } => Box::new(FilePairs { examples: train, rows: train_rows }),
        }
    }

    pub fn val(&self) -> Box<dyn PairSource + '_> {
        match self {
            Dataset::Books { corpus, split } => Box::new(BookPairs::new(corpus, &split.val)),
            Dataset::File { train, val, val_rows, .. } => {
                Box::new(FilePairs { examples: val.as_ref().unwrap_or(train), rows: val_rows })
            }
        }
    }

    /// What was held out, in words: the held-out books, or the file's share.
    pub fn held_out(&self) -> Vec<String> {
        match self {
            Dataset::Books { split, .. } => split.val_books.clone(),
            Dataset::File { train, val: Some(v), .. } => {
                vec![format!(
                    "{} (data.val_file; training on {})",
                    v.manifest.source.display(),
                    train.manifest.source.display()
                )]
            }
            Dataset::File { train, val_rows, .. } => vec![format!(
                "{} of {} examples of {} (by a hash of the anchor)",
                val_rows.len(),
                train.len(),
                train.manifest.source.display()
            )],
        }
    }
}
