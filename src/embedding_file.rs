//! The embeddings file `embed` writes and `compare` reads: safetensors with `embeddings`
//! [n, dim] (F32 or F16) and `line` [n] (I64), streamed so memory does not grow with n.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::{check_output_file, clean_stale, temp_path};

/// Streams `[n, dim]` embeddings into a safetensors file: the header (with `n` known from a
/// first pass) goes first, then rows as they come, so memory does not grow with `n`. Tensors:
/// `embeddings` [n, dim] (F32 or F16) and `line` [n] (I64, the 0-based input line of each row).
/// Written to a temporary name ([`temp_path`]) and renamed by
/// [`EmbeddingWriter::finish`]; dropped unfinished (an error), the temporary file is removed.
pub struct EmbeddingWriter {
    out: std::io::BufWriter<std::fs::File>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    n: usize,
    dim: usize,
    f16: bool,
    lines: Vec<i64>,
}

impl EmbeddingWriter {
    pub fn create(
        path: &Path,
        n: usize,
        dim: usize,
        f16: bool,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self> {
        use std::io::Write;
        let elem = if f16 { 2 } else { 4 };
        let emb_bytes = n * dim * elem;
        let header = json!({
            "__metadata__": metadata,
            "embeddings": {"dtype": if f16 { "F16" } else { "F32" }, "shape": [n, dim], "data_offsets": [0, emb_bytes]},
            "line": {"dtype": "I64", "shape": [n], "data_offsets": [emb_bytes, emb_bytes + 8 * n]},
        });
        let mut header = serde_json::to_string(&header).map_err(|e| Error::json(path, e))?;
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        check_output_file(path)?;
        clean_stale(path);
        let tmp = temp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(header.as_bytes()))
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(Self { out, tmp, path: path.to_path_buf(), n, dim, f16, lines: Vec::with_capacity(n) })
    }

    /// Append one row, from input line `line`.
    pub fn push(&mut self, row: &[f32], line: usize) -> Result<()> {
        use std::io::Write;
        if row.len() != self.dim || self.lines.len() >= self.n {
            return Err(Error::Invalid(format!(
                "embedding row {} of dim {} does not fit [{}, {}]",
                self.lines.len(),
                row.len(),
                self.n,
                self.dim
            )));
        }
        let res = if self.f16 {
            row.iter().try_for_each(|v| self.out.write_all(&half::f16::from_f32(*v).to_le_bytes()))
        } else {
            row.iter().try_for_each(|v| self.out.write_all(&v.to_le_bytes()))
        };
        res.map_err(|e| Error::io(&self.tmp, e))?;
        self.lines.push(line as i64);
        Ok(())
    }

    /// Write the line index, flush and rename into place. Fails if fewer rows than announced.
    pub fn finish(mut self) -> Result<()> {
        use std::io::Write;
        if self.lines.len() != self.n {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Error::Invalid(format!("wrote {} rows, announced {}", self.lines.len(), self.n)));
        }
        for l in &self.lines {
            self.out.write_all(&l.to_le_bytes()).map_err(|e| Error::io(&self.tmp, e))?;
        }
        self.out.flush().map_err(|e| Error::io(&self.tmp, e))?;
        self.out.get_ref().sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for EmbeddingWriter {
    fn drop(&mut self) {
        // After `finish` the temporary name is gone (renamed); otherwise it is half a file.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Embeddings read back from a file written by `embed`.
pub struct EmbeddingFile {
    pub data: Vec<f32>,
    pub n: usize,
    pub dim: usize,
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// Read the `embeddings` tensor ([n, dim], F32 or F16) of a safetensors file.
pub fn read_embeddings(path: &Path) -> Result<EmbeddingFile> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::data(path, msg);
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().cloned().collect();
    let t = st.tensor("embeddings").map_err(|_| {
        bad(format!("no tensor named `embeddings` (found: {}); write one with `hypersphere embed`", names.join(", ")))
    })?;
    let [n, dim] = t.shape() else {
        return Err(bad(format!("`embeddings` has shape {:?}, expected [n, dim]", t.shape())));
    };
    let data: Vec<f32> = match t.dtype() {
        Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => t.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(bad(format!("`embeddings` has dtype {other:?}, expected F32 or F16"))),
    };
    let metadata = meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
    Ok(EmbeddingFile { data, n: *n, dim: *dim, metadata })
}

/// The `embeddings` rows of an F32 file written by [`EmbeddingWriter`], read by range without
/// loading the file: what a search streams its documents from.
pub struct EmbeddingRows {
    file: std::fs::File,
    path: std::path::PathBuf,
    pub n: usize,
    pub dim: usize,
    /// Where row 0 starts in the file.
    start: u64,
}

impl EmbeddingRows {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::data(path, msg);
        let mut len = [0u8; 8];
        crate::io::read_exact_at(&file, &mut len, 0).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return Err(bad(format!("a header of {len} bytes: not an embeddings file")));
        }
        let mut header = vec![0u8; len as usize];
        crate::io::read_exact_at(&file, &mut header, 8).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        let t = &header["embeddings"];
        let (Some(n), Some(dim), Some(offset)) =
            (t["shape"][0].as_u64(), t["shape"][1].as_u64(), t["data_offsets"][0].as_u64())
        else {
            return Err(bad("no [n, dim] `embeddings` tensor".into()));
        };
        if t["dtype"] != "F32" {
            return Err(bad(format!("`embeddings` is {}, expected F32", t["dtype"])));
        }
        let start = 8 + len + offset;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if start + n * dim * 4 > size {
            return Err(bad(format!("{size} bytes, too short for [{n}, {dim}] F32 rows (truncated?)")));
        }
        Ok(Self { file, path: path.to_path_buf(), n: n as usize, dim: dim as usize, start })
    }

    /// Rows `first..first + count`, flat.
    pub fn rows(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        if first + count > self.n {
            return Err(Error::data(&self.path, format!("rows {first}..{} of {}", first + count, self.n)));
        }
        let mut buf = vec![0u8; count * self.dim * 4];
        let at = self.start + (first * self.dim * 4) as u64;
        crate::io::read_exact_at(&self.file, &mut buf, at).map_err(|e| Error::io(&self.path, e))?;
        Ok(buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_round_trip_in_f32_and_f16() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [[0.6f32, 0.8, 0.0], [0.0, -1.0, 0.0], [0.5, 0.5, 0.70710677]];
        for f16 in [false, true] {
            let path = dir.path().join(format!("e{f16}.safetensors"));
            let meta = [("pooling".to_string(), "mean".to_string())].into_iter().collect();
            let mut w = EmbeddingWriter::create(&path, 3, 3, f16, &meta).unwrap();
            for (i, r) in rows.iter().enumerate() {
                w.push(r, i * 2).unwrap();
            }
            w.finish().unwrap();
            let back = read_embeddings(&path).unwrap();
            assert_eq!((back.n, back.dim), (3, 3));
            assert_eq!(back.metadata["pooling"], "mean");
            let tol = if f16 { 1e-3 } else { 0.0 };
            for (a, b) in back.data.iter().zip(rows.iter().flatten()) {
                assert!((a - b).abs() <= tol, "{a} vs {b}");
            }
            // candle reads the same file, the line index included.
            let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
            assert_eq!(t["line"].to_vec1::<i64>().unwrap(), vec![0, 2, 4]);
            // Read by range: F32 files only.
            match EmbeddingRows::open(&path) {
                Ok(r) => {
                    assert!(!f16 && (r.n, r.dim) == (3, 3));
                    assert_eq!(r.rows(1, 2).unwrap(), [rows[1], rows[2]].concat());
                    assert!(r.rows(2, 2).is_err());
                }
                Err(e) => assert!(f16 && e.to_string().contains("expected F32"), "{e}"),
            }
        }
    }

    #[test]
    fn short_writes_and_wrong_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.safetensors");
        let mut w = EmbeddingWriter::create(&path, 2, 2, false, &Default::default()).unwrap();
        w.push(&[1.0, 0.0], 0).unwrap();
        assert!(w.push(&[1.0], 1).is_err());
        assert!(w.finish().is_err());
        assert!(!path.exists(), "nothing half-written is left under the final name");
        let other = dir.path().join("other.safetensors");
        let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("vectors", t)].into_iter().collect(), &other).unwrap();
        let err = read_embeddings(&other).err().unwrap().to_string();
        assert!(err.contains("other.safetensors") && err.contains("vectors"), "{err}");
        let t = candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("embeddings", t)].into_iter().collect(), &other).unwrap();
        assert!(read_embeddings(&other).err().unwrap().to_string().contains("shape"));
    }
}
