//! Sentence pooling over token states, then L2 normalisation onto the unit sphere.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Masked mean of the last layer's token states (divides by real lengths, never padding).
    Mean,
    /// The last layer's [CLS] state.
    Cls,
    /// Masked mean of the average of the first and the last transformer layer (SimCSE's `avg_first_last`).
    FirstLastAvg,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::FirstLastAvg => "first-last-avg",
        }
    }
}

/// What the encoder must compute for a pooling: the first layer's states kept, and the last
/// layer at every position or only at [CLS] (which skips most of its work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub first_layer: bool,
    pub all_positions: bool,
}

impl Needs {
    /// Everything: every position of the last layer (a mean-pooled view needs it whatever the
    /// pooling), and the first layer's states when `first_layer`.
    pub fn all(first_layer: bool) -> Self {
        Self { first_layer, all_positions: true }
    }
}

/// The token states the encoder returns: the last layer's ([b, seq or 1, hidden]) and, when
/// asked for, the first layer's.
pub struct States {
    pub first: Option<Tensor>,
    pub last: Tensor,
}

impl Pooling {
    /// What this pooling reads of the encoder.
    pub fn needs(self) -> Needs {
        match self {
            Pooling::Mean => Needs { first_layer: false, all_positions: true },
            Pooling::Cls => Needs { first_layer: false, all_positions: false },
            Pooling::FirstLastAvg => Needs { first_layer: true, all_positions: true },
        }
    }
}

/// Masked mean over the sequence.
///
/// # Shapes
/// `states` [b, seq, hidden], `mask` [b, seq] (1 real, 0 padding, any float dtype) -> [b, hidden].
pub fn masked_mean(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(states.dtype())?;
    if !states.track_op() && states.device().is_cpu() && states.dtype() == DType::F32 {
        return states.contiguous()?.apply_op2_no_bwd(&mask.contiguous()?, &MaskedMean);
    }
    let lengths = mask.sum_keepdim(1)?; // [b, 1]
    let summed = states.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    summed.broadcast_div(&lengths)
}

/// [`masked_mean`] in one pass per sentence when nothing trains (embedding, the frozen
/// teacher): candle's masked sum over a middle dimension costs a division per element and
/// three temporaries. The same operations in the same order (`sum_l x * m` from 0, then one
/// division), so the same bits.
struct MaskedMean;

impl CustomOp2 for MaskedMean {
    fn name(&self) -> &'static str {
        "masked-mean"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = (crate::cpu::f32s(s1, l1, self.name())?, crate::cpu::f32s(s2, l2, self.name())?);
        let (b, s, h) = l1.shape().dims3()?;
        if l2.shape().dims() != [b, s] {
            candle_core::bail!("masked mean: states {:?}, mask {:?}", l1.shape(), l2.shape());
        }
        let mut out = vec![0f32; b * h];
        out.par_chunks_mut(h.max(1)).enumerate().for_each(|(i, acc)| {
            let mask = &m[i * s..(i + 1) * s];
            for (row, &mv) in x[i * s * h..(i + 1) * s * h].chunks_exact(h).zip(mask) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v * mv);
            }
            let len: f32 = mask.iter().sum();
            acc.iter_mut().for_each(|a| *a /= len);
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h))))
    }
}

/// Rows scaled to unit L2 norm. `xs` [b, hidden].
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = (xs.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    xs.broadcast_div(&norm)
}

/// Pool the states the encoder computed for [`Pooling::needs`].
pub fn pool(pooling: Pooling, states: &States, mask: &Tensor) -> Result<Tensor> {
    let last = &states.last;
    match (pooling, &states.first) {
        (Pooling::Mean, _) => masked_mean(last, mask),
        (Pooling::Cls, _) => last.narrow(1, 0, 1)?.squeeze(1),
        (Pooling::FirstLastAvg, Some(first)) => masked_mean(&((first + last)? * 0.5)?, mask),
        (Pooling::FirstLastAvg, None) => candle_core::bail!("first-last-avg pooling needs the first layer's states"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn mean_ignores_padding() {
        let dev = Device::Cpu;
        // One sentence of 2 real tokens and 1 pad whose state is huge.
        let states = Tensor::new(&[[[1f32, 2.], [3., 4.], [1000., -1000.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0.]], &dev).unwrap();
        let m = masked_mean(&states, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m, vec![vec![2.0, 3.0]]);
    }

    /// The one-pass mean gives candle's masked sum and division to the bit, padding and a
    /// sentence of one token included.
    #[test]
    fn fused_mean_matches_the_ops_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let (b, s, h) = (5, 13, 37);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Divided by 3: rand's uniform f32s are multiples of 2^-23, whose sums are exact in any order.
        let xs: Vec<f32> = (0..b * s * h).map(|_| rng.gen_range(-3.0f32..3.0) / 3.0).collect();
        let lens = [13, 1, 7, 12, 4];
        let mask: Vec<f32> = (0..b * s).map(|i| if i % s < lens[i / s] { 1.0 } else { 0.0 }).collect();
        let states = Tensor::from_vec(xs, (b, s, h), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (b, s), &dev).unwrap();
        let fused = masked_mean(&states, &mask).unwrap().to_vec2::<f32>().unwrap();
        let lengths = mask.sum_keepdim(1).unwrap();
        let ops = states.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap().sum(1).unwrap();
        let ops = ops.broadcast_div(&lengths).unwrap().to_vec2::<f32>().unwrap();
        let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&ops));
        // A tracked input (training) takes the candle ops, whose gradient flows.
        let var = candle_core::Var::from_tensor(&states).unwrap();
        let g = masked_mean(var.as_tensor(), &mask).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(var.as_tensor()).is_some());
    }

    #[test]
    fn normalize_gives_unit_rows() {
        let xs = Tensor::new(&[[3f32, 4.], [0.5, 0.]], &Device::Cpu).unwrap();
        let n = l2_normalize(&xs).unwrap().to_vec2::<f32>().unwrap();
        assert!((n[0][0] - 0.6).abs() < 1e-6 && (n[0][1] - 0.8).abs() < 1e-6);
        assert!((n[1][0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cls_takes_first_token() {
        let states = Tensor::new(&[[[1f32, 2.], [3., 4.]], [[5., 6.], [7., 8.]]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let c =
            pool(Pooling::Cls, &States { first: None, last: states.clone() }, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(c, vec![vec![1.0, 2.0], vec![5.0, 6.0]]);
    }

    /// Each pooling asks the encoder for exactly what it reads, and says so if it is missing.
    #[test]
    fn needs_follow_the_pooling() {
        assert_eq!(Pooling::Cls.needs(), Needs { first_layer: false, all_positions: false });
        assert_eq!(Pooling::Mean.needs(), Needs { first_layer: false, all_positions: true });
        assert_eq!(Pooling::FirstLastAvg.needs(), Needs { first_layer: true, all_positions: true });
        let last = Tensor::ones((1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
        let e = pool(Pooling::FirstLastAvg, &States { first: None, last }, &mask).unwrap_err().to_string();
        assert!(e.contains("first layer"), "{e}");
    }
}
