//! Multi-head attention with the padding mask, softmax and dropout inside, and its backward.

use super::dropout::{dropout_mask, mul};
use super::*;

kernel! {
    /// Softmax of `x * scale + mask` for each row of `x` (rows as long as `mask`). The `exp`
    /// runs over all rows in one loop: rows of a few dozen keys are too short for vector loops
    /// unrolled 4 x 16 wide, which left a row-by-row `exp` mostly scalar.
    fn softmax_rows(x: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
        let s = mask.len();
        for (o, x) in out.chunks_exact_mut(s).zip(x.chunks_exact(s)) {
            for ((o, &v), &m) in o.iter_mut().zip(x).zip(mask) {
                *o = v * scale + m;
            }
            let max = max(o);
            o.iter_mut().for_each(|o| *o -= max);
        }
        out.iter_mut().for_each(|o| *o = exp(*o));
        for o in out.chunks_exact_mut(s) {
            let inv = 1.0 / sum(o);
            o.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

kernel! {
    /// `scale * y * (dy - sum(dy * y))` for one row.
    fn softmax_bwd_row(y: &[f32], dy: &[f32], scale: f32, out: &mut [f32]) {
        let dot = dot(y, dy);
        for ((o, &yv), &g) in out.iter_mut().zip(y).zip(dy) {
            *o = scale * yv * (g - dot);
        }
    }
}

/// Multi-head scaled dot-product attention with padding mask and dropout on the attention
/// probabilities, heads split and merged inside.
///
/// One op instead of three head-split copies, two batched matmuls (candle runs them as one
/// small GEMM call per sequence and head), softmax, dropout and a merge copy, each of which
/// also costs a zero-filled gradient buffer in backward. Backward recomputes the
/// probabilities (cheap at these lengths) rather than storing them.
///
/// # Shapes
/// `q`: [b, nq, h] projected queries (nq may be 1: [CLS] only); `kv`: [b, s, 2h] projected keys
/// then values; `mask_bias`: [b, s] -> [b, nq, h].
pub fn attention(
    k: Kernels,
    q: &Tensor,
    kv: &Tensor,
    mask_bias: &Tensor,
    heads: usize,
    dropout: Option<(f32, &mut rand::rngs::StdRng)>,
) -> Result<Tensor> {
    let (b, nq, h) = q.dims3()?;
    let (b2, s, h2) = kv.dims3()?;
    if b2 != b || h2 != 2 * h || mask_bias.dims() != [b, s] || heads == 0 || h % heads != 0 {
        bail!(
            "attention: q {:?}, kv {:?}, mask {:?}, {heads} heads do not fit together",
            q.dims(),
            kv.dims(),
            mask_bias.dims()
        )
    }
    let scale = 1.0 / ((h / heads) as f64).sqrt();
    let drop = match dropout {
        Some((p, rng)) if p > 0.0 => Some(dropout_mask(&Shape::from((b, heads, nq, s)), p, rng, q.device())?),
        _ => None,
    };
    if !k.fused(q) {
        return reference::attention(q, kv, mask_bias, heads, scale, drop.as_ref());
    }
    let op = Attention { heads, scale: scale as f32, mask: mask_bias.contiguous()?, drop };
    q.contiguous()?.apply_op2(&kv.contiguous()?, op)
}

#[derive(Clone)]
pub(super) struct Attention {
    pub(super) heads: usize,
    pub(super) scale: f32,
    pub(super) mask: Tensor,
    pub(super) drop: Option<Tensor>,
}

/// Shapes of one attention call: sequences, queries, keys, hidden, heads, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nq: usize,
    s: usize,
    h: usize,
    heads: usize,
    hd: usize,
}

impl Attention {
    fn dims(&self, l1: &Layout, l2: &Layout) -> Result<Dims> {
        let (b, nq, h) = l1.shape().dims3()?;
        let (_, s, _) = l2.shape().dims3()?;
        Ok(Dims { b, nq, s, h, heads: self.heads, hd: h / self.heads })
    }
}

/// Per sequence and head: the probabilities after dropout `pd` [nq, s] and before `p`, from
/// queries `q` [nq, h] and keys `kv` [s, 2h] (keys first).
#[allow(clippy::too_many_arguments)]
fn attention_probs(
    d: Dims,
    head: usize,
    q: &[f32],
    kv: &[f32],
    mask: &[f32],
    drop: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    p: &mut [f32],
) {
    let (s, h, hd) = (d.s, d.h, d.hd);
    // scores = Q_head · K_headᵀ
    gemm_small(d.nq, s, hd, scores, s, (&q[head * hd..], h, 1), (&kv[head * hd..], 1, 2 * h));
    softmax_rows(&scores[..d.nq * s], mask, scale, &mut p[..d.nq * s]);
    if let Some(m) = drop {
        mul(p, &m[head * d.nq * s..(head + 1) * d.nq * s], scores);
    } else {
        scores.copy_from_slice(p);
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, kv) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let d = self.dims(l1, l2)?;
        let mut out = vec![0f32; d.b * d.nq * d.h];
        let (mask_guard, mask_layout) = self.mask.storage_and_layout();
        let mask = storage_f32(&mask_guard, mask_layout)?;
        let drop_guard = self.drop.as_ref().map(|t| t.storage_and_layout());
        let drop = drop_guard.as_ref().map(|(g, l)| storage_f32(g, l)).transpose()?;
        {
            out.par_chunks_mut(d.nq * d.h).enumerate().for_each(|(b, out)| {
                let (qb, kvb) =
                    (&q[b * d.nq * d.h..(b + 1) * d.nq * d.h], &kv[b * d.s * 2 * d.h..(b + 1) * d.s * 2 * d.h]);
                let mb = &mask[b * d.s..(b + 1) * d.s];
                let db = drop.as_ref().map(|m| &m[b * d.heads * d.nq * d.s..(b + 1) * d.heads * d.nq * d.s]);
                let (mut pd, mut p) = (vec![0f32; d.nq * d.s], vec![0f32; d.nq * d.s]);
                for head in 0..d.heads {
                    let off = head * d.hd;
                    attention_probs(d, head, qb, kvb, mb, db, self.scale, &mut pd, &mut p);
                    // out[:, head] = pd · V_head
                    gemm_small(d.nq, d.hd, d.s, &mut out[off..], d.h, (&pd, d.s, 1), (&kvb[d.h + off..], 2 * d.h, 1));
                }
            });
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, kv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = q.apply_op3_no_bwd(kv, &grad.contiguous()?, &AttentionBwd(self.clone()))?;
        let (nq_all, nkv) = (q.elem_count(), kv.elem_count());
        let dq = packed.narrow(0, 0, nq_all)?.reshape(q.shape())?;
        let dkv = packed.narrow(0, nq_all, nkv)?.reshape(kv.shape())?;
        Ok((Some(dq), Some(dkv)))
    }
}

/// Gradients of [`Attention`] for q and kv, packed: dq then dkv.
struct AttentionBwd(Attention);

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = &self.0;
        let (q, kv, dout) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let d = a.dims(l1, l2)?;
        let (nq_all, nkv) = (q.len(), kv.len());
        let mut out = par_zeroed(nq_all + nkv);
        let (dq, dkv) = out.split_at_mut(nq_all);
        let (mask_guard, mask_layout) = a.mask.storage_and_layout();
        let mask = storage_f32(&mask_guard, mask_layout)?;
        let drop_guard = a.drop.as_ref().map(|t| t.storage_and_layout());
        let drop = drop_guard.as_ref().map(|(g, l)| storage_f32(g, l)).transpose()?;
        {
            let (qn, kvn) = (d.nq * d.h, d.s * 2 * d.h);
            dq.par_chunks_mut(qn).zip(dkv.par_chunks_mut(kvn)).enumerate().for_each(|(b, (dqb, dkvb))| {
                let (qb, kvb, gb) =
                    (&q[b * qn..(b + 1) * qn], &kv[b * kvn..(b + 1) * kvn], &dout[b * qn..(b + 1) * qn]);
                let mb = &mask[b * d.s..(b + 1) * d.s];
                let db = drop.as_ref().map(|m| &m[b * d.heads * d.nq * d.s..(b + 1) * d.heads * d.nq * d.s]);
                let ns = d.nq * d.s;
                let (mut pd, mut p, mut dpd, mut ds) = (vec![0f32; ns], vec![0f32; ns], vec![0f32; ns], vec![0f32; ns]);
                for head in 0..d.heads {
                    let off = head * d.hd;
                    attention_probs(d, head, qb, kvb, mb, db, a.scale, &mut pd, &mut p);
                    // d(pd) = dO · Vᵀ  [nq, s]
                    gemm_small(d.nq, d.s, d.hd, &mut dpd, d.s, (&gb[off..], d.h, 1), (&kvb[d.h + off..], 1, 2 * d.h));
                    // dV = pdᵀ · dO  [s, hd]
                    gemm_small(d.s, d.hd, d.nq, &mut dkvb[d.h + off..], 2 * d.h, (&pd, 1, d.s), (&gb[off..], d.h, 1));
                    // Through dropout, then softmax: dS = scale p (dp - rowsum(dp p)).
                    if let Some(m) = db {
                        let mh = &m[head * ns..(head + 1) * ns];
                        dpd.iter_mut().zip(mh).for_each(|(g, &mv)| *g *= mv);
                    }
                    for i in 0..d.nq {
                        let r = i * d.s..(i + 1) * d.s;
                        softmax_bwd_row(&p[r.clone()], &dpd[r.clone()], a.scale, &mut ds[r]);
                    }
                    // dQ = dS · K  [nq, hd]; dK = dSᵀ · Q  [s, hd]
                    gemm_small(d.nq, d.hd, d.s, &mut dqb[off..], d.h, (&ds, d.s, 1), (&kvb[off..], 2 * d.h, 1));
                    gemm_small(d.s, d.hd, d.nq, &mut dkvb[off..], 2 * d.h, (&ds, 1, d.s), (&qb[off..], d.h, 1));
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from(nq_all + nkv)))
    }
}
