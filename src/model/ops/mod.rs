//! Fused CPU kernels with hand-written backward passes: linear layers, layer norm, masked
//! softmax, GELU, dropout and multi-head attention; and a whole encoder layer built from them
//! as one graph node for training ([`layer`]).
//!
//! Built from primitive ops, each of these is 5-10 candle ops forward and more backward, every
//! one a full pass over memory plus an allocation, and candle's backprop adds a zero-filled
//! gradient buffer per node. One pass each way is what PyTorch does, and what we do here.
//! On other devices or dtypes the same functions fall back to the primitive versions
//! ([`reference`]), which are also what the tests compare against.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    column_sums, dot, erf, exp, f32s, gemm_small, kernel, map_chunks, max, par_blocks, par_rows, par_zeroed, reduce2,
    storage_f32, sum, CHUNK, FRAC_1_SQRT_2, INV_SQRT_2PI, LANES,
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
    /// The fused kernels, with the linear layers in int8 ([`int8`]): CPU inference only.
    Int8,
    /// The fused kernels, with the linear layers' products (forward and backward) in bf16
    /// ([`bf16`]): CPU training with `train.dtype = "bf16"`.
    Bf16,
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
        self != Kernels::Reference && xs.device().is_cpu() && xs.dtype() == DType::F32
    }
}

pub mod amx;
mod attention;
pub mod bf16;
mod dropout;
pub(crate) mod gelu;
pub mod int8;
mod layer;
mod layer_norm;
mod linear;
pub mod reference;
#[cfg(test)]
mod tests;

pub use attention::attention;
pub use dropout::dropout;
pub use gelu::gelu_erf;
pub use layer::{backward, layer as encoder_layer, trains_fused, LayerParams};
pub use layer_norm::{add_layer_norm, layer_norm};
pub use linear::linear;
