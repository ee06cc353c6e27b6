//! BERT-whitening (Su et al. 2021, "Whitening Sentence Representations for Better Semantics and
//! Faster Retrieval"): a training-free baseline that maps embeddings to zero mean and identity
//! covariance, `x -> (x - mu) W`, optionally keeping only the top-k principal directions. It undoes
//! the narrow cone of raw BERT embeddings that alignment/uniformity fine-tuning also targets, so it
//! is the natural point of comparison.

use std::path::Path;

use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Eigenvalues get `EPS_REL * mean eigenvalue + EPS_ABS` added before `1/sqrt`, so a singular
/// covariance (fewer rows than dimensions, constant features) still gives finite weights. The
/// whitened fit data then has variance `s / (s + eps)` along each kept direction: 1 to within
/// 1e-6 relative for directions with at least mean variance, smaller for near-null ones.
const EPS_REL: f64 = 1e-6;
const EPS_ABS: f64 = 1e-12;

/// BERT-whitening parameters: x -> (x - mu) W, W = U diag(1/sqrt(S)) [:, :k] from the
/// eigendecomposition U S U^T of the covariance of the fitted rows (eigenvalues descending).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whitening {
    /// Mean of the fitted rows, `dim` values.
    pub mu: Vec<f32>,
    /// `dim x k`, row-major.
    pub w: Vec<f32>,
    pub dim: usize,
    pub k: usize,
}

impl Whitening {
    /// Fit on `n` rows of `dim` values (row-major). The covariance uses the unbiased `1/(n-1)`
    /// normalisation (as `np.cov` in the reference code), so at least 2 rows are needed.
    /// `k = None` keeps all dims; `k = 0` or `k > dim` is an error.
    pub fn fit(data: &[f32], n: usize, dim: usize, k: Option<usize>) -> Result<Self> {
        check_shape(data, n, dim)?;
        if n < 2 {
            return Err(Error::Invalid(format!("whitening needs at least 2 rows to estimate a covariance, got {n}")));
        }
        let k = k.unwrap_or(dim);
        if k == 0 || k > dim {
            return Err(Error::Invalid(format!("whitening k must be in 1..={dim}, got {k}")));
        }
        // Column r of the dim x n matrix is row r of the input.
        let mut x = DMatrix::<f64>::from_iterator(dim, n, data.iter().map(|&v| v as f64));
        let mu = x.column_mean();
        for mut col in x.column_iter_mut() {
            col -= &mu;
        }
        let cov = (&x * x.transpose()) / (n - 1) as f64;
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let mean_ev = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum::<f64>() / dim as f64;
        let eps = EPS_REL * mean_ev + EPS_ABS;
        let scale: Vec<f64> = order[..k].iter().map(|&j| 1.0 / (eig.eigenvalues[j].max(0.0) + eps).sqrt()).collect();
        let mut w = Vec::with_capacity(dim * k);
        for i in 0..dim {
            w.extend(order[..k].iter().zip(&scale).map(|(&j, s)| (eig.eigenvectors[(i, j)] * s) as f32));
        }
        if w.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("whitening fit produced non-finite weights (non-finite input?)"));
        }
        Ok(Self { mu: mu.iter().map(|&v| v as f32).collect(), w, dim, k })
    }

    /// Apply to `n` rows of `dim` values, returning `n x k` row-major; with `normalize`, each
    /// output row is scaled to unit L2 norm (an all-zero row stays zero).
    pub fn apply(&self, data: &[f32], n: usize, normalize: bool) -> Result<Vec<f32>> {
        check_shape(data, n, self.dim)?;
        if self.mu.len() != self.dim || self.w.len() != self.dim * self.k {
            return Err(Error::Invalid(format!(
                "whitening parameters are inconsistent: dim {}, k {}, mu {} values, w {} values",
                self.dim,
                self.k,
                self.mu.len(),
                self.w.len()
            )));
        }
        // Column-major dim x n view of the row-major input, centred; then out^T = W^T (x - mu).
        let mut x = DMatrix::<f32>::from_column_slice(self.dim, n, data);
        let mu = DMatrix::<f32>::from_column_slice(self.dim, 1, &self.mu);
        for mut col in x.column_iter_mut() {
            col -= &mu;
        }
        let wt = DMatrix::<f32>::from_column_slice(self.k, self.dim, &self.w); // W^T, k x dim
        let mut out = wt * x; // k x n, column-major == n x k row-major
        if normalize {
            for mut col in out.column_iter_mut() {
                let norm = col.norm();
                if norm > 0.0 {
                    col /= norm;
                }
            }
        }
        Ok(out.as_slice().to_vec())
    }
}

fn check_shape(data: &[f32], n: usize, dim: usize) -> Result<()> {
    if dim == 0 {
        return Err(Error::invalid("whitening needs dim > 0"));
    }
    if n.checked_mul(dim) != Some(data.len()) {
        return Err(Error::Invalid(format!(
            "whitening input has {} values, expected {n} rows x {dim} = {}",
            data.len(),
            n * dim
        )));
    }
    Ok(())
}

/// Save whitening parameters as safetensors: `mu` [dim] and `w` [dim, k].
pub fn save(w: &Whitening, path: &Path) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let tensors = [
        ("mu".to_string(), candle_core::Tensor::from_slice(&w.mu, w.dim, &dev)?),
        ("w".to_string(), candle_core::Tensor::from_slice(&w.w, (w.dim, w.k), &dev)?),
    ];
    crate::io::save_safetensors(&tensors.into_iter().collect(), path)
}

/// Load parameters written by [`save`] (`compare --whiten`).
pub fn load(path: &Path) -> Result<Whitening> {
    let bad = |m: String| Error::data(path, m);
    let t = crate::io::load_safetensors(path)?;
    let (mu, w) = match (t.get("mu"), t.get("w")) {
        (Some(mu), Some(w)) => (mu, w),
        _ => {
            return Err(bad("expected tensors `mu` [dim] and `w` [dim, k] (write them with `compare --whiten`)".into()))
        }
    };
    let (dim, k) = w.dims2().map_err(|_| bad(format!("`w` has shape {:?}, expected [dim, k]", w.dims())))?;
    if mu.dims() != [dim] {
        return Err(bad(format!("`mu` has shape {:?}, expected [{dim}]", mu.dims())));
    }
    Ok(Whitening {
        mu: mu.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        w: w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?,
        dim,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `n` rows of correlated, shifted, anisotropic data in `dim` dims.
    fn sample(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut mix = rand::rngs::StdRng::seed_from_u64(99);
        let a: Vec<f64> = (0..dim * dim)
            .map(|i| if i % (dim + 1) == 0 { 1.0 } else { 0.0 } + 0.4 * (mix.gen::<f64>() - 0.5))
            .collect();
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let z: Vec<f64> = (0..dim).map(|i| gauss(&mut rng) * (1.0 + 3.0 * i as f64)).collect();
            for j in 0..dim {
                let v: f64 = (0..dim).map(|i| z[i] * a[i * dim + j]).sum();
                out.push((v + 5.0 + j as f64) as f32);
            }
        }
        out
    }

    fn gauss(rng: &mut impl Rng) -> f64 {
        let (u, v): (f64, f64) = (rng.gen::<f64>().max(1e-12), rng.gen());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Mean and unbiased covariance of row-major `n x d` data.
    fn moments(y: &[f32], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let mean: Vec<f64> = (0..d).map(|j| (0..n).map(|r| y[r * d + j] as f64).sum::<f64>() / n as f64).collect();
        let mut cov = vec![0.0; d * d];
        for r in 0..n {
            for a in 0..d {
                for b in 0..d {
                    cov[a * d + b] += (y[r * d + a] as f64 - mean[a]) * (y[r * d + b] as f64 - mean[b]);
                }
            }
        }
        cov.iter_mut().for_each(|c| *c /= (n - 1) as f64);
        (mean, cov)
    }

    fn assert_whitened(y: &[f32], n: usize, d: usize, tol: f64) {
        assert_eq!(y.len(), n * d);
        let (mean, cov) = moments(y, n, d);
        for a in 0..d {
            assert!(mean[a].abs() < tol, "mean[{a}] = {}", mean[a]);
            for b in 0..d {
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((cov[a * d + b] - want).abs() < tol, "cov[{a},{b}] = {}", cov[a * d + b]);
            }
        }
    }

    #[test]
    fn fit_data_is_white_full_and_reduced() {
        let (n, dim) = (3000, 6);
        let x = sample(n, dim, 1);
        let full = Whitening::fit(&x, n, dim, None).unwrap();
        assert_eq!((full.dim, full.k, full.mu.len(), full.w.len()), (dim, dim, dim, dim * dim));
        assert_whitened(&full.apply(&x, n, false).unwrap(), n, dim, 1e-3);
        let top = Whitening::fit(&x, n, dim, Some(3)).unwrap();
        assert_eq!((top.k, top.w.len()), (3, dim * 3));
        assert_whitened(&top.apply(&x, n, false).unwrap(), n, 3, 1e-3);
    }

    #[test]
    fn keeps_directions_of_largest_variance_first() {
        // Variance 100 along axis 2, 1 elsewhere: the single kept direction must be axis 2.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, dim) = (2000, 4);
        let x: Vec<f32> =
            (0..n * dim).map(|i| (gauss(&mut rng) * if i % dim == 2 { 10.0 } else { 1.0 }) as f32).collect();
        let wh = Whitening::fit(&x, n, dim, Some(1)).unwrap();
        let col: Vec<f64> = wh.w.iter().map(|&v| v as f64).collect();
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((col[2].abs() / norm) > 0.99, "w = {col:?}");
        assert!((norm - 0.1).abs() < 0.01, "scale 1/sqrt(100), got {norm}");
    }

    #[test]
    fn applies_to_other_data_and_normalises() {
        let (n, dim) = (4000, 5);
        let wh = Whitening::fit(&sample(n, dim, 1), n, dim, None).unwrap();
        let other = sample(n, dim, 2);
        assert_whitened(&wh.apply(&other, n, false).unwrap(), n, dim, 0.1);
        let unit = wh.apply(&other[..3 * dim], 3, true).unwrap();
        for row in unit.chunks(dim) {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
        assert_eq!(wh.apply(&[], 0, true).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn singular_covariance_stays_finite() {
        // 3 rows in 5 dims, one constant feature: rank 2 covariance.
        let x: Vec<f32> = (0..15).map(|i| if i % 5 == 4 { 1.0 } else { (i * i % 7) as f32 }).collect();
        let wh = Whitening::fit(&x, 3, 5, None).unwrap();
        let y = wh.apply(&x, 3, false).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        let constant = vec![2.0f32; 10];
        let wh = Whitening::fit(&constant, 2, 5, Some(2)).unwrap();
        assert!(wh.apply(&constant, 2, true).unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn shape_errors() {
        let x = vec![0.0f32; 12];
        assert!(Whitening::fit(&x, 3, 5, None).unwrap_err().to_string().contains("expected 3 rows x 5"));
        assert!(Whitening::fit(&x, 1, 12, None).unwrap_err().to_string().contains("at least 2 rows"));
        assert!(Whitening::fit(&x, 4, 3, Some(4)).unwrap_err().to_string().contains("k must be in 1..=3"));
        assert!(Whitening::fit(&x, 4, 3, Some(0)).is_err());
        assert!(Whitening::fit(&[], 0, 0, None).is_err());
        let wh = Whitening::fit(&sample(10, 3, 1), 10, 3, Some(2)).unwrap();
        assert!(wh.apply(&x[..7], 2, false).unwrap_err().to_string().contains("expected 2 rows x 3"));
        let mut broken = wh.clone();
        broken.w.pop();
        assert!(broken.apply(&x[..6], 2, false).unwrap_err().to_string().contains("inconsistent"));
    }
}
