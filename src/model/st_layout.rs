//! The sentence-transformers model folder, read and written in one place: `modules.json`,
//! `sentence_bert_config.json` (`max_seq_length`), `1_Pooling/config.json`, `2_Normalize/`,
//! and our own `hypersphere.json` (the real pooling, the base model), beside the Hugging Face
//! files (`config.json`, `model.safetensors`, tokenizer files).

use std::path::Path;

use serde_json::json;

use super::pooling::Pooling;
use super::source::ModelFiles;
use super::Encoder;
use crate::error::{Error, Result};
use crate::io::{save_safetensors, sha256_file, write_json, PartialDir};

/// The sequence length the model folder declares for embedding (sentence-transformers'
/// `sentence_bert_config.json` `max_seq_length`), capped at the model's position table; else
/// the position table's size. What Python's `SentenceTransformer(dir).encode` truncates at.
pub fn declared_max_len(files: &ModelFiles, max_position_embeddings: usize) -> usize {
    let declared =
        read(files, "sentence_bert_config.json").and_then(|v| v.get("max_seq_length")?.as_u64()).map(|n| n as usize);
    declared.unwrap_or(max_position_embeddings).min(max_position_embeddings)
}

/// The pooling a model folder declares: our `hypersphere.json`, else sentence-transformers'
/// `1_Pooling/config.json` (cls or mean). None when the folder says nothing.
pub fn saved_pooling(files: &ModelFiles) -> Option<Pooling> {
    if let Some(p) =
        read(files, "hypersphere.json").and_then(|v| serde_json::from_value::<Pooling>(v.get("pooling")?.clone()).ok())
    {
        return Some(p);
    }
    let st = read(files, "1_Pooling/config.json")?;
    let on = |k: &str| st.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if on("pooling_mode_cls_token") {
        Some(Pooling::Cls)
    } else if on("pooling_mode_mean_tokens") {
        Some(Pooling::Mean)
    } else {
        None
    }
}

/// A model folder exported by hypersphere records its weights' sha256 in `hypersphere.json`:
/// weights that no longer match (damaged, or replaced) are an error instead of silently other
/// vectors. Folders without the record (other models, older exports) pass.
pub fn check_weights(files: &ModelFiles) -> Result<()> {
    let Some(want) = read(files, "hypersphere.json").and_then(|v| v.get("weights_sha256")?.as_str().map(String::from))
    else {
        return Ok(());
    };
    if sha256_file(&files.weights)? != want {
        return Err(Error::data(
            &files.weights,
            "does not match the weights_sha256 in hypersphere.json: the file is damaged or was replaced; export the model again (or, if you replaced the weights yourself, delete that key)",
        ));
    }
    Ok(())
}

/// A JSON file of the model folder, if it is there and parses.
fn read(files: &ModelFiles, name: &str) -> Option<serde_json::Value> {
    let dir = files.config.parent()?;
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
}

/// Write the model folder: config.json, model.safetensors and tokenizer files (HF layout), plus
/// modules.json, sentence_bert_config.json, 1_Pooling/ and 2_Normalize/ so that Python's
/// `SentenceTransformer(dir)` loads it with the pooling used in training, at `max_len`.
///
/// Written into `<dir>.partial` and renamed over `dir` at the end.
pub fn write_model(encoder: &Encoder, dir: &Path, max_len: usize) -> Result<()> {
    let partial = PartialDir::create(dir)?;
    let tmp = partial.path();
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| Error::io(p, e));
    mkdir(&tmp.join("1_Pooling"))?;
    mkdir(&tmp.join("2_Normalize"))?;
    save_safetensors(&encoder.state_dict()?, &tmp.join("model.safetensors"))?;
    copy_hf_files(&encoder.files, tmp)?;
    write_json(
        &tmp.join("modules.json"),
        &json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]),
    )?;
    write_json(&tmp.join("sentence_bert_config.json"), &json!({"max_seq_length": max_len, "do_lower_case": false}))?;
    write_json(&tmp.join("1_Pooling/config.json"), &pooling_config(encoder.pooling, encoder.config.hidden_size))?;
    let sha = sha256_file(&tmp.join("model.safetensors"))?;
    write_json(
        &tmp.join("hypersphere.json"),
        &json!({"pooling": encoder.pooling.as_str(), "base_model": encoder.files.spec, "version": env!("CARGO_PKG_VERSION"), "weights_sha256": sha}),
    )?;
    partial.commit().map(|_| ())
}

/// The base model's config, tokenizer and vocabulary files, copied into `out`.
fn copy_hf_files(files: &ModelFiles, out: &Path) -> Result<()> {
    let copy =
        |from: &Path, name: &std::ffi::OsStr| std::fs::copy(from, out.join(name)).map_err(|e| Error::io(from, e));
    let src_dir = files.config.parent().unwrap_or(Path::new("."));
    for name in ["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = src_dir.join(name);
        if src.is_file() {
            copy(&src, name.as_ref())?;
        }
    }
    copy(&files.config, "config.json".as_ref())?;
    copy(&files.tokenizer, files.tokenizer.file_name().unwrap_or_default())?;
    Ok(())
}

/// sentence-transformers' `1_Pooling/config.json` for `pooling`.
fn pooling_config(pooling: Pooling, hidden: usize) -> serde_json::Value {
    json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == Pooling::Cls,
        // first-last-avg has no sentence-transformers mode: the nearest, mean, is declared
        // (hypersphere.json records the real pooling).
        "pooling_mode_mean_tokens": pooling != Pooling::Cls,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true
    })
}
