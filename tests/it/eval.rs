use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(args)
        .current_dir(cwd)
        .env("HYPERSPHERE_CACHE", cwd.join("cache"))
        .env_remove("HYPERSPHERE_DATA")
        .output()
        .unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_quick_on_a_tiny_model_caches_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 2, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let data = data_dir();
    let args =
        ["eval", "--model", &model, "--tasks", "MR,STSB", "--quick", "--data", data.to_str().unwrap(), "--out", "ev"];
    let out = run(&args, tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("spearman_test") && stdout.contains("SimCSE"), "{stdout}");
    let first = json(&tmp.path().join("ev/eval.json"));
    let results = first["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["cached"], false);
    // MR --quick: 1000 examples, 10 folds of 100; the accuracy is correct / 1000 x 100, so a
    // multiple of 0.1, and a random tiny model is near chance on a balanced task.
    let acc = results[0]["metrics"][0][1].as_f64().unwrap();
    assert!((acc * 10.0 - (acc * 10.0).round()).abs() < 1e-6, "{acc} is not k / 1000");
    assert!((35.0..=75.0).contains(&acc), "{acc}");
    // The second run reads the cached embeddings and gives the same numbers.
    assert!(run(&args, tmp.path()).status.success());
    let second = json(&tmp.path().join("ev/eval.json"));
    assert_eq!(second["results"][0]["cached"], true);
    assert_eq!(first["results"][0]["metrics"], second["results"][0]["metrics"]);
    assert!(tmp.path().join("ev/eval.md").is_file());
    // int8 embeddings are other embeddings: not read from the f32 cache, cached on their own.
    let int8 = [&args[..], &["--dtype", "int8"]].concat();
    for cached in [false, true] {
        assert!(run(&int8, tmp.path()).status.success());
        let third = json(&tmp.path().join("ev/eval.json"));
        assert_eq!((third["dtype"].as_str(), third["results"][0]["cached"].as_bool()), (Some("int8"), Some(cached)));
    }
    assert_eq!(second["dtype"], "f32");
}

#[test]
fn eval_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 2, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let out = run(&["eval", "--model", &model, "--tasks", "MR,XYZ", "--data", "."], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("XYZ"));
    let out = run(&["eval", "--model", &model, "--tasks", "MR"], tmp.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HYPERSPHERE_DATA"));
    let out = run(&["eval", "--model", &model, "--tasks", "MR", "--data", "."], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && stderr.contains("rt-polarity"), "{stderr}");
}

/// The real model on the quick STS-B subset: mean pooling lands near the published 82.
#[test]
fn real_model_sts_b_quick() {
    real_model();
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["eval", "--model", REAL_MODEL, "--pooling", "mean", "--tasks", "STSB", "--quick", "--max-len", "64"])
        .args(["--data", data.to_str().unwrap(), "--out", "ev", "--no-cache"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&tmp.path().join("ev/eval.json"));
    let metrics = v["results"][0]["metrics"].as_array().unwrap();
    let test = metrics.iter().find(|m| m[0] == "spearman_test").unwrap()[1].as_f64().unwrap();
    assert!(test > 75.0 && test < 92.0, "STS-B test Spearman {test}");
}

#[test]
fn finetune_with_quick_eval_reports_before_and_after() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 1, "");
    let data = data_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .args(["finetune", "--data", data.to_str().unwrap()])
        .args(["--set", &format!("model.source={}", files.config.parent().unwrap().display())])
        .args(["--set", &format!("data.corpus={}", fixtures().join("books").display())])
        .args(["--set", "data.val_fraction=0.25", "--set", "data.min_tokens=2", "--set", "train.batch_pairs=8"])
        .args(["--set", "train.steps=2", "--set", "report.sentences=20", "--set", "eval.tasks=[\"STSB\", \"TREC\"]"])
        .args(["--set", "eval.quick=true"])
        .env("HYPERSPHERE_CACHE", tmp.path().join("cache"))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("before") && stdout.contains("TREC"), "{stdout}");
    let report = json(&tmp.path().join("runs/default/report.json"));
    // The two tasks, then BOOKS-NEXT (report.books_next, on by default).
    assert_eq!(report["eval"]["before"].as_array().unwrap().len(), 3);
    assert_eq!(report["eval"]["after"].as_array().unwrap().len(), 3);
    assert_eq!(report["eval"]["after"][2]["task"], "BOOKS-NEXT");
    let (u, c) = (report["before"]["uniformity"].as_f64().unwrap(), report["before"]["mean_cosine"].as_f64().unwrap());
    assert!(u <= 0.0 && u >= -4.0 * (1.0 - c) - 1e-9, "uniformity {u} vs mean cosine {c} (Jensen)");
    assert!(tmp.path().join("runs/default/eval.md").is_file());
}

/// Spearman of distinct values: Pearson of ranks (an independent reference for the test).
fn spearman_distinct(x: &[f64], y: &[f64]) -> f64 {
    let ranks = |v: &[f64]| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        for (rank, &i) in idx.iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    };
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let d2: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - b) * (a - b)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// `eval --sts NAME=FILE`: the user's pairs scored like STS-B, checked against `embed`'s vectors
/// of the same sentences and a rank correlation computed here; bad files name file and line.
#[test]
fn user_sts_sets_match_embed_and_an_independent_spearman() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let pairs = [
        ("the barge moved along the canal", "a barge went down the canal", 4.5),
        ("nell sat on the roof", "the horse ate hay", 0.3),
        ("the keeper waved them through", "the keeper let them pass", 3.9),
        ("the city smelled of coal", "coal smoke filled the city", 3.2),
        ("her father whistled a song", "the orchard was full of apples", 1.1),
        ("the lighthouse stood on the rock", "a light stood on the rocks", 4.2),
    ];
    let mut text = "sentence1\tsentence2\tscore\n".to_string();
    let mut lines = String::new();
    for (a, b, s) in pairs {
        text += &format!("{a}\t{b}\t{s}\n");
        lines += &format!("{a}\n{b}\n");
    }
    std::fs::write(tmp.path().join("mine.tsv"), &text).unwrap();
    std::fs::write(tmp.path().join("lines.txt"), &lines).unwrap();
    let out = run(&["eval", "--model", &model, "--sts", "mine=mine.tsv", "--out", "ev", "--max-len", "32"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&tmp.path().join("ev/eval.json"));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "only the --sts set runs when --tasks is absent");
    assert_eq!(results[0]["task"], "mine");
    assert_eq!(results[0]["n_test"], 6);
    let got = results[0]["metrics"][0][1].as_f64().unwrap();

    let out = run(
        &["embed", "--model", &model, "--input", "lines.txt", "--out", "e.safetensors", "--max-len", "32"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = hypersphere::embedding_file::read_embeddings(&tmp.path().join("e.safetensors")).unwrap();
    let row = |i: usize| &e.data[i * e.dim..(i + 1) * e.dim];
    let cos: Vec<f64> = (0..pairs.len()).map(|i| cosine(row(2 * i), row(2 * i + 1)) as f64).collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.2).collect();
    let want = 100.0 * spearman_distinct(&cos, &gold);
    assert!((got - want).abs() < 1e-6, "eval {got} vs reference {want}");

    // A bad score names the file and the line; a built-in name is refused.
    std::fs::write(tmp.path().join("bad.tsv"), "a\tb\t1\nc\td\tx\n").unwrap();
    let out = run(&["eval", "--model", &model, "--sts", "bad=bad.tsv"], tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.tsv") && err.contains("line 2"), "{err}");
    let out = run(&["eval", "--model", &model, "--sts", "STSB=mine.tsv"], tmp.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("built-in"));
    // Issue 25: a name given twice, a first-line NaN score (not a header), constant scores.
    let out = run(&["eval", "--model", &model, "--sts", "a=mine.tsv", "--sts", "a=mine.tsv"], tmp.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"));
    std::fs::write(tmp.path().join("nan.tsv"), "a\tb\tNaN\nc\td\t1\ne\tf\t2\ng\th\t3\n").unwrap();
    let out = run(&["eval", "--model", &model, "--sts", "n=nan.tsv"], tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nan.tsv") && err.contains("line 1"), "{err}");
    std::fs::write(tmp.path().join("flat.tsv"), "a\tb\t2\nc\td\t2\ne\tf\t2\n").unwrap();
    let out = run(&["eval", "--model", &model, "--sts", "f=flat.tsv"], tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flat.tsv") && err.contains("every score is the same"), "{err}");
}

/// Every selected task's files are read before anything is embedded: a task with its files
/// missing fails the run at once, naming the file, with nothing embedded and no results file.
#[cfg(unix)]
#[test]
fn a_task_with_missing_files_fails_before_any_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 2, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let data = tmp.path().join("data/senteval");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(data_dir().join("senteval/MR"), data.join("MR")).unwrap();
    let root = tmp.path().join("data");
    let out = run(
        &["eval", "--model", &model, "--tasks", "MR,CR", "--quick", "--data", root.to_str().unwrap(), "--out", "ev"],
        tmp.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("custrev"), "{stderr}");
    assert!(!stderr.contains("embedding"), "nothing is embedded before the files are checked: {stderr}");
    assert!(!tmp.path().join("ev/eval.json").exists());
}

/// Results reach the caller after each task (the CLI saves them then), so a later failure
/// keeps the finished tasks; an error from saving stops the run.
#[test]
fn each_finished_task_is_handed_over_as_it_completes() {
    use hypersphere::eval::runner::{evaluate, EvalOptions};
    use hypersphere::eval::Task;
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 2, "");
    let enc = hypersphere::model::Encoder::load(
        &files,
        hypersphere::model::pooling::Pooling::Mean,
        false,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tok = hypersphere::data::batch::TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let opts = EvalOptions {
        root: data_dir(),
        tasks: vec![Task::MRPC, Task::STSB],
        quick: true,
        seed: 1,
        cache_dir: None,
        user_sts: Vec::new(),
        user_retrieval: Vec::new(),
    };
    let world = hypersphere::dist::World::single();
    let embedder = hypersphere::eval::runner::Embedder {
        encoder: &enc,
        tokenizer: &tok,
        device: &candle_core::Device::Cpu,
        world: &world,
    };
    let mut seen = Vec::new();
    let all = evaluate(&embedder, "x", &opts, &hypersphere::progress::Quiet, &mut |r| {
        seen.push(r.iter().map(|e| e.result.task.clone()).collect::<Vec<_>>());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![vec![all[0].result.task.clone()], vec![all[0].result.task.clone(), all[1].result.task.clone()]]
    );
    let mut calls = 0;
    let e = evaluate(&embedder, "x", &opts, &hypersphere::progress::Quiet, &mut |_| {
        calls += 1;
        Err(hypersphere::Error::Invalid("disk full".into()))
    });
    assert!(e.is_err() && calls == 1, "a failed save stops the run after the first task");
}

/// `eval --retrieval NAME=DIR` on a BEIR folder: the four scores from the binary equal the
/// ranking computed here from `embed`'s vectors of the same texts.
#[test]
fn retrieval_sets_match_a_ranking_from_embed() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let docs = ["the barge moved along the canal", "nell sat on the roof", "coal smoke filled the city", "apples"];
    let queries = [("q1", "a barge on the canal", 0), ("q2", "the smell of coal", 2), ("q3", "the roof", 1)];
    let dir = tmp.path().join("beir");
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    let corpus: String =
        docs.iter().enumerate().map(|(i, d)| format!("{{\"_id\": \"d{i}\", \"text\": \"{d}\"}}\n")).collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    let qs: String = queries.iter().map(|(id, q, _)| format!("{{\"_id\": \"{id}\", \"text\": \"{q}\"}}\n")).collect();
    std::fs::write(dir.join("queries.jsonl"), qs).unwrap();
    let qrels: String = queries.iter().map(|(id, _, d)| format!("{id}\td{d}\t1\n")).collect();
    std::fs::write(dir.join("qrels/test.tsv"), format!("query-id\tcorpus-id\tscore\n{qrels}")).unwrap();
    let out =
        run(&["eval", "--model", &model, "--retrieval", "mine=beir", "--out", "ev", "--max-len", "32"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&tmp.path().join("ev/eval.json"));
    let result = &v["results"][0];
    assert_eq!((result["task"].as_str(), result["n_test"].as_u64()), (Some("mine"), Some(3)));
    let metric = |k: usize| result["metrics"][k][1].as_f64().unwrap();

    // The reference: rank of each query's document by cosine of `embed`'s unit vectors.
    let lines: String = docs.iter().chain(queries.iter().map(|(_, q, _)| q)).map(|t| format!("{t}\n")).collect();
    std::fs::write(tmp.path().join("lines.txt"), lines).unwrap();
    let out = run(
        &["embed", "--model", &model, "--input", "lines.txt", "--out", "e.safetensors", "--max-len", "32"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = hypersphere::embedding_file::read_embeddings(&tmp.path().join("e.safetensors")).unwrap();
    let row = |i: usize| &e.data[i * e.dim..(i + 1) * e.dim];
    let (mut ndcg, mut mrr, mut r10) = (0.0, 0.0, 0.0);
    for (qi, (_, _, rel)) in queries.iter().enumerate() {
        let q = row(docs.len() + qi);
        let s = |d: usize| cosine(q, row(d));
        // 1-based rank: documents scoring higher, or equal with a lower index, come first.
        let rank = 1 + (0..docs.len()).filter(|&d| s(d) > s(*rel) || (s(d) == s(*rel) && d < *rel)).count();
        ndcg += 1.0 / ((rank + 1) as f64).log2();
        mrr += 1.0 / rank as f64;
        r10 += 1.0;
    }
    let n = queries.len() as f64;
    assert!((metric(0) - 100.0 * ndcg / n).abs() < 1e-3, "nDCG@10 {} vs {}", metric(0), 100.0 * ndcg / n);
    assert!((metric(1) - 100.0 * mrr / n).abs() < 1e-3, "MRR@10 {} vs {}", metric(1), 100.0 * mrr / n);
    assert_eq!((metric(2), metric(3)), (100.0 * r10 / n, 100.0), "4 documents: all within 10 and 100");
}

/// `eval --tasks BOOKS-NEXT --corpus BOOKS` holds out the books the default config holds out and
/// scores the starting model as `finetune` does before training: the same queries, documents
/// and scores by two paths.
#[test]
fn books_next_from_eval_equals_the_finetune_before_score() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 4, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    let books = fixtures().join("books");
    let books = books.to_str().unwrap();
    // finetune's default pooling is [CLS]; eval's, for a model folder that names none, mean.
    let cls = format!("{model}@cls");
    let out = run(&["eval", "--model", &cls, "--tasks", "books-next", "--corpus", books, "--out", "ev"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&tmp.path().join("ev/eval.json"));
    let from_eval = &v["results"][0];
    assert_eq!(from_eval["task"], "BOOKS-NEXT");
    assert!(from_eval["n_test"].as_u64().unwrap() > 5, "{from_eval}");

    let sets = [
        format!("model.source={model}"),
        format!("data.corpus={books}"),
        "train.steps=2".into(),
        "train.batch_pairs=4".into(),
        "train.select=\"last\"".into(),
        "report.sentences=10".into(),
    ];
    let mut args = vec!["finetune"];
    args.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
    let out = run(&args, tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&tmp.path().join("runs/default/report.json"));
    let before = &report["eval"]["before"][0];
    assert_eq!(before["task"], "BOOKS-NEXT");
    for key in ["n_test", "n_train"] {
        assert_eq!(before[key], from_eval[key], "{key}");
    }
    for k in 0..4 {
        let (a, b) = (before["metrics"][k][1].as_f64().unwrap(), from_eval["metrics"][k][1].as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "metric {k}: {a} vs {b}");
    }
    assert_eq!(report["eval"]["after"][0]["task"], "BOOKS-NEXT");
    let out = run(&["eval", "--model", &model, "--tasks", "BOOKS-NEXT", "--out", "ev2"], tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--corpus"), "{err}");
}
