//! Inverted dropout with seeded, thread-count-independent masks, and its backward.

use super::*;

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
pub(super) fn dropout_mask(
    shape: &Shape,
    p: f32,
    rng: &mut rand::rngs::StdRng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    use rand::{Rng, RngCore, SeedableRng};
    let n = shape.elem_count();
    // A unit is dropped when 16 random bits fall below p * 2^16 (p = 0.1 becomes 0.100006).
    let threshold = (p as f64 * 65_536.0).round().min(65_536.0) as u64;
    let scale = 1.0 / (1.0 - p);
    // One ChaCha8 stream per chunk, seeded in order from `rng`: the same mask whatever the
    // number of threads, and both cores drawing.
    let seeds: Vec<u64> = (0..n.div_ceil(CHUNK)).map(|_| rng.gen()).collect();
    let mask = par_blocks(n, CHUNK, |s, chunk| {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seeds[s / CHUNK]);
        for quad in chunk.chunks_mut(4) {
            let bits = r.next_u64();
            for (j, m) in quad.iter_mut().enumerate() {
                *m = if ((bits >> (16 * j)) & 0xffff) < threshold { 0.0 } else { scale };
            }
        }
    });
    Tensor::from_vec(mask, shape, device)
}

pub(super) struct Dropout {
    pub(super) mask: Tensor,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (storage, ml) = self.mask.storage_and_layout();
        let m = storage_f32(&storage, ml)?;
        let out = par_blocks(x.len(), CHUNK, |s, o| mul(&x[s..s + o.len()], &m[s..s + o.len()], o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.mul(&self.mask)?))
    }
}

kernel! {
    pub(super) fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
    }
}
