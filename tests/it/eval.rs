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
    let acc = results[0]["metrics"][0][1].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));
    // The second run reads the cached embeddings and gives the same numbers.
    assert!(run(&args, tmp.path()).status.success());
    let second = json(&tmp.path().join("ev/eval.json"));
    assert_eq!(second["results"][0]["cached"], true);
    assert_eq!(first["results"][0]["metrics"], second["results"][0]["metrics"]);
    assert!(tmp.path().join("ev/eval.md").is_file());
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
    assert_eq!(report["eval"]["before"].as_array().unwrap().len(), 2);
    assert_eq!(report["eval"]["after"].as_array().unwrap().len(), 2);
    assert!(report["before"]["uniformity"].is_number());
    assert!(tmp.path().join("runs/default/eval.md").is_file());
}
