//! Anisotropy metrics of a set of sentence embeddings.
//!
//! Pre-trained BERT sentence embeddings are anisotropic: they fill a narrow cone of the unit
//! sphere (high mean cosine, one dominant direction), which hurts cosine-similarity tasks.
//! Fine-tuning for alignment and uniformity (Wang & Isola 2020) should spread them out while
//! keeping positive pairs close. These numbers measure that before and after training:
//! uniformity and alignment (the training objectives themselves), mean cosine, the isotropy
//! score of Mu & Viswanath (2018), the effective rank (Roy & Vetterli 2007) and the share of
//! variance on the top principal component. Everything is computed in f64 on L2-normalised rows.

use nalgebra::{DMatrix, DMatrixView, SymmetricEigen};

use crate::error::{Error, Result};

/// Rows per block for the GEMM-based Gram / scatter computations.
const BLOCK: usize = 256;
/// Total variance (trace of the covariance of unit rows, which lies in [0, 1]) at or below
/// which the covariance is treated as zero (all rows identical up to rounding).
const ZERO_VARIANCE: f64 = 1e-20;

/// Embeddings as a row-major matrix: `n` rows of `dim` f32 values each. Rows are
/// L2-normalised by [`anisotropy`] itself (callers may pass raw vectors); a zero row is an error.
#[derive(Debug, Clone, Copy)]
pub struct Embeddings<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub dim: usize,
}

/// Anisotropy report of one set of embeddings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Anisotropy {
    pub n: usize,
    pub dim: usize,
    /// `log mean_{i<j} exp(-t ||x_i - x_j||²)`, t = 2, self-pairs excluded (Wang & Isola).
    /// 0 = collapse; around -4 = spread (the bound depends on dim and n).
    pub uniformity: f64,
    /// Mean cosine over all pairs i != j: `(||Σx||² - Σ||x_i||²) / (n(n-1))`, exact.
    pub mean_cosine: f64,
    /// Mu & Viswanath 2018: `I = min_c Z(c) / max_c Z(c)`, `Z(c) = Σ_i exp(cᵀ x_i)`, c over the
    /// eigenvectors of `XᵀX` *and their negatives* (an eigenvector's sign is arbitrary, so both
    /// are used to make the score well defined). 1 = isotropic.
    pub isotropy: f64,
    /// `exp(-Σ p_k ln p_k)`, `p_k = λ_k / Σλ` over the eigenvalues of the covariance
    /// (Roy & Vetterli 2007); in [1, dim]. 0 when the covariance is zero (all rows identical).
    pub effective_rank: f64,
    /// `λ_1 / Σλ` of the covariance of the rows (mean subtracted); in [1/dim, 1].
    /// 0 when the covariance is zero (all rows identical).
    pub top_pc_variance: f64,
    /// `mean_i ||a_i - b_i||²` over positive pairs, when pairs are given (alpha = 2).
    pub alignment: Option<f64>,
    /// Next-sentence retrieval over the same pairs (`retrieval::next_sentence`), when the
    /// pairs' texts are known: each first sentence a query among all the second sentences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sentence: Option<crate::retrieval::Retrieval>,
}

/// L2-normalises each row of a row-major matrix into f64. Errors on dim 0, a length that is
/// not a multiple of `dim`, non-finite values and zero rows.
pub fn normalize_rows(data: &[f32], dim: usize) -> Result<Vec<f64>> {
    if dim == 0 {
        return Err(Error::invalid("dim must be positive, got 0"));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::Invalid(format!("{} values are not a whole number of rows of dim {dim}", data.len())));
    }
    let mut out = Vec::with_capacity(data.len());
    for (r, row) in data.chunks_exact(dim).enumerate() {
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("non-finite value {} at row {r}, column {c}", row[c])));
        }
        let norm = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err(Error::Invalid(format!("row {r} is a zero vector and cannot be normalised")));
        }
        out.extend(row.iter().map(|&v| f64::from(v) / norm));
    }
    Ok(out)
}

/// `log mean_{i<j} exp(-t ||x_i - x_j||²)` over unit rows, using `||x_i - x_j||² = 2 - 2 x_i·x_j`
/// (clamped at 0). Gram blocks come from GEMM; the sum is a streamed log-sum-exp, so large `t`
/// does not underflow. O(n² dim) time, O(256 n) memory.
///
/// # Panics
/// If `n < 2` or `x_unit.len() != n * dim`.
pub fn uniformity(x_unit: &[f64], n: usize, dim: usize, t: f64) -> f64 {
    assert!(n >= 2 && x_unit.len() == n * dim, "uniformity: need n >= 2 rows of dim values");
    let (mut m, mut s) = (f64::NEG_INFINITY, 0.0);
    let expo = |g: f64| -t * (2.0 - 2.0 * g).max(0.0);
    let mut i0 = 0;
    while i0 + 1 < n {
        let b = BLOCK.min(n - 1 - i0);
        let a = DMatrixView::from_slice(&x_unit[i0 * dim..(i0 + b) * dim], dim, b);
        let rest = DMatrixView::from_slice(&x_unit[i0 * dim..], dim, n - i0);
        // g[(r, c)] = x_{i0+r} · x_{i0+c}; pairs i < j are the entries with r < c.
        let g = a.transpose() * rest;
        let gs = g.as_slice(); // column-major, b rows
        let upper = |c: usize| &gs[c * b..c * b + b.min(c)];
        let bm = (1..n - i0).flat_map(|c| upper(c).iter().map(|&v| expo(v))).fold(f64::NEG_INFINITY, f64::max);
        if bm > m {
            s *= (m - bm).exp();
            m = bm;
        }
        s += (1..n - i0).map(|c| upper(c).iter().map(|&v| (expo(v) - m).exp()).sum::<f64>()).sum::<f64>();
        i0 += b;
    }
    let pairs = n as f64 * (n as f64 - 1.0) / 2.0;
    m + (s / pairs).ln()
}

/// `mean_i ||a_i - b_i||^alpha` over paired unit rows (computed from the differences).
///
/// # Panics
/// If `dim == 0`, the slices are empty, of different lengths, or not whole rows.
pub fn alignment(a_unit: &[f64], b_unit: &[f64], dim: usize, alpha: f64) -> f64 {
    assert!(
        dim > 0 && !a_unit.is_empty() && a_unit.len() == b_unit.len() && a_unit.len().is_multiple_of(dim),
        "alignment: need equal, non-empty slices of whole rows"
    );
    let n = a_unit.len() / dim;
    let total: f64 = a_unit
        .chunks_exact(dim)
        .zip(b_unit.chunks_exact(dim))
        .map(|(x, y)| {
            let d2: f64 = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum();
            d2.powf(alpha / 2.0)
        })
        .sum();
    total / n as f64
}

/// Scatter matrix `Σ_i (x_i - c)(x_i - c)ᵀ` (dim x dim), accumulated over row blocks with GEMM.
fn scatter(x: &[f64], dim: usize, center: Option<&[f64]>) -> DMatrix<f64> {
    let mut out = DMatrix::zeros(dim, dim);
    for chunk in x.chunks(BLOCK * dim) {
        let mut blk = DMatrix::from_column_slice(dim, chunk.len() / dim, chunk);
        if let Some(c) = center {
            for mut col in blk.column_iter_mut() {
                col.iter_mut().zip(c).for_each(|(v, m)| *v -= m);
            }
        }
        out.gemm(1.0, &blk, &blk.transpose(), 1.0);
    }
    out
}

/// Symmetric eigendecomposition sorted by descending eigenvalue; negative rounding noise
/// in the eigenvalues of a PSD matrix is clamped to 0. Eigenvectors are orthonormal columns.
fn eigen_desc(m: DMatrix<f64>) -> (Vec<f64>, DMatrix<f64>) {
    let d = m.nrows();
    let eig = SymmetricEigen::new(m);
    let mut idx: Vec<usize> = (0..d).collect();
    idx.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let vals = idx.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
    let vecs = DMatrix::from_fn(d, d, |r, c| eig.eigenvectors[(r, idx[c])]);
    (vals, vecs)
}

/// Eigenvalues (descending, clamped at 0) and eigenvectors (columns, same order) of the
/// dim x dim population covariance `(1/n) Σ_i (x_i - x̄)(x_i - x̄)ᵀ` of the rows of `x`
/// (row-major, finite values).
///
/// # Panics
/// If `n == 0`, `dim == 0` or `x.len() != n * dim`.
pub fn covariance_spectrum(x: &[f64], n: usize, dim: usize) -> (Vec<f64>, DMatrix<f64>) {
    assert!(n > 0 && dim > 0 && x.len() == n * dim, "covariance_spectrum: need n rows of dim values");
    let mut mean = vec![0.0; dim];
    for row in x.chunks_exact(dim) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    eigen_desc(scatter(x, dim, Some(&mean)) / n as f64)
}

/// Mu & Viswanath isotropy `min_c Z(c) / max_c Z(c)` over ± the eigenvectors of `XᵀX`.
fn isotropy(x: &[f64], dim: usize) -> f64 {
    let (_, v) = eigen_desc(scatter(x, dim, None));
    let (mut zp, mut zn) = (vec![0.0; dim], vec![0.0; dim]);
    for chunk in x.chunks(BLOCK * dim) {
        let p = DMatrixView::from_slice(chunk, dim, chunk.len() / dim).transpose() * &v;
        for (k, col) in p.column_iter().enumerate() {
            for &s in col.iter() {
                zp[k] += s.exp();
                zn[k] += (-s).exp();
            }
        }
    }
    let z = zp.iter().chain(&zn);
    let (lo, hi) = z.fold((f64::INFINITY, 0.0_f64), |(lo, hi), &z| (lo.min(z), hi.max(z)));
    lo / hi
}

/// Validates shape and values of one embedding matrix and returns its normalised rows.
fn checked(e: &Embeddings, what: &str, min_rows: usize) -> Result<Vec<f64>> {
    if e.dim == 0 {
        return Err(Error::Invalid(format!("{what}: dim must be positive, got 0")));
    }
    if e.n < min_rows {
        return Err(Error::Invalid(format!("{what}: need at least {min_rows} rows, got {}", e.n)));
    }
    let expected =
        e.n.checked_mul(e.dim).ok_or_else(|| Error::Invalid(format!("{what}: {} x {} overflows", e.n, e.dim)))?;
    if e.data.len() != expected {
        return Err(Error::Invalid(format!(
            "{what}: {} rows of dim {} expected {expected} values, got {}",
            e.n,
            e.dim,
            e.data.len()
        )));
    }
    normalize_rows(e.data, e.dim).map_err(|err| Error::Invalid(format!("{what}: {err}")))
}

/// All metrics of `x` (at least 2 rows), plus alignment when positive `pairs` are given
/// (two matrices of equal shape, same dim as `x`, at least one row; row i of a pairs with row
/// i of b). All rows are L2-normalised first.
pub fn anisotropy(x: Embeddings, pairs: Option<(Embeddings, Embeddings)>) -> Result<Anisotropy> {
    let xs = checked(&x, "embeddings", 2)?;
    let (n, dim) = (x.n, x.dim);
    let alignment = match pairs {
        None => None,
        Some((a, b)) => {
            if (a.n, a.dim) != (b.n, b.dim) {
                return Err(Error::Invalid(format!(
                    "pairs: shapes differ, a is {}x{} and b is {}x{}",
                    a.n, a.dim, b.n, b.dim
                )));
            }
            if a.dim != dim {
                return Err(Error::Invalid(format!("pairs: dim {} differs from embeddings dim {dim}", a.dim)));
            }
            let (au, bu) = (checked(&a, "pairs a", 1)?, checked(&b, "pairs b", 1)?);
            Some(alignment(&au, &bu, dim, 2.0))
        }
    };

    let mut sum = vec![0.0; dim];
    let mut sq = 0.0;
    for row in xs.chunks_exact(dim) {
        sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        sq += row.iter().map(|v| v * v).sum::<f64>();
    }
    let sum_sq: f64 = sum.iter().map(|s| s * s).sum();
    let mean_cosine = (sum_sq - sq) / (n as f64 * (n as f64 - 1.0));

    let (vals, _) = covariance_spectrum(&xs, n, dim);
    let total: f64 = vals.iter().sum();
    let (effective_rank, top_pc_variance) = if total <= ZERO_VARIANCE {
        (0.0, 0.0)
    } else {
        let h: f64 = vals.iter().map(|&l| l / total).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum();
        (h.exp(), vals[0] / total)
    };

    Ok(Anisotropy {
        n,
        dim,
        uniformity: uniformity(&xs, n, dim, 2.0),
        mean_cosine,
        isotropy: isotropy(&xs, dim),
        effective_rank,
        top_pc_variance,
        alignment,
        next_sentence: None,
    })
}

/// What validation measures on held-out pairs during training (t from the run's loss).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// `mean_i ||x_i - y_i||²`.
    pub align: f64,
    /// `(U(x) + U(y)) / 2` at temperature `t`, as the loss computes it.
    pub uniform: f64,
    /// Mean cosine of distinct anchors.
    pub mean_cos: f64,
    /// Share of (i, j != i) with `x_i . y_i > x_i . y_j`: how often an anchor is closer to its own
    /// positive than to another pair's (1 = always, 0.5 = chance).
    pub pos_auc: f64,
}

/// [`Geometry`] of anchors `x` and their positives `y` (equal shapes, at least 2 rows).
pub fn held_out_geometry(x: Embeddings, y: Embeddings, t: f64) -> Result<Geometry> {
    if (x.n, x.dim) != (y.n, y.dim) {
        return Err(Error::Invalid(format!("held-out pairs: {}x{} anchors, {}x{} positives", x.n, x.dim, y.n, y.dim)));
    }
    let (xs, ys) = (checked(&x, "held-out anchors", 2)?, checked(&y, "held-out positives", 2)?);
    let (n, dim) = (x.n, x.dim);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    fn row(m: &[f64], i: usize, dim: usize) -> &[f64] {
        &m[i * dim..(i + 1) * dim]
    }
    let mut closer = 0usize;
    for i in 0..n {
        let own = dot(row(&xs, i, dim), row(&ys, i, dim));
        closer += (0..n).filter(|&j| j != i && dot(row(&xs, i, dim), row(&ys, j, dim)) < own).count();
    }
    let sum: Vec<f64> = (0..dim).map(|c| (0..n).map(|i| xs[i * dim + c]).sum()).collect();
    Ok(Geometry {
        align: alignment(&xs, &ys, dim, 2.0),
        uniform: (uniformity(&xs, n, dim, t) + uniformity(&ys, n, dim, t)) / 2.0,
        mean_cos: (dot(&sum, &sum) - n as f64) / (n as f64 * (n as f64 - 1.0)),
        pos_auc: closer as f64 / (n * (n - 1)) as f64,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::f64::consts::{E, PI};

    fn emb(data: &[f32], n: usize, dim: usize) -> Embeddings<'_> {
        Embeddings { data, n, dim }
    }

    fn gauss(rng: &mut StdRng) -> f64 {
        // Box-Muller.
        let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
    }

    /// Independent reference: normalise in f64 row by row.
    fn unit_rows(data: &[f32], dim: usize) -> Vec<Vec<f64>> {
        data.chunks(dim)
            .map(|r| {
                let r: Vec<f64> = r.iter().map(|&v| v as f64).collect();
                let nrm = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                r.iter().map(|v| v / nrm).collect()
            })
            .collect()
    }

    /// Naive double loop: (mean cosine, uniformity with t = 2 from explicit differences).
    fn naive_pairs(rows: &[Vec<f64>]) -> (f64, f64) {
        let (mut cos, mut ex, mut cnt) = (0.0, 0.0, 0.0);
        for i in 0..rows.len() {
            for j in i + 1..rows.len() {
                cos += rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum::<f64>();
                let d2: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| (a - b) * (a - b)).sum();
                ex += (-2.0 * d2).exp();
                cnt += 1.0;
            }
        }
        (cos / cnt, (ex / cnt).ln())
    }

    /// Cyclic Jacobi eigendecomposition (independent of nalgebra): (eigenvalues, eigenvectors as rows).
    fn jacobi(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
        let d = a.len();
        let mut v: Vec<Vec<f64>> = (0..d).map(|i| (0..d).map(|j| (i == j) as u8 as f64).collect()).collect();
        for _ in 0..100 {
            let off: f64 = (0..d)
                .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i][j].powi(2))
                .sum();
            if off < 1e-30 {
                break;
            }
            for p in 0..d {
                for q in p + 1..d {
                    if a[p][q].abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                    let rot = |x: f64, y: f64| (c * x - s * y, s * x + c * y);
                    for row in a.iter_mut().chain(v.iter_mut()) {
                        (row[p], row[q]) = rot(row[p], row[q]);
                    }
                    let (lo, hi) = a.split_at_mut(q);
                    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                        (*x, *y) = rot(*x, *y);
                    }
                }
            }
        }
        let vecs = (0..d).map(|k| (0..d).map(|i| v[i][k]).collect()).collect();
        ((0..d).map(|i| a[i][i]).collect(), vecs)
    }

    /// Population covariance (or uncentered XᵀX when `center` is false) by explicit loops.
    fn naive_second_moment(rows: &[Vec<f64>], center: bool) -> Vec<Vec<f64>> {
        let (n, d) = (rows.len(), rows[0].len());
        let mean: Vec<f64> =
            (0..d).map(|k| if center { rows.iter().map(|r| r[k]).sum::<f64>() / n as f64 } else { 0.0 }).collect();
        let scale = if center { 1.0 / n as f64 } else { 1.0 };
        (0..d)
            .map(|i| {
                (0..d).map(|j| rows.iter().map(|r| (r[i] - mean[i]) * (r[j] - mean[j])).sum::<f64>() * scale).collect()
            })
            .collect()
    }

    /// 1-D integration: E exp(-t ||x - y||²) = E exp(-2t (1 - u)) for x, y uniform on S^{d-1},
    /// with u = cos θ of density ∝ (1 - u²)^{(d-3)/2} on [-1, 1] (composite Simpson).
    fn sphere_uniformity(d: usize, t: f64) -> f64 {
        let m = 200_000;
        let h = 2.0 / m as f64;
        let (mut num, mut den) = (0.0, 0.0);
        for k in 0..=m {
            let u = -1.0 + k as f64 * h;
            let w = if k == 0 || k == m {
                1.0
            } else if k % 2 == 1 {
                4.0
            } else {
                2.0
            };
            let dens = (1.0 - u * u).max(0.0).powf((d as f64 - 3.0) / 2.0);
            num += w * dens * (-2.0 * t * (1.0 - u)).exp();
            den += w * dens;
        }
        (num / den).ln()
    }

    #[test]
    fn hand_computed_three_vectors_in_2d() {
        // Raw rows (3,0), (0,0.5), (-2,0) normalise to e1, e2, -e1.
        // Cosines: e1·e2 = 0, e1·(-e1) = -1, e2·(-e1) = 0 -> mean cosine -1/3.
        // Squared distances 2, 4, 2 -> uniformity ln((2e^-4 + e^-8) / 3).
        // Mean (0, 1/3); centred rows (1,-1/3), (0,2/3), (-1,-1/3); population covariance
        // diag(2/3, 2/9) -> top share (2/3)/(8/9) = 3/4, effective rank exp(H(3/4, 1/4))
        // = (4/3)^(3/4) 4^(1/4).
        // XᵀX = diag(2, 1): Z(±e1) = e + 1 + 1/e, Z(e2) = 2 + e, Z(-e2) = 2 + 1/e
        // -> isotropy (2 + 1/e) / (2 + e).
        let data = [3.0f32, 0.0, 0.0, 0.5, -2.0, 0.0];
        let r = anisotropy(emb(&data, 3, 2), None).unwrap();
        close(r.mean_cosine, -1.0 / 3.0, 1e-12);
        close(r.uniformity, ((2.0 * (-4.0f64).exp() + (-8.0f64).exp()) / 3.0).ln(), 1e-12);
        close(r.top_pc_variance, 0.75, 1e-12);
        close(r.effective_rank, (4.0f64 / 3.0).powf(0.75) * 4.0f64.powf(0.25), 1e-12);
        close(r.isotropy, (2.0 + 1.0 / E) / (2.0 + E), 1e-12);
        assert_eq!((r.n, r.dim, r.alignment), (3, 2, None));
    }

    #[test]
    fn identical_vectors_collapse() {
        let v = [0.3f32, -1.2, 0.7, 2.0, 0.0, -0.1, 0.5, 0.9];
        let data: Vec<f32> = v.iter().copied().cycle().take(50 * 8).collect();
        let r = anisotropy(emb(&data, 50, 8), None).unwrap();
        close(r.uniformity, 0.0, 1e-9);
        close(r.mean_cosine, 1.0, 1e-12);
        // Zero covariance: documented sentinel values, never NaN.
        assert_eq!((r.effective_rank, r.top_pc_variance), (0.0, 0.0));
        // Z(x) = n e, Z(-x) = n / e, Z(c ⊥ x) = n -> e^-2.
        close(r.isotropy, (-2.0f64).exp(), 1e-9);
    }

    #[test]
    fn all_variance_on_one_axis() {
        // Rows ±e1 (scaled), three +, one -. Covariance has rank 1 -> erank 1, top share 1.
        // Pairs: 3 with cos 1 (d² 0), 3 with cos -1 (d² 4): mean cosine 0,
        // uniformity ln((3 + 3e^-8) / 6). XᵀX = diag(4, 0, 0, 0): Z(e1) = 3e + 1/e,
        // Z(-e1) = 3/e + e, Z(c ⊥ e1) = 4 -> isotropy (3/e + e) / (3e + 1/e).
        let mut data = vec![0.0f32; 16];
        for (i, s) in [3.0f32, 0.5, -7.0, 2.0].iter().enumerate() {
            data[i * 4] = *s;
        }
        let r = anisotropy(emb(&data, 4, 4), None).unwrap();
        close(r.effective_rank, 1.0, 1e-12);
        close(r.top_pc_variance, 1.0, 1e-12);
        close(r.mean_cosine, 0.0, 1e-12);
        close(r.uniformity, ((1.0 + (-8.0f64).exp()) / 2.0).ln(), 1e-12);
        close(r.isotropy, (3.0 / E + E) / (3.0 * E + 1.0 / E), 1e-12);
    }

    #[test]
    fn uniform_on_sphere() {
        let (n, d) = (2000, 16);
        let mut rng = StdRng::seed_from_u64(7);
        let data: Vec<f32> = (0..n * d).map(|_| gauss(&mut rng) as f32).collect();
        let r = anisotropy(emb(&data, n, d), None).unwrap();
        assert!(r.isotropy > 0.8, "isotropy {}", r.isotropy);
        assert!(r.mean_cosine.abs() < 0.02, "mean cosine {}", r.mean_cosine);
        assert!(r.effective_rank > 0.9 * d as f64, "erank {}", r.effective_rank);
        assert!(r.top_pc_variance < 1.5 / d as f64, "top {}", r.top_pc_variance);
        // The U-statistic's first-order variance vanishes on the sphere, so n = 2000 is tight.
        let expected = sphere_uniformity(d, 2.0);
        close(r.uniformity, expected, 2e-3);
    }

    #[test]
    fn sphere_integral_matches_closed_form_in_3d() {
        // d = 3: u is uniform on [-1, 1], E exp(-4(1-u)) = (1 - e^-8) / 8.
        close(sphere_uniformity(3, 2.0), ((1.0 - (-8.0f64).exp()) / 8.0).ln(), 1e-9);
    }

    #[test]
    fn narrow_cone_matches_naive_computations() {
        let (n, d) = (300, 16);
        let mut rng = StdRng::seed_from_u64(11);
        let mu: Vec<f64> = (0..d).map(|_| gauss(&mut rng)).collect();
        let mnorm = mu.iter().map(|v| v * v).sum::<f64>().sqrt();
        let data: Vec<f32> = (0..n)
            .flat_map(|_| mu.iter().map(|m| (m / mnorm + 0.1 * gauss(&mut rng)) as f32).collect::<Vec<_>>())
            .collect();
        let r = anisotropy(emb(&data, n, d), None).unwrap();
        let rows = unit_rows(&data, d);
        let (cos, uni) = naive_pairs(&rows);
        close(r.mean_cosine, cos, 1e-12);
        close(r.uniformity, uni, 1e-10);
        assert!(r.mean_cosine > 0.8 && r.uniformity > -1.0, "{r:?}");

        let (mut vals, _) = jacobi(naive_second_moment(&rows, true));
        vals.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = vals.iter().sum();
        let erank = (-vals.iter().map(|l| l / total).filter(|&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>()).exp();
        close(r.top_pc_variance, vals[0] / total, 1e-9);
        close(r.effective_rank, erank, 1e-9);

        let (_, vecs) = jacobi(naive_second_moment(&rows, false));
        let z: Vec<f64> = vecs
            .iter()
            .flat_map(|c| {
                [1.0, -1.0].map(|s| {
                    rows.iter().map(|x| (s * x.iter().zip(c).map(|(a, b)| a * b).sum::<f64>()).exp()).sum::<f64>()
                })
            })
            .collect();
        let iso = z.iter().cloned().fold(f64::INFINITY, f64::min) / z.iter().cloned().fold(0.0, f64::max);
        close(r.isotropy, iso, 1e-9);
        assert!(r.isotropy < 0.3, "cone isotropy {}", r.isotropy);
    }

    #[test]
    fn uniformity_large_t_does_not_underflow() {
        // e1, e2, -e1 with t = 500: squared distances 2, 4, 2 give terms e^-1000 (twice) and
        // e^-2000, which underflow in f64 (below ~e^-745) if summed directly;
        // ln((2e^-1000 + e^-2000)/3) = -1000 + ln(2/3) + ln(1 + e^-1000/2) = -1000 + ln(2/3).
        let x = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        close(uniformity(&x, 3, 2, 500.0), -1000.0 + (2.0f64 / 3.0).ln(), 1e-9);
    }

    #[test]
    fn uniformity_across_block_boundaries_matches_naive() {
        // n > BLOCK so several GEMM blocks and a ragged last block are exercised.
        let (n, d) = (600, 5);
        let mut rng = StdRng::seed_from_u64(3);
        let data: Vec<f32> = (0..n * d).map(|_| gauss(&mut rng) as f32).collect();
        let rows = unit_rows(&data, d);
        let x = normalize_rows(&data, d).unwrap();
        close(uniformity(&x, n, d, 2.0), naive_pairs(&rows).1, 1e-10);
    }

    #[test]
    fn alignment_cases() {
        let a = [1.0, 0.0, 0.0, 1.0];
        let neg: Vec<f64> = a.iter().map(|v| -v).collect();
        close(alignment(&a, &a, 2, 2.0), 0.0, 0.0);
        close(alignment(&a, &neg, 2, 2.0), 4.0, 1e-15);
        // e1 vs e2: ||.||² = 2; alpha = 1 gives sqrt(2).
        close(alignment(&a[..2], &a[2..], 2, 1.0), 2.0f64.sqrt(), 1e-15);

        let x = [1.0f32, 2.0, -1.0, 0.5, 3.0, 3.0];
        let b: Vec<f32> = x.iter().map(|v| -3.0 * v).collect();
        let r = anisotropy(emb(&x, 3, 2), Some((emb(&x, 3, 2), emb(&b, 3, 2)))).unwrap();
        close(r.alignment.unwrap(), 4.0, 1e-12);
        let r = anisotropy(emb(&x, 3, 2), Some((emb(&x, 3, 2), emb(&x, 3, 2)))).unwrap();
        close(r.alignment.unwrap(), 0.0, 0.0);
    }

    #[test]
    fn errors() {
        let ok = [1.0f32, 0.0, 0.0, 1.0];
        let err = |x: Embeddings, p| anisotropy(x, p).unwrap_err().to_string();
        assert!(err(emb(&ok[..2], 1, 2), None).contains("at least 2 rows, got 1"));
        assert!(err(emb(&[], 2, 0), None).contains("dim must be positive"));
        assert_eq!(err(emb(&[0.0; 11], 3, 4), None), "embeddings: 3 rows of dim 4 expected 12 values, got 11");
        assert!(err(emb(&[1.0, f32::NAN, 0.0, 1.0], 2, 2), None).contains("non-finite value NaN at row 0, column 1"));
        assert!(err(emb(&[1.0, 0.0, f32::INFINITY, 1.0], 2, 2), None).contains("non-finite value inf at row 1"));
        assert!(err(emb(&[1.0, 0.0, 0.0, 0.0], 2, 2), None).contains("row 1 is a zero vector"));
        let e = err(emb(&ok, 2, 2), Some((emb(&ok, 2, 2), emb(&ok[..2], 1, 2))));
        assert_eq!(e, "pairs: shapes differ, a is 2x2 and b is 1x2");
        let wide = [1.0f32, 0.0, 0.0, 0.0];
        let e = err(emb(&ok, 2, 2), Some((emb(&wide, 1, 4), emb(&wide, 1, 4))));
        assert!(e.contains("dim 4 differs from embeddings dim 2"), "{e}");
        let e = err(emb(&ok, 2, 2), Some((emb(&ok, 2, 2), emb(&[1.0, 0.0, 0.0, 0.0], 2, 2))));
        assert!(e.starts_with("pairs b: row 1 is a zero vector"), "{e}");
        assert!(normalize_rows(&[1.0, 2.0, 3.0], 2).unwrap_err().to_string().contains("not a whole number"));
    }

    /// The held-out geometry against plain loops over the same rows.
    #[test]
    fn held_out_geometry_matches_loops() {
        let mut rng = StdRng::seed_from_u64(4);
        let (n, d) = (30, 6);
        let xd: Vec<f32> = (0..n * d).map(|_| gauss(&mut rng) as f32 + 0.5).collect();
        let yd: Vec<f32> = xd.iter().map(|v| v + 0.3 * gauss(&mut rng) as f32).collect();
        let g = held_out_geometry(emb(&xd, n, d), emb(&yd, n, d), 0.5).unwrap();
        let (xr, yr) = (unit_rows(&xd, d), unit_rows(&yd, d));
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        let uni = |r: &[Vec<f64>]| {
            let (mut s, mut c) = (0.0, 0.0);
            for i in 0..n {
                for j in i + 1..n {
                    s += (-0.5 * (2.0 - 2.0 * dot(&r[i], &r[j]))).exp();
                    c += 1.0;
                }
            }
            (s / c).ln()
        };
        close(g.uniform, (uni(&xr) + uni(&yr)) / 2.0, 1e-9);
        close(g.align, (0..n).map(|i| 2.0 - 2.0 * dot(&xr[i], &yr[i])).sum::<f64>() / n as f64, 1e-9);
        close(g.mean_cos, naive_pairs(&xr).0, 1e-9);
        let closer = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|&(i, j)| i != j && dot(&xr[i], &yr[j]) < dot(&xr[i], &yr[i]))
            .count();
        close(g.pos_auc, closer as f64 / (n * (n - 1)) as f64, 1e-12);
        assert!(g.pos_auc > 0.9, "noisy copies are closest to their own anchor: {}", g.pos_auc);
        assert!(held_out_geometry(emb(&xd, n, d), emb(&yd[..d * 2], 2, d), 0.5).is_err());
    }
}
