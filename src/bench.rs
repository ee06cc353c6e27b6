//! `hypersphere bench`: train-step and embedding throughput, as fractions of the machine.
//!
//! The JSON it writes has the same shape as `bench/torch_bench.py`'s, and `--export-inputs`
//! writes the exact batches and sentences used, so that the PyTorch reference runs on the same
//! data. Timings are medians or sums of whole steps; nothing here asserts a speed.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::config::RunConfig;
use crate::data::batch::{Batch, TextTokenizer};
use crate::data::order::EpochOrder;
use crate::data::source::{PairIds, PairSource};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::bert::BertConfig;
use crate::model::pooling::Pooling;
use crate::model::{embed_texts, Encoder};
use crate::optim::AdamW;
use crate::progress::Progress;
use crate::train::step::{train_step, StepModel, StepOutcome, StepStats};

/// What to run.
pub struct BenchOptions {
    /// Timed steps of the fixed-shape workload (after one warm-up step).
    pub steps: usize,
    /// Real length-bucketed batches from the corpus, one timed step each.
    pub mix_batches: usize,
    /// Corpus sentences to embed.
    pub embed_sentences: usize,
    pub embed_batch: usize,
    pub embed_max_len: usize,
}

#[derive(Debug, Serialize)]
pub struct Gemm {
    pub n: usize,
    /// f32 through candle (the `gemm` crate).
    pub gflops: f64,
    /// Through our bf16 kernels (AVX-512 BF16; AMX tiles), when the CPU has them; and our int8
    /// kernel.
    pub bf16_gflops: Option<f64>,
    pub bf16_amx_gflops: Option<f64>,
    pub int8_gops: f64,
    pub int8_amx_gops: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TrainFixed {
    pub pairs: usize,
    pub seq: usize,
    pub steps: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub pairs_per_s: f64,
    /// Matmul FLOPs of a full forward + backward of this model on this shape, counted the same
    /// way as the PyTorch reference.
    pub gflop_per_step: f64,
    /// The matmul FLOPs we actually execute (less with [CLS] pooling: see `Bert::forward_t`).
    pub gflop_executed_per_step: f64,
    /// Executed FLOPs per second.
    pub achieved_gflops: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct TrainMix {
    pub batches: usize,
    pub pairs: usize,
    pub tokens: usize,
    pub mean_seq: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub seconds: f64,
    pub pairs_per_s: f64,
    pub gflop: f64,
    pub gflop_executed: f64,
    pub achieved_gflops: f64,
}

#[derive(Debug, Serialize)]
pub struct Embed {
    pub sentences: usize,
    pub batch_size: usize,
    pub max_len: usize,
    pub pooling: Pooling,
    pub seconds: f64,
    pub sentences_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub model: String,
    pub threads: usize,
    pub pooling: Pooling,
    /// Whether each step also runs the frozen teacher's forward pass (`loss.mean_teacher`).
    pub mean_teacher: bool,
    pub gemm: Gemm,
    pub train_fixed: TrainFixed,
    pub train_mix: TrainMix,
    pub embed: Embed,
    pub peak_rss_mb: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds of 5 calls after a warm-up.
fn timed(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let times = (0..5)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(median(times))
}

/// The CPU's low-precision ceilings on an `n`-square product through our kernels, in G
/// multiply-adds x 2 a second: bf16 (AVX-512 BF16, and AMX tiles; None without them) and int8 (VNNI, and AMX; activations
/// quantized per row in the timing, as `--dtype int8` runs).
pub fn low_precision_gops(n: usize) -> Result<LowPrecision> {
    use crate::model::ops::{bf16, int8};
    let x: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let ops = 2.0 * (n as f64).powi(3);
    let v = bf16::View { data: &x, rows: n, cols: n, rs: n, cs: 1 };
    let rate = |path: bf16::Path| -> Result<f64> {
        Ok(ops / timed(|| bf16::gemm(v, v, None, path).map(|_| ()).map_err(Into::into))? / 1e9)
    };
    let bf16 = bf16::supported().then(|| rate(bf16::Path::Avx512)).transpose()?;
    let amx = crate::model::ops::amx::available().then(|| rate(bf16::Path::Amx)).transpose()?;
    let q = int8::QWeight::new(&x, &vec![0.0; n], n, n)?;
    let int8_rate = |path: int8::Path| -> Result<f64> {
        Ok(ops
            / timed(|| {
                q.forward(&x, int8::Epilogue::Bias, path);
                Ok(())
            })?
            / 1e9)
    };
    let int8 = int8_rate(if int8::vnni_supported() { int8::Path::Vnni } else { int8::Path::Portable })?;
    let int8_amx = (int8::Path::best() == int8::Path::Amx).then(|| int8_rate(int8::Path::Amx)).transpose()?;
    Ok(LowPrecision { bf16, bf16_amx: amx, int8, int8_amx })
}

/// [`low_precision_gops`]' rates.
pub struct LowPrecision {
    pub bf16: Option<f64>,
    pub bf16_amx: Option<f64>,
    pub int8: f64,
    pub int8_amx: Option<f64>,
}

/// f32 GFLOP/s of an `n`-square matmul through candle: the ceiling for everything else.
pub fn gemm_gflops(n: usize, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?;
    let times = (0..5)
        .map(|_| {
            let t = Instant::now();
            a.matmul(&b).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<Vec<f64>>>()?;
    Ok(2.0 * (n as f64).powi(3) / median(times) / 1e9)
}

/// Matmul FLOPs of one forward pass over `rows` sequences padded to `seq`: (nominal, executed).
/// With `cls_only` the last layer projects keys and values for every token but computes the
/// rest for one position.
pub fn forward_flop(cfg: &BertConfig, rows: usize, seq: usize, cls_only: bool) -> (f64, f64) {
    let (h, i, layers) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_hidden_layers as f64);
    let (rows, seq) = (rows as f64, seq as f64);
    let layer = |queries: f64| {
        let kv = 2.0 * rows * seq * 2.0 * h * h;
        let rest = 2.0 * rows * queries * (2.0 * h * h + 2.0 * h * i);
        let attention = 4.0 * rows * queries * seq * h;
        kv + rest + attention
    };
    let nominal = layers * layer(seq);
    let executed = if cls_only && layers > 0.0 { (layers - 1.0) * layer(seq) + layer(1.0) } else { nominal };
    (nominal, executed)
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A bench step must update: a skipped one would time nothing.
fn updated(o: StepOutcome) -> Result<StepStats> {
    match o {
        StepOutcome::Updated(s) => Ok(s),
        StepOutcome::Skipped(why) => Err(Error::Invalid(format!("bench step skipped: {}", why.0))),
    }
}

fn step_s(s: &StepStats) -> f64 {
    s.forward_s + s.backward_s + s.optimizer_s
}

/// What `hypersphere bench` runs on: the training step's model (encoder, teacher, objective,
/// layout), the inference encoder, the tokenizers, the corpus pairs for the mix workload and
/// the corpus sentences to sample the embedding workload from.
pub struct BenchInputs<'a> {
    pub cfg: &'a RunConfig,
    pub model: StepModel<'a>,
    pub inference: &'a Encoder,
    pub tokenizer: &'a TextTokenizer,
    pub embed_tokenizer: &'a TextTokenizer,
    pub pairs: &'a dyn PairSource,
    pub sentences: &'a [String],
    pub device: &'a Device,
    pub progress: &'a dyn Progress,
}

/// Everything `hypersphere bench` measures; with `export` the exact inputs go there as
/// `mix_batches.json` and `sentences.txt`.
pub fn run(inp: &BenchInputs, opts: &BenchOptions, export: Option<&Path>) -> Result<BenchReport> {
    inp.progress.line("gemm 2048^3 ...");
    let low = low_precision_gops(2048)?;
    let gemm = Gemm {
        n: 2048,
        gflops: gemm_gflops(2048, inp.device)?,
        bf16_gflops: low.bf16,
        bf16_amx_gflops: low.bf16_amx,
        int8_gops: low.int8,
        int8_amx_gops: low.int8_amx,
    };
    let rate = |g: Option<f64>| g.map_or("n/a".into(), |g| format!("{g:.0}"));
    inp.progress.line(&format!(
        "  G ops/s: f32 {:.0}, bf16 {} (AVX-512) {} (AMX), int8 {:.0} (VNNI) {} (AMX)",
        gemm.gflops,
        rate(low.bf16),
        rate(low.bf16_amx),
        low.int8,
        rate(low.int8_amx)
    ));
    let mut rng = StdRng::seed_from_u64(inp.cfg.seed);
    let train_fixed = train_fixed(inp, opts, &mut rng)?;
    let train_mix = train_mix(inp, opts, export, &mut rng)?;
    let embed = embed(inp, opts, export)?;
    let encoder = inp.model.encoder;
    Ok(BenchReport {
        implementation: "hypersphere",
        model: encoder.files.spec.clone(),
        threads: rayon::current_num_threads(),
        pooling: encoder.pooling,
        mean_teacher: inp.model.teacher.is_some(),
        gemm,
        train_fixed,
        train_mix,
        embed,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// One training step, which must have updated (a bench input never gives a non-finite loss).
fn bench_step(inp: &BenchInputs, opt: &mut AdamW, batch: &Batch, rng: &mut StdRng) -> Result<StepStats> {
    let micro = std::slice::from_ref(batch);
    updated(train_step(inp.model, opt, micro, inp.cfg.train.max_grad_norm, Some(rng))?)
}

/// Matmul FLOPs of one step on `rows x seq` (nominal, executed): forward and backward (twice
/// the forward), plus the frozen teacher's forward when there is one.
fn step_flop(encoder: &Encoder, teacher: bool, rows: usize, seq: usize) -> (f64, f64) {
    let (nominal, executed) = forward_flop(&encoder.config, rows, seq, encoder.pooling == Pooling::Cls);
    let extra = if teacher { forward_flop(&encoder.config, rows, seq, false).1 } else { 0.0 };
    (3.0 * nominal, 3.0 * executed + extra)
}

/// (a) A fixed shape: `batch_pairs` pairs of `max_len` random word pieces, median of the steps
/// after a warm-up step.
fn train_fixed(inp: &BenchInputs, opts: &BenchOptions, rng: &mut StdRng) -> Result<TrainFixed> {
    let (cfg, encoder) = (inp.cfg, inp.model.encoder);
    let mut opt = AdamW::new(encoder.vars(), cfg.train.adamw())?;
    let (n_pairs, seq) = (cfg.train.batch_pairs, cfg.model.max_len);
    let rows = inp.model.layout.views() * n_pairs;
    let batch = Batch::random(rows, seq, encoder.config.vocab_size, false, rng, inp.device)?;
    let mut stats = Vec::new();
    for i in 0..=opts.steps.max(1) {
        let s = bench_step(inp, &mut opt, &batch, rng)?;
        let warm = if i == 0 { " (warm-up)" } else { "" };
        inp.progress.line(&format!("train {n_pairs}x{seq} step {i}{warm}: {:.3}s", step_s(&s)));
        if i > 0 {
            stats.push(s);
        }
    }
    let (nominal, executed) = step_flop(encoder, inp.model.teacher.is_some(), rows, seq);
    let step = median(stats.iter().map(step_s).collect());
    Ok(TrainFixed {
        pairs: n_pairs,
        seq,
        steps: stats.len(),
        forward_s: median(stats.iter().map(|s| s.forward_s).collect()),
        backward_s: median(stats.iter().map(|s| s.backward_s).collect()),
        optimizer_s: median(stats.iter().map(|s| s.optimizer_s).collect()),
        step_s: step,
        pairs_per_s: n_pairs as f64 / step,
        gflop_per_step: nominal / 1e9,
        gflop_executed_per_step: executed / 1e9,
        achieved_gflops: executed / 1e9 / step,
    })
}

/// The trainer's own length-bucketed batches of corpus pairs: `mix_batches` of them.
fn mix_batches(inp: &BenchInputs, opts: &BenchOptions) -> Result<Vec<Batch>> {
    let (n_pairs, pairs) = (inp.cfg.train.batch_pairs, inp.pairs);
    if pairs.len() < n_pairs {
        return Err(Error::Invalid(format!("only {} pairs for batches of {n_pairs}", pairs.len())));
    }
    let order = EpochOrder::new(pairs.len(), n_pairs, inp.cfg.seed);
    let mut batches = Vec::new();
    for j in 0..opts.mix_batches.max(1).min(order.len()) {
        let batch = order.batch(j, &|k| pairs.max_tokens(k))?;
        let ids = batch.iter().map(|&k| pairs.ids(k)).collect::<Result<Vec<PairIds>>>()?;
        batches.extend(inp.model.layout.batches(&ids, None, inp.tokenizer, inp.device)?);
    }
    Ok(batches)
}

/// (b) The realistic mix: the trainer's own length-bucketed batches of corpus pairs, summed.
fn train_mix(inp: &BenchInputs, opts: &BenchOptions, export: Option<&Path>, rng: &mut StdRng) -> Result<TrainMix> {
    let (cfg, encoder, teacher) = (inp.cfg, inp.model.encoder, inp.model.teacher);
    let n_pairs = cfg.train.batch_pairs;
    let batches = mix_batches(inp, opts)?;
    if let Some(dir) = export {
        export_batches(dir, &batches)?;
    }
    let mut opt = AdamW::new(encoder.vars(), cfg.train.adamw())?;
    bench_step(inp, &mut opt, &batches[0], rng)?;
    let mut m = TrainMix { batches: batches.len(), pairs: batches.len() * n_pairs, ..TrainMix::default() };
    let mut padded = 0;
    for (i, b) in batches.iter().enumerate() {
        let s = bench_step(inp, &mut opt, b, rng)?;
        let (rows, len) = b.input_ids.dims2()?;
        inp.progress.line(&format!("train mix batch {i} ({rows} x {len}): {:.3}s", step_s(&s)));
        (m.forward_s, m.backward_s, m.optimizer_s) =
            (m.forward_s + s.forward_s, m.backward_s + s.backward_s, m.optimizer_s + s.optimizer_s);
        m.tokens += b.lengths.iter().sum::<usize>();
        padded += len;
        let (n, e) = step_flop(encoder, teacher.is_some(), rows, len);
        (m.gflop, m.gflop_executed) = (m.gflop + n / 1e9, m.gflop_executed + e / 1e9);
    }
    m.seconds = m.forward_s + m.backward_s + m.optimizer_s;
    m.mean_seq = padded as f64 / batches.len() as f64;
    m.pairs_per_s = m.pairs as f64 / m.seconds;
    m.achieved_gflops = m.gflop_executed / m.seconds;
    Ok(m)
}

/// (c) Embedding: corpus sentences, no gradients, length-sorted dynamic batches, after a
/// warm-up on 256 of them.
fn embed(inp: &BenchInputs, opts: &BenchOptions, export: Option<&Path>) -> Result<Embed> {
    let (inference, tokenizer, device) = (inp.inference, inp.embed_tokenizer, inp.device);
    let mut sample: Vec<&str> = inp.sentences.iter().map(String::as_str).collect();
    sample.shuffle(&mut StdRng::seed_from_u64(inp.cfg.seed));
    sample.truncate(opts.embed_sentences);
    if let Some(dir) = export {
        let text: String = sample.iter().map(|s| format!("{}\n", s.replace(['\n', '\r'], " "))).collect();
        write_atomic(&dir.join("sentences.txt"), text.as_bytes())?;
    }
    embed_texts(inference, tokenizer, &sample[..sample.len().min(256)], opts.embed_batch, device)?;
    let t = Instant::now();
    embed_texts(inference, tokenizer, &sample, opts.embed_batch, device)?;
    let seconds = t.elapsed().as_secs_f64();
    inp.progress.line(&format!("embedded {} sentences in {seconds:.2}s", sample.len()));
    Ok(Embed {
        sentences: sample.len(),
        batch_size: opts.embed_batch,
        max_len: opts.embed_max_len,
        pooling: inference.pooling,
        seconds,
        sentences_per_s: sample.len() as f64 / seconds,
    })
}

/// `mix_batches.json`: each batch's padded ids and attention mask, as the PyTorch side reads them.
fn export_batches(dir: &Path, batches: &[Batch]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for b in batches {
        let mask: Vec<Vec<u32>> =
            b.attention_mask.to_vec2::<f32>()?.into_iter().map(|r| r.into_iter().map(|m| m as u32).collect()).collect();
        out.push(serde_json::json!({"input_ids": b.input_ids.to_vec2::<u32>()?, "attention_mask": mask}));
    }
    let path = dir.join("mix_batches.json");
    let text = serde_json::to_string(&serde_json::json!({ "batches": out })).map_err(|e| Error::json(&path, e))?;
    write_atomic(&path, text.as_bytes())
}
