//! The binary under `mpirun --oversubscribe -np R` (one rayon thread per rank) against one
//! process: training, the default config, faults, resumes across rank counts, embedding.
//! Needs OpenMPI (`.ci/run` installs it) and `--features mpi`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `hypersphere ARGS` in `cwd`, as `ranks` MPI ranks (or one plain process when `ranks` is 0).
fn launch(ranks: usize, args: &[String], cwd: &Path) -> Command {
    let bin = env!("CARGO_BIN_EXE_hypersphere");
    let mut c = match ranks {
        0 => Command::new(bin),
        r => {
            let mut c = Command::new("mpirun");
            c.args(["--oversubscribe", "-np", &r.to_string(), "-x", "RAYON_NUM_THREADS=1", bin]);
            c
        }
    };
    c.args(args)
        .current_dir(cwd)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("HYPERSPHERE_CACHE", cwd.join(".cache"));
    c
}

fn run(ranks: usize, args: &[String], cwd: &Path) -> Output {
    launch(ranks, args, cwd).output().unwrap()
}

/// `finetune` of the tiny model on the fixture books, as run `name`, with `--set`s.
fn tiny_args(model: &Path, name: &str, sets: &[&str]) -> Vec<String> {
    let own = ["report.pairs=10", "loss.w_mean=0", "loss.mean_teacher=false", "loss.w_align=1"].map(String::from);
    let mut args = vec!["finetune".to_string()];
    for s in tiny_run(model, name).into_iter().chain(own).chain(sets.iter().map(|s| s.to_string())) {
        args.extend(["--set".to_string(), s]);
    }
    args
}

/// Every tensor of two model folders' weights within `rel` of the first's largest value.
fn same_weights(a: &Path, b: &Path, rel: f32) {
    let load =
        |p: &Path| candle_core::safetensors::load(p.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let (x, y) = (x.to_dtype(candle_core::DType::F32).unwrap(), b[name].to_dtype(candle_core::DType::F32).unwrap());
        let scale = x.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let diff = max_abs_diff(&x, &y);
        assert!(diff <= rel * scale, "{name}: {diff} apart (scale {scale})");
    }
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// 10 steps of align + uniform, and of InfoNCE with dropout views, over 2 ranks end with the
/// weights of one process running GradCache with 2 micro-batches; only rank 0 reports.
#[test]
fn two_ranks_train_like_one_process_with_two_micro_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    let runs = tmp.path().join("runs");
    // The first also has an infinite clipping norm (no clipping), which JSON cannot carry.
    let configs: [&[&str]; 2] = [
        &["loss.w_uniform=1", "loss.t=2", "train.max_grad_norm=inf"],
        &["loss.kind=\"infonce\"", "loss.w_dropout=1", "loss.tau=0.1"],
    ];
    for (i, extra) in configs.iter().enumerate() {
        let sets: Vec<&str> =
            ["train.steps=10", "train.eval_every_steps=5"].iter().chain(extra.iter()).copied().collect();
        let two = ok(&run(2, &tiny_args(&model, &format!("two{i}"), &sets), tmp.path()));
        let micro: Vec<&str> = sets.iter().copied().chain(["train.micro_batch_pairs=4"]).collect();
        ok(&run(0, &tiny_args(&model, &format!("one{i}"), &micro), tmp.path()));
        same_weights(&runs.join(format!("one{i}/model")), &runs.join(format!("two{i}/model")), 1e-5);
        assert_eq!(two.matches("trained 10 of 10 steps").count(), 1, "one report, from rank 0: {two}");
    }
}

/// The default config (the real model, its frozen teacher, STS-B dev selection) over 2 ranks:
/// the same selected step, STS-B dev within 0.05 and weights within 1e-5 of one process with
/// `train.micro_batch_pairs=32`.
#[test]
fn the_default_config_over_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir();
    let sets = [
        "train.steps=10",
        "train.eval_every_steps=5",
        "report.sentences=200",
        "report.pairs=100",
        "train.val_pairs=64",
        // BOOKS-NEXT embeds every held-out sentence (2 minutes a measurement): not what this
        // test is about.
        "report.books_next=false",
    ];
    let args = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut a = vec!["finetune".to_string(), "--data".into(), data.display().to_string()];
        let named = format!("name={name}");
        for s in sets.iter().chain(extra).copied().chain([named.as_str()]) {
            a.extend(["--set".to_string(), s.to_string()]);
        }
        a
    };
    ok(&run(2, &args("two", &[]), tmp.path()));
    ok(&run(0, &args("one", &["train.micro_batch_pairs=32"]), tmp.path()));
    let report = |n: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(format!("runs/{n}/report.json"))).unwrap())
            .unwrap()
    };
    let (one, two) = (report("one"), report("two"));
    assert_eq!(one["train"]["selected"]["step"], two["train"]["selected"]["step"]);
    let dev = |r: &serde_json::Value| r["train"]["selected"]["sts_dev"].as_f64().unwrap();
    assert!((dev(&one) - dev(&two)).abs() <= 0.05, "STS-B dev {} vs {}", dev(&one), dev(&two));
    same_weights(&tmp.path().join("runs/one/model"), &tmp.path().join("runs/two/model"), 1e-5);
}

/// The rank processes under a running `mpirun`: its children (from /proc) running our binary.
fn ranks_of(mpirun: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: the fields after the last ')'.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        if ppid == Some(mpirun) && exe.ends_with("hypersphere") {
            out.push(pid);
        }
    }
    out
}

/// The newest complete checkpoint's step in `run_dir` (`.partial` folders are not complete).
fn newest_checkpoint(run_dir: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(run_dir.join("checkpoints")).into_iter().flatten().flatten();
    entries.filter_map(|e| e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()).max()
}

/// Wait (at most a minute) until `run_dir` holds a complete checkpoint.
fn wait_for_checkpoint(run_dir: &Path) {
    let t = Instant::now();
    while newest_checkpoint(run_dir).is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoint in {} after a minute", run_dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait (at most a minute) until `path` exists.
fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A rank killed mid-run ends the whole world with a non-zero exit (no rank left waiting); the
/// run folder then resumes on one process from rank 0's last checkpoint and finishes.
#[test]
fn a_killed_rank_ends_the_world_and_the_run_resumes_on_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    // Far more steps than the test waits for: the run only ends by the kill.
    let sets = ["train.steps=10000000", "train.eval_every_steps=0", "train.checkpoint_every_steps=20"];
    let mut child = launch(2, &tiny_args(&model, "killed", &sets), tmp.path()).stderr(Stdio::piped()).spawn().unwrap();
    let run_dir = tmp.path().join("runs/killed");
    wait_for_checkpoint(&run_dir);
    let rank0: u32 = std::fs::read_to_string(run_dir.join(".lock")).unwrap().trim().parse().unwrap();
    let other = ranks_of(child.id()).into_iter().find(|&p| p != rank0).expect("rank 1's process");
    Command::new("kill").args(["-KILL", &other.to_string()]).status().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the world did not end after a rank died");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("rank 1"), "the launcher names the dead rank: {said}");
    assert!(!run_dir.join("model").exists(), "nothing exported");
    let saved = newest_checkpoint(&run_dir).expect("a checkpoint");
    let resume = [
        "finetune".to_string(),
        "--resume".into(),
        run_dir.display().to_string(),
        "--set".into(),
        format!("train.steps={}", saved + 10),
    ];
    let stderr = ok(&run(0, &resume, tmp.path()));
    assert!(stderr.contains("resuming from"), "{stderr}");
    assert!(run_dir.join("model/model.safetensors").is_file());
}

/// A run may change its number of ranks when it resumes: 2 ranks to 1, and 1 to 2.
#[test]
fn resumes_change_the_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    let sets = ["train.steps=4", "train.eval_every_steps=2", "train.checkpoint_every_steps=2"];
    for (first, then) in [(2, 0), (0, 2)] {
        let name = format!("r{first}{then}");
        ok(&run(first, &tiny_args(&model, &name, &sets), tmp.path()));
        let dir = tmp.path().join("runs").join(&name);
        let resume = [
            "finetune".to_string(),
            "--resume".into(),
            dir.display().to_string(),
            "--set".into(),
            "train.steps=8".into(),
        ];
        let stderr = ok(&run(then, &resume, tmp.path()));
        assert!(stderr.contains("resuming from") && stderr.contains("trained 8 of 8 steps"), "{stderr}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["train"]["resumed_at"], 4);
    }
}

/// SIGTERM to every rank (what Slurm's `scancel` sends) checkpoints at the end of the step and
/// exits 1 naming `--resume`; the resume finishes.
#[test]
fn sigterm_to_the_ranks_checkpoints_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    // Far more steps than the test waits for: the run only ends by the signal.
    let sets = ["train.steps=10000000", "train.eval_every_steps=0", "train.checkpoint_every_steps=1000000"];
    let mut child = launch(2, &tiny_args(&model, "term", &sets), tmp.path()).stderr(Stdio::piped()).spawn().unwrap();
    let run_dir = tmp.path().join("runs/term");
    wait_for(&run_dir.join("log.jsonl"));
    std::thread::sleep(Duration::from_secs(1));
    // One rank first, the other a moment later (a scheduler's signals do not arrive at once):
    // the late one must not count as a second interrupt.
    for pid in ranks_of(child.id()) {
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the ranks did not stop within a minute of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let saved: Vec<PathBuf> =
        std::fs::read_dir(run_dir.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(!saved[0].display().to_string().ends_with(".partial"));
    let resume = [
        "finetune".to_string(),
        "--resume".into(),
        run_dir.display().to_string(),
        "--set".into(),
        format!("train.steps={}", newest_checkpoint(&run_dir).unwrap() + 10),
    ];
    ok(&run(2, &resume, tmp.path()));
}

/// `embed` over 2 ranks writes the one-process file (each rank embeds a share of every chunk).
#[test]
fn embed_over_two_ranks_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    let lines: String = (0..37).map(|i| format!("sentence number {i} is {} long\n", "very ".repeat(i % 7))).collect();
    std::fs::write(tmp.path().join("in.txt"), lines).unwrap();
    let args = |out: &str| -> Vec<String> {
        ["embed", "--model", &model.display().to_string(), "--input", "in.txt", "--out", out].map(String::from).to_vec()
    };
    ok(&run(2, &args("two.safetensors"), tmp.path()));
    ok(&run(0, &args("one.safetensors"), tmp.path()));
    let read = |f: &str| hypersphere::embedding_file::read_embeddings(&tmp.path().join(f)).unwrap();
    let (one, two) = (read("one.safetensors"), read("two.safetensors"));
    assert_eq!((one.n, one.dim), (two.n, two.dim));
    let diff = one.data.iter().zip(&two.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-6, "max abs difference {diff}");
}

/// An error on one rank (rank 0 refuses a run folder that exists) ends every rank at once, with
/// a non-zero exit and a message naming the rank; the others do not wait for it.
#[test]
fn an_error_on_one_rank_ends_the_world_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    let args = tiny_args(&model, "taken", &["train.steps=2", "train.eval_every_steps=0"]);
    ok(&run(2, &args, tmp.path()));
    let t = Instant::now();
    let out = run(2, &args, tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 0 of 2: error") && stderr.contains("--force"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(30), "the other rank waited");
}

/// A rank that hangs (stopped with SIGSTOP) is caught by the others' collective timeout: they
/// say which collective waited, and the whole world ends.
#[test]
fn a_hung_rank_times_out_the_world() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "").config.parent().unwrap().to_path_buf();
    let sets = ["train.steps=10000000", "train.eval_every_steps=0", "train.checkpoint_every_steps=0"];
    let mut cmd = launch(2, &tiny_args(&model, "hung", &sets), tmp.path());
    let mut child = cmd.env("HYPERSPHERE_COLLECTIVE_TIMEOUT_S", "2").stderr(Stdio::piped()).spawn().unwrap();
    let run_dir = tmp.path().join("runs/hung");
    wait_for(&run_dir.join("log.jsonl"));
    let rank0: u32 = std::fs::read_to_string(run_dir.join(".lock")).unwrap().trim().parse().unwrap();
    let other = ranks_of(child.id()).into_iter().find(|&p| p != rank0).expect("rank 1's process");
    Command::new("kill").args(["-STOP", &other.to_string()]).status().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            Command::new("kill").args(["-KILL", &other.to_string()]).status().unwrap();
            child.kill().unwrap();
            panic!("the world did not end a minute after a rank hung");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 0 of 2: error") && stderr.contains("waited 2s"), "{stderr}");
}
