//! Data-parallel training, simulated in one process (DISTRIBUTED.md has the multi-GPU plan).
//!
//! Each rank holds a shard of the global batch. Uniformity and InfoNCE need every sentence of
//! the global batch, so the ranks all-gather their embeddings (no graph travels), each puts its
//! own rows back with their graph, takes the loss over the global batch and back-propagates:
//! the gradient reaches its parameters through its own rows only. The sum of the ranks'
//! gradients (an all-reduce) is then the gradient of the global batch's loss.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::train::step::StepModel;

/// What rank `rank` contributes: its shard's embeddings, as all-gathered ([views * n, d] in the
/// layout of [`crate::train::step::StepLayout`], no graph).
pub fn gather_rows(model: StepModel, shard: &Batch, dropout: Option<&mut StdRng>) -> Result<Tensor> {
    Ok(model.encoder.embed(shard, dropout)?.detach())
}

/// Rank `rank`'s gradients for the global batch whose shards' embeddings are `gathered` (one
/// entry per rank, rank order): its own shard is embedded again with a graph (the same dropout
/// stream as when it was gathered), the global loss is taken, and its own rows carry the
/// gradient. Returns the global loss and this rank's parameter gradients.
pub fn rank_gradients(
    model: StepModel,
    shard: &Batch,
    rank: usize,
    gathered: &[Tensor],
    dropout: Option<&mut StdRng>,
) -> Result<(f32, GradStore)> {
    if model.objective.needs_mean_view() {
        return Err(Error::invalid("the data-parallel simulation does not gather mean-pooled views yet"));
    }
    if rank >= gathered.len() {
        return Err(Error::invalid(format!("rank {rank} of {} ranks", gathered.len())));
    }
    let own = model.encoder.embed(shard, dropout)?;
    let per_rank = gathered
        .iter()
        .enumerate()
        .map(|(k, g)| model.layout.split(if k == rank { &own } else { g }))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // View block v of the global batch: every rank's block v, in rank order.
    let blocks = (0..model.layout.views())
        .map(|v| Tensor::cat(&per_rank.iter().map(|r| &r[v]).collect::<Vec<_>>(), 0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let parts = model.loss(&blocks, None)?;
    let loss = parts.total.to_scalar::<f32>()?;
    Ok((loss, parts.total.backward()?))
}
