//! Training from files (`data.pairs`, `data.sentences`): the books' own pairs written to JSON
//! Lines train the same weights as the books; a Parquet file with hard negatives trains end to
//! end; a sentences file trains on dropout views.

use std::path::Path;
use std::process::Command;

use hypersphere::config::resolved::Resolved;
use hypersphere::config::RunConfig;

use crate::common::{tiny_model, tiny_run};

/// Settings shared by every run here: a tiny model, 12 steps, selection on the last step.
fn settings(model: &Path, name: &str) -> Vec<String> {
    let mut sets = tiny_run(model, name);
    sets.extend(
        ["train.steps=12", "train.warmup_steps=2", "train.eval_every_steps=4", "train.norm_lr_scale=1"]
            .map(String::from),
    );
    sets
}

fn finetune(dir: &Path, sets: &[String]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypersphere"));
    cmd.current_dir(dir).env("HYPERSPHERE_CACHE", dir.join("cache")).arg("finetune");
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn jsonl(path: &Path, rows: &[(String, String)]) {
    let text: String = rows
        .iter()
        .map(|(a, p)| serde_json::json!({"anchor": a, "positive": p, "note": 1}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

/// The books' training and held-out pairs, written to two JSON Lines files in order, train
/// bit-identical weights to the books themselves (same seed, same order, same batches).
#[test]
fn books_pairs_as_jsonl_train_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 21, "");
    let base = settings(model.weights.parent().unwrap(), "books");
    finetune(tmp.path(), &base);

    let cfg = RunConfig::load(None, &base).unwrap();
    let res = Resolved::new(cfg, None, None).unwrap();
    let (_, data) = hypersphere::app::training_data(&res, &model).unwrap();
    let rows = |src: &dyn hypersphere::data::source::PairSource| -> Vec<(String, String)> {
        (0..src.len()).map(|k| src.pair(k).unwrap()).map(|p| (p.anchor.to_string(), p.positive.to_string())).collect()
    };
    let (train, val) = (rows(&*data.train()), rows(&*data.val()));
    assert!(train.len() > 16 && !val.is_empty());
    jsonl(&tmp.path().join("train.jsonl"), &train);
    jsonl(&tmp.path().join("val.jsonl"), &val);
    let mut file = settings(model.weights.parent().unwrap(), "file");
    file.push(format!("data.pairs={}", tmp.path().join("train.jsonl").display()));
    file.push(format!("data.val_file={}", tmp.path().join("val.jsonl").display()));
    let out = finetune(tmp.path(), &file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{} training examples", train.len())), "{err}");

    let read = |name: &str| std::fs::read(tmp.path().join("runs").join(name).join("model/model.safetensors")).unwrap();
    assert!(read("books") == read("file"), "the weights differ");
    // Prepared once: a second run reads the cache (the prepared folder is not rewritten).
    let prepared: Vec<_> = std::fs::read_dir(tmp.path().join("cache/files")).unwrap().flatten().collect();
    assert_eq!(prepared.len(), 2, "{prepared:?}");
    let stamp = |p: &std::fs::DirEntry| p.path().join("manifest.json").metadata().unwrap().modified().unwrap();
    let before: Vec<_> = prepared.iter().map(stamp).collect();
    file.push("name=again".into());
    finetune(tmp.path(), &file);
    let after: Vec<_> = prepared.iter().map(stamp).collect();
    assert_eq!(before, after);
    assert!(read("again") == read("file"));
}

/// Made-up pairs: "item k" sentences about numbered things, each with a hard negative.
fn triplets(n: usize) -> Vec<[String; 3]> {
    let things = ["boat", "lamp", "horse", "garden", "letter", "bridge", "clock", "river"];
    (0..n)
        .map(|k| {
            let t = things[k % things.len()];
            [
                format!("the {t} number {k} was old and grey"),
                format!("an old grey {t}, the one numbered {k}"),
                format!("a new {} stood by the road {}", things[(k + 3) % things.len()], k + 7),
            ]
        })
        .collect()
}

/// `rows` as Parquet columns query, positive and (when `negatives`) negative.
fn write_parquet(path: &Path, rows: &[[String; 3]], negatives: bool) {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use std::sync::Arc;
    let col =
        |j: usize| Arc::new(StringArray::from(rows.iter().map(|r| r[j].as_str()).collect::<Vec<_>>())) as ArrayRef;
    let mut cols = vec![("query", col(0)), ("positive", col(1))];
    if negatives {
        cols.push(("negative", col(2)));
    }
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A Parquet file of pairs with hard negatives (the anchor column renamed) trains end to end
/// with InfoNCE; the hard negatives enter the loss (more candidates: a higher InfoNCE loss than
/// the same pairs without them, and other weights); a wrong column name is refused.
#[test]
fn parquet_pairs_with_hard_negatives_train() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 22, "");
    let path = tmp.path().join("pairs.parquet");
    write_parquet(&path, &triplets(120), true);
    let mut sets = settings(model.weights.parent().unwrap(), "parquet");
    sets.extend([
        format!("data.pairs={}", path.display()),
        "data.anchor_column=query".into(),
        // InfoNCE over the pairs at weight 1 (the built-in config trains on its teacher alone).
        "loss.kind=\"infonce\"".into(),
        "loss.w_align=1".into(),
        "data.val_fraction=0.2".into(),
    ]);
    let out = finetune(tmp.path(), &sets);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("with hard negatives"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/parquet/report.json")).unwrap()).unwrap();
    assert_eq!(report["train"]["steps"], 12);
    let held = report["sample"]["val_books"][0].as_str().unwrap();
    assert!(held.contains("of 120 examples") && held.contains("pairs.parquet"), "{held}");

    // The same pairs without their negatives: the same split and batches (both follow the
    // anchors), 8 candidates per anchor instead of 16.
    let plain = tmp.path().join("plain.parquet");
    write_parquet(&plain, &triplets(120), false);
    let mut plain_sets: Vec<String> =
        sets.iter().filter(|s| !s.starts_with("data.pairs=") && !s.starts_with("name=")).cloned().collect();
    plain_sets.extend([format!("data.pairs={}", plain.display()), "name=plain".into()]);
    let out = finetune(tmp.path(), &plain_sets);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("with hard negatives"));
    let first_infonce = |run: &str| -> f64 {
        let log = std::fs::read_to_string(tmp.path().join("runs").join(run).join("log.jsonl")).unwrap();
        let line = log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|l| l["step"] == 4);
        line.and_then(|l| l["train"]["infonce"].as_f64()).unwrap()
    };
    let (with, without) = (first_infonce("parquet"), first_infonce("plain"));
    assert!(with > without + 0.3, "InfoNCE over steps 1-4: {with} with negatives, {without} without");
    let weights = |run: &str| std::fs::read(tmp.path().join("runs").join(run).join("model/model.safetensors")).unwrap();
    assert_ne!(weights("parquet"), weights("plain"));

    sets.retain(|s| !s.starts_with("data.anchor_column"));
    sets.push("name=bad".into());
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .current_dir(tmp.path())
        .env("HYPERSPHERE_CACHE", tmp.path().join("cache"))
        .arg("finetune")
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pairs.parquet") && err.contains("no column `anchor`"), "{err}");
    assert!(err.contains("query, positive, negative"), "{err}");
}

/// A file of sentences trains on dropout views (each sentence its own positive).
#[test]
fn a_sentences_file_trains_on_dropout_views() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 23, "");
    let path = tmp.path().join("sentences.txt");
    let lines: String = triplets(80).iter().map(|r| r[0].clone() + "\n").collect();
    std::fs::write(&path, lines + "\n\n").unwrap();
    let mut sets = settings(model.weights.parent().unwrap(), "sentences");
    sets.extend([format!("data.sentences={}", path.display()), "loss.w_align=0".into(), "loss.w_dropout=1".into()]);
    let out = finetune(tmp.path(), &sets);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("skipped 2 rows with an empty field"), "{err}");
    assert!(tmp.path().join("runs/sentences/model/model.safetensors").is_file());
}
