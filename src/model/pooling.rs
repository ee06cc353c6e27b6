//! Sentence pooling over token states, then L2 normalisation onto the unit sphere.

use candle_core::{Result, Tensor, D};
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

/// Masked mean over the sequence.
///
/// # Shapes
/// `states` [b, seq, hidden], `mask` [b, seq] (1 real, 0 padding, any float dtype) -> [b, hidden].
pub fn masked_mean(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(states.dtype())?;
    let lengths = mask.sum_keepdim(1)?; // [b, 1]
    let summed = states.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    summed.broadcast_div(&lengths)
}

/// Rows scaled to unit L2 norm. `xs` [b, hidden].
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = (xs.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    xs.broadcast_div(&norm)
}

/// Pool `last` (and `first`, the first layer's output, for [`Pooling::FirstLastAvg`]).
pub fn pool(pooling: Pooling, first: &Tensor, last: &Tensor, mask: &Tensor) -> Result<Tensor> {
    match pooling {
        Pooling::Mean => masked_mean(last, mask),
        Pooling::Cls => last.narrow(1, 0, 1)?.squeeze(1),
        Pooling::FirstLastAvg => masked_mean(&((first + last)? * 0.5)?, mask),
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
        let c = pool(Pooling::Cls, &states, &states, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(c, vec![vec![1.0, 2.0], vec![5.0, 6.0]]);
    }
}
