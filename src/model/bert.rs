//! A trainable BERT encoder written from differentiable candle ops.
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` record no backward op, so a model
//! built on them "trains" without updating anything below them. Everything here is built from
//! primitive ops that autograd sees. Dropout masks come from our own seeded RNG (candle's
//! CPU device refuses `set_seed`), and are drawn only in training.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::ops::int8::{Epilogue, QWeight};
use super::ops::Kernels;
use super::pooling::{Needs, States};

/// Hugging Face `config.json` for BERT: tolerant of extra keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Not in config.json: the ops implementation, chosen when the model is loaded
    /// ([`Kernels::for_device`]).
    #[serde(skip)]
    pub kernels: Kernels,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf), BERT's default.
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

impl Activation {
    fn forward(self, k: Kernels, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => super::ops::gelu_erf(k, xs),
            Activation::GeluNew => xs.gelu(),
            Activation::Relu => xs.relu(),
        }
    }
}

/// Inverted dropout with masks from our RNG: kept units are scaled by 1 / (1 - p).
#[derive(Debug, Clone, Copy)]
struct Dropout {
    p: f32,
    k: Kernels,
}

impl Dropout {
    fn forward(&self, xs: &Tensor, rng: Option<&mut StdRng>) -> Result<Tensor> {
        match rng {
            Some(rng) if self.p > 0.0 => super::ops::dropout(self.k, xs, self.p, rng),
            _ => Ok(xs.clone()),
        }
    }
}

/// `x W^T + b` over the last dimension; with int8 kernels, from weights quantized at load.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
    k: Kernels,
    int8: Option<Arc<QWeight>>,
}

impl Linear {
    fn load(in_dim: usize, out_dim: usize, vb: VarBuilder, k: Kernels) -> Result<Self> {
        Self::new(vb.get((out_dim, in_dim), "weight")?, vb.get(out_dim, "bias")?, k)
    }

    fn new(weight: Tensor, bias: Tensor, k: Kernels) -> Result<Self> {
        let int8 = match k {
            Kernels::Int8 => {
                let (out, inp) = weight.dims2()?;
                let (w, b) = (weight.flatten_all()?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
                Some(Arc::new(QWeight::new(&w, &b, out, inp)?))
            }
            _ => None,
        };
        Ok(Self { weight, bias, k, int8 })
    }

    /// The int8 weights, when `xs` can use them (f32 on the CPU).
    fn int8_for(&self, xs: &Tensor) -> Option<&Arc<QWeight>> {
        self.int8.as_ref().filter(|_| xs.device().is_cpu() && xs.dtype() == DType::F32)
    }

    /// `act(x W^T + b)`; exact GELU runs in the int8 kernel's epilogue, on outputs still in cache.
    fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        match (self.int8_for(xs), act) {
            (Some(w), Activation::Gelu) => super::ops::int8::linear_int8(xs, w, Epilogue::BiasGelu),
            _ => act.forward(self.k, &self.forward(xs)?),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.int8_for(xs) {
            Some(w) => super::ops::int8::linear_int8(xs, w, Epilogue::Bias),
            None => super::ops::linear(self.k, xs, &self.weight, &self.bias),
        }
    }
}

/// Layer norm with a backward pass (candle-nn's has none): see [`super::ops::layer_norm`].
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    k: Kernels,
}

impl LayerNorm {
    fn load(dim: usize, eps: f64, vb: VarBuilder, k: Kernels) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps, k })
    }
}

impl LayerNorm {
    /// The norm of a residual connection, `a + r`.
    fn forward_sum(&self, a: &Tensor, r: &Tensor) -> Result<Tensor> {
        super::ops::add_layer_norm(self.k, a, r, &self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        super::ops::layer_norm(self.k, xs, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: LayerNorm,
    dropout: Dropout,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: vb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: vb.get((cfg.max_position_embeddings, h), "position_embeddings.weight")?,
            token_type_embeddings: vb.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?,
            layer_norm: LayerNorm::load(h, cfg.layer_norm_eps, vb.pp("LayerNorm"), cfg.kernels)?,
            dropout: Dropout { p: cfg.hidden_dropout_prob as f32, k: cfg.kernels },
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, rng: Option<&mut StdRng>) -> Result<Tensor> {
        let tables = [&self.word_embeddings, &self.token_type_embeddings, &self.position_embeddings];
        let xs = if tables
            .iter()
            .all(|t| !t.track_op() && t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        {
            self.summed_rows(input_ids, token_type_ids)?
        } else {
            self.summed_rows_ops(input_ids, token_type_ids)?
        };
        self.dropout.forward(&self.layer_norm.forward(&xs)?, rng)
    }

    /// `(words + types) + positions` from candle's ops, which autograd sees.
    fn summed_rows_ops(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let lookup = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            table.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, ()))
        };
        let words = lookup(&self.word_embeddings, input_ids)?;
        let types = lookup(&self.token_type_embeddings, token_type_ids)?;
        let positions = self.position_embeddings.narrow(0, 0, s)?.unsqueeze(0)?;
        (words + types)?.broadcast_add(&positions)
    }

    /// `(words + types) + positions` in one pass over the rows when nothing trains (embedding,
    /// the frozen teacher), where candle makes two gathers, two adds and their temporaries:
    /// the same additions in the same order, so the same bits.
    fn summed_rows(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let (ids, types) =
            (input_ids.flatten_all()?.to_vec1::<u32>()?, token_type_ids.flatten_all()?.to_vec1::<u32>()?);
        let (word, ty, pos) = (&self.word_embeddings, &self.token_type_embeddings, &self.position_embeddings);
        let (w, wl) = word.storage_and_layout();
        let (t, tl) = ty.storage_and_layout();
        let (p, pl) = pos.storage_and_layout();
        let (w, t, p) =
            (crate::cpu::storage_f32(&w, wl)?, crate::cpu::storage_f32(&t, tl)?, crate::cpu::storage_f32(&p, pl)?);
        let h = word.dim(1)?;
        let check = |table: &[f32], id: u32, what: &str| -> Result<()> {
            if (id as usize + 1) * h > table.len() {
                candle_core::bail!("{what} id {id} is outside the model's table of {} rows", table.len() / h.max(1));
            }
            Ok(())
        };
        for (&id, &tt) in ids.iter().zip(&types) {
            check(w, id, "token")?;
            check(t, tt, "token type")?;
        }
        if s * h > p.len() {
            candle_core::bail!("{s} positions, the model has {}", p.len() / h.max(1));
        }
        let h = h.max(1);
        let block = h * 64;
        // SAFETY: every block is a whole number of rows (or the tail's), and each row's every
        // value is written below.
        let out = unsafe {
            crate::cpu::par_written(b * s * h, block, |start, chunk| {
                for (j, o) in chunk.chunks_mut(h).enumerate() {
                    let i = start / h + j;
                    let (wr, tr) = (&w[ids[i] as usize * h..][..h], &t[types[i] as usize * h..][..h]);
                    let pr = &p[(i % s) * h..][..h];
                    for (((o, &a), &c), &d) in o.iter_mut().zip(wr).zip(tr).zip(pr) {
                        o.write((a + c) + d);
                    }
                }
            })
        };
        Tensor::from_vec(out, (b, s, h), input_ids.device())
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    /// Keys and values as one layer, quantized together (int8 kernels only: training needs the
    /// two weights apart, as parameters).
    kv_int8: Option<Linear>,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
    k: Kernels,
    heads: usize,
    hidden_dropout: Dropout,
    attention_dropout: Dropout,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps, k) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps, cfg.kernels);
        let att = vb.pp("attention");
        let (key, value) = (Linear::load(h, h, att.pp("self.key"), k)?, Linear::load(h, h, att.pp("self.value"), k)?);
        let kv_int8 = match k {
            Kernels::Int8 => Some(Linear::new(
                Tensor::cat(&[&key.weight, &value.weight], 0)?,
                Tensor::cat(&[&key.bias, &value.bias], 0)?,
                k,
            )?),
            _ => None,
        };
        Ok(Self {
            query: Linear::load(h, h, att.pp("self.query"), k)?,
            key,
            value,
            kv_int8,
            attention_output: Linear::load(h, h, att.pp("output.dense"), k)?,
            attention_norm: LayerNorm::load(h, eps, att.pp("output.LayerNorm"), k)?,
            intermediate: Linear::load(h, i, vb.pp("intermediate.dense"), k)?,
            output: Linear::load(i, h, vb.pp("output.dense"), k)?,
            output_norm: LayerNorm::load(h, eps, vb.pp("output.LayerNorm"), k)?,
            act: cfg.hidden_act,
            k,
            heads: cfg.num_attention_heads,
            hidden_dropout: Dropout { p: cfg.hidden_dropout_prob as f32, k },
            attention_dropout: Dropout { p: cfg.attention_probs_dropout_prob as f32, k },
        })
    }

    /// The parameters and settings, for the layer as one op ([`super::ops::encoder_layer`]).
    fn params(&self) -> super::ops::LayerParams<'_> {
        super::ops::LayerParams {
            query: [&self.query.weight, &self.query.bias],
            key: [&self.key.weight, &self.key.bias],
            value: [&self.value.weight, &self.value.bias],
            attention_output: [&self.attention_output.weight, &self.attention_output.bias],
            attention_norm: [&self.attention_norm.weight, &self.attention_norm.bias],
            intermediate: [&self.intermediate.weight, &self.intermediate.bias],
            output: [&self.output.weight, &self.output.bias],
            output_norm: [&self.output_norm.weight, &self.output_norm.bias],
            eps: self.attention_norm.eps as f32,
            heads: self.heads,
            p_attention: self.attention_dropout.p,
            p_hidden: self.hidden_dropout.p,
        }
    }

    /// `mask_bias` [b, seq]: 0 for real tokens, a large finite negative for padding.
    /// Only the first `queries` positions are computed (all keys and values still are):
    /// 1 when only the [CLS] output is needed.
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, queries: usize, mut rng: Option<&mut StdRng>) -> Result<Tensor> {
        let params = self.params();
        if self.act == Activation::Gelu && super::ops::trains_fused(self.k, xs, &params) {
            return super::ops::encoder_layer(self.k, &params, xs, mask_bias, queries, rng);
        }
        let s = xs.dim(1)?;
        let xq = if queries < s { xs.narrow(1, 0, queries)? } else { xs.clone() };
        let q = self.query.forward(&xq)?;
        // Keys and values in one GEMM: [b, s, 2h].
        let kv = match &self.kv_int8 {
            Some(kv) => kv.forward(xs)?,
            None => {
                let kv_weight = Tensor::cat(&[&self.key.weight, &self.value.weight], 0)?;
                let kv_bias = Tensor::cat(&[&self.key.bias, &self.value.bias], 0)?;
                super::ops::linear(self.k, xs, &kv_weight, &kv_bias)?
            }
        };
        let p = self.attention_dropout.p;
        let dropout = rng.as_deref_mut().filter(|_| p > 0.0).map(|r| (p, r));
        let context = super::ops::attention(self.k, &q, &kv, mask_bias, self.heads, dropout)?;
        let attended = self.hidden_dropout.forward(&self.attention_output.forward(&context)?, rng.as_deref_mut())?;
        let xs = self.attention_norm.forward_sum(&attended, &xq)?;
        let out = match (self.intermediate.int8_for(&xs), self.output.int8_for(&xs), self.act) {
            // int8 inference: the wide GELU rows pass between the two layers quantized.
            (Some(up), Some(down), Activation::Gelu) => super::ops::int8::ffn_int8(&xs, up, down)?,
            _ => self.output.forward(&self.intermediate.forward_act(&xs, self.act)?)?,
        };
        let out = self.hidden_dropout.forward(&out, rng)?;
        self.output_norm.forward_sum(&out, &xs)
    }
}

/// BERT without the pooler: token states of the first and the last transformer layer.
#[derive(Debug, Clone)]
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// The transformer layers' compute dtype (`train.dtype`): F32, or BF16 for mixed precision
    /// (weights stay f32; embeddings, layer norms, softmax and the returned states are f32).
    pub compute: DType,
}

impl Bert {
    /// `vb` is rooted where `embeddings.*` and `encoder.layer.*` live (the `bert.` prefix, if
    /// any, already applied).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers, compute: DType::F32 })
    }

    /// The token states `needs` asks for (see [`Pooling::needs`](super::pooling::Pooling::needs)):
    /// the last layer's, and the first layer's when `needs.first_layer`. Without
    /// `needs.all_positions` the last layer computes only position 0 (its output is
    /// [b, 1, hidden]): [CLS] pooling needs nothing else, and that skips about 80% of the last
    /// layer's work, forward and backward. Dropout is active exactly when `rng` is given.
    ///
    /// # Shapes
    /// `input_ids`, `token_type_ids`: [b, seq] u32; `attention_mask`: [b, seq] f32 of 1/0.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        needs: Needs,
        mut rng: Option<&mut StdRng>,
    ) -> Result<States> {
        let max_pos = self.embeddings.position_embeddings.dim(0)?;
        let seq = input_ids.dim(1)?;
        if seq > max_pos {
            candle_core::bail!("sequence of {seq} tokens is longer than max_position_embeddings {max_pos}")
        }
        let mut xs = self.embeddings.forward(input_ids, token_type_ids, rng.as_deref_mut())?.to_dtype(self.compute)?;
        // Built in the compute dtype with a finite negative: -inf would give NaN via 0 * -inf.
        let mask_bias = ((attention_mask.to_dtype(xs.dtype())? - 1.0)? * 10_000.0)?;
        let mut first = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let queries = if !needs.all_positions && i + 1 == self.layers.len() { 1 } else { seq };
            xs = layer.forward(&xs, &mask_bias, queries, rng.as_deref_mut())?;
            if needs.first_layer && first.is_none() {
                first = Some(xs.to_dtype(DType::F32)?);
            }
        }
        Ok(States { first, last: xs.to_dtype(DType::F32)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn embeddings(vocab: usize, positions: usize, h: usize) -> Embeddings {
        let mut rng = StdRng::seed_from_u64(5);
        // Scaled by 1/3, 1/7, 1/11: rand's uniform f32s are multiples of 2^-23, whose sums
        // would be exact in any order (and the test blind to it).
        let mut divisor = 3.0f32;
        let mut table = |rows: usize| {
            let v: Vec<f32> = (0..rows * h).map(|_| rng.gen_range(-1.0f32..1.0) / divisor).collect();
            divisor = if divisor == 3.0 { 7.0 } else { 11.0 };
            Tensor::from_vec(v, (rows, h), &Device::Cpu).unwrap()
        };
        let (word_embeddings, position_embeddings, token_type_embeddings) = (table(vocab), table(positions), table(2));
        let ones = Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
        let layer_norm =
            LayerNorm { weight: ones.clone(), bias: ones.zeros_like().unwrap(), eps: 1e-12, k: Kernels::Fused };
        let dropout = Dropout { p: 0.1, k: Kernels::Fused };
        Embeddings { word_embeddings, position_embeddings, token_type_embeddings, layer_norm, dropout }
    }

    /// The one-pass lookup gives candle's gathers and adds to the bit, and refuses ids outside
    /// the tables where a slice index would panic.
    #[test]
    fn summed_rows_match_the_ops_bit_for_bit() {
        let e = embeddings(50, 32, 24);
        let ids = Tensor::new(&[[0u32, 7, 49, 3, 3], [12, 1, 0, 0, 0]], &Device::Cpu).unwrap();
        let types = Tensor::new(&[[0u32, 0, 1, 1, 0], [1, 0, 0, 0, 0]], &Device::Cpu).unwrap();
        let bits = |t: Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let (fused, ops) = (e.summed_rows(&ids, &types).unwrap(), e.summed_rows_ops(&ids, &types).unwrap());
        assert_eq!(fused.dims(), ops.dims());
        assert_eq!(bits(fused), bits(ops));
        // 90 rows: more than one parallel block of 64.
        let many: Vec<u32> = (0..90u32).map(|i| (i * 17) % 50).collect();
        let ids = Tensor::from_vec(many, (3, 30), &Device::Cpu).unwrap();
        let types = ids.ones_like().unwrap();
        assert_eq!(bits(e.summed_rows(&ids, &types).unwrap()), bits(e.summed_rows_ops(&ids, &types).unwrap()));
        let bad = Tensor::new(&[[0u32, 50]], &Device::Cpu).unwrap();
        let err = e.summed_rows(&bad, &Tensor::zeros((1, 2), DType::U32, &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("token id 50"), "{err}");
        let long = Tensor::zeros((1, 33), DType::U32, &Device::Cpu).unwrap();
        assert!(e.summed_rows(&long, &long).is_err());
    }
}
