//! AdamW with decoupled weight decay, global-norm clipping and a warm-up/decay schedule.
//!
//! Our own rather than candle-nn's so that the moments are visible (for checkpoints) and so
//! that biases and LayerNorm weights are excluded from weight decay, as BERT fine-tuning does.
//! On the CPU the update runs in place (three passes, no allocation) instead of building a
//! dozen temporary tensors per parameter.

use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::cpu::f32s;

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
                p.m.inplace_op2(&g, &Ema { decay: b1 as f32, scale: grad_scale as f32, square: false })?;
                p.v.inplace_op2(&g, &Ema { decay: b2 as f32, scale: grad_scale as f32, square: true })?;
                let keep = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
                let update = Update {
                    keep: keep as f32,
                    lr_over_bc1: (lr / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                    eps: self.eps as f32,
                };
                theta.inplace_op3(&p.m, &p.v, &update)?;
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

fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => bail!("AdamW: {what} is not a contiguous f32 tensor"),
    }
}

/// Moment update in place: `m = decay m + (1 - decay) (scale g)`, squared for the second moment.
struct Ema {
    decay: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (m, g) = (cpu_f32_mut(s1, l1, "moment")?, f32s(s2, l2, "AdamW gradient")?);
        if m.len() != g.len() {
            bail!("AdamW: moment of {} values for a gradient of {}", m.len(), g.len())
        }
        let (decay, rest, scale, square) = (self.decay, 1.0 - self.decay, self.scale, self.square);
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                let g = g * scale;
                *m = decay * *m + rest * if square { g * g } else { g };
            }
        });
        Ok(())
    }
}

/// `theta = keep theta - lr (m / bc1) / (sqrt(v / bc2) + eps)` in place.
struct Update {
    keep: f32,
    lr_over_bc1: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let theta = cpu_f32_mut(s1, l1, "parameter")?;
        let (m, v) = (f32s(s2, l2, "AdamW first moment")?, f32s(s3, l3, "AdamW second moment")?);
        if m.len() != theta.len() || v.len() != theta.len() {
            bail!("AdamW: moments of {} and {} values for a parameter of {}", m.len(), v.len(), theta.len())
        }
        theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(t, (m, v))| {
            for i in 0..t.len() {
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
            opt.step(&grads, 1.0).unwrap();
            for i in 0..2 {
                let g = 2.0 * [3.0, 0.5][i] * theta[i];
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
