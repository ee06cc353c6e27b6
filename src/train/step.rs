//! One training step: a batch's examples laid out as rows ([`StepLayout`]), embedded, scored by
//! the objective, back-propagated (across micro-batches with GradCache) and applied by AdamW.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::data::batch::{Batch, TextTokenizer};
use crate::data::source::PairIds;
use crate::dist::World;
use crate::error::Result;
use crate::loss::objective::{part, LossParts, Objective, Views};
use crate::model::Encoder;
use crate::optim::AdamW;

/// What a block of a step's rows holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Anchor,
    Positive,
    /// The anchors again, under other dropout masks (a dropout-view term).
    AnchorAgain,
    /// Each example's hard negative (a pairs file with a negative column).
    Negative,
}

/// How a step lays out its rows: one block per view, each with a row per example, in this order.
/// Built once from the objective; everything that makes rows or reads embeddings back (the
/// step, GradCache, the data-parallel gather, the bench) goes through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    blocks: Vec<Block>,
}

impl StepLayout {
    pub fn new(objective: &Objective) -> Self {
        let mut blocks = vec![Block::Anchor, Block::Positive];
        if objective.needs_dropout_view() {
            blocks.push(Block::AnchorAgain);
        }
        Self { blocks }
    }

    /// With a block of hard negatives (every example has one), after the others.
    pub fn with_negatives(mut self, yes: bool) -> Self {
        if yes && !self.blocks.contains(&Block::Negative) {
            self.blocks.push(Block::Negative);
        }
        self
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Row blocks per example.
    pub fn views(&self) -> usize {
        self.blocks.len()
    }

    /// The rows of `examples` (anchor, positive), block by block: ids or texts.
    pub fn rows<'a, T: ?Sized>(&self, examples: &[(&'a T, &'a T)]) -> Vec<&'a T> {
        let side = |b: Block, &(anchor, positive): &(&'a T, &'a T)| match b {
            Block::Anchor | Block::AnchorAgain => anchor,
            Block::Positive | Block::Negative => positive,
        };
        self.blocks.iter().flat_map(|&b| examples.iter().map(move |e| side(b, e))).collect()
    }

    /// One step's micro-batches of `micro` examples each (None: one batch), tokenized.
    pub fn batches(
        &self,
        examples: &[PairIds],
        micro: Option<usize>,
        tokenizer: &TextTokenizer,
        device: &Device,
    ) -> Result<Vec<Batch>> {
        let size = micro.unwrap_or(examples.len()).max(1);
        fn side(b: Block, e: &PairIds) -> Result<&[u32]> {
            Ok(match b {
                Block::Anchor | Block::AnchorAgain => &e.anchor,
                Block::Positive => &e.positive,
                Block::Negative => e.negative.as_deref().ok_or_else(|| {
                    crate::Error::invalid("an example without a hard negative in a batch of examples with them")
                })?,
            })
        }
        let mut out = Vec::new();
        for chunk in examples.chunks(size) {
            let rows = self.blocks.iter().flat_map(|&b| chunk.iter().map(move |e| side(b, e)));
            out.push(tokenizer.batch_ids(&rows.collect::<Result<Vec<_>>>()?, device)?);
        }
        Ok(out)
    }

    /// A batch's embeddings [views * n, d] cut into its blocks.
    pub fn split(&self, emb: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let n = emb.dim(0)? / self.views();
        (0..self.views()).map(|k| emb.narrow(0, k * n, n)).collect()
    }

    /// Examples in a batch of embedded rows.
    pub fn examples(&self, rows: usize) -> usize {
        rows / self.views()
    }

    /// The blocks as the objective's named views; `mean` holds the mean-pooled rows of the
    /// anchors then the positives ([`StepLayout::mean_rows`]).
    pub fn named<'a>(&self, blocks: &'a [Tensor], mean: Option<&'a Tensor>) -> Views<'a> {
        let find = |b: Block| self.blocks.iter().position(|&x| x == b).map(|i| &blocks[i]);
        Views {
            x: &blocks[0],
            y: find(Block::Positive).unwrap_or(&blocks[0]),
            x_drop: find(Block::AnchorAgain),
            mean_xy: mean,
            neg: find(Block::Negative),
        }
    }

    /// The rows of a mean-pooled embedding of a whole batch that the mean view reads: the
    /// anchors' then the positives' (the first two blocks).
    pub fn mean_rows(&self, mean: &Tensor) -> candle_core::Result<Tensor> {
        let n = mean.dim(0)? / self.views();
        mean.narrow(0, 0, 2 * n)
    }
}

/// What one step measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub loss: f32,
    /// The objective's named parts (see [`Objective::loss`]).
    pub parts: Vec<(&'static str, f32)>,
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl StepStats {
    pub fn part(&self, name: &str) -> f32 {
        part(&self.parts, name).unwrap_or(f32::NAN)
    }
}

/// Why a step made no update: the loss or the gradient norm was not finite.
#[derive(Debug, Clone)]
pub struct NonFinite(pub String);

/// What one step did.
#[derive(Debug)]
pub enum StepOutcome {
    Updated(StepStats),
    /// Skipped without touching the weights.
    Skipped(NonFinite),
}

/// A batch's loss, its parts and the parameter gradients.
pub struct Gradients {
    pub loss: f32,
    pub parts: Vec<(&'static str, f32)>,
    pub grads: GradStore,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// What a step computes with: the encoder, its frozen teacher (with `loss.mean_teacher`), the
/// objective and the layout of its rows.
#[derive(Clone, Copy)]
pub struct StepModel<'a> {
    pub encoder: &'a Encoder,
    pub teacher: Option<&'a Encoder>,
    pub objective: &'a Objective,
    pub layout: &'a StepLayout,
}

impl StepModel<'_> {
    /// Whether the encoder must give its own mean view (a mean term without a teacher).
    fn own_mean(&self) -> bool {
        self.objective.needs_mean_view() && self.teacher.is_none()
    }

    /// A micro-batch's embeddings (with a graph) and its mean-pooled rows for the mean view
    /// (the same pass's, or the teacher's), if a term reads them.
    pub fn embed(&self, batch: &Batch, rng: Option<&mut StdRng>) -> Result<(Tensor, Option<Tensor>)> {
        let (emb, own) = self.encoder.embed_views(batch, rng, self.own_mean())?;
        let mean = match (own, self.teacher) {
            (Some(m), _) => Some(m),
            (None, Some(t)) if self.objective.needs_mean_view() => Some(t.embed(batch, None)?.detach()),
            _ => None,
        };
        Ok((emb, mean.map(|m| self.layout.mean_rows(&m)).transpose()?))
    }

    /// The objective on a batch's blocks and mean rows.
    pub fn loss(&self, blocks: &[Tensor], mean: Option<&Tensor>) -> Result<LossParts> {
        Ok(self.objective.loss(&self.layout.named(blocks, mean))?)
    }
}

/// The loss value, or why it cannot be trained on.
fn finite(parts: &LossParts) -> Result<std::result::Result<f32, NonFinite>> {
    let loss = parts.total.to_scalar::<f32>()?;
    Ok(if loss.is_finite() { Ok(loss) } else { Err(NonFinite(format!("loss is {loss} (parts {:?})", parts.parts))) })
}

/// Loss and gradients of one batch given as micro-batches (each laid out by the model's
/// [`StepLayout`]).
///
/// One micro-batch: an ordinary forward and backward. Several: GradCache (Gao et al. 2021),
/// exact for any loss over the whole batch with the memory of one micro-batch: embed every
/// micro-batch without keeping its graph, take the loss over all embeddings and its gradient
/// `G` with respect to them, then run each micro-batch again with a graph and back-propagate
/// `sum(e * G)`; the parameter gradients add up to the full batch's. Each micro-batch draws
/// its dropout masks from its own seed, so both passes see the same masks.
pub fn batch_gradients(
    model: StepModel,
    micro: &[Batch],
    dropout_rng: Option<&mut StdRng>,
) -> Result<std::result::Result<Gradients, NonFinite>> {
    let t0 = Instant::now();
    if let [batch] = micro {
        let (emb, mean) = model.embed(batch, dropout_rng)?;
        let parts = model.loss(&model.layout.split(&emb)?, mean.as_ref())?;
        let loss = match finite(&parts)? {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let forward_s = t0.elapsed().as_secs_f64();
        let grads = crate::model::backward(&parts.total)?;
        let backward_s = t0.elapsed().as_secs_f64() - forward_s;
        return Ok(Ok(Gradients { loss, parts: parts.parts, grads, forward_s, backward_s }));
    }
    let seeds: Option<Vec<u64>> = dropout_rng.map(|r| micro.iter().map(|_| rand::Rng::gen(r)).collect());
    shard_gradients(model, &World::single(), micro, seeds.as_deref())
}

/// GradCache over ranks: this rank's shard of the global batch, as micro-batches `micro` with a
/// dropout seed each (`seeds`; None without dropout). Every micro-batch is embedded without a
/// graph; the ranks all-gather every view block (and the mean rows), so each holds the global
/// batch's embeddings in rank order; each takes the loss over the global batch and its gradient
/// `G` with respect to the embeddings, back-propagates its own rows of `G` through its own
/// micro-batches (embedded again with the same seeds), and the ranks sum the parameter
/// gradients. With one rank this is GradCache in one process; R ranks of m micro-batches give
/// the gradient of one process running GradCache over the same R m micro-batches.
pub fn shard_gradients(
    model: StepModel,
    world: &World,
    micro: &[Batch],
    seeds: Option<&[u64]>,
) -> Result<std::result::Result<Gradients, NonFinite>> {
    let t0 = Instant::now();
    let rng_for = |k: usize| seeds.map(|s| StdRng::seed_from_u64(s[k]));
    if let [batch] = micro {
        return shard_one_pass(model, world, batch, rng_for(0));
    }
    let (own, own_mean) = embed_detached(model, micro, &rng_for)?;
    let n = own[0].dim(0)?;
    let full = own.iter().map(|b| world.gather_rows(b)).collect::<Result<Vec<_>>>()?;
    let mean = own_mean.map(|m| gather_mean(world, &m)).transpose()?;
    let vars = full.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let full: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let parts = model.loss(&full, mean.as_ref())?;
    let loss = match finite(&parts)? {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let g_emb = parts.total.backward()?;
    let own_g = full
        .iter()
        .map(|t| g_emb.get(t).cloned().map_or_else(|| t.zeros_like(), Ok)?.narrow(0, world.rank() * n, n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let forward_s = t0.elapsed().as_secs_f64();
    // Pass 2: each micro-batch with a graph, back-propagating its rows of G.
    let rngs: Vec<Option<StdRng>> = (0..micro.len()).map(rng_for).collect();
    let acc = backprop_rows(model, micro, &own_g, rngs)?;
    let grads = world.all_reduce_grads(&model.encoder.params, acc)?;
    let backward_s = t0.elapsed().as_secs_f64() - forward_s;
    Ok(Ok(Gradients { loss, parts: parts.parts, grads, forward_s, backward_s }))
}

/// A rank's shard in one micro-batch: one forward pass with a graph. The other ranks' rows
/// join as constants and this rank's keep their graph, so back-propagating the global loss
/// reaches the parameters through this rank's rows only: the same gradient as GradCache's two
/// passes, for one forward pass less.
fn shard_one_pass(
    model: StepModel,
    world: &World,
    batch: &Batch,
    mut rng: Option<StdRng>,
) -> Result<std::result::Result<Gradients, NonFinite>> {
    let t0 = Instant::now();
    let (emb, own_mean) = model.embed(batch, rng.as_mut())?;
    let (rank, ranks) = (world.rank(), world.size());
    let mut full = Vec::new();
    for own in model.layout.split(&emb)? {
        let n = own.dim(0)?;
        let all = world.gather_rows(&own)?;
        let before = (rank > 0).then(|| all.narrow(0, 0, rank * n)).transpose()?;
        let after = (rank + 1 < ranks).then(|| all.narrow(0, (rank + 1) * n, (ranks - rank - 1) * n)).transpose()?;
        let rows: Vec<Tensor> = before.into_iter().chain([own]).chain(after).collect();
        full.push(Tensor::cat(&rows, 0)?);
    }
    let mean = own_mean.map(|m| gather_mean(world, &m)).transpose()?;
    let parts = model.loss(&full, mean.as_ref())?;
    let loss = match finite(&parts)? {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let forward_s = t0.elapsed().as_secs_f64();
    let grads = world.all_reduce_grads(&model.encoder.params, crate::model::backward(&parts.total)?)?;
    let backward_s = t0.elapsed().as_secs_f64() - forward_s;
    Ok(Ok(Gradients { loss, parts: parts.parts, grads, forward_s, backward_s }))
}

/// Every rank's mean rows (this rank's `m`: its anchors' rows, then its positives'), laid out
/// as one process would: all anchors in rank order, then all positives.
fn gather_mean(world: &World, m: &Tensor) -> Result<Tensor> {
    let n = m.dim(0)? / 2;
    let (anchors, positives) = (world.gather_rows(&m.narrow(0, 0, n)?)?, world.gather_rows(&m.narrow(0, n, n)?)?);
    Ok(Tensor::cat(&[anchors, positives], 0)?)
}

/// GradCache's first pass: every micro-batch embedded without keeping its graph, each block
/// concatenated over the micro-batches, and the mean rows likewise (anchors' then positives').
fn embed_detached(
    model: StepModel,
    micro: &[Batch],
    rng_for: &dyn Fn(usize) -> Option<StdRng>,
) -> Result<(Vec<Tensor>, Option<Tensor>)> {
    let views = model.layout.views();
    let mut blocks: Vec<Vec<Tensor>> = vec![Vec::new(); views];
    let mut means: Vec<Vec<Tensor>> = vec![Vec::new(); 2];
    for (k, b) in micro.iter().enumerate() {
        let (emb, mean) = model.embed(b, rng_for(k).as_mut())?;
        for (v, part) in model.layout.split(&emb.detach())?.into_iter().enumerate() {
            blocks[v].push(part);
        }
        if let Some(m) = mean {
            let n = m.dim(0)? / 2;
            means[0].push(m.narrow(0, 0, n)?);
            means[1].push(m.narrow(0, n, n)?);
        }
    }
    let full = blocks.iter().map(|b| Tensor::cat(b, 0)).collect::<candle_core::Result<Vec<_>>>()?;
    let mean = match means[0].is_empty() {
        false => Some(Tensor::cat(&[Tensor::cat(&means[0], 0)?, Tensor::cat(&means[1], 0)?], 0)?),
        true => None,
    };
    Ok((full, mean))
}

/// GradCache's second pass: each micro-batch embedded again with its graph (and its own dropout
/// stream), `sum(e * G)` back-propagated with its rows of `G` (one tensor per view block, rows
/// in micro-batch order), and the parameter gradients added up.
fn backprop_rows(
    model: StepModel,
    micro: &[Batch],
    g_views: &[Tensor],
    rngs: Vec<Option<StdRng>>,
) -> Result<GradStore> {
    let encoder = model.encoder;
    let mut acc =
        Var::new(0f32, encoder.params.first().map_or(&Device::Cpu, |(_, v)| v.device()))?.as_tensor().backward()?;
    let mut offset = 0;
    for (b, mut rng) in micro.iter().zip(rngs) {
        let n = model.layout.examples(b.lengths.len());
        let (emb, _) = encoder.embed_views(b, rng.as_mut(), model.own_mean())?;
        let g =
            Tensor::cat(&g_views.iter().map(|g| g.narrow(0, offset, n)).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
        let grads = crate::model::backward(&(emb * g)?.sum_all()?)?;
        for (_, var) in &encoder.params {
            if let Some(gk) = grads.get(var.as_tensor()) {
                let sum = match acc.get(var.as_tensor()) {
                    Some(ga) => (ga + gk)?,
                    None => gk.clone(),
                };
                acc.insert(var.as_tensor(), sum);
            }
        }
        offset += n;
    }
    Ok(acc)
}

/// Clip the gradients to `max_grad_norm` (0: no clipping) and apply AdamW, unless their norm
/// is not finite; `g` is what [`batch_gradients`] (or a data-parallel all-reduce) gave.
pub fn apply(opt: &mut AdamW, g: Gradients, max_grad_norm: f64) -> Result<StepOutcome> {
    let t1 = Instant::now();
    let grad_norm = opt.grad_norm(&g.grads)?;
    let backward_s = g.backward_s + t1.elapsed().as_secs_f64();
    if !grad_norm.is_finite() {
        return Ok(StepOutcome::Skipped(NonFinite(format!("gradient norm is {grad_norm} at loss {}", g.loss))));
    }
    let t2 = Instant::now();
    let scale = if max_grad_norm > 0.0 && grad_norm > max_grad_norm { max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
    opt.step(&g.grads, scale)?;
    Ok(StepOutcome::Updated(StepStats {
        loss: g.loss,
        parts: g.parts,
        grad_norm,
        forward_s: g.forward_s,
        backward_s,
        optimizer_s: t2.elapsed().as_secs_f64(),
    }))
}

/// Forward, backward and (when the numbers are finite) an optimizer update on one batch, given
/// as one or more micro-batches (see [`batch_gradients`]).
pub fn train_step(
    model: StepModel,
    opt: &mut AdamW,
    micro: &[Batch],
    max_grad_norm: f64,
    dropout_rng: Option<&mut StdRng>,
) -> Result<StepOutcome> {
    match batch_gradients(model, micro, dropout_rng)? {
        Ok(g) => apply(opt, g, max_grad_norm),
        Err(e) => Ok(StepOutcome::Skipped(e)),
    }
}

/// A seed for step `step`'s dropout masks, or epoch `epoch`'s shuffle: streams derived from the
/// run seed, so a resumed run draws exactly what an uninterrupted one would.
pub fn derived_seed(seed: u64, kind: u64, index: usize) -> u64 {
    let mut x = seed ^ kind.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser: nearby indices give unrelated seeds.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LossConfig;

    /// With hard negatives, a batch holds the anchors, the positives, then the negatives; an
    /// example without one is an error, not a silent row of something else.
    #[test]
    fn negatives_are_a_block_of_their_own() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/vocab.txt");
        let tok = TextTokenizer::load(&tiny, 16).unwrap();
        let layout = StepLayout::new(&Objective::new(&LossConfig::default())).with_negatives(true);
        assert_eq!(layout.blocks(), [Block::Anchor, Block::Positive, Block::Negative]);
        let ex = |k: u32| PairIds { anchor: vec![10 + k], positive: vec![20 + k], negative: Some(vec![30 + k]) };
        let batches = layout.batches(&[ex(0), ex(1)], None, &tok, &Device::Cpu).unwrap();
        let ids = batches[0].input_ids.to_vec2::<u32>().unwrap();
        let middle: Vec<u32> = ids.iter().map(|r| r[1]).collect();
        assert_eq!(middle, [10, 11, 20, 21, 30, 31]);
        let bad = PairIds { negative: None, ..ex(2) };
        assert!(layout.batches(&[ex(0), bad], None, &tok, &Device::Cpu).is_err());
        // Without negatives the layout is unchanged.
        let plain = StepLayout::new(&Objective::new(&LossConfig::default())).with_negatives(false);
        assert_eq!(plain.blocks(), [Block::Anchor, Block::Positive]);
    }

    #[test]
    fn derived_seeds_differ_by_kind_and_index() {
        let seeds: Vec<u64> = (0..3).flat_map(|k| (0..50).map(move |i| derived_seed(42, k, i))).collect();
        let mut unique = seeds.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seeds.len());
        assert_eq!(derived_seed(42, 2, 7), derived_seed(42, 2, 7));
    }
}
