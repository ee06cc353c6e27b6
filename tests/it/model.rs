use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hypersphere::config::{LossConfig, TrainConfig};
use hypersphere::data::batch::TextTokenizer;
use hypersphere::loss;
use hypersphere::loss::objective::{Objective, Views};
use hypersphere::model::pooling::Pooling;
use hypersphere::model::source::local_files;
use hypersphere::model::{embed_texts, Encoder};
use hypersphere::optim::AdamW;
use hypersphere::train::step::{batch_gradients, train_step, StepLayout, StepModel, StepOutcome};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::common::*;

const SENTENCES: [&str; 6] = [
    "the old man walked to the river.",
    "she looked at the dark window and said nothing.",
    "they came home late.",
    "a cold wind kept the ship in the town for two days.",
    "mr brown knew the road.",
    "what did you hear?",
];

/// Each fixture sentence paired with the one at the mirrored position: six distinct pairs.
fn reversed_pairs() -> Vec<hypersphere::data::source::Pair> {
    let pair = |(a, b): (&&str, &&str)| hypersphere::data::source::Pair::new(*a, *b);
    SENTENCES.iter().zip(SENTENCES.iter().rev()).map(pair).collect()
}

/// The pairs as (anchor, positive) text rows.
fn sides(pairs: &[hypersphere::data::source::Pair]) -> Vec<(&str, &str)> {
    pairs.iter().map(|p| (&*p.anchor, &*p.positive)).collect()
}

/// A loss config's objective and the layout of its rows.
fn objective_of(cfg: &LossConfig) -> (Objective, StepLayout) {
    let o = Objective::new(cfg);
    let l = StepLayout::new(&o);
    (o, l)
}

fn tiny(seed: u64, pooling: Pooling, trainable: bool) -> (tempfile::TempDir, Encoder, TextTokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(&dir.path().join("m"), seed, "");
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(&files, pooling, trainable, &Device::Cpu).unwrap();
    (dir, enc, tok)
}

/// Our encoder in eval mode against candle-transformers' BertModel, same real weights.
#[test]
fn parity_with_candle_transformers_bert() {
    let dev = Device::Cpu;
    let files = real_model();
    let tok = TextTokenizer::load(&files.tokenizer, 64).unwrap();
    let ours = Encoder::load(&files, Pooling::Mean, false, &dev).unwrap();
    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, &dev).unwrap() };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
    // Different lengths, so that padding and the mask matter.
    let batch = tok.batch(&SENTENCES, &dev).unwrap();
    let needs = hypersphere::model::pooling::Needs::all(false);
    let last =
        ours.bert.forward_t(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, needs, None).unwrap().last;
    let expected = reference.forward(&batch.input_ids, &batch.token_type_ids, Some(&batch.attention_mask)).unwrap();
    let diff = max_abs_diff(&last, &expected);
    assert!(diff < 1e-4, "max abs difference {diff}");
}

/// One backward pass on the real model: every trainable parameter gets a finite, non-zero
/// gradient (a LayerNorm without backward would leave everything below it at zero).
#[test]
fn every_real_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let files = real_model();
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(&files, Pooling::Cls, true, &dev).unwrap();
    // 6 layers x 16 tensors + 5 embedding tensors; the pooler is not used, so not trained.
    assert_eq!(enc.params.len(), 6 * 16 + 5);
    assert!(enc.params.iter().all(|(n, _)| !n.contains("pooler") && !n.contains("position_ids")));
    let batch = tok.batch(&SENTENCES[..4], &dev).unwrap();
    let emb = enc.embed(&batch, Some(&mut StdRng::seed_from_u64(0))).unwrap();
    let (x, y) = (emb.narrow(0, 0, 2).unwrap(), emb.narrow(0, 2, 2).unwrap());
    let views = Views { x: &x, y: &y, x_drop: None, mean_xy: None, neg: None };
    let parts = Objective::new(&LossConfig::default()).loss(&views).unwrap();
    let grads = hypersphere::model::backward(&parts.total).unwrap();
    for (name, var) in &enc.params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: gradient norm^2 {norm}");
    }
}

/// The [CLS]-only last layer gives the same [CLS] state, and the same gradient for every
/// parameter, as computing every position.
#[test]
fn cls_only_last_layer_matches_full_computation() {
    let dev = Device::Cpu;
    let files = real_model();
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(&files, Pooling::Cls, true, &dev).unwrap();
    let batch = tok.batch(&SENTENCES, &dev).unwrap();
    let run = |cls_only: bool| {
        let needs = hypersphere::model::pooling::Needs { first_layer: false, all_positions: !cls_only };
        let last = enc
            .bert
            .forward_t(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, needs, None)
            .unwrap()
            .last;
        assert_eq!(last.dim(1).unwrap(), if cls_only { 1 } else { batch.input_ids.dim(1).unwrap() });
        let cls = last.narrow(1, 0, 1).unwrap();
        let grads = hypersphere::model::backward(&cls.sin().unwrap().sum_all().unwrap()).unwrap();
        (cls, grads)
    };
    let ((trimmed, g1), (full, g2)) = (run(true), run(false));
    assert!(max_abs_diff(&trimmed, &full) < 1e-5);
    for (name, var) in &enc.params {
        let (a, b) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(a, b);
        assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: gradients differ by {diff} (largest {scale})");
    }
}

#[test]
fn padding_does_not_change_embeddings() {
    for pooling in [Pooling::Mean, Pooling::Cls, Pooling::FirstLastAvg] {
        let (_d, enc, tok) = tiny(1, pooling, false);
        let dev = Device::Cpu;
        let alone = enc.embed(&tok.batch(&[SENTENCES[2]], &dev).unwrap(), None).unwrap().to_vec2::<f32>().unwrap();
        // In a batch with a longer sentence, SENTENCES[2] gets padding.
        let batch = tok.batch(&[SENTENCES[2], SENTENCES[3]], &dev).unwrap();
        assert!(batch.lengths[0] < batch.lengths[1]);
        let padded = enc.embed(&batch, None).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in alone[0].iter().zip(&padded[0]) {
            assert!((a - b).abs() < 1e-5, "{pooling:?}: {a} vs {b}");
        }
    }
}

#[test]
fn batch_equals_one_at_a_time_and_rows_are_unit() {
    let (_d, enc, tok) = tiny(2, Pooling::Mean, false);
    let dev = Device::Cpu;
    let all = embed_texts(&enc, &tok, &SENTENCES, 4, &dev).unwrap();
    let h = enc.config.hidden_size;
    for (i, s) in SENTENCES.iter().enumerate() {
        let one = enc.embed(&tok.batch(&[s], &dev).unwrap(), None).unwrap().to_vec2::<f32>().unwrap();
        let row = &all[i * h..(i + 1) * h];
        assert!(cosine(row, &one[0]) > 0.999, "sentence {i}");
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let (_d, enc, tok) = tiny(3, Pooling::Mean, false);
    let dev = Device::Cpu;
    let b = tok.batch(&SENTENCES, &dev).unwrap();
    let eval1 = enc.embed(&b, None).unwrap();
    let eval2 = enc.embed(&b, None).unwrap();
    assert_eq!(max_abs_diff(&eval1, &eval2), 0.0);
    let t1 = enc.embed(&b, Some(&mut StdRng::seed_from_u64(5))).unwrap();
    let t2 = enc.embed(&b, Some(&mut StdRng::seed_from_u64(5))).unwrap();
    let t3 = enc.embed(&b, Some(&mut StdRng::seed_from_u64(6))).unwrap();
    assert_eq!(max_abs_diff(&t1, &t2), 0.0, "same seed, same masks");
    assert!(max_abs_diff(&t1, &t3) > 1e-4, "different seeds, different masks");
    assert!(max_abs_diff(&t1, &eval1) > 1e-4, "dropout changes the output in training");
}

fn train_tiny(seed: u64, steps: usize) -> (Vec<f32>, Vec<f32>) {
    let (_d, enc, tok) = tiny(4, Pooling::Mean, true);
    let dev = Device::Cpu;
    let cfg = TrainConfig { lr: 3e-3, warmup_steps: 0, ..Default::default() };
    let mut opt = AdamW::new(enc.vars(), cfg.adamw()).unwrap();
    // Anchors then positives: each sentence paired with itself reworded slightly.
    let texts: Vec<&str> =
        SENTENCES.iter().copied().chain(SENTENCES.iter().map(|s| s.trim_end_matches(['.', '?']))).collect();
    let batch = tok.batch(&texts, &dev).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let (objective, layout) = objective_of(&LossConfig::default());
    let model = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
    let losses: Vec<f32> = (0..steps)
        .map(|_| match train_step(model, &mut opt, std::slice::from_ref(&batch), 1.0, Some(&mut rng)).unwrap() {
            StepOutcome::Updated(s) => s.loss,
            StepOutcome::Skipped(why) => panic!("skipped: {}", why.0),
        })
        .collect();
    let w = enc.params[0].1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (losses, w)
}

#[test]
fn loss_goes_down_and_training_is_deterministic() {
    let (losses, w1) = train_tiny(9, 20);
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[17..].iter().sum::<f32>() / 3.0;
    assert!(last < first - 0.05, "loss did not go down: {losses:?}");
    let (losses2, w2) = train_tiny(9, 20);
    assert_eq!(losses, losses2);
    assert_eq!(w1, w2, "same seed must give the same weights");
}

#[test]
fn export_then_reload_gives_the_same_embeddings() {
    let (d, enc, tok) = tiny(5, Pooling::Cls, true);
    let dev = Device::Cpu;
    // Change the weights so that the export must carry trained values, not the originals.
    let mut opt =
        AdamW::new(enc.vars(), TrainConfig { lr: 1e-2, warmup_steps: 0, ..Default::default() }.adamw()).unwrap();
    let batch = tok.batch(&SENTENCES[..4], &dev).unwrap();
    let (objective, layout) = objective_of(&LossConfig::default());
    let model = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
    train_step(model, &mut opt, std::slice::from_ref(&batch), 1.0, None).unwrap();
    let out = d.path().join("exported");
    hypersphere::model::st_layout::write_model(&enc, &out, 32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let pooling: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("1_Pooling/config.json")).unwrap()).unwrap();
    assert_eq!(pooling["pooling_mode_cls_token"], true);
    let reloaded = Encoder::load(&local_files("exported", &out).unwrap(), Pooling::Cls, false, &dev).unwrap();
    let a = embed_texts(&enc, &tok, &SENTENCES, 8, &dev).unwrap();
    let b = embed_texts(&reloaded, &tok, &SENTENCES, 8, &dev).unwrap();
    assert_eq!(a, b);
    let original = Encoder::load(&enc.files, Pooling::Cls, false, &dev).unwrap();
    assert_ne!(a, embed_texts(&original, &tok, &SENTENCES, 8, &dev).unwrap());
    // Every key of the input survives, the int64 position ids included.
    let keys = |p: &std::path::Path| {
        let mut k: Vec<String> = candle_core::safetensors::load(p, &dev).unwrap().into_keys().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&enc.files.weights), keys(&out.join("model.safetensors")));
}

#[test]
fn bert_prefix_is_detected_and_shapes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let plain = tiny_model(&dir.path().join("plain"), 8, "");
    let prefixed = tiny_model(&dir.path().join("prefixed"), 8, "bert.");
    let a = Encoder::load(&plain, Pooling::Mean, false, &dev).unwrap();
    let b = Encoder::load(&prefixed, Pooling::Mean, true, &dev).unwrap();
    assert!(b.params.iter().all(|(n, _)| n.starts_with("bert.")));
    let tok = TextTokenizer::load(&plain.tokenizer, 32).unwrap();
    assert_eq!(
        embed_texts(&a, &tok, &SENTENCES, 8, &dev).unwrap(),
        embed_texts(&b, &tok, &SENTENCES, 8, &dev).unwrap()
    );
    // A config that disagrees with the weights names the weight.
    let text = std::fs::read_to_string(&plain.config)
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
    std::fs::write(&plain.config, text).unwrap();
    let err = Encoder::load(&plain, Pooling::Mean, false, &dev).err().unwrap().to_string();
    assert!(err.contains("intermediate.dense.weight") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn tokenizer_pads_per_batch_and_truncates() {
    let files = real_model();
    let tok = TextTokenizer::load(&files.tokenizer, 8).unwrap();
    let b = tok
        .batch(&["short.", "a somewhat longer sentence that will surely be cut at eight tokens"], &Device::Cpu)
        .unwrap();
    assert_eq!(b.input_ids.dims(), &[2, 8]);
    assert_eq!(b.lengths[1], 8);
    assert!(b.lengths[0] < 8);
    let mask = b.attention_mask.to_vec2::<f32>().unwrap();
    assert_eq!(mask[0].iter().sum::<f32>() as usize, b.lengths[0]);
    let tok = TextTokenizer::load(&files.tokenizer, 128).unwrap();
    let b = tok.batch(&["short.", "also short."], &Device::Cpu).unwrap();
    assert!(b.input_ids.dim(1).unwrap() < 10, "no fixed padding to 128");
}

/// Batches built from a prepared corpus's word-piece ids are the tokenizer's own batches of
/// the texts, truncation included, at any length.
#[test]
fn batches_from_ids_equal_batches_from_text() {
    let files = real_model();
    let texts = [
        "short.",
        "“Well,” said Mr. Brown, “the road is long — longer than you think!”",
        "a somewhat longer sentence that will surely be cut at eight tokens, and at twelve too",
        "naïve café owners' Übermensch",
    ];
    for max_len in [8, 12, 128] {
        let tok = TextTokenizer::load(&files.tokenizer, max_len).unwrap();
        let encode = tok.encoder().unwrap();
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| encode(t).unwrap()).collect();
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let (a, b) = (tok.batch(&texts, &Device::Cpu).unwrap(), tok.batch_ids(&rows, &Device::Cpu).unwrap());
        assert_eq!(a.lengths, b.lengths, "max_len {max_len}");
        let v = |t: &candle_core::Tensor| t.to_vec2::<u32>().unwrap();
        assert_eq!(v(&a.input_ids), v(&b.input_ids), "max_len {max_len}");
        assert_eq!(a.attention_mask.to_vec2::<f32>().unwrap(), b.attention_mask.to_vec2::<f32>().unwrap());
    }
}

/// GradCache: the gradients of a batch computed in micro-batches equal those of the whole
/// batch at once, for every loss (dropout off, so both see the same network). Within 1e-3 of
/// each tensor's largest entry: micro-batches pad less, so the f32 sums differ at ~2e-4 (key
/// biases, whose true gradient is 0, show it most); a wrong gradient is off by O(1).
#[test]
fn micro_batches_give_the_full_batch_gradient() {
    use hypersphere::config::LossKind;
    let (_d, enc, tok) = tiny(6, Pooling::Cls, true);
    let dev = Device::Cpu;
    let pairs = reversed_pairs();
    let refs = sides(&pairs);
    let losses = [
        LossConfig::default(),
        LossConfig { kind: LossKind::Infonce, tau: 0.1, ..Default::default() },
        LossConfig { kind: LossKind::Mix, w_infonce: 0.5, w_dropout: 0.3, t: 5.0, ..Default::default() },
        LossConfig { kind: LossKind::Mix, w_infonce: 1.0, w_mean: 0.7, ..Default::default() },
        LossConfig { kind: LossKind::Infonce, w_distill: 2.0, ..Default::default() },
    ];
    for cfg in &losses {
        let (objective, layout) = objective_of(cfg);
        let model = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
        let micro =
            |m: usize| -> Vec<_> { refs.chunks(m).map(|c| tok.batch(&layout.rows(c), &dev).unwrap()).collect() };
        let full = batch_gradients(model, &micro(6), None).unwrap().unwrap();
        for m in [2, 4] {
            let cached = batch_gradients(model, &micro(m), None).unwrap().unwrap();
            assert!((cached.loss - full.loss).abs() < 1e-5, "{:?} loss {} vs {}", cfg.kind, cached.loss, full.loss);
            for (name, var) in &enc.params {
                let a = full.grads.get(var.as_tensor()).unwrap();
                let b = cached.grads.get(var.as_tensor()).unwrap();
                let scale = a.abs().unwrap().max_keepdim(0).unwrap().flatten_all().unwrap().max(0).unwrap();
                let scale = scale.to_scalar::<f32>().unwrap().max(1e-6);
                let diff = max_abs_diff(a, b);
                assert!(
                    diff <= 1e-3 * scale + 1e-7,
                    "{:?} micro {m}: {name} differs by {diff} (scale {scale})",
                    cfg.kind
                );
            }
        }
    }
}

/// The whole encoder through the reference ops (primitive candle ops: the path every non-CPU
/// device takes) and through the fused CPU kernels, on a real model with dropout on: the same
/// loss, and every parameter's gradient, within float tolerance.
#[test]
fn reference_and_fused_encoders_agree_on_values_and_gradients() {
    use hypersphere::config::LossKind;
    use hypersphere::model::ops::Kernels;
    use rand::SeedableRng;
    let files = real_model();
    let dev = Device::Cpu;
    let tok = TextTokenizer::load(&files.tokenizer, 24).unwrap();
    let pairs = reversed_pairs();
    let refs = sides(&pairs);
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let cfg = LossConfig { kind: LossKind::Mix, w_infonce: 1.0, w_mean: 0.5, ..Default::default() };
        let cfg = if pooling == Pooling::Mean { LossConfig { w_mean: 0.0, ..cfg } } else { cfg };
        let (objective, layout) = objective_of(&cfg);
        let batch = tok.batch(&layout.rows(&refs), &dev).unwrap();
        let run = |k: Kernels| {
            let enc = Encoder::load_with(&files, pooling, true, &dev, k).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let model = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
            let g = batch_gradients(model, std::slice::from_ref(&batch), Some(&mut rng)).unwrap().unwrap();
            let grads: Vec<(String, candle_core::Tensor)> =
                enc.params.iter().map(|(n, v)| (n.clone(), g.grads.get(v.as_tensor()).unwrap().clone())).collect();
            (g.loss, grads)
        };
        let (fused_loss, fused) = run(Kernels::Fused);
        let (ref_loss, reference) = run(Kernels::Reference);
        assert!(
            (fused_loss - ref_loss).abs() < 1e-4 * ref_loss.abs().max(1.0),
            "{pooling:?}: {fused_loss} vs {ref_loss}"
        );
        assert_eq!(fused.len(), reference.len());
        // Two different code paths: their rounding differs somewhere.
        assert!(fused.iter().zip(&reference).any(|((_, a), (_, b))| max_abs_diff(a, b) > 0.0), "the same path twice");
        for ((name, a), (_, b)) in fused.iter().zip(&reference) {
            // Some gradients are zero in exact arithmetic (the key bias: softmax ignores a shift):
            // compared against a floor, not their rounding noise.
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-4);
            let diff = max_abs_diff(a, b);
            assert!(diff <= 2e-3 * scale, "{pooling:?} {name}: max diff {diff} vs scale {scale}");
        }
    }
}

/// The bf16 CPU path (linear layers' products in bf16, forward and backward) against f32 on a
/// real model with dropout on: the loss within 1%, and every parameter's gradient pointing the
/// same way (cosine above 0.99; tolerances measured, with margin: the lowest cosine seen was
/// 0.9999).
#[test]
fn bf16_products_train_like_f32() {
    use hypersphere::config::LossKind;
    use hypersphere::model::ops::{bf16, Kernels};
    use rand::SeedableRng;
    if !bf16::supported() {
        eprintln!("note: this CPU has no AVX-512 BF16; the portable kernel is checked against it in the unit tests");
    }
    let files = real_model();
    let dev = Device::Cpu;
    let tok = TextTokenizer::load(&files.tokenizer, 24).unwrap();
    let pairs = reversed_pairs();
    let refs = sides(&pairs);
    let cfg = LossConfig { kind: LossKind::Mix, w_infonce: 1.0, w_mean: 0.5, ..Default::default() };
    let (objective, layout) = objective_of(&cfg);
    let batch = tok.batch(&layout.rows(&refs), &dev).unwrap();
    let run = |k: Kernels| {
        let enc = Encoder::load_with(&files, Pooling::Cls, true, &dev, k).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let model = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
        let g = batch_gradients(model, std::slice::from_ref(&batch), Some(&mut rng)).unwrap().unwrap();
        let grads: Vec<(String, Vec<f32>)> = enc
            .params
            .iter()
            .map(|(n, v)| (n.clone(), g.grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        (g.loss, grads)
    };
    let ((loss16, g16), (loss32, g32)) = (run(Kernels::Bf16), run(Kernels::Fused));
    assert!((loss16 - loss32).abs() < 1e-2 * loss32.abs().max(1.0), "{loss16} vs {loss32}");
    assert_eq!(g16.len(), g32.len());
    let mut lowest = 1.0f64;
    for ((name, a), (_, b)) in g16.iter().zip(&g32) {
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
        let norm = (dot(a, a) * dot(b, b)).sqrt();
        if norm < 1e-12 {
            continue; // zero in exact arithmetic (the key bias)
        }
        let cos = dot(a, b) / norm;
        lowest = lowest.min(cos);
        assert!(cos > 0.99, "{name}: gradient cosine {cos} between bf16 and f32");
    }
    assert!(lowest < 1.0, "the bf16 path gave f32's gradients exactly: it did not run");
    eprintln!("lowest gradient cosine bf16 vs f32: {lowest}");
}

/// Data-parallel GradCache: two ranks (threads of this process, exchanging through the same
/// collectives MPI provides) each embed their shard, all-gather every view, back-propagate the
/// global loss through their own rows and sum their gradients. Every rank ends with the same
/// gradient, equal to one process's GradCache over the same two micro-batches with the same
/// dropout seeds (dropout on), for align + uniform, InfoNCE, their mix with dropout views and
/// the frozen teacher's mean view.
#[test]
fn two_ranks_give_the_gradcache_gradient() {
    use hypersphere::config::LossKind;
    use hypersphere::dist::threads::Threads;
    use hypersphere::dist::World;
    use hypersphere::train::step::shard_gradients;
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(&dir.path().join("m"), 8, "");
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(&files, Pooling::Cls, true, &Device::Cpu).unwrap();
    let teacher = Encoder::load(&files, Pooling::Mean, false, &Device::Cpu).unwrap();
    let pairs = reversed_pairs();
    let refs = sides(&pairs);
    let losses = [
        LossConfig::default(),
        LossConfig { kind: LossKind::Infonce, tau: 0.1, w_dropout: 1.0, ..Default::default() },
        LossConfig { kind: LossKind::Mix, w_infonce: 0.5, w_dropout: 0.3, t: 5.0, ..Default::default() },
        LossConfig { w_align: 0.0, w_mean: 10.0, mean_teacher: true, t: 0.5, w_uniform: 10.0, ..Default::default() },
    ];
    for cfg in &losses {
        let (objective, layout) = objective_of(cfg);
        let model = StepModel {
            encoder: &enc,
            teacher: cfg.mean_teacher.then_some(&teacher),
            objective: &objective,
            layout: &layout,
        };
        let micro: Vec<_> = refs.chunks(3).map(|c| tok.batch(&layout.rows(c), &Device::Cpu).unwrap()).collect();
        let one = batch_gradients(model, &micro, Some(&mut StdRng::seed_from_u64(42))).unwrap().unwrap();
        // The seeds one process draws for its micro-batches, in order: rank k takes the k-th.
        let mut rng = StdRng::seed_from_u64(42);
        let seeds: Vec<u64> = (0..2).map(|_| rng.gen()).collect();
        let ranks: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = Threads::world(2)
                .into_iter()
                .map(|t| {
                    let (micro, seeds) = (&micro, &seeds);
                    s.spawn(move || {
                        let world = World::new(Box::new(t));
                        let k = world.rank();
                        shard_gradients(model, &world, &micro[k..=k], Some(&seeds[k..=k])).unwrap().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for rank in &ranks {
            assert_eq!(rank.loss, one.loss, "{:?}: every rank sees the global loss", cfg.kind);
            for (name, var) in &enc.params {
                let (got, want) = (rank.grads.get(var.as_tensor()).unwrap(), one.grads.get(var.as_tensor()).unwrap());
                let scale =
                    want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
                let diff = max_abs_diff(got, want);
                assert!(diff <= 1e-6 * scale, "{:?} {name}: {diff} vs scale {scale}", cfg.kind);
            }
        }
        let (a, b) = (&ranks[0].grads, &ranks[1].grads);
        for (name, var) in &enc.params {
            let diff = max_abs_diff(a.get(var.as_tensor()).unwrap(), b.get(var.as_tensor()).unwrap());
            assert_eq!(diff, 0.0, "{name}: the ranks' summed gradients differ");
        }
    }
}

/// The training loop reports through its progress only: start, every step in order, the
/// validation lines, finish once, in the order they happen.
#[test]
fn training_reports_through_its_progress() {
    use hypersphere::config::resolved::Resolved;
    use hypersphere::config::{RunConfig, Select};
    use hypersphere::data::books::{build, pairs::PairOptions, prepared, BookPairs};
    use hypersphere::progress::Progress;
    use hypersphere::train::{train, TrainInputs};
    use std::sync::Mutex;
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl Progress for Recorder {
        fn start(&self, label: &str, done: u64, total: u64) {
            self.0.lock().unwrap().push(format!("start {label} {done}/{total}"));
        }
        fn advance(&self, done: u64, _: &str) {
            self.0.lock().unwrap().push(format!("step {done}"));
        }
        fn line(&self, text: &str) {
            self.0.lock().unwrap().push(format!("line {}", text.split(':').next().unwrap_or("")));
        }
        fn finish(&self) {
            self.0.lock().unwrap().push("finish".into());
        }
    }
    let (_d, enc, tok) = tiny(4, Pooling::Mean, true);
    let run_dir = tempfile::tempdir().unwrap();
    let pairs = reversed_pairs();
    // The fixture sentences as paragraphs of a book, prepared: five adjacent pairs.
    let book = run_dir.path().join("book.txt");
    std::fs::write(&book, SENTENCES.join("\n")).unwrap();
    let opts = PairOptions { min_tokens: 1, ..Default::default() };
    let recipe = prepared::Recipe::new("test".into(), &opts);
    let dir = run_dir.path().join("prepared");
    let encode = tok.encoder().unwrap();
    build::prepare(&book, &dir, &recipe, &opts, &encode, &hypersphere::progress::Quiet).unwrap();
    let corpus = prepared::Prepared::open(&dir, &recipe).unwrap();
    let split = corpus.split(None, 0.0, 1);
    assert_eq!(split.train.len(), 5);
    let mut cfg = RunConfig::default();
    cfg.data.corpus = dir.display().to_string();
    (cfg.train.steps, cfg.train.batch_pairs, cfg.train.eval_every_steps) = (3, 2, 2);
    (cfg.train.select, cfg.train.checkpoint_every_steps) = (Select::Last, 0);
    let run = Resolved::new(cfg, None, Some("cpu")).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let recorder = Recorder::default();
    let summary = train(&TrainInputs {
        encoder: &enc,
        teacher: None,
        tokenizer: &tok,
        run: &run,
        train: &BookPairs::new(&corpus, &split.train),
        val_pairs: &pairs[..4],
        dev: None,
        run_dir: run_dir.path(),
        resume: false,
        stop: &stop,
        progress: &recorder,
        world: &hypersphere::dist::World::single(),
    })
    .unwrap();
    assert_eq!(summary.steps, 3);
    // Drift warnings (a random tiny model's positives are far apart) may come after a
    // validation line; everything else in this order.
    let events: Vec<String> = recorder.0.lock().unwrap().iter().filter(|e| *e != "line warning").cloned().collect();
    let want = [
        "line step 0 (before training)",
        "start training 0/3",
        "step 1",
        "step 2",
        "line step 2/3",
        "step 3",
        "line step 3/3",
        "finish",
    ];
    assert_eq!(events, want);
}

/// `loss.mean_teacher`: the mean view from a frozen copy of the starting model. Before any
/// update (dropout off) it equals the same pass's mean view, so loss and gradients match the
/// plain path, in one batch and through GradCache; the teacher's weights get no gradient.
#[test]
fn frozen_teacher_gives_the_same_pass_view_before_training() {
    use hypersphere::config::LossKind;
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_model(&dir.path().join("m"), 12, "");
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(&files, Pooling::Cls, true, &Device::Cpu).unwrap();
    // Loaded with its weights as variables, so that a gradient reaching them would show.
    let teacher = Encoder::load(&files, Pooling::Mean, true, &Device::Cpu).unwrap();
    assert_eq!(teacher.params.len(), enc.params.len());
    let pairs = reversed_pairs();
    let refs = sides(&pairs);
    let cfg = LossConfig { kind: LossKind::AlignUniform, w_align: 0.0, w_mean: 2.0, ..Default::default() };
    let (objective, layout) = objective_of(&cfg);
    let plain = StepModel { encoder: &enc, teacher: None, objective: &objective, layout: &layout };
    let taught = StepModel { teacher: Some(&teacher), ..plain };
    for m in [6, 3] {
        let micro: Vec<_> = refs.chunks(m).map(|c| tok.batch(&layout.rows(c), &Device::Cpu).unwrap()).collect();
        let own = batch_gradients(plain, &micro, None).unwrap().unwrap();
        let frozen = batch_gradients(taught, &micro, None).unwrap().unwrap();
        assert!((own.loss - frozen.loss).abs() < 1e-5, "micro {m}: {} vs {}", own.loss, frozen.loss);
        assert!(own.parts.iter().any(|(n, v)| *n == "mean" && *v > 0.0));
        for (name, var) in &enc.params {
            let (a, b) = (own.grads.get(var.as_tensor()).unwrap(), frozen.grads.get(var.as_tensor()).unwrap());
            let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            assert!(max_abs_diff(a, b) <= 1e-3 * scale, "micro {m} {name}");
        }
        for (_, var) in &teacher.params {
            assert!(frozen.grads.get(var.as_tensor()).is_none(), "the teacher is frozen");
        }
    }
    // Another model as the teacher: the mean term is the alignment of our [CLS] rows with its
    // mean-pooled rows, whatever the same pass's mean view would have been.
    let other = Encoder::load(&tiny_model(&dir.path().join("t"), 13, ""), Pooling::Mean, false, &Device::Cpu).unwrap();
    let batch = tok.batch(&layout.rows(&refs), &Device::Cpu).unwrap();
    let g = batch_gradients(StepModel { teacher: Some(&other), ..plain }, std::slice::from_ref(&batch), None)
        .unwrap()
        .unwrap();
    let want = loss::align(&enc.embed(&batch, None).unwrap(), &other.embed(&batch, None).unwrap(), 2.0).unwrap();
    let got = g.parts.iter().find(|(n, _)| *n == "mean").unwrap().1;
    assert!((got - want.to_scalar::<f32>().unwrap()).abs() < 1e-5, "{got} vs {want}");
    let own = batch_gradients(plain, std::slice::from_ref(&batch), None).unwrap().unwrap();
    assert!((own.parts.iter().find(|(n, _)| *n == "mean").unwrap().1 - got).abs() > 1e-3);
}

/// A config.json that declares fewer layers than its weights hold is an error naming it, not a
/// shallower model (issue 25); the matching count loads.
#[test]
fn fewer_declared_layers_than_weights_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 1, "");
    let text = std::fs::read_to_string(&files.config).unwrap();
    assert!(text.contains("\"num_hidden_layers\": 2"), "{text}");
    std::fs::write(&files.config, text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1")).unwrap();
    let err = Encoder::load(&files, Pooling::Mean, false, &Device::Cpu).err().expect("refused").to_string();
    assert!(err.contains("config.json") && err.contains("holds 2 layers"), "{err}");
    std::fs::write(&files.config, text).unwrap();
    assert_eq!(Encoder::load(&files, Pooling::Mean, false, &Device::Cpu).unwrap().config.num_hidden_layers, 2);
}
