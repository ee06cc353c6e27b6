//! `hypersphere check-device`: one training step on a device against the same step on the CPU,
//! from the same weights and batch: the loss, every parameter's gradient and the updated
//! weights, each within a stated tolerance. On the CPU itself the device side runs the
//! reference ops (what every other device runs), so the check also runs where no GPU is.
//!
//! Dropout is off on both sides (its masks are drawn per device) and the batch has padded rows,
//! so the attention mask is exercised.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::config::{Precision, RunConfig};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::loss::objective::Objective;
use crate::model::ops::Kernels;
use crate::model::source::ModelFiles;
use crate::model::{load_encoders, Encoder};
use crate::optim::AdamW;
use crate::train::step::{batch_gradients, StepLayout, StepModel};

/// What counts as agreement. f32 on both sides: the same arithmetic in another order (other
/// reduction trees, other GEMM blockings) differs by a few ulps per operation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// |loss_dev - loss_cpu| / max(|loss_cpu|, 1).
    pub loss_rel: f64,
    /// Per parameter: max |g_dev - g_cpu| / max |g_cpu|, where max |g_cpu| is taken as at least
    /// `grad_floor` times the largest gradient of any parameter: some gradients are exactly
    /// zero in exact arithmetic (attention's key biases: a softmax ignores a shift shared by
    /// its row) and both sides return rounding noise for them.
    pub grad_rel: f64,
    pub grad_floor: f64,
    /// Updated weights: the share of elements more than lr / 100 apart, among those whose CPU
    /// gradient is above the floor. Adam's first step moves each weight by lr g / (|g| + eps),
    /// about lr times the sign of its gradient, so a gradient within rounding of zero may move
    /// its weight anywhere within 2 lr: those are left out.
    pub weights_flipped_share: f64,
}

impl Tolerance {
    pub const F32: Tolerance =
        Tolerance { loss_rel: 1e-5, grad_rel: 1e-3, grad_floor: 1e-5, weights_flipped_share: 1e-3 };
    /// bf16 against f32: 8 bits of mantissa (a relative step of 0.4%), rounding at every
    /// matmul's inputs and outputs. Measured on MiniLM-L6 with the default loss, reference ops
    /// on the CPU, seeds 1-5 and 42 at 8 x 16 and 32 x 32: the loss up to 4e-3 apart, every
    /// gradient within 4.5% of its largest value, the exactly-zero key-bias gradients at up to
    /// 5e-6 of the largest gradient. The bounds leave about 2x; a wrong kernel or a missing
    /// cast is off by far more.
    pub const BF16: Tolerance =
        Tolerance { loss_rel: 1e-2, grad_rel: 0.1, grad_floor: 1e-3, weights_flipped_share: 1e-3 };
}

/// One parameter's gradient, compared.
#[derive(Debug, Clone, Serialize)]
pub struct ParamDiff {
    pub name: String,
    pub max_abs: f64,
    pub max_abs_diff: f64,
    /// max_abs_diff / max(max_abs, grad_floor x the largest gradient).
    pub rel: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceCheck {
    pub device: String,
    /// What the device side ran: `fused` or `reference` ops.
    pub device_kernels: String,
    pub dtype: &'static str,
    pub rows: usize,
    pub seq: usize,
    pub loss_cpu: f64,
    pub loss_device: f64,
    pub loss_rel_diff: f64,
    /// Every trained parameter, worst first.
    pub grads: Vec<ParamDiff>,
    pub weights_max_abs_diff: f64,
    pub weights_flipped_share: f64,
    pub tolerance: Tolerance,
    /// What is out of tolerance (empty: the check passed).
    pub failures: Vec<String>,
}

impl DeviceCheck {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Loss and gradients, then one AdamW step: (loss, gradients, updated weights on the host).
fn step(
    (encoder, teacher): &(Encoder, Option<Encoder>),
    cfg: &RunConfig,
    batch: &Batch,
) -> Result<(f64, GradStore, Vec<Vec<f32>>)> {
    let micro = std::slice::from_ref(batch);
    let objective = Objective::new(&cfg.loss);
    let layout = StepLayout::new(&objective);
    let model = StepModel { encoder, teacher: teacher.as_ref(), objective: &objective, layout: &layout };
    let g = batch_gradients(model, micro, None)?
        .map_err(|e| Error::Invalid(format!("the check's step is not finite: {}", e.0)))?;
    let mut opt = AdamW::new(encoder.vars(), cfg.train.adamw())?;
    opt.step(&g.grads, 1.0)?;
    let weights = encoder.vars().iter().map(|v| host(v.as_tensor())).collect::<Result<_>>()?;
    Ok((g.loss as f64, g.grads, weights))
}

/// A tensor's values on the host, flattened, as f32.
fn host(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Max |x| and max |x - y| over two tensors of one shape (any devices).
fn max_abs_and_diff(x: &Tensor, y: &Tensor) -> Result<(f64, f64)> {
    let (x, y) = (host(x)?, host(y)?);
    let max_abs = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = x.iter().zip(&y).fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    Ok((max_abs, diff))
}

/// Compare gradients parameter by parameter (same order and names on both sides).
pub fn compare_grads(
    params: &[(String, Var)],
    cpu: &GradStore,
    other_params: &[(String, Var)],
    other: &GradStore,
    tol: &Tolerance,
) -> Result<Vec<ParamDiff>> {
    let mut out: Vec<ParamDiff> = Vec::with_capacity(params.len());
    for ((name, v), (other_name, w)) in params.iter().zip(other_params) {
        if name != other_name {
            return Err(Error::Invalid(format!("parameters differ in order: {name} vs {other_name}")));
        }
        let missing = |side: &str| Error::Invalid(format!("{name}: no gradient on the {side}"));
        let (g, h) = (
            cpu.get(v.as_tensor()).ok_or_else(|| missing("CPU"))?,
            other.get(w.as_tensor()).ok_or_else(|| missing("device"))?,
        );
        let (max_abs, max_abs_diff) = max_abs_and_diff(g, h)?;
        out.push(ParamDiff { name: name.clone(), max_abs, max_abs_diff, rel: 0.0 });
    }
    let floor = tol.grad_floor * out.iter().fold(f64::MIN_POSITIVE, |m, p| m.max(p.max_abs));
    for p in &mut out {
        p.rel = p.max_abs_diff / p.max_abs.max(floor);
    }
    out.sort_by(|a, b| b.rel.total_cmp(&a.rel));
    Ok(out)
}

/// Run the check: `rows` x `seq` in f32 on the CPU (fused ops) and in `train.dtype` on
/// `device` (its own ops; the reference ops when `device` is the CPU).
pub fn check(files: &ModelFiles, cfg: &RunConfig, device: &Device, rows: usize, seq: usize) -> Result<DeviceCheck> {
    let (tol, dtype) = match cfg.train.dtype {
        Precision::F32 => (Tolerance::F32, "f32"),
        Precision::Bf16 => (Tolerance::BF16, "bf16"),
    };
    let kernels = if device.is_cpu() { Kernels::Reference } else { Kernels::for_device(device) };
    let (pooling, teacher) = (cfg.model.pooling, cfg.loss.mean_teacher);
    let cpu = load_encoders(files, pooling, teacher, &Device::Cpu, Kernels::Fused, DType::F32)?;
    let dev = load_encoders(files, pooling, teacher, device, kernels, cfg.train.dtype.dtype())?;
    let vocab = cpu.0.config.vocab_size;
    let batch = |d: &Device| Batch::random(rows, seq, vocab, true, &mut StdRng::seed_from_u64(cfg.seed), d);
    let (loss_cpu, g_cpu, w_cpu) = step(&cpu, cfg, &batch(&Device::Cpu)?)?;
    let (loss_dev, g_dev, w_dev) = step(&dev, cfg, &batch(device)?)?;
    let grads = compare_grads(&cpu.0.params, &g_cpu, &dev.0.params, &g_dev, &tol)?;
    let floor = tol.grad_floor * grads.iter().fold(0f64, |m, p| m.max(p.max_abs));
    let (mut weights_max_abs_diff, mut flipped, mut total) = (0f64, 0usize, 0usize);
    let lr = cfg.train.lr;
    for (((_, var), a), b) in cpu.0.params.iter().zip(&w_cpu).zip(&w_dev) {
        let g = g_cpu.get(var.as_tensor()).map(host).transpose()?.unwrap_or_default();
        for ((x, y), g) in a.iter().zip(b).zip(&g) {
            let d = (x - y).abs() as f64;
            weights_max_abs_diff = weights_max_abs_diff.max(d);
            if (*g as f64).abs() > floor {
                flipped += usize::from(d > lr / 100.0);
                total += 1;
            }
        }
    }
    let loss_rel_diff = (loss_dev - loss_cpu).abs() / loss_cpu.abs().max(1.0);
    let weights_flipped_share = flipped as f64 / total.max(1) as f64;
    let mut failures = Vec::new();
    if loss_rel_diff > tol.loss_rel {
        failures.push(format!("loss {loss_dev} vs {loss_cpu} on the CPU (relative difference {loss_rel_diff:.2e})"));
    }
    failures.extend(
        grads
            .iter()
            .filter(|p| p.rel > tol.grad_rel)
            .map(|p| format!("gradient of {}: relative difference {:.2e}", p.name, p.rel)),
    );
    if weights_flipped_share > tol.weights_flipped_share {
        failures
            .push(format!("{:.3}% of the updated weights differ by more than lr/100", 100.0 * weights_flipped_share));
    }
    Ok(DeviceCheck {
        device: format!("{device:?}"),
        device_kernels: format!("{kernels:?}").to_lowercase(),
        dtype,
        rows,
        seq,
        loss_cpu,
        loss_device: loss_dev,
        loss_rel_diff,
        grads,
        weights_max_abs_diff,
        weights_flipped_share,
        tolerance: tol,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gradient that differs beyond the tolerance is caught, and equal ones are not.
    #[test]
    fn compare_grads_flags_a_wrong_gradient() {
        let dev = Device::Cpu;
        let v = Var::new(&[1f32, 2., 3.], &dev).unwrap();
        let w = Var::new(&[1f32, 2., 3.], &dev).unwrap();
        let params = vec![("p".to_string(), v.clone())];
        let other = vec![("p".to_string(), w.clone())];
        let g = (v.as_tensor().sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let same = (w.as_tensor().sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let off = ((w.as_tensor().sqr().unwrap() * 1.01).unwrap().sum_all().unwrap()).backward().unwrap();
        let tol = Tolerance::F32;
        assert_eq!(compare_grads(&params, &g, &other, &same, &tol).unwrap()[0].rel, 0.0);
        let d = &compare_grads(&params, &g, &other, &off, &tol).unwrap()[0];
        assert!(d.rel > tol.grad_rel && (d.max_abs_diff - 0.06).abs() < 1e-5, "{d:?}");
    }
}
