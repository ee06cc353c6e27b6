//! STS-B dev, embedded and scored during training for model selection (the SimCSE protocol:
//! never a test split).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;

use super::sts_spearman;
use super::tasks::Scored;
use crate::data::batch::TextTokenizer;
use crate::dist::World;
use crate::error::{Error, Result};
use crate::model::{Encoder, EMBED_BATCH};

/// STS-B dev's scored pairs and the tokenizer at the evaluation length.
pub struct DevSet {
    data: Scored,
    tokenizer: TextTokenizer,
}

impl DevSet {
    /// `sts/STSBenchmark/sts-dev.csv` under the data root (read now, so a missing file stops
    /// the run before training); `tokenizer` truncates as evaluation does (`eval.max_len`).
    pub fn stsb(root: &Path, tokenizer: TextTokenizer) -> Result<Self> {
        let data = super::tasks::stsb(&root.join("sts/STSBenchmark/sts-dev.csv"))?;
        if data.pairs.len() < 3 {
            return Err(Error::invalid(format!("{}: STS-B dev needs at least 3 pairs", root.display())));
        }
        Ok(Self { data, tokenizer })
    }

    /// Spearman x 100 of the cosine of each pair's embeddings against the gold scores; over
    /// several ranks each embeds a share of the sentences (every rank must call this).
    pub fn score(&self, encoder: &Encoder, device: &Device, world: &World) -> Result<f64> {
        let texts: Vec<&str> = self.data.pairs.iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]).collect();
        let flat = world.embed(encoder, &self.tokenizer, &texts, EMBED_BATCH, device)?;
        let rows: HashMap<&str, &[f32]> =
            texts.iter().copied().zip(flat.chunks_exact(encoder.config.hidden_size)).collect();
        sts_spearman(&"STS-B dev", &self.data, &|s| rows.get(s).copied())
    }
}
