//! The same functions from primitive candle ops (autograd derives their backward passes).

use candle_core::{Result, Tensor, D};

pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let k = weight.dim(1)?;
    let mut shape = xs.dims().to_vec();
    let out = xs.reshape(((), k))?.matmul(&weight.t()?)?.broadcast_add(bias)?;
    *shape.last_mut().unwrap_or(&mut 0) = weight.dim(0)?;
    out.reshape(shape)
}

pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
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
        probs = (probs * m)?;
    }
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, h))
}

pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    let bias = mask_bias.unsqueeze(1)?.unsqueeze(1)?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&bias)?, D::Minus1)
}
