//! Layer norm over the last dimension, and its backward.

use super::*;

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
    /// Layer norm of `a + r`, one row, written over `out` (which holds nothing yet): the same
    /// bits as adding first and normalising after.
    fn add_layer_norm_row(a: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(r) {
            *o = x + y;
        }
        let (mean, rstd) = moments(out, eps);
        for ((o, &wv), &bv) in out.iter_mut().zip(w).zip(b) {
            *o = (*o - mean) * rstd * wv + bv;
        }
    }
}

/// `layer_norm(a + r)`, a residual connection and its norm, in one pass over the rows when
/// nothing trains (inference, the frozen teacher): one activation-sized allocation and pass
/// less per use, and the same bits as the two ops.
pub fn add_layer_norm(k: Kernels, a: &Tensor, r: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let trains = [a, r, weight, bias].iter().any(|t| t.track_op());
    if trains || !k.fused(a) || !k.fused(r) || a.shape() != r.shape() {
        return layer_norm(k, &(a + r)?, weight, bias, eps);
    }
    let op = AddLayerNorm { eps: eps as f32, w: weight.contiguous()?, b: bias.contiguous()? };
    a.contiguous()?.apply_op2_no_bwd(&r.contiguous()?, &op)
}

struct AddLayerNorm {
    eps: f32,
    w: Tensor,
    b: Tensor,
}

impl CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "fused-add-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, r) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let ((ws, wl), (bs, bl)) = (self.w.storage_and_layout(), self.b.storage_and_layout());
        let (w, b) = (storage_f32(&ws, wl)?, storage_f32(&bs, bl)?);
        let d = l1.dims().last().copied().unwrap_or(1);
        if w.len() != d || b.len() != d || r.len() != a.len() {
            bail!(
                "add + layer norm over {d} features: weight {}, bias {}, inputs {} and {}",
                w.len(),
                b.len(),
                a.len(),
                r.len()
            )
        }
        let mut out = par_zeroed(a.len());
        par_rows(&mut out, d, |i, row| {
            let span = i * d..(i + 1) * d;
            add_layer_norm_row(&a[span.clone()], &r[span], w, b, self.eps, row)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(k: Kernels, xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !k.fused(xs) {
        return reference::layer_norm(xs, weight, bias, eps);
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

pub(super) struct LayerNorm {
    pub(super) eps: f32,
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
        let mut out = par_zeroed(x.len());
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
        let mut out = par_zeroed(n + 2 * d);
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
