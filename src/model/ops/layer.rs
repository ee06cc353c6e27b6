//! A whole transformer layer as one node of candle's graph, for training on the CPU.
//!
//! candle's backward gives every op input a zero-filled gradient buffer and adds the incoming
//! gradient into it: a zero fill on the calling thread, then an add into a fresh allocation,
//! for every edge of the graph. Over a layer's dozen ops that was about a fifth of a bf16
//! training step. Here the layer's fused ops run outside the graph and their backward passes
//! are chained by hand, each gradient used as it comes. The graph holds one op, on the layer's
//! input; its parameters' gradients leave the backward pass by a side door (a per-thread sink)
//! that [`backward`] empties into the gradient store, so they are neither concatenated nor
//! zero-filled and added to on the way.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::Storage;
use rand::rngs::StdRng;

use super::attention::Attention;
use super::dropout::{dropout_mask, Dropout};
use super::gelu::Gelu;
use super::layer_norm::LayerNorm;
use super::linear::Linear;
use super::*;

/// A BERT layer's parameters, each `[weight, bias]`, and its settings.
pub struct LayerParams<'a> {
    pub query: [&'a Tensor; 2],
    pub key: [&'a Tensor; 2],
    pub value: [&'a Tensor; 2],
    pub attention_output: [&'a Tensor; 2],
    pub attention_norm: [&'a Tensor; 2],
    pub intermediate: [&'a Tensor; 2],
    pub output: [&'a Tensor; 2],
    pub output_norm: [&'a Tensor; 2],
    pub eps: f32,
    pub heads: usize,
    /// Dropout on the attention probabilities, and on the two sublayers' outputs.
    pub p_attention: f32,
    pub p_hidden: f32,
}

/// Indexes into [`LayerParams::tensors`].
const Q: usize = 0;
const K: usize = 2;
const V: usize = 4;
const AO: usize = 6;
const AN: usize = 8;
const UP: usize = 10;
const DOWN: usize = 12;
const ON: usize = 14;

impl LayerParams<'_> {
    /// The sixteen tensors in a fixed order: the order of the flattened parameter vector.
    fn tensors(&self) -> [&Tensor; 16] {
        let [q, k, v, ao, an, up, down, on] = [
            self.query,
            self.key,
            self.value,
            self.attention_output,
            self.attention_norm,
            self.intermediate,
            self.output,
            self.output_norm,
        ];
        [q[0], q[1], k[0], k[1], v[0], v[1], ao[0], ao[1], an[0], an[1], up[0], up[1], down[0], down[1], on[0], on[1]]
    }
}

thread_local! {
    /// Parameter gradients of the [`layer`] ops back-propagated on this thread (candle runs a
    /// backward pass on the calling thread), each with its parameter; [`backward`] takes them.
    static SINK: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()`, with the parameter gradients of the [`layer`] ops in it merged into the
/// store. Every loss over an encoder that may train through [`layer`] goes back through here:
/// candle's own `backward` would leave those layers' parameters without gradients.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SINK.with_borrow_mut(Vec::clear);
    let mut grads = loss.backward()?;
    for (param, g) in SINK.with_borrow_mut(std::mem::take) {
        let sum = match grads.get(&param) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&param, sum);
    }
    Ok(grads)
}

/// Whether [`layer`] applies: fused f32 or bf16 kernels on a CPU f32 input, exact GELU, and a
/// gradient to compute (inference keeps the op-by-op path, which builds no graph anyway).
pub fn trains_fused(k: Kernels, xs: &Tensor, p: &LayerParams) -> bool {
    matches!(k, Kernels::Fused | Kernels::Bf16)
        && k.fused(xs)
        && (xs.track_op() || p.tensors().iter().any(|t| t.track_op()))
}

/// An inverted-dropout mask when `rng` is given and `p > 0`, drawn as [`super::dropout`] does.
fn draw(rng: Option<&mut StdRng>, shape: &Shape, p: f32, device: &candle_core::Device) -> Result<Option<Tensor>> {
    match rng {
        Some(rng) if p > 0.0 => Ok(Some(dropout_mask(shape, p, rng, device)?)),
        _ => Ok(None),
    }
}

/// `x * mask`, or `x` without a mask (dropout's forward, and its backward on a gradient).
fn masked(x: &Tensor, mask: &Option<Tensor>) -> Result<Tensor> {
    match mask {
        Some(m) => x.apply_op1_no_bwd(&Dropout { mask: m.clone() }),
        None => Ok(x.clone()),
    }
}

/// A BERT layer (post-norm, exact GELU), the same ops in the same order as the op-by-op layer
/// of [`crate::model::bert`], its dropout masks drawn from `rng` in the same order too; only
/// the first `queries` positions are computed. `xs` [b, s, h], `mask_bias` [b, s].
pub fn layer(
    k: Kernels,
    p: &LayerParams,
    xs: &Tensor,
    mask_bias: &Tensor,
    queries: usize,
    mut rng: Option<&mut StdRng>,
) -> Result<Tensor> {
    let params = p.tensors();
    let w = params.iter().map(|t| t.detach().contiguous()).collect::<Result<Vec<_>>>()?;
    let x = xs.detach().contiguous()?;
    let (b, s, h) = x.dims3()?;
    if mask_bias.dims() != [b, s] || p.heads == 0 || h % p.heads != 0 || queries == 0 || queries > s {
        bail!("encoder layer: input {:?}, mask {:?}, {} heads, {queries} queries", x.dims(), mask_bias.dims(), p.heads)
    }
    let dev = x.device();
    let lin = Linear { bf16: k == Kernels::Bf16 };
    let xq = if queries < s { x.narrow(1, 0, queries)?.contiguous()? } else { x.clone() };
    let q = xq.apply_op3_no_bwd(&w[Q], &w[Q + 1], &lin)?;
    // Keys and values in one GEMM: [b, s, 2h].
    let (wkv, bkv) = (Tensor::cat(&[&w[K], &w[V]], 0)?, Tensor::cat(&[&w[K + 1], &w[V + 1]], 0)?);
    let kv = x.apply_op3_no_bwd(&wkv, &bkv, &lin)?;
    let att = Attention {
        heads: p.heads,
        scale: (1.0 / ((h / p.heads) as f64).sqrt()) as f32,
        mask: mask_bias.contiguous()?,
        drop: draw(rng.as_deref_mut(), &Shape::from((b, p.heads, queries, s)), p.p_attention, dev)?,
    };
    let ctx = q.apply_op2_no_bwd(&kv, &att)?;
    let a = ctx.apply_op3_no_bwd(&w[AO], &w[AO + 1], &lin)?;
    let drop1 = draw(rng.as_deref_mut(), a.shape(), p.p_hidden, dev)?;
    let ln = LayerNorm { eps: p.eps };
    let r1 = (masked(&a, &drop1)? + &xq)?;
    let x1 = r1.apply_op3_no_bwd(&w[AN], &w[AN + 1], &ln)?;
    let up = x1.apply_op3_no_bwd(&w[UP], &w[UP + 1], &lin)?;
    let g = up.apply_op1_no_bwd(&Gelu)?;
    let down = g.apply_op3_no_bwd(&w[DOWN], &w[DOWN + 1], &lin)?;
    let drop2 = draw(rng, down.shape(), p.p_hidden, dev)?;
    let r2 = (masked(&down, &drop2)? + &x1)?;
    // The op's second input only puts it on the graph when a parameter trains (and the input
    // does not): the parameters' gradients go to the sink.
    let anchor = params.iter().find(|t| t.track_op()).copied().unwrap_or(params[ON + 1]).clone();
    let params = params.map(Tensor::clone);
    let op = EncoderLayer { lin, ln, att, params, w, wkv, bkv, x, xq, q, kv, ctx, drop1, r1, x1, up, g, drop2, r2 };
    xs.contiguous()?.apply_op2(&anchor, op)
}

/// The layer's forward values that its backward reads.
struct EncoderLayer {
    lin: Linear,
    ln: LayerNorm,
    att: Attention,
    /// The parameters themselves (what the gradients are for), and `w`, their contiguous data.
    params: [Tensor; 16],
    w: Vec<Tensor>,
    wkv: Tensor,
    bkv: Tensor,
    x: Tensor,
    xq: Tensor,
    q: Tensor,
    kv: Tensor,
    ctx: Tensor,
    drop1: Option<Tensor>,
    r1: Tensor,
    x1: Tensor,
    up: Tensor,
    g: Tensor,
    drop2: Option<Tensor>,
    r2: Tensor,
}

/// The three gradients of an (input, weight, bias) op, all of which ours return.
fn three(g: (Option<Tensor>, Option<Tensor>, Option<Tensor>)) -> Result<[Tensor; 3]> {
    match g {
        (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
        _ => bail!("encoder layer: an op returned no gradient"),
    }
}

impl CustomOp2 for EncoderLayer {
    fn name(&self) -> &'static str {
        "fused-encoder-layer"
    }

    /// The layer's last op, the output layer norm, from the values computed when the op was
    /// built: its result is the op's output, with no copy.
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, rl) = self.r2.storage_and_layout();
        let (w, wl) = self.w[ON].storage_and_layout();
        let (b, bl) = self.w[ON + 1].storage_and_layout();
        match (&*r, &*w, &*b) {
            (Storage::Cpu(r), Storage::Cpu(w), Storage::Cpu(b)) => self.ln.cpu_fwd(r, rl, w, wl, b, bl),
            _ => bail!("encoder layer: expected CPU tensors"),
        }
    }

    /// `y` (the output) only fills the ops' unused `res` argument.
    fn bwd(&self, _: &Tensor, _: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (l, w) = (&self.lin, &self.w);
        let dy = grad.contiguous()?;
        let [dr2, dn2w, dn2b] = three(self.ln.bwd(&self.r2, &w[ON], &w[ON + 1], y, &dy)?)?;
        let [dg, ddw, ddb] = three(l.bwd(&self.g, &w[DOWN], &w[DOWN + 1], y, &masked(&dr2, &self.drop2)?)?)?;
        let Some(dup) = Gelu.bwd(&self.up, &self.g, &dg)? else { bail!("encoder layer: GELU returned no gradient") };
        let [dx1, duw, dub] = three(l.bwd(&self.x1, &w[UP], &w[UP + 1], y, &dup)?)?;
        let [dr1, dn1w, dn1b] = three(self.ln.bwd(&self.r1, &w[AN], &w[AN + 1], y, &(dx1 + &dr2)?)?)?;
        let [dctx, dow, dob] = three(l.bwd(&self.ctx, &w[AO], &w[AO + 1], y, &masked(&dr1, &self.drop1)?)?)?;
        let (Some(dq), Some(dkv)) = self.att.bwd(&self.q, &self.kv, y, &dctx)? else {
            bail!("encoder layer: attention returned no gradient")
        };
        let [dxq, dqw, dqb] = three(l.bwd(&self.xq, &w[Q], &w[Q + 1], y, &dq)?)?;
        let [dx, dkvw, dkvb] = three(l.bwd(&self.x, &self.wkv, &self.bkv, y, &dkv)?)?;
        let (s, nq, h) = (self.x.dim(1)?, self.xq.dim(1)?, w[Q + 1].elem_count());
        let dxq = (dxq + dr1)?.pad_with_zeros(1, 0, s - nq)?;
        let dx = (dx + dxq)?;
        let parts = [
            dqw,
            dqb,
            dkvw.narrow(0, 0, h)?,
            dkvb.narrow(0, 0, h)?,
            dkvw.narrow(0, h, h)?,
            dkvb.narrow(0, h, h)?,
            dow,
            dob,
            dn1w,
            dn1b,
            duw,
            dub,
            ddw,
            ddb,
            dn2w,
            dn2b,
        ];
        SINK.with_borrow_mut(|sink| {
            let trained = self.params.iter().zip(parts).filter(|(p, _)| p.track_op());
            sink.extend(trained.map(|(p, g)| (p.clone(), g)))
        });
        Ok((Some(dx), None))
    }
}
