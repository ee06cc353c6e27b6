//! The same functions from primitive candle ops (autograd derives their backward passes).
//!
//! Mixed precision: activations in a lower dtype (bf16) meet f32 weights, which are cast to
//! the activations' dtype where used (the cast is differentiable, so gradients reach the f32
//! weights in f32); layer norm and softmax compute in f32.

use candle_core::{DType, Result, Tensor, D};

pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let k = weight.dim(1)?;
    let mut shape = xs.dims().to_vec();
    let product = xs.reshape(((), k))?.matmul(&weight.to_dtype(xs.dtype())?.t()?)?;
    // The bias is added in f32, so that its gradient (a sum over every row) is summed in f32.
    let out = match xs.dtype() {
        DType::F32 => product.broadcast_add(bias)?,
        dtype => product.to_dtype(DType::F32)?.broadcast_add(bias)?.to_dtype(dtype)?,
    };
    *shape.last_mut().unwrap_or(&mut 0) = weight.dim(0)?;
    out.reshape(shape)
}

pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)?.to_dtype(dtype)
}

/// Multi-head attention from primitive ops; `drop` is the mask on the probabilities.
pub fn attention(
    q: &Tensor,
    kv: &Tensor,
    mask_bias: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, h) = q.dims3()?;
    let s = kv.dim(1)?;
    let hd = h / heads;
    let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous();
    let (k, v) = (kv.narrow(2, 0, h)?, kv.narrow(2, h, h)?);
    let (q, k, v) = (split(q, nq)?, split(&k, s)?, split(&v, s)?);
    let mut probs = masked_softmax(&q.matmul(&k.t()?)?, mask_bias, scale)?;
    if let Some(m) = drop {
        let m = m.to_dtype(probs.dtype())?;
        probs = (probs * m)?;
    }
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, h))
}

pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = scores.dtype();
    let bias = mask_bias.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
    let scores = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&bias)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)
}
