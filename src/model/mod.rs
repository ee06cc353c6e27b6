//! The sentence encoder: BERT -> pooling -> L2 normalisation, with its weights.

pub mod bert;
pub mod ops;
pub mod pip;
pub mod pooling;
pub mod source;
pub mod st_layout;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;

use crate::data::batch::Batch;
use crate::error::{Error, Result};

use bert::{Bert, BertConfig};
pub use ops::backward;
use pooling::Pooling;
use source::ModelFiles;

/// Sentences per batch when embedding without gradients (eval, validation, `embed`).
pub const EMBED_BATCH: usize = 64;

/// The arithmetic of inference (`--dtype` of `embed`, `eval` and `compare`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Compute {
    /// 32-bit floats throughout.
    #[default]
    F32,
    /// Linear layers in int8: weights quantized per output channel when the model loads,
    /// activations per row; AMX tiles or AVX-512 VNNI where the CPU has them. Attention, layer
    /// norm and pooling stay f32.
    Int8,
}

impl Compute {
    pub fn as_str(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Int8 => "int8",
        }
    }

    /// The ops that compute this way on `device`.
    pub fn kernels(self, device: &Device) -> Result<ops::Kernels> {
        match self {
            Compute::F32 => Ok(ops::Kernels::for_device(device)),
            Compute::Int8 if !device.is_cpu() => {
                crate::bail!("--dtype int8 is a CPU path: use it with --device cpu, or drop it")
            }
            Compute::Int8 => Ok(ops::Kernels::Int8),
        }
    }
}

/// A BERT with a pooling head whose output rows are unit vectors.
pub struct Encoder {
    pub bert: Bert,
    pub pooling: Pooling,
    pub config: BertConfig,
    /// The trainable parameters (empty when loaded for inference), named by checkpoint key.
    pub params: Vec<(String, Var)>,
    pub files: ModelFiles,
}

/// Transformer layers in a weights file: one more than the largest `N` of an
/// `[bert.]encoder.layer.N.` key (0 when there is none).
fn layers_held<'a>(keys: impl Iterator<Item = &'a String>) -> usize {
    keys.filter_map(|k| {
        let rest = k.strip_prefix("bert.").unwrap_or(k).strip_prefix("encoder.layer.")?;
        rest.split('.').next()?.parse::<usize>().ok()
    })
    .map(|n| n + 1)
    .max()
    .unwrap_or(0)
}

impl Encoder {
    /// Load from checkpoint files. With `trainable`, every used weight becomes a `Var`. The ops
    /// are the device's ([`ops::Kernels::for_device`]).
    pub fn load(files: &ModelFiles, pooling: Pooling, trainable: bool, device: &Device) -> Result<Self> {
        Self::load_with(files, pooling, trainable, device, ops::Kernels::for_device(device))
    }

    /// [`Encoder::load`] with the ops implementation given: the reference ops on the CPU are the
    /// path every other device takes, so tests can compare the two on one machine.
    pub fn load_with(
        files: &ModelFiles,
        pooling: Pooling,
        trainable: bool,
        device: &Device,
        kernels: ops::Kernels,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(&files.config).map_err(|e| Error::io(&files.config, e))?;
        let mut config: BertConfig = serde_json::from_str(&text)
            .map_err(|e| Error::data(&files.config, format!("not a BERT config.json: {e}")))?;
        config.kernels = kernels;
        let tensors = candle_core::safetensors::load(&files.weights, device)
            .map_err(|e| Error::data(&files.weights, format!("cannot read safetensors: {e}")))?;
        let held = layers_held(tensors.keys());
        if held > config.num_hidden_layers {
            return Err(Error::data(
                &files.config,
                format!(
                    "num_hidden_layers is {}, but {} holds {held} layers: the others would be silently unused; set num_hidden_layers to {held} (or keep the weights of the layers wanted only)",
                    config.num_hidden_layers,
                    files.weights.display()
                ),
            ));
        }
        Self::from_tensors(tensors, config, files.clone(), pooling, trainable, device)
            .map_err(|e| Error::data(&files.weights, e.to_string()))
    }

    /// Build from tensors already in memory (tests use random ones).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        config: BertConfig,
        files: ModelFiles,
        pooling: Pooling,
        trainable: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // Checkpoints name weights with or without a `bert.` prefix; detect it once.
        let prefix = if tensors.keys().any(|k| k.starts_with("bert.embeddings.")) { "bert" } else { "" };
        let used = Arc::new(Mutex::new(Vec::new()));
        let store = ParamStore { tensors, trainable, used: used.clone() };
        let vb = VarBuilder::from_backend(Box::new(store), DType::F32, device.clone());
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        let bert = Bert::load(vb, &config)?;
        let params = std::mem::take(&mut *used.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?);
        Ok(Self { bert, pooling, config, params, files })
    }

    /// Unit-norm sentence embeddings [b, hidden]. Dropout is on exactly when `rng` is given.
    pub fn embed(&self, batch: &Batch, rng: Option<&mut StdRng>) -> candle_core::Result<Tensor> {
        let states = self.bert.forward_t(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            self.pooling.needs(),
            rng,
        )?;
        pooling::l2_normalize(&pooling::pool(self.pooling, &states, &batch.attention_mask)?)
    }

    /// The pooled embeddings and, with `with_mean`, each sentence's mean of last-layer token
    /// states, unit-norm and detached: a second view of the sentence from the same pass (the
    /// last layer then runs on every position even for [CLS] pooling).
    pub fn embed_views(
        &self,
        batch: &Batch,
        rng: Option<&mut StdRng>,
        with_mean: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        if !with_mean {
            return Ok((self.embed(batch, rng)?, None));
        }
        let needs = pooling::Needs::all(self.pooling.needs().first_layer);
        let states = self.bert.forward_t(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, needs, rng)?;
        let pooled = pooling::l2_normalize(&pooling::pool(self.pooling, &states, &batch.attention_mask)?)?;
        let mean = pooling::l2_normalize(&pooling::masked_mean(&states.last.detach(), &batch.attention_mask)?)?;
        Ok((pooled, Some(mean)))
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// The checkpoint's tensors with the trained parameters written over them, so the output
    /// keeps every key of the input (pooler, position ids) under the same names; on the CPU.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut all = crate::io::load_safetensors(&self.files.weights)?;
        for (name, var) in &self.params {
            let dtype = all.get(name).map(|t| t.dtype()).unwrap_or(DType::F32);
            all.insert(name.clone(), var.as_tensor().detach().to_dtype(dtype)?.to_device(&Device::Cpu)?);
        }
        Ok(all)
    }

    /// The parameters' current values, by name (what checkpoints and kept best weights save).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }

    /// Set every parameter from `tensors` (a checkpoint's or kept weights; `path` names them in
    /// errors). Everything is checked before anything is set.
    pub fn set_weights(&self, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let mut values = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let t = tensors.get(name).ok_or_else(|| Error::data(path, format!("missing tensor {name}")))?;
            if t.shape() != var.shape() {
                return Err(Error::data(path, format!("{name} has shape {:?}, the model {:?}", t.dims(), var.dims())));
            }
            values.push(t);
        }
        for ((_, var), value) in self.params.iter().zip(values) {
            var.set(&value.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The arithmetic its linear layers run in.
    pub fn compute(&self) -> Compute {
        match self.config.kernels {
            ops::Kernels::Int8 => Compute::Int8,
            _ => Compute::F32,
        }
    }

    /// Number of scalar parameters the encoder trains.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// A VarBuilder backend over checkpoint tensors: checks shapes, converts to f32, and records
/// each weight it hands out as a `Var` when trainable, so unused keys never become parameters.
struct ParamStore {
    tensors: HashMap<String, Tensor>,
    trainable: bool,
    used: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("weight {name} has shape {:?}, config.json implies {:?}", t.dims(), s.dims())
        }
        if !self.trainable {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        if let Ok(mut used) = self.used.lock() {
            used.push((name.to_string(), var));
        }
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| candle_core::Error::Msg(format!("weight {name} is missing")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// The encoder a run trains (`pooling`, trainable) and, with `teacher`, a frozen copy of the
/// starting model with mean pooling (`loss.mean_teacher`), both with `kernels` and computing in
/// `compute`.
pub fn load_encoders(
    files: &ModelFiles,
    pooling: Pooling,
    teacher: bool,
    device: &Device,
    kernels: ops::Kernels,
    compute: DType,
) -> Result<(Encoder, Option<Encoder>)> {
    let load = |pooling, trainable| -> Result<Encoder> {
        let mut e = Encoder::load_with(files, pooling, trainable, device, kernels)?;
        e.bert.compute = compute;
        Ok(e)
    };
    let teacher = teacher.then(|| load(Pooling::Mean, false)).transpose()?;
    Ok((load(pooling, true)?, teacher))
}

/// Embed many sentences without gradients: batches of sentences sorted by their token count
/// (not by characters, as sentence-transformers does: that left 30% of a batch as padding on
/// book sentences), rows returned in input order as a flat row-major [n, hidden] buffer. A
/// second thread tokenizes the next batches while this one runs the model.
pub fn embed_texts(
    encoder: &Encoder,
    tokenizer: &crate::data::batch::TextTokenizer,
    texts: &[&str],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    let hidden = encoder.config.hidden_size;
    let counter = tokenizer.counter()?;
    let lengths: Vec<usize> = {
        use rayon::prelude::*;
        texts.par_iter().map(|t| counter(t).min(tokenizer.max_len)).collect()
    };
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    // Longest batches first: the allocator then reuses their buffers for the shorter ones,
    // where growing batches would fault in fresh pages all along.
    let chunks: Vec<&[usize]> = order.chunks(batch_size.max(1)).rev().collect();
    let mut out = vec![0f32; texts.len() * hidden];
    std::thread::scope(|scope| -> Result<()> {
        // Two batches ahead at most: enough to hide tokenization, little memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(2);
        let chunks_ref = &chunks;
        scope.spawn(move || {
            for chunk in chunks_ref {
                let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
                // A send fails only when the consumer stopped on an error: stop too.
                if tx.send(tokenizer.batch(&batch_texts, device)).is_err() {
                    break;
                }
            }
        });
        for (chunk, batch) in chunks.iter().zip(rx) {
            let rows = encoder.embed(&batch?, None)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i * hidden..(i + 1) * hidden].copy_from_slice(&row);
            }
        }
        Ok(())
    })?;
    Ok(out)
}
