//! Exact (erf) GELU, and its backward.

use super::*;

kernel! {
    /// `0.5 x (1 + erf(x / sqrt 2))`
    fn gelu_fwd(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
        }
    }
}

kernel! {
    /// [`gelu_fwd`] in place (the same operations, so the same bits): the epilogue of the
    /// int8 linear layer that feeds it.
    pub(crate) fn gelu_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * FRAC_1_SQRT_2));
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

/// Exact GELU, `x * Phi(x)` with the normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_erf(k: Kernels, xs: &Tensor) -> Result<Tensor> {
    if !k.fused(xs) {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1(Gelu)
}

pub(super) struct Gelu;

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
        let out = par_blocks(x.len(), CHUNK, |s, o| gelu_bwd(&x[s..s + o.len()], &dy[s..s + o.len()], o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
