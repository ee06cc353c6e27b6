//! Writing results: the fine-tuned model in Hugging Face + sentence-transformers layout, and
//! small files, always through a temp name and a rename so a crash never leaves half a file.

use std::path::Path;

use candle_core::Device;
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::{save_safetensors, Encoder};

/// Write `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(path, (text + "\n").as_bytes())
}

/// The model folder: config.json, model.safetensors and tokenizer files (HF layout), plus
/// modules.json, sentence_bert_config.json, 1_Pooling/ and 2_Normalize/ so that Python's
/// `SentenceTransformer(dir)` loads it with the pooling used in training.
///
/// Written into `<dir>.partial` and renamed over `dir` at the end.
pub fn write_model(encoder: &Encoder, dir: &Path, max_len: usize, device: &Device) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| Error::io(p, e));
    mkdir(&tmp.join("1_Pooling"))?;
    mkdir(&tmp.join("2_Normalize"))?;
    save_safetensors(&encoder.state_dict(device)?, &tmp.join("model.safetensors"))?;
    let src_dir = encoder.files.config.parent().unwrap_or(Path::new("."));
    let tokenizer_name = encoder.files.tokenizer.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    for name in ["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = src_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, tmp.join(name)).map_err(|e| Error::io(&src, e))?;
        }
    }
    std::fs::copy(&encoder.files.config, tmp.join("config.json")).map_err(|e| Error::io(&encoder.files.config, e))?;
    std::fs::copy(&encoder.files.tokenizer, tmp.join(&tokenizer_name))
        .map_err(|e| Error::io(&encoder.files.tokenizer, e))?;
    let pooling = encoder.pooling.as_str();
    write_json(
        &tmp.join("modules.json"),
        &json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]),
    )?;
    write_json(&tmp.join("sentence_bert_config.json"), &json!({"max_seq_length": max_len, "do_lower_case": false}))?;
    write_json(
        &tmp.join("1_Pooling/config.json"),
        &json!({
            "word_embedding_dimension": encoder.config.hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true
        }),
    )?;
    write_json(
        &tmp.join("hypersphere.json"),
        &json!({"pooling": pooling, "base_model": encoder.files.spec, "version": env!("CARGO_PKG_VERSION")}),
    )?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}
