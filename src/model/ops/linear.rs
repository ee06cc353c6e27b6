//! `x Wᵀ + b` in one GEMM, and its backward.

use super::*;

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
    let op = Linear { bf16: k == Kernels::Bf16 };
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// `bf16`: the products in bf16 ([`super::bf16`]), forward and backward.
pub(super) struct Linear {
    pub(super) bf16: bool,
}

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
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = o;
        if self.bf16 {
            use super::bf16::{gemm, Path, View};
            // x [rows, k] · Wᵀ [k, o], Wᵀ being W read column-wise.
            let (xv, wt) =
                (View { data: x, rows, cols: k, rs: k, cs: 1 }, View { data: w, rows: k, cols: o, rs: 1, cs: k });
            return Ok((CpuStorage::F32(gemm(xv, wt, Some(b), Path::best())?), Shape::from(shape)));
        }
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
        let (dx, dw) = match self.bf16 {
            true => (super::bf16::matmul(&g, &w, false)?, super::bf16::matmul(&g, &x2, true)?),
            false => (g.matmul(&w)?, g.t()?.matmul(&x2)?),
        };
        let dx = dx.reshape(x.shape())?;
        let db = sum_rows(&g, o)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
