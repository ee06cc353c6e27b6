//! Fused CPU kernels with hand-written backward passes: linear layers, layer norm, masked
//! softmax, GELU, dropout and multi-head attention.
//!
//! Built from primitive ops, each of these is 5-10 candle ops forward and more backward, every
//! one a full pass over memory plus an allocation, and candle's backprop adds a zero-filled
//! gradient buffer per node. One pass each way is what PyTorch does, and what we do here.
//! On other devices or dtypes the same functions fall back to the primitive versions
//! ([`reference`]), which are also what the tests compare against.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    column_sums, dot, erf, exp, f32s, gemm_small, kernel, map_chunks, max, par_rows, reduce2, storage_f32, sum, CHUNK,
    FRAC_1_SQRT_2, INV_SQRT_2PI, LANES,
};

/// Which implementation of the ops a model uses, chosen once when it is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fused kernels of this module where they apply (CPU, f32), else the reference ops.
    #[default]
    Fused,
    /// Primitive candle ops only ([`reference`]): what any device runs, and what the fused
    /// kernels are tested against.
    Reference,
}

impl Kernels {
    /// The fused kernels on the CPU; the reference ops on other devices (the fused kernels are
    /// CPU code).
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Kernels::Fused
        } else {
            Kernels::Reference
        }
    }

    /// Whether `xs` goes through a fused kernel (f32 on the CPU, with fused kernels chosen).
    fn fused(self, xs: &Tensor) -> bool {
        self == Kernels::Fused && xs.device().is_cpu() && xs.dtype() == DType::F32
    }
}

kernel! {
    /// `0.5 x (1 + erf(x / sqrt 2))`
    fn gelu_fwd(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
        }
    }
}

kernel! {
    /// `dy (Phi(x) + x phi(x))`
    fn gelu_bwd(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * v * v);
            *o = g * (cdf + v * pdf);
        }
    }
}

kernel! {
    /// Softmax of `x * scale + mask` for one row.
    fn softmax_row(x: &[f32], mask: &[f32], scale: f32, out: &mut [f32]) {
        for ((o, &v), &m) in out.iter_mut().zip(x).zip(mask) {
            *o = v * scale + m;
        }
        let max = max(out);
        out.iter_mut().for_each(|o| *o = exp(*o - max));
        let inv = 1.0 / sum(out);
        out.iter_mut().for_each(|o| *o *= inv);
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

kernel! {
    /// Layer norm of one row.
    fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let (mean, rstd) = moments(x, eps);
        for (((o, &v), &wv), &bv) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) * rstd * wv + bv;
        }
    }
}

kernel! {
    /// Layer norm backward for one row: writes dx, adds into the dweight and dbias sums.
    fn layer_norm_bwd_row(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
        let (mean, rstd) = moments(x, eps);
        let d = x.len() as f32;
        // dx holds xhat until the last loop.
        for (h, &v) in dx.iter_mut().zip(x) {
            *h = (v - mean) * rstd;
        }
        for (((a, b), &g), &h) in dw.iter_mut().zip(db.iter_mut()).zip(dy).zip(dx.iter()) {
            *a += g * h;
            *b += g;
        }
        let mean_g = reduce2(dy, w, |g, wv| g * wv) / d;
        let mut acc = [0f32; LANES];
        let (cg, cw, ch) = (dy.chunks_exact(LANES), w.chunks_exact(LANES), dx.chunks_exact(LANES));
        let tail: f32 = cg.remainder().iter().zip(cw.remainder()).zip(ch.remainder()).map(|((g, wv), h)| g * wv * h).sum();
        for ((g, wv), h) in cg.zip(cw).zip(ch) {
            for j in 0..LANES {
                acc[j] += g[j] * wv[j] * h[j];
            }
        }
        let mean_gx = (acc.iter().sum::<f32>() + tail) / d;
        for ((o, &g), &wv) in dx.iter_mut().zip(dy).zip(w) {
            *o = rstd * (g * wv - mean_g - *o * mean_gx);
        }
    }
}

kernel! {
    fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
    }
}

/// Column sums of `g` viewed as [rows, cols], as a [cols] tensor.
fn sum_rows(g: &Tensor, cols: usize) -> Result<Tensor> {
    if !Kernels::Fused.fused(g) {
        return g.reshape(((), cols))?.sum(0);
    }
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let sums = column_sums(storage_f32(&storage, layout)?, cols);
    Tensor::from_vec(sums, cols, g.device())
}

/// `x Wᵀ + b` over the last dimension of `x`, any leading shape.
///
/// One GEMM whose output buffer starts out holding the bias, where candle would zero the output,
/// multiply, then add the bias in a second pass (and backward would add reshape, transpose and
/// broadcast nodes, each with a zero-filled gradient).
pub fn linear(k: Kernels, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !k.fused(xs) {
        return reference::linear(xs, weight, bias);
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (x, w, b) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let dims = l1.dims();
        let k = dims.last().copied().unwrap_or(1);
        let (o, wk) = l2.shape().dims2()?;
        if wk != k || b.len() != o {
            bail!("linear: input with {k} features, weight {:?}, bias of {}", l2.dims(), b.len())
        }
        let rows = x.len() / k.max(1);
        let mut out = Vec::with_capacity(rows * o);
        for _ in 0..rows {
            out.extend_from_slice(b);
        }
        let threads = rayon::current_num_threads();
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // out[rows, o] = 1 * out + 1 * x[rows, k] @ Wᵀ[k, o]; Wᵀ is W read column-wise.
        // SAFETY: the three buffers hold exactly rows*o, rows*k and o*k elements (checked above),
        // and the strides below stay inside them.
        unsafe {
            gemm::gemm(
                rows,
                o,
                k,
                out.as_mut_ptr(),
                1,
                o as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            )
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = o;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: these products are gradients, not part of any graph.
        let (x, w) = (x.detach(), w.detach());
        let (o, k) = w.dims2()?;
        let g = grad.contiguous()?.reshape(((), o))?;
        let x2 = x.reshape(((), k))?;
        let dx = g.matmul(&w)?.reshape(x.shape())?;
        let dw = g.t()?.matmul(&x2)?;
        let db = sum_rows(&g, o)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Inverted dropout: `x * mask`, with the mask (0 or 1 / (1 - p)) drawn from `rng`.
///
/// A fused op because candle's multiply would also compute, zero-fill and accumulate a
/// gradient for the mask, which nothing reads.
pub fn dropout(k: Kernels, xs: &Tensor, p: f32, rng: &mut rand::rngs::StdRng) -> Result<Tensor> {
    let mask = dropout_mask(xs.shape(), p, rng, xs.device())?.to_dtype(xs.dtype())?;
    if !k.fused(xs) {
        return xs * mask;
    }
    xs.contiguous()?.apply_op1(Dropout { mask })
}

/// An inverted-dropout mask of `shape`: 0 with probability `p`, else `1 / (1 - p)`.
fn dropout_mask(shape: &Shape, p: f32, rng: &mut rand::rngs::StdRng, device: &candle_core::Device) -> Result<Tensor> {
    use rand::{Rng, RngCore, SeedableRng};
    let n = shape.elem_count();
    // A unit is dropped when 16 random bits fall below p * 2^16 (p = 0.1 becomes 0.100006).
    let threshold = (p as f64 * 65_536.0).round().min(65_536.0) as u64;
    let scale = 1.0 / (1.0 - p);
    // One ChaCha8 stream per chunk, seeded in order from `rng`: the same mask whatever the
    // number of threads, and both cores drawing.
    let seeds: Vec<u64> = (0..n.div_ceil(CHUNK)).map(|_| rng.gen()).collect();
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(CHUNK).zip(seeds).for_each(|(chunk, seed)| {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for quad in chunk.chunks_mut(4) {
            let bits = r.next_u64();
            for (j, m) in quad.iter_mut().enumerate() {
                *m = if ((bits >> (16 * j)) & 0xffff) < threshold { 0.0 } else { scale };
            }
        }
    });
    Tensor::from_vec(mask, shape, device)
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
struct Attention {
    heads: usize,
    scale: f32,
    mask: Tensor,
    drop: Option<Tensor>,
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
    for i in 0..d.nq {
        softmax_row(&scores[i * s..(i + 1) * s], mask, scale, &mut p[i * s..(i + 1) * s]);
    }
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
        let mut out = vec![0f32; nq_all + nkv];
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

struct Dropout {
    mask: Tensor,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (storage, ml) = self.mask.storage_and_layout();
        let m = storage_f32(&storage, ml)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(m.par_chunks(CHUNK)))
            .for_each(|(o, (x, m))| mul(x, m, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.mul(&self.mask)?))
    }
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(k: Kernels, xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !k.fused(xs) {
        return reference::layer_norm(xs, weight, bias, eps);
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// Mean and 1 / std of one row (two passes: stable for rows with a large mean).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = sum(row) / d;
    let var = reduce2(row, row, |v, _| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (x, w, b) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let d = l1.dims().last().copied().unwrap_or(1);
        if w.len() != d || b.len() != d {
            bail!("layer norm over {d} features with weight {} and bias {}", w.len(), b.len())
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, row| layer_norm_row(&x[r * d..(r + 1) * d], w, b, self.eps, row));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?;
        let db = packed.narrow(0, n + d, d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Gradients of layer norm packed in one buffer: dx (all of x), then dweight, then dbias.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
        let (x, w, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let d = w.len();
        let n = x.len();
        let mut out = vec![0f32; n + 2 * d];
        let (dx, _) = out.split_at_mut(n);
        let per = (CHUNK / d).max(1);
        // Each chunk of rows returns its partial sums of dweight and dbias.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(per * d)
            .enumerate()
            .map(|(c, chunk)| {
                let mut acc = vec![0f32; 2 * d];
                let (dw, db) = acc.split_at_mut(d);
                for (j, dxr) in chunk.chunks_mut(d).enumerate() {
                    let r = c * per + j;
                    layer_norm_bwd_row(&x[r * d..(r + 1) * d], w, &dy[r * d..(r + 1) * d], self.eps, dxr, dw, db);
                }
                acc
            })
            .collect();
        let tail = &mut out[n..];
        for p in partials {
            for (t, v) in tail.iter_mut().zip(p) {
                *t += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

/// Exact GELU, `x * Phi(x)` with the normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_erf(k: Kernels, xs: &Tensor) -> Result<Tensor> {
    if !k.fused(xs) {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let out = map_chunks(x, gelu_fwd);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// `dy * (Phi(x) + x phi(x))`.
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| gelu_bwd(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The same functions from primitive candle ops (autograd derives their backward passes).
pub mod reference {
    use candle_core::{Result, Tensor, D};

    pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let k = weight.dim(1)?;
        let mut shape = xs.dims().to_vec();
        let out = xs.reshape(((), k))?.matmul(&weight.t()?)?.broadcast_add(bias)?;
        *shape.last_mut().unwrap_or(&mut 0) = weight.dim(0)?;
        out.reshape(shape)
    }

    pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
        normed.broadcast_mul(weight)?.broadcast_add(bias)
    }

    /// Multi-head attention from primitive ops; `drop` is the mask on the probabilities.
    pub fn attention(
        q: &Tensor,
        kv: &Tensor,
        mask_bias: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, nq, h) = q.dims3()?;
        let s = kv.dim(1)?;
        let hd = h / heads;
        let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous();
        let (k, v) = (kv.narrow(2, 0, h)?, kv.narrow(2, h, h)?);
        let (q, k, v) = (split(q, nq)?, split(&k, s)?, split(&v, s)?);
        let mut probs = masked_softmax(&q.matmul(&k.t()?)?, mask_bias, scale)?;
        if let Some(m) = drop {
            probs = (probs * m)?;
        }
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, h))
    }

    pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
        let bias = mask_bias.unsqueeze(1)?.unsqueeze(1)?;
        candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&bias)?, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(rng: &mut StdRng, shape: &[usize], scale: f32) -> Vec<f32> {
        (0..shape.iter().product::<usize>()).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    /// Central finite differences of `sum(f(inputs) * r)` against the op's backward, for
    /// every element of every input that has a gradient.
    fn check_grads(inputs: &[Var], f: &dyn Fn(&[Tensor]) -> Result<Tensor>, tol: f32) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let r = Tensor::from_vec(random(&mut rng, out.dims(), 1.0), out.shape(), out.device()).unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-2f32;
        for (k, var) in inputs.iter().enumerate() {
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..base.len() {
                let loss_at = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[i] += delta;
                    let mut ts = ts.clone();
                    ts[k] = Tensor::from_vec(v, var.shape(), var.device()).unwrap();
                    let y = f(&ts).unwrap().to_dtype(DType::F64).unwrap();
                    (y * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
                };
                let numeric = ((loss_at(h) - loss_at(-h)) / (2.0 * h as f64)) as f32;
                assert!(
                    (numeric - analytic[i]).abs() <= tol * (1.0 + numeric.abs()),
                    "input {k} element {i}: finite difference {numeric}, backward {}",
                    analytic[i]
                );
            }
        }
    }

    fn var(rng: &mut StdRng, shape: &[usize], scale: f32) -> Var {
        Var::from_vec(random(rng, shape, scale), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn layer_norm_matches_reference_and_finite_differences() {
        let mut rng = StdRng::seed_from_u64(1);
        let (x, w, b) = (var(&mut rng, &[2, 3, 8], 2.0), var(&mut rng, &[8], 1.5), var(&mut rng, &[8], 1.0));
        let fused = |t: &[Tensor]| layer_norm(Kernels::Fused, &t[0], &t[1], &t[2], 1e-5);
        check_grads(&[x.clone(), w.clone(), b.clone()], &fused, 2e-2);
        let (xs, ws, bs) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let ours = layer_norm(Kernels::Fused, xs, ws, bs, 1e-5).unwrap();
        let want = reference::layer_norm(xs, ws, bs, 1e-5).unwrap();
        close(&ours, &want, 1e-5);
        let r = Tensor::from_vec(random(&mut rng, &[2, 3, 8], 1.0), (2, 3, 8), &Device::Cpu).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [xs, ws, bs] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
        }
    }

    #[test]
    fn gelu_matches_candle_and_finite_differences() {
        let mut rng = StdRng::seed_from_u64(3);
        let x = var(&mut rng, &[3, 7], 4.0);
        check_grads(std::slice::from_ref(&x), &|t: &[Tensor]| gelu_erf(Kernels::Fused, &t[0]), 2e-2);
        let ours = gelu_erf(Kernels::Fused, x.as_tensor()).unwrap();
        let want = x.as_tensor().gelu_erf().unwrap();
        close(&ours, &want, 1e-6);
        let g1 = ours.sum_all().unwrap().backward().unwrap();
        let g2 = want.sum_all().unwrap().backward().unwrap();
        close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn linear_matches_reference_and_finite_differences() {
        let mut rng = StdRng::seed_from_u64(5);
        let (x, w, b) = (var(&mut rng, &[2, 3, 4], 1.0), var(&mut rng, &[5, 4], 1.0), var(&mut rng, &[5], 1.0));
        check_grads(
            &[x.clone(), w.clone(), b.clone()],
            &|t: &[Tensor]| linear(Kernels::Fused, &t[0], &t[1], &t[2]),
            1e-2,
        );
        let (xs, ws, bs) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let ours = linear(Kernels::Fused, xs, ws, bs).unwrap();
        assert_eq!(ours.dims(), [2, 3, 5]);
        let want = reference::linear(xs, ws, bs).unwrap();
        close(&ours, &want, 1e-6);
        let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [xs, ws, bs] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-5);
        }
    }

    #[test]
    fn dropout_keeps_about_1_minus_p_scales_and_masks_the_gradient() {
        let mut rng = StdRng::seed_from_u64(6);
        let x = Var::from_vec(vec![1f32; 20_000], (100, 200), &Device::Cpu).unwrap();
        let y = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut rng).unwrap();
        let vals = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kept = vals.iter().filter(|&&v| v != 0.0).count() as f64 / vals.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(vals.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        // d(sum y)/dx is the mask itself.
        let g = y.sum_all().unwrap().backward().unwrap();
        let grad = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(grad, vals);
        // Same seed, same mask; another seed, another mask.
        let again = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut StdRng::seed_from_u64(6)).unwrap();
        assert_eq!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
        let other = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut StdRng::seed_from_u64(7)).unwrap();
        assert_ne!(other.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
    }

    /// Inputs for attention: 2 sequences of 5 tokens, hidden 8 in 2 heads, the second
    /// sequence padded after 3 tokens.
    fn attention_inputs(rng: &mut StdRng, nq: usize) -> (Var, Var, Tensor) {
        let q = var(rng, &[2, nq, 8], 1.5);
        let kv = var(rng, &[2, 5, 16], 1.5);
        let mask = Tensor::new(&[[0f32, 0., 0., 0., 0.], [0., 0., 0., -10_000., -10_000.]], &Device::Cpu).unwrap();
        (q, kv, mask)
    }

    #[test]
    fn attention_matches_reference_and_finite_differences() {
        let mut rng = StdRng::seed_from_u64(8);
        for nq in [5, 1] {
            let (q, kv, mask) = attention_inputs(&mut rng, nq);
            let fused = |t: &[Tensor]| attention(Kernels::Fused, &t[0], &t[1], &mask, 2, None);
            check_grads(&[q.clone(), kv.clone()], &fused, 2e-2);
            // With dropout: the same seed gives the fused op and the reference the same mask.
            for p in [0.0f32, 0.3] {
                let mut r1 = StdRng::seed_from_u64(11);
                let ours =
                    attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, Some((p, &mut r1))).unwrap();
                let drop = (p > 0.0).then(|| {
                    dropout_mask(&Shape::from((2, 2, nq, 5)), p, &mut StdRng::seed_from_u64(11), &Device::Cpu).unwrap()
                });
                let scale = 1.0 / 2f64;
                let want = reference::attention(q.as_tensor(), kv.as_tensor(), &mask, 2, scale, drop.as_ref()).unwrap();
                close(&ours, &want, 1e-5);
                let r = Tensor::from_vec(random(&mut rng, &[2, nq, 8], 1.0), (2, nq, 8), &Device::Cpu).unwrap();
                let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for t in [q.as_tensor(), kv.as_tensor()] {
                    close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
                }
            }
        }
    }

    #[test]
    fn attention_ignores_padded_keys() {
        let mut rng = StdRng::seed_from_u64(12);
        let (q, kv, mask) = attention_inputs(&mut rng, 5);
        let base = attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, None).unwrap();
        // Change the keys and values of the second sequence's padding: nothing moves.
        let mut vals = kv.as_tensor().to_vec3::<f32>().unwrap();
        for row in &mut vals[1][3..] {
            row.iter_mut().for_each(|v| *v += 5.0);
        }
        let kv2 = Tensor::new(vals, &Device::Cpu).unwrap();
        let moved = attention(Kernels::Fused, q.as_tensor(), &kv2, &mask, 2, None).unwrap();
        close(&moved, &base, 1e-6);
    }

    #[test]
    fn big_inputs_split_across_chunks_agree_with_reference() {
        // More rows than one work item holds, so the chunked reductions are exercised.
        let mut rng = StdRng::seed_from_u64(4);
        let (x, w, b) = (var(&mut rng, &[300, 96], 3.0), var(&mut rng, &[96], 1.0), var(&mut rng, &[96], 1.0));
        let ours = layer_norm(Kernels::Fused, x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        let want = reference::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        close(&ours, &want, 1e-5);
        let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-3);
        }
        // Softmax rows longer than the reduction lanes, with a partial last chunk, and padding
        // of a different length in each sequence.
        let (q, kv) = (var(&mut rng, &[3, 37, 64], 1.0), var(&mut rng, &[3, 37, 128], 1.0));
        let mask_rows: Vec<f32> =
            (0..3 * 37).map(|i| if i % 37 > 30 - (i / 37) * 5 { -10_000.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask_rows, (3, 37), &Device::Cpu).unwrap();
        let ours = attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, None).unwrap();
        let want = reference::attention(q.as_tensor(), kv.as_tensor(), &mask, 2, 1.0 / 32f64.sqrt(), None).unwrap();
        close(&ours, &want, 1e-5);
        let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [q.as_tensor(), kv.as_tensor()] {
            close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
        }
        let x = var(&mut rng, &[70, 1000], 6.0);
        let ours = gelu_erf(Kernels::Fused, x.as_tensor()).unwrap();
        close(&ours, &x.as_tensor().gelu_erf().unwrap(), 1e-6);
    }
}
