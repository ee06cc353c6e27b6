use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use hypersphere::data::batch::TextTokenizer;
use hypersphere::embedding_file::read_embeddings;
use hypersphere::model::ops::Kernels;
use hypersphere::model::pooling::Pooling;
use hypersphere::model::{embed_texts, Encoder};

use crate::common::*;

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hypersphere")).args(args).current_dir(cwd).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn failed(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains(what), "error does not name {what}: {line}");
}

const LINES: &str =
    "the old man walked to the river.\n\nshe looked at the dark window.\nthey came home late.\n\nwhat did you hear?\n";

#[test]
fn embed_writes_rows_in_input_order_with_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    std::fs::write(tmp.path().join("in.txt"), LINES).unwrap();
    for (dtype, tol) in [("f32", 1e-6f32), ("f16", 2e-3)] {
        let out = format!("e-{dtype}.safetensors");
        let stderr =
            run(&["embed", "--model", &model, "--input", "in.txt", "--out", &out, "--out-dtype", dtype], tmp.path());
        ok(&stderr);
        assert!(String::from_utf8_lossy(&stderr.stderr).contains("2 empty lines"), "empty lines are reported");
        let e = read_embeddings(&tmp.path().join(&out)).unwrap();
        assert_eq!((e.n, e.dim), (4, 32));
        assert_eq!(e.metadata["count"], "4");
        assert_eq!(e.metadata["pooling"], "mean");
        assert_eq!(e.metadata["compute"], "f32");
        assert_eq!(e.metadata["weights_sha256"].len(), 64);
        let lines = candle_core::safetensors::load(tmp.path().join(&out), &Device::Cpu).unwrap()["line"]
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(lines, vec![0, 2, 3, 5]);
        // Same values as embedding directly, in input order.
        let enc = Encoder::load(&files, Pooling::Mean, false, &Device::Cpu).unwrap();
        let tok = TextTokenizer::load(&files.tokenizer, 128).unwrap();
        let texts: Vec<&str> = LINES.lines().filter(|l| !l.is_empty()).collect();
        let direct = embed_texts(&enc, &tok, &texts, 2, &Device::Cpu).unwrap();
        for (a, b) in e.data.iter().zip(&direct) {
            assert!((a - b).abs() <= tol, "{a} vs {b}");
        }
    }
    // Python reads it (CI installs the safetensors and numpy wheels).
    let py = Command::new("python3")
        .args(["-c", "import sys; from safetensors.numpy import load_file; d = load_file(sys.argv[1]); print(d['embeddings'].shape, d['embeddings'].dtype)"])
        .arg(tmp.path().join("e-f32.safetensors"))
        .output();
    match py {
        Ok(o) if o.status.success() => assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "(4, 32) float32"),
        _ if std::env::var_os("CI").is_none() => {
            eprintln!("note: python3 with safetensors+numpy not available; Python load not checked")
        }
        other => panic!("python could not load the file: {other:?}"),
    }
}

/// `--dtype int8`: the file says so, its rows are what the int8 encoder gives, and they stay
/// close to f32's (cosine measured on this random tiny model: 0.999999).
#[test]
fn embed_int8_is_close_to_f32_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    std::fs::write(tmp.path().join("in.txt"), LINES).unwrap();
    for dtype in ["f32", "int8"] {
        let out = format!("{dtype}.safetensors");
        ok(&run(&["embed", "--model", &model, "--input", "in.txt", "--out", &out, "--dtype", dtype], tmp.path()));
    }
    let (f32s, int8) = (
        read_embeddings(&tmp.path().join("f32.safetensors")).unwrap(),
        read_embeddings(&tmp.path().join("int8.safetensors")).unwrap(),
    );
    assert_eq!(int8.metadata["compute"], "int8");
    let enc = Encoder::load_with(&files, Pooling::Mean, false, &Device::Cpu, Kernels::Int8).unwrap();
    let tok = TextTokenizer::load(&files.tokenizer, 128).unwrap();
    let texts: Vec<&str> = LINES.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        embed_texts(&enc, &tok, &texts, 2, &Device::Cpu).unwrap(),
        int8.data,
        "the CLI's rows are the int8 encoder's"
    );
    for (a, b) in f32s.data.chunks(f32s.dim).zip(int8.data.chunks(int8.dim)) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.999 && a != b, "cosine {cos} between f32 and int8 rows");
    }
}

#[test]
fn embed_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 3, "");
    let model = files.config.parent().unwrap().to_str().unwrap().to_string();
    std::fs::write(tmp.path().join("empty.txt"), "\n\n").unwrap();
    failed(
        &run(&["embed", "--model", &model, "--input", "empty.txt", "--out", "o.safetensors"], tmp.path()),
        "empty.txt",
    );
    failed(
        &run(&["embed", "--model", "./nope", "--input", "empty.txt", "--out", "o.safetensors"], tmp.path()),
        "./nope",
    );
    failed(&run(&["embed", "--model", &model, "--input", ".", "--out", "o.safetensors"], tmp.path()), "folder");
    assert!(!tmp.path().join("o.safetensors").exists());
    // The output path is checked before anything else (here, before the model is even found).
    std::fs::create_dir(tmp.path().join("taken")).unwrap();
    failed(&run(&["embed", "--model", "./nope", "--input", "empty.txt", "--out", "taken"], tmp.path()), "is a folder");
    failed(
        &run(&["embed", "--model", "./nope", "--input", "empty.txt", "--out", "missing/o.safetensors"], tmp.path()),
        "no such folder",
    );
    // A killed run's temporary file (a process that no longer exists) is cleaned by the next.
    #[cfg(target_os = "linux")]
    {
        std::fs::write(tmp.path().join("in.txt"), LINES).unwrap();
        let stale = tmp.path().join(".o.safetensors.4294967.0.tmp");
        std::fs::write(&stale, b"").unwrap();
        ok(&run(&["embed", "--model", &model, "--input", "in.txt", "--out", "o.safetensors"], tmp.path()));
        assert!(!stale.exists() && tmp.path().join("o.safetensors").is_file());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn compare_models_files_and_whitening() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny_model(&tmp.path().join("a"), 3, "");
    let b = tiny_model(&tmp.path().join("b"), 4, "");
    let (a, b) = (
        a.config.parent().unwrap().to_str().unwrap().to_string(),
        b.config.parent().unwrap().to_str().unwrap().to_string(),
    );
    let books = fixtures().join("books");
    let books = books.to_str().unwrap();
    ok(&run(&["embed", "--model", &b, "--input", books, "--sentences", "--out", "b.safetensors"], tmp.path()));
    let a_cls = format!("{a}@cls");
    let stdout = ok(&run(
        &["compare", &a_cls, &b, "b.safetensors", "--corpus", books, "--whiten", "8", "--out", "cmp"],
        tmp.path(),
    ));
    assert!(stdout.contains("uniformity (t=2)") && stdout.contains("whitening(8)"), "{stdout}");
    let cmp = tmp.path().join("cmp");
    // Each plot, both formats: a PNG image, and an SVG whose legend names every column.
    for f in ["cosine", "alignment", "circle", "spectrum"] {
        let png = std::fs::read(cmp.join(format!("{f}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{f}.png");
        let svg = std::fs::read_to_string(cmp.join(format!("{f}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{f}.svg");
        // An embeddings file has no pairs, so no alignment curve.
        let names: &[&str] = match f {
            "circle" => &[],
            "alignment" => &[a_cls.as_str()],
            _ => &[a_cls.as_str(), "b.safetensors"],
        };
        {
            for &name in names {
                assert!(svg.contains(name), "{f}.svg has no legend entry {name}");
            }
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cmp.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4, "three inputs and the whitened first one");
    assert_eq!(json[3]["dim"], 8);
    // A column computed in int8 says so.
    ok(&run(&["compare", &b, "--corpus", books, "--dtype", "int8", "--out", "cmp8"], tmp.path()));
    let json8: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("cmp8/compare.json")).unwrap()).unwrap();
    assert_eq!(json8[0]["name"], format!("{b}@mean int8"));
    // The whitening parameters feed `embed --whiten`.
    ok(&run(
        &[
            "embed",
            "--model",
            &a_cls,
            "--input",
            books,
            "--sentences",
            "--whiten",
            "cmp/whitening.safetensors",
            "--out",
            "w.safetensors",
        ],
        tmp.path(),
    ));
    assert_eq!(read_embeddings(&tmp.path().join("w.safetensors")).unwrap().dim, 8);
    // Bad inputs: an unknown model, a file without `embeddings`, no sentences for a model.
    failed(&run(&["compare", "./nope", "--corpus", books], tmp.path()), "./nope");
    let t = candle_core::Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("vectors", t)].into_iter().collect(), tmp.path().join("bad.safetensors"))
        .unwrap();
    failed(&run(&["compare", "bad.safetensors", "b.safetensors"], tmp.path()), "bad.safetensors");
    failed(&run(&["compare", &a], tmp.path()), "--corpus");
}

/// A relative model folder is stored in the embeddings file as its absolute path, so the file
/// still names its model once moved.
#[test]
fn embeddings_name_their_model_by_absolute_path() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("tiny"), 3, "");
    std::fs::write(tmp.path().join("in.txt"), LINES).unwrap();
    ok(&run(&["embed", "--model", "tiny@cls", "--input", "in.txt", "--out", "e.safetensors"], tmp.path()));
    let e = hypersphere::embedding_file::read_embeddings(&tmp.path().join("e.safetensors")).unwrap();
    let want = std::fs::canonicalize(tmp.path().join("tiny")).unwrap().display().to_string();
    assert_eq!((e.metadata["model"].as_str(), e.metadata["pooling"].as_str()), (want.as_str(), "cls"));
}
