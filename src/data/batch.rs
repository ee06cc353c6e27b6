//! Tokenize sentences and pad per batch (to the longest sentence, never to a fixed 128).

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationParams};

use rand::rngs::StdRng;
use rand::Rng;

use crate::error::{Error, Result};

/// Token tensors of one padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// [b, seq] u32
    pub input_ids: Tensor,
    /// [b, seq] u32, all zeros (single sentences)
    pub token_type_ids: Tensor,
    /// [b, seq] f32: 1 for real tokens, 0 for padding
    pub attention_mask: Tensor,
    /// Real length of each row, [CLS] and [SEP] included.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// `rows` rows of random word pieces ([CLS] ... [SEP]) of `seq` tokens, drawn from `rng`
    /// above BERT's special and unused ids; with `padded`, every other row is padded to a
    /// random shorter length, so the attention mask is exercised. For benchmarks and checks.
    pub fn random(
        rows: usize,
        seq: usize,
        vocab: usize,
        padded: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let low = (vocab as u32 / 2).min(1000);
        let (mut ids, mut mask, mut lengths) = (Vec::with_capacity(rows * seq), Vec::new(), Vec::new());
        for r in 0..rows {
            let len = if padded && r % 2 == 1 { rng.gen_range(3.min(seq)..=seq) } else { seq };
            ids.push(101u32.min(vocab as u32 - 1));
            ids.extend((1..len.saturating_sub(1)).map(|_| rng.gen_range(low..vocab as u32)));
            if len > 1 {
                ids.push(102u32.min(vocab as u32 - 1));
            }
            ids.extend(std::iter::repeat_n(0, seq - len));
            mask.extend((0..seq).map(|i| if i < len { 1f32 } else { 0. }));
            lengths.push(len);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (rows, seq), device)?,
            token_type_ids: Tensor::zeros((rows, seq), candle_core::DType::U32, device)?,
            attention_mask: Tensor::from_vec(mask, (rows, seq), device)?,
            lengths,
        })
    }
}

/// A BERT word-piece tokenizer with truncation at `max_len` and per-batch padding.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    /// [CLS] and [SEP], for batches built from word-piece ids.
    specials: Option<(u32, u32)>,
    pub max_len: usize,
}

impl TextTokenizer {
    /// From `tokenizer.json`, or from `vocab.txt` with BERT's uncased pipeline (cased when a
    /// `tokenizer_config.json` beside it says `do_lower_case: false`).
    pub fn load(path: &Path, max_len: usize) -> Result<Self> {
        let tk_err = |e: String| Error::data(path, format!("cannot load tokenizer: {e}"));
        let mut tokenizer = if path.extension().is_some_and(|e| e == "json") {
            Tokenizer::from_file(path).map_err(|e| tk_err(e.to_string()))?
        } else {
            let lowercase = std::fs::read_to_string(path.with_file_name("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
                .unwrap_or(true);
            let path_str = path.to_str().ok_or_else(|| tk_err("path is not UTF-8".into()))?;
            let wp =
                WordPiece::from_file(path_str).unk_token("[UNK]".into()).build().map_err(|e| tk_err(e.to_string()))?;
            let mut tk = Tokenizer::new(wp);
            let id = |t: &str| tk.token_to_id(t).ok_or_else(|| tk_err(format!("vocabulary lacks {t}")));
            let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
            tk.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
                .with_pre_tokenizer(Some(BertPreTokenizer))
                .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
            tk
        };
        // The packaged tokenizer.json pads everything to 128: we pad per batch instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| tk_err(e.to_string()))?;
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);
        let specials = tokenizer.token_to_id("[CLS]").zip(tokenizer.token_to_id("[SEP]"));
        Ok(Self { tokenizer, pad_id, specials, max_len })
    }

    /// Ids are below this.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Counts word pieces without special tokens or truncation (for the length filter).
    /// Shareable across threads; skips the offsets that counting does not need.
    pub fn counter(&self) -> Result<impl Fn(&str) -> usize + Sync> {
        let mut tk = self.tokenizer.clone();
        tk.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(move |text: &str| tk.encode_fast(text, false).map(|e| e.len()).unwrap_or(usize::MAX))
    }

    /// Word-piece ids without special tokens or truncation (None: not tokenizable), for
    /// preparing a corpus. Shareable across threads.
    pub fn encoder(&self) -> Result<impl Fn(&str) -> Option<Vec<u32>> + Sync> {
        let mut tk = self.tokenizer.clone();
        tk.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(move |text: &str| tk.encode_fast(text, false).ok().map(|e| e.get_ids().to_vec()))
    }

    /// Tokenize, truncate to `max_len` and pad to the longest row.
    pub fn batch(&self, texts: &[&str], device: &Device) -> Result<Batch> {
        if texts.is_empty() {
            return Err(Error::Invalid("cannot build a batch of zero sentences".into()));
        }
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let rows: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        self.padded(&rows, device)
    }

    /// A batch from word-piece ids (as [`TextTokenizer::encoder`] gives them): [CLS], the
    /// first `max_len - 2` ids, [SEP]; the same rows as [`TextTokenizer::batch`] of the texts.
    pub fn batch_ids(&self, rows: &[&[u32]], device: &Device) -> Result<Batch> {
        let (cls, sep) = self.specials.ok_or_else(|| Error::Tokenizer("the vocabulary lacks [CLS] or [SEP]".into()))?;
        let keep = self.max_len.saturating_sub(2);
        let full: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| std::iter::once(cls).chain(r[..r.len().min(keep)].iter().copied()).chain([sep]).collect())
            .collect();
        let rows: Vec<&[u32]> = full.iter().map(Vec::as_slice).collect();
        self.padded(&rows, device)
    }

    /// Rows of ids padded to the longest, with the attention mask.
    fn padded(&self, rows: &[&[u32]], device: &Device) -> Result<Batch> {
        if rows.is_empty() {
            return Err(Error::Invalid("cannot build a batch of zero sentences".into()));
        }
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let b = rows.len();
        let mut ids = vec![self.pad_id; b * seq];
        let mut mask = vec![0f32; b * seq];
        let mut lengths = Vec::with_capacity(b);
        for (row, r) in rows.iter().enumerate() {
            let n = r.len();
            ids[row * seq..row * seq + n].copy_from_slice(r);
            mask[row * seq..row * seq + n].fill(1.0);
            lengths.push(n);
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, seq), device)?,
            token_type_ids: Tensor::zeros((b, seq), candle_core::DType::U32, device)?,
            attention_mask: Tensor::from_vec(mask, (b, seq), device)?,
            lengths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn random_batches_are_seeded_and_padded() {
        let make = |padded| Batch::random(6, 9, 500, padded, &mut StdRng::seed_from_u64(3), &Device::Cpu).unwrap();
        let (a, b) = (make(true), make(true));
        assert_eq!(a.input_ids.to_vec2::<u32>().unwrap(), b.input_ids.to_vec2::<u32>().unwrap());
        assert_eq!(a.lengths, b.lengths);
        assert!(a.lengths.iter().any(|&l| l < 9), "no padded row: {:?}", a.lengths);
        let mask = a.attention_mask.to_vec2::<f32>().unwrap();
        for (row, &len) in mask.iter().zip(&a.lengths) {
            assert_eq!(row.iter().sum::<f32>() as usize, len);
        }
        let full = make(false);
        assert!(full.lengths.iter().all(|&l| l == 9));
        let ids = full.input_ids.to_vec2::<u32>().unwrap();
        assert!(ids.iter().all(|r| r[0] == 101 && r[8] == 102 && r[1..8].iter().all(|&t| t >= 250)));
    }
}
