//! AdamW with decoupled weight decay, global-norm clipping and a warm-up/decay schedule.
//!
//! Our own rather than candle-nn's so that the moments are visible (for checkpoints) and so
//! that biases and LayerNorm weights are excluded from weight decay, as BERT fine-tuning does.
//! On the CPU the update runs in place (one pass, no allocation) instead of building a dozen
//! temporary tensors per parameter.

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::cpu::with_f32s_mut;

pub struct AdamW {
    params: Vec<Param>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    pub step: usize,
}

struct Param {
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
    /// Multiplies the learning rate of this parameter (see `train.norm_lr_scale`).
    lr_scale: f64,
}

/// AdamW's hyper-parameters (candle-nn's `ParamsAdamW` style): what the optimizer needs, and
/// nothing else of the run's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWParams) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|var| {
                // Separate buffers: the update writes into them in place.
                let (m, v) = (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?);
                // Matrices decay; vectors (biases, LayerNorm gains) do not.
                let decay = var.rank() > 1;
                Ok(Param { m, v, var, decay, lr_scale: 1.0 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: 0,
        })
    }

    /// The moments (m, v) of each parameter, in the order of the vars given to `new`.
    pub fn moments(&self) -> Vec<(&Tensor, &Tensor)> {
        self.params.iter().map(|p| (&p.m, &p.v)).collect()
    }

    /// Restore moments (same order and shapes as [`AdamW::moments`]) and the step counter.
    pub fn restore(&mut self, moments: Vec<(Tensor, Tensor)>, step: usize) -> Result<()> {
        if moments.len() != self.params.len() {
            candle_core::bail!("optimizer state has {} parameters, the model {}", moments.len(), self.params.len())
        }
        for (p, (m, v)) in self.params.iter_mut().zip(moments) {
            if m.shape() != p.var.shape() || v.shape() != p.var.shape() {
                candle_core::bail!(
                    "optimizer moment of shape {:?} for a parameter of shape {:?}",
                    m.dims(),
                    p.var.dims()
                )
            }
            (p.m, p.v) = (m.contiguous()?.copy()?, v.contiguous()?.copy()?);
        }
        self.step = step;
        Ok(())
    }

    /// Per-parameter learning-rate multipliers, in the order of the vars given to `new`.
    pub fn set_lr_scales(&mut self, scales: &[f64]) -> Result<()> {
        if scales.len() != self.params.len() {
            bail!("{} learning-rate scales for {} parameters", scales.len(), self.params.len())
        }
        for (p, &s) in self.params.iter_mut().zip(scales) {
            p.lr_scale = s;
        }
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Global L2 norm of the gradients of all parameters (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for p in &self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            let (storage, layout) = g.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => {
                    // Collected, then summed in chunk order: the same result on any thread count.
                    let partials: Vec<f64> =
                        data[a..b].par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x * x) as f64).sum::<f64>()).collect();
                    total += partials.iter().sum::<f64>()
                }
                _ => {
                    drop(storage);
                    total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?
                }
            }
        }
        Ok(total.sqrt())
    }

    /// One update; gradients are multiplied by `grad_scale` first (for clipping).
    pub fn step(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            let lr = self.lr * p.lr_scale;
            let theta = p.var.as_tensor();
            if theta.device().is_cpu() && theta.dtype() == DType::F32 && theta.is_contiguous() {
                let g = g.contiguous()?;
                let keep = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
                let k = Fused {
                    b1: b1 as f32,
                    b2: b2 as f32,
                    scale: grad_scale as f32,
                    keep: keep as f32,
                    lr_over_bc1: (lr / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                    eps: self.eps as f32,
                };
                let (gs, gl) = g.storage_and_layout();
                let g = crate::cpu::storage_f32(&gs, gl)?;
                with_f32s_mut(&p.m, |m| with_f32s_mut(&p.v, |v| with_f32s_mut(theta, |t| k.apply(t, m, v, g))))????;
                continue;
            }
            let g = (g * grad_scale)?;
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + self.eps)?)?;
            let theta = p.var.as_tensor();
            let decayed = if p.decay { (theta * (1.0 - lr * self.weight_decay))? } else { theta.clone() };
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

const CHUNK: usize = 1 << 15;

/// One AdamW update of a parameter in place, in one pass over its values: `m = b1 m + (1 - b1) g`,
/// `v = b2 v + (1 - b2) g^2` (with `g` scaled by `scale` for clipping), then
/// `theta = keep theta - lr (m / bc1) / (sqrt(v / bc2) + eps)`.
struct Fused {
    b1: f32,
    b2: f32,
    scale: f32,
    keep: f32,
    lr_over_bc1: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

impl Fused {
    fn apply(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> Result<()> {
        if m.len() != theta.len() || v.len() != theta.len() || g.len() != theta.len() {
            bail!(
                "AdamW: moments of {} and {} values and a gradient of {} for a parameter of {}",
                m.len(),
                v.len(),
                g.len(),
                theta.len()
            )
        }
        let (r1, r2) = (1.0 - self.b1, 1.0 - self.b2);
        let chunks = theta.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK));
        chunks.zip(g.par_chunks(CHUNK)).for_each(|(((t, m), v), g)| {
            for i in 0..t.len() {
                let g = g[i] * self.scale;
                m[i] = self.b1 * m[i] + r1 * g;
                v[i] = self.b2 * v[i] + r2 * (g * g);
                t[i] = self.keep * t[i] - self.lr_over_bc1 * m[i] / (v[i].sqrt() * self.inv_sqrt_bc2 + self.eps);
            }
        });
        Ok(())
    }
}

/// Learning rate at `step` (1-based): linear warm-up over `warmup` steps to `lr`, then linear
/// decay to 0 at `total`.
pub fn lr_at(step: usize, total: usize, lr: f64, warmup: usize) -> f64 {
    let warm = warmup.min(total);
    if step <= warm && warm > 0 {
        lr * step as f64 / warm as f64
    } else {
        lr * (total.saturating_sub(step)) as f64 / (total - warm).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(lr_at(1, 12, 1.0, 4), 0.25);
        assert_eq!(lr_at(4, 12, 1.0, 4), 1.0);
        assert_eq!(lr_at(8, 12, 1.0, 4), 0.5);
        assert_eq!(lr_at(12, 12, 1.0, 4), 0.0);
    }

    /// A parameter with learning-rate scale s moves s times as far: Adam's first step is
    /// lr * g / (|g| + eps) per element, whatever the gradient's size.
    #[test]
    fn lr_scales_multiply_the_step() {
        let cfg = AdamWParams { lr: 0.01, weight_decay: 0.0, ..Default::default() };
        let (a, b) =
            (Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap(), Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap());
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], cfg).unwrap();
        assert!(opt.set_lr_scales(&[1.0]).is_err());
        opt.set_lr_scales(&[1.0, 50.0]).unwrap();
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
        opt.step(&loss.backward().unwrap(), 1.0).unwrap();
        let moved = |v: &Var| -> Vec<f32> {
            v.as_tensor().to_vec1::<f32>().unwrap().iter().zip([1.0f32, -2.0]).map(|(x, x0)| (x - x0).abs()).collect()
        };
        for (da, db) in moved(&a).into_iter().zip(moved(&b)) {
            assert!((da - 0.01).abs() < 1e-6, "{da}");
            assert!((db - 0.5).abs() < 1e-4, "{db}");
        }
    }

    /// Two steps by hand, PyTorch's AdamW formula: m, v, bias correction, decoupled decay.
    #[test]
    fn matches_hand_computed_adamw() {
        let cfg = AdamWParams { lr: 0.1, weight_decay: 0.5, beta1: 0.9, beta2: 0.99, eps: 1e-8 };
        let w = Var::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![w.clone()], cfg).unwrap();
        let (mut m, mut v, mut theta) = ([0f64; 2], [0f64; 2], [1.0f64, -2.0]);
        for step in 1..=2 {
            // loss = sum(w^2 * c) so grad = 2 c w
            let c = Tensor::new(&[[3f32, 0.5]], &Device::Cpu).unwrap();
            let loss = (w.as_tensor().sqr().unwrap() * &c).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            // Clipped to half.
            opt.step(&grads, 0.5).unwrap();
            for i in 0..2 {
                let g = 0.5 * 2.0 * [3.0, 0.5][i] * theta[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let upd = (m[i] / (1.0 - 0.9f64.powi(step))) / ((v[i] / (1.0 - 0.99f64.powi(step))).sqrt() + 1e-8);
                theta[i] = theta[i] * (1.0 - 0.1 * 0.5) - 0.1 * upd;
            }
        }
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[0][i] as f64 - theta[i]).abs() < 1e-5, "{got:?} vs {theta:?}");
        }
    }
}
