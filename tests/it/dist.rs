//! Data-parallel training and sharded embedding. In every build: ranks as threads of one
//! process run the real training loop. With `--features mpi`: the binary under
//! `mpirun --oversubscribe -np 2` (as root where CI runs as root), against one process.

use std::path::{Path, PathBuf};

use candle_core::Device;
use hypersphere::config::resolved::Resolved;
use hypersphere::config::{RunConfig, Select};
use hypersphere::data::batch::TextTokenizer;
use hypersphere::data::books::{build, pairs::PairOptions, prepared, BookPairs};
use hypersphere::data::source::{Pair, PairSource};
use hypersphere::dist::threads::Threads;
use hypersphere::dist::{Collective, World};
use hypersphere::model::pooling::Pooling;
use hypersphere::model::Encoder;
use hypersphere::train::{train, TrainInputs};

use crate::common::*;

/// The fixture books prepared for the tiny model's tokenizer, in `dir`.
fn prepared_books(dir: &Path, tok: &TextTokenizer) -> (prepared::Prepared, prepared::Split) {
    let opts = PairOptions { min_tokens: 2, ..Default::default() };
    let recipe = prepared::Recipe::new("test".into(), &opts);
    let out = dir.join("prepared");
    build::prepare(
        &fixtures().join("books"),
        &out,
        &recipe,
        &opts,
        &tok.encoder().unwrap(),
        &hypersphere::progress::Quiet,
    )
    .unwrap();
    let corpus = prepared::Prepared::open(&out, &recipe).unwrap();
    let split = corpus.split(None, 0.25, 1);
    (corpus, split)
}

/// Train `steps` steps of `sets` on the tiny model in `run_dir` as one rank of `world`; the
/// final weights.
fn train_tiny(
    files: &hypersphere::model::source::ModelFiles,
    run_dir: &Path,
    world: &World,
    sets: &[&str],
) -> Vec<Vec<f32>> {
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let enc = Encoder::load(files, Pooling::Cls, true, &Device::Cpu).unwrap();
    let teacher = Encoder::load(files, Pooling::Mean, false, &Device::Cpu).unwrap();
    let (corpus, split) = prepared_books(run_dir, &tok);
    let mut cfg = RunConfig::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    cfg.data.corpus = run_dir.join("prepared").display().to_string();
    cfg.train.select = Select::Last;
    let run = Resolved::new(cfg, None, Some("cpu")).unwrap();
    let val = BookPairs::new(&corpus, &split.val);
    let val_pairs: Vec<Pair> = (0..8).map(|k| val.pair(k).unwrap()).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let summary = train(&TrainInputs {
        encoder: &enc,
        teacher: run.cfg().loss.mean_teacher.then_some(&teacher),
        tokenizer: &tok,
        run: &run,
        train: &BookPairs::new(&corpus, &split.train),
        val_pairs: &val_pairs,
        dev: None,
        run_dir,
        resume: false,
        stop: &stop,
        progress: &hypersphere::progress::Quiet,
        world,
    })
    .unwrap();
    assert_eq!(summary.steps, run.cfg().train.steps);
    enc.params.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// `run` on two ranks as threads, rank k in `dirs[k]`, each world's engine made by `comm` from
/// its thread handle; what each rank returned, in rank order.
fn two_ranks<T: Send>(
    dirs: &[PathBuf],
    comm: impl Fn(Threads) -> Box<dyn Collective> + Sync,
    run: impl Fn(&Path, &World) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = Threads::world(2)
            .into_iter()
            .zip(dirs)
            .map(|(t, dir)| {
                let (comm, run) = (&comm, &run);
                s.spawn(move || run(dir, &World::new(comm(t))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Two ranks (threads exchanging through the collectives) run the training loop, each on its
/// shard of every global batch, with dropout on: both end with the same weights, those of one
/// process running GradCache with `train.micro_batch_pairs = batch_pairs / 2`, for align +
/// uniform, InfoNCE with dropout views and the default config's frozen teacher.
#[test]
fn ranks_as_threads_train_the_gradcache_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let base = ["train.steps=6", "train.batch_pairs=8", "train.eval_every_steps=3", "train.checkpoint_every_steps=3"];
    let configs: [&[&str]; 3] = [
        &["loss.w_align=1", "loss.w_mean=0", "loss.mean_teacher=false", "loss.t=2", "loss.w_uniform=1"],
        &["loss.kind=\"infonce\"", "loss.w_align=1", "loss.w_dropout=1", "loss.w_mean=0", "loss.mean_teacher=false"],
        &[],
    ];
    for (i, extra) in configs.iter().enumerate() {
        let sets: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let one_dir = tmp.path().join(format!("one{i}"));
        let micro: Vec<&str> = sets.iter().copied().chain(["train.micro_batch_pairs=4"]).collect();
        let one = train_tiny(&files, &one_dir, &World::single(), &micro);
        let dirs: Vec<PathBuf> = (0..2).map(|k| tmp.path().join(format!("two{i}-{k}"))).collect();
        let ranks = two_ranks(&dirs, |t| Box::new(t), |dir, world| train_tiny(&files, dir, world, &sets));
        assert_eq!(ranks[0], ranks[1], "config {i}: the ranks' weights differ");
        for (p, (a, b)) in one.iter().zip(&ranks[0]).enumerate() {
            let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "config {i}, parameter {p}: {diff} (scale {scale})");
        }
        // Each validation was embedded half by each rank: rank 0 logged the numbers one
        // process logs (to float rounding: the weights agree to 1e-5).
        let log = |dir: &Path| -> Vec<serde_json::Value> {
            let text = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        let (solo, shared) = (log(&one_dir), log(&dirs[0]));
        assert_eq!(solo.len(), 3, "config {i}: validations at steps 0, 3, 6");
        assert_eq!(solo.len(), shared.len());
        for (a, b) in solo.iter().zip(&shared) {
            assert_eq!(a["step"], b["step"]);
            for k in ["val_align", "val_uniform", "val_mean_cos"] {
                let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "config {i}, step {}: {k} {x} vs {y}", a["step"]);
            }
        }
        // Rank 0 wrote the run folder; rank 1 wrote nothing but its prepared corpus.
        assert!(dirs[0].join("log.jsonl").is_file() && dirs[0].join("checkpoints").is_dir());
        assert!(!dirs[1].join("log.jsonl").exists() && !dirs[1].join("checkpoints").exists());
    }
}

/// The path NCCL takes on GPUs (every gradient summed as one dense tensor where it lives, rows
/// gathered as tensors), here with ranks as threads on the CPU: the same weights as the sparse
/// host path's, for the default config (its frozen teacher's rows gathered too).
#[test]
fn the_dense_device_path_trains_the_same_weights() {
    /// Threads that say they work in device memory, so the world takes the dense path.
    struct Dense(Threads);
    impl Collective for Dense {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn size(&self) -> usize {
            self.0.size()
        }
        fn all_gather(&self, local: &[f32]) -> hypersphere::error::Result<Vec<f32>> {
            self.0.all_gather(local)
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> hypersphere::error::Result<()> {
            self.0.all_reduce_sum(buf)
        }
        fn broadcast(&self, buf: &mut [u8]) -> hypersphere::error::Result<()> {
            self.0.broadcast(buf)
        }
        fn barrier(&self) -> hypersphere::error::Result<()> {
            self.0.barrier()
        }
        fn works_on_device(&self) -> bool {
            true
        }
        fn abort(&self, code: i32) -> ! {
            self.0.abort(code)
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let sets = ["train.steps=4", "train.batch_pairs=8", "train.eval_every_steps=2", "train.checkpoint_every_steps=2"];
    let run = |dense: bool| -> Vec<Vec<f32>> {
        let dirs: Vec<PathBuf> = (0..2).map(|k| tmp.path().join(format!("{dense}-{k}"))).collect();
        let comm = |t: Threads| -> Box<dyn Collective> {
            if dense {
                Box::new(Dense(t))
            } else {
                Box::new(t)
            }
        };
        let ranks = two_ranks(&dirs, comm, |dir, world| train_tiny(&files, dir, world, &sets));
        assert_eq!(ranks[0], ranks[1], "dense {dense}: the ranks' weights differ");
        ranks.into_iter().next().unwrap()
    };
    let (sparse, dense) = (run(false), run(true));
    for (p, (a, b)) in sparse.iter().zip(&dense).enumerate() {
        let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-6 * scale, "parameter {p}: {diff} (scale {scale})");
    }
}

/// A build without MPI started by a launcher as one of several ranks refuses at once.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["finetune", "--set", "data.corpus=/nowhere"])
        .current_dir(tmp.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("--features mpi"), "{stderr}");
    assert!(!tmp.path().join("runs").exists(), "nothing written");
}
