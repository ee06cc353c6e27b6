//! L2-penalised logistic regression (binary or multinomial), the SentEval probe classifier.
//!
//! Written by hand because the crate that fits, linfa-logistic 0.8.1 (L-BFGS through argmin on
//! ndarray; +56 crates, ~50 s to build), was too slow for the protocol: on this 2-core machine one
//! binary fit took 2.0–5.4 s at MR size (9596 × 384) and 15–32 s at SST-2 size (67349 × 384),
//! while 10-fold CV with an inner 5-fold search over the penalty grid needs ~400 fits per task.
//! Plain (unpreconditioned) L-BFGS is no better on embedding-like features: their coordinates
//! are strongly correlated, and it hit 500 iterations (5 s) per fit. This one is L-BFGS over f64
//! with nalgebra (GEMMs through matrixmultiply) in coordinates preconditioned by the Hessian at
//! zero (see [`Design::fit`]), warm-started along the penalty path: 3–50 iterations, 0.02–0.3 s
//! per fit at MR/TREC size.
//!
//! Model: features are standardised with the training set's mean and (population) standard
//! deviation; 2 classes use one logit (class 1 against class 0, as sklearn), K > 2 classes use
//! K logits (softmax). Objective: Σᵢ cross-entropy + (λ/2)‖W‖², the bias unpenalised (sklearn's
//! `LogisticRegression(C = 1/λ)`), minimised in the equivalent mean form (divided by n).

use std::collections::VecDeque;

use nalgebra::{DMatrix, DVector};

use crate::error::{Error, Result};

/// L-BFGS memory (pairs kept).
const MEMORY: usize = 10;
/// Iteration cap for one fit.
const MAX_ITER: usize = 500;
/// Stop when every gradient component (mean objective, preconditioned coordinates) is below this.
const GTOL: f64 = 1e-5;
/// ... or when one iteration lowers the mean objective by less than this (relative).
const FTOL: f64 = 1e-10;

/// Per-feature standardisation fitted on training rows (constant features are only centred).
#[derive(Debug, Clone)]
pub struct Scaler {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl Scaler {
    /// Mean and population standard deviation of each column of `rows` (all of equal length).
    pub fn fit(rows: &[&[f32]]) -> Scaler {
        let d = rows.first().map_or(0, |r| r.len());
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0.0; d];
        for r in rows {
            for (m, &v) in mean.iter_mut().zip(*r) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0.0; d];
        for r in rows {
            for ((s, &v), m) in var.iter_mut().zip(*r).zip(&mean) {
                *s += (v as f64 - m).powi(2);
            }
        }
        let inv_std = var
            .iter()
            .map(|s| {
                let sd = (s / n).sqrt();
                if sd > 1e-12 {
                    1.0 / sd
                } else {
                    1.0
                }
            })
            .collect();
        Scaler { mean, inv_std }
    }

    /// The standardised rows as an n × d matrix.
    pub fn transform(&self, rows: &[&[f32]]) -> DMatrix<f64> {
        let d = self.mean.len();
        DMatrix::from_fn(rows.len(), d, |i, j| (rows[i][j] as f64 - self.mean[j]) * self.inv_std[j])
    }
}

/// A standardised training set, ready for fits at several penalties.
#[derive(Debug, Clone)]
pub struct Design {
    x: DMatrix<f64>,
    y: Vec<usize>,
    classes: usize,
    scaler: Scaler,
    /// XᵀX / n of the standardised rows (the preconditioner's base).
    gram: DMatrix<f64>,
}

/// A fitted classifier (weights in standardised feature space, plus the scaler).
#[derive(Debug, Clone)]
pub struct Model {
    w: DMatrix<f64>,
    b: DVector<f64>,
    classes: usize,
    scaler: Scaler,
    /// L-BFGS iterations the fit took.
    pub iterations: usize,
}

/// Number of logit columns fitted: 1 for binary, K otherwise.
fn free(classes: usize) -> usize {
    if classes == 2 {
        1
    } else {
        classes
    }
}

fn check_rows(rows: &[&[f32]], what: &str) -> Result<usize> {
    let d = rows.first().map_or(0, |r| r.len());
    if d == 0 {
        return Err(Error::Invalid(format!("logistic regression: {what} set is empty or has 0 features")));
    }
    if rows.iter().any(|r| r.len() != d) {
        return Err(Error::Invalid(format!("logistic regression: {what} rows differ in length")));
    }
    if rows.iter().any(|r| r.iter().any(|v| !v.is_finite())) {
        return Err(Error::Invalid(format!("logistic regression: {what} rows hold NaN or infinity")));
    }
    Ok(d)
}

impl Design {
    /// Standardise `rows` (labels `y` in `0..classes`, `classes` ≥ 2) with their own statistics.
    pub fn new(rows: &[&[f32]], y: &[usize], classes: usize) -> Result<Design> {
        let d = check_rows(rows, "training")?;
        if rows.len() != y.len() || classes < 2 || y.iter().any(|&c| c >= classes) {
            return Err(Error::Invalid(format!(
                "logistic regression: {} rows, {} labels, labels must lie in 0..{classes} (≥ 2 classes)",
                rows.len(),
                y.len()
            )));
        }
        let scaler = Scaler::fit(rows);
        let x = scaler.transform(rows);
        // XᵀX by blocks of rows, so each product is a GEMM (matrixmultiply).
        let mut gram = DMatrix::zeros(d, d);
        let mut start = 0;
        while start < x.nrows() {
            let block = x.rows(start, (x.nrows() - start).min(1024));
            gram += block.transpose() * block;
            start += 1024;
        }
        gram /= x.nrows() as f64;
        Ok(Design { x, y: y.to_vec(), classes, scaler, gram })
    }

    /// Number of training rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no rows (never true for a constructed design).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Fit at penalty `lambda` (on the summed loss), starting from `init` if given (a model
    /// of the same shape, e.g. the previous penalty on the path), else from zero.
    ///
    /// L-BFGS runs in preconditioned coordinates u = Lᵀw (and √a·b), where LLᵀ = a·XᵀX/n + (λ/n)·I
    /// is the mean objective's Hessian at 0 (a = p(1−p), p = 1/K): the same minimiser, but the optimiser
    /// sees a well-conditioned problem however correlated the features are (embedding
    /// coordinates are; per-feature standardisation does not decorrelate them).
    pub fn fit(&self, lambda: f64, init: Option<&Model>) -> Result<Model> {
        let (d, m) = (self.x.ncols(), free(self.classes));
        let lambda_n = lambda / self.len() as f64;
        let k = self.classes as f64;
        let a = (1.0 - 1.0 / k) / k;
        let mut p = &self.gram * a;
        for i in 0..d {
            p[(i, i)] += lambda_n + 1e-10;
        }
        let l = nalgebra::Cholesky::new(p)
            .ok_or_else(|| Error::Invalid("logistic regression: preconditioner is not positive definite".into()))?
            .unpack();
        let sb = a.sqrt();
        let mut u = DVector::zeros(d * m + m);
        if let Some(init) = init.filter(|p| p.w.shape() == (d, m)) {
            u.rows_mut(0, d * m).copy_from_slice((l.transpose() * &init.w).as_slice());
            u.rows_mut(d * m, m).copy_from(&(&init.b * sb));
        }
        // u -> (w, b); (w, b) gradient -> u gradient.
        let to_wb = |u: &DVector<f64>| {
            let uw = DMatrix::from_column_slice(d, m, &u.as_slice()[..d * m]);
            let w = l.tr_solve_lower_triangular(&uw).unwrap_or(uw);
            (w, u.rows(d * m, m) / sb)
        };
        let (u, iterations) = lbfgs(
            |u, g| {
                let (w, b) = to_wb(u);
                let (f, gw, gb) = self.loss_grad(lambda_n, &w, &b);
                let gu = l.solve_lower_triangular(&gw).unwrap_or(gw);
                g.rows_mut(0, d * m).copy_from_slice(gu.as_slice());
                g.rows_mut(d * m, m).copy_from(&(gb / sb));
                f
            },
            u,
        );
        let (w, b) = to_wb(&u);
        Ok(Model { w, b, classes: self.classes, scaler: self.scaler.clone(), iterations })
    }

    /// Mean penalised cross-entropy at (W, b) and its gradients.
    fn loss_grad(&self, lambda_n: f64, w: &DMatrix<f64>, b: &DVector<f64>) -> (f64, DMatrix<f64>, DVector<f64>) {
        let m = w.ncols();
        let mut r = &self.x * w; // logits, then residuals p - onehot(y)
        let mut loss = 0.0;
        for (i, &yi) in self.y.iter().enumerate() {
            if m == 1 {
                let z = r[(i, 0)] + b[0];
                let t = (yi == 1) as u8 as f64;
                loss += softplus(z) - t * z;
                r[(i, 0)] = sigmoid(z) - t;
            } else {
                let mut top = f64::NEG_INFINITY;
                for k in 0..m {
                    r[(i, k)] += b[k];
                    top = top.max(r[(i, k)]);
                }
                let sum: f64 = (0..m).map(|k| (r[(i, k)] - top).exp()).sum();
                let lse = top + sum.ln();
                loss += lse - r[(i, yi)];
                for k in 0..m {
                    r[(i, k)] = (r[(i, k)] - lse).exp() - (k == yi) as u8 as f64;
                }
            }
        }
        let inv_n = 1.0 / self.len() as f64;
        // XᵀR: GEMM (matrixmultiply) when every dimension exceeds nalgebra's threshold of 5.
        let xr = if m > 5 { (r.transpose() * &self.x).transpose() } else { self.x.tr_mul(&r) };
        let gw = xr * inv_n + w * lambda_n;
        let gb = DVector::from_iterator(m, r.column_iter().map(|c| c.sum() * inv_n));
        (loss * inv_n + 0.5 * lambda_n * w.norm_squared(), gw, gb)
    }
}

impl Model {
    /// Class scores, n × classes (for 2 classes: 0 for class 0, the logit for class 1).
    pub fn logits(&self, rows: &[&[f32]]) -> Result<DMatrix<f64>> {
        if !rows.is_empty() && check_rows(rows, "prediction")? != self.w.nrows() {
            return Err(Error::Invalid(format!(
                "logistic regression: model has {} features, rows have {}",
                self.w.nrows(),
                rows[0].len()
            )));
        }
        let mut z = self.scaler.transform(rows) * &self.w;
        for (k, &bk) in self.b.iter().enumerate() {
            z.column_mut(k).add_scalar_mut(bk);
        }
        if self.classes == 2 {
            z = z.insert_column(0, 0.0);
        }
        Ok(z)
    }

    /// Class probabilities, n × classes.
    pub fn probabilities(&self, rows: &[&[f32]]) -> Result<DMatrix<f64>> {
        let mut z = self.logits(rows)?;
        for mut row in z.row_iter_mut() {
            let top = row.max();
            row.apply(|v| *v = (*v - top).exp());
            let s = row.sum();
            row /= s;
        }
        Ok(z)
    }

    /// Most probable class of each row (the lower class on an exact tie).
    pub fn predict(&self, rows: &[&[f32]]) -> Result<Vec<usize>> {
        let z = self.logits(rows)?;
        Ok(z.row_iter()
            .map(|row| (0..row.len()).fold(0, |best, k| if row[k] > row[best] { k } else { best }))
            .collect())
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// ln(1 + e^z) without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// Minimise `fg` (value; gradient written into its second argument) from `x` by L-BFGS with
/// Armijo backtracking. Returns the minimiser and the iterations taken.
fn lbfgs(mut fg: impl FnMut(&DVector<f64>, &mut DVector<f64>) -> f64, mut x: DVector<f64>) -> (DVector<f64>, usize) {
    let mut g = DVector::zeros(x.len());
    let mut f = fg(&x, &mut g);
    let mut g_new = g.clone();
    let mut pairs: VecDeque<(DVector<f64>, DVector<f64>, f64)> = VecDeque::new();
    for it in 0..MAX_ITER {
        if g.amax() < GTOL {
            return (x, it);
        }
        // Two-loop recursion: dir = -H g.
        let mut q = g.clone();
        let mut alpha = vec![0.0; pairs.len()];
        for (j, (s, y, rho)) in pairs.iter().enumerate().rev() {
            alpha[j] = rho * s.dot(&q);
            q.axpy(-alpha[j], y, 1.0);
        }
        // Initial Hessian γI; 1 at the start (the coordinates are preconditioned).
        let gamma = pairs.back().map_or(1.0, |(s, y, _)| s.dot(y) / y.dot(y));
        q *= gamma;
        for (j, (s, y, rho)) in pairs.iter().enumerate() {
            let beta = rho * y.dot(&q);
            q.axpy(alpha[j] - beta, s, 1.0);
        }
        let mut dir = -q;
        let mut slope = g.dot(&dir);
        if slope >= 0.0 {
            pairs.clear();
            dir = -&g / g.norm().max(1.0);
            slope = g.dot(&dir);
        }
        let mut t = 1.0;
        let (x_new, f_new) = loop {
            let cand = &x + t * &dir;
            let fc = fg(&cand, &mut g_new);
            if fc <= f + 1e-4 * t * slope {
                break (cand, fc);
            }
            t *= 0.5;
            if t < 1e-12 {
                return (x, it);
            }
        };
        let s = &x_new - &x;
        let y = &g_new - &g;
        let sy = s.dot(&y);
        if sy > 1e-12 * y.norm_squared() && sy > 0.0 {
            if pairs.len() == MEMORY {
                pairs.pop_front();
            }
            pairs.push_back((s, y, 1.0 / sy));
        }
        let decrease = f - f_new;
        x = x_new;
        f = f_new;
        std::mem::swap(&mut g, &mut g_new);
        if decrease <= FTOL * f.abs().max(1.0) {
            return (x, it + 1);
        }
    }
    (x, MAX_ITER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn as_rows(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(|r| r.as_slice()).collect()
    }

    /// Gaussian-ish blobs around `k` random centres, `gap` apart on average.
    fn blobs(n: usize, d: usize, k: usize, gap: f32, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..k).map(|_| (0..d).map(|_| rng.gen_range(-gap..gap)).collect()).collect();
        let y: Vec<usize> = (0..n).map(|i| i % k).collect();
        let x = y.iter().map(|&c| centres[c].iter().map(|m| m + rng.gen_range(-1.0f32..1.0)).collect()).collect();
        (x, y)
    }

    #[test]
    fn separable_data_is_learned() {
        for k in [2, 4] {
            let (x, y) = blobs(600, 10, k, 3.0, 7 + k as u64);
            let design = Design::new(&as_rows(&x), &y, k).unwrap();
            let model = design.fit(0.01, None).unwrap();
            let pred = model.predict(&as_rows(&x)).unwrap();
            let acc = crate::eval::stats::accuracy(&pred, &y);
            assert!(acc > 0.995, "k={k}: accuracy {acc}");
            let (xt, yt) = blobs(300, 10, k, 3.0, 7 + k as u64); // same centres, new noise
            let acc = crate::eval::stats::accuracy(&model.predict(&as_rows(&xt)).unwrap(), &yt);
            assert!(acc > 0.98, "k={k}: held-out accuracy {acc}");
        }
    }

    /// Two classes, one feature: compare with an independent Newton solve of
    /// Σ softplus(z) − t·z + λ/2·w², z = w·s + c, on the standardised feature s.
    #[test]
    fn one_feature_matches_newton() {
        let x: Vec<f32> = vec![-2.0, -1.5, -0.3, 0.1, 0.4, 1.0, 1.2, 2.5, 3.0, -0.8, 0.2, 1.7];
        let t: Vec<usize> = vec![0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0];
        let lambda = 0.7;
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let sd = (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let s: Vec<f64> = x.iter().map(|&v| (v as f64 - mean) / sd).collect();
        let (mut w, mut c) = (0.0f64, 0.0f64);
        for _ in 0..50 {
            let (mut gw, mut gc, mut hww, mut hwc, mut hcc) = (lambda * w, 0.0, lambda, 0.0, 0.0);
            for (si, &ti) in s.iter().zip(&t) {
                let p = 1.0 / (1.0 + (-(w * si + c)).exp());
                let r = p - ti as f64;
                let h = p * (1.0 - p);
                gw += r * si;
                gc += r;
                hww += h * si * si;
                hwc += h * si;
                hcc += h;
            }
            let det = hww * hcc - hwc * hwc;
            w -= (hcc * gw - hwc * gc) / det;
            c -= (hww * gc - hwc * gw) / det;
        }
        let rows: Vec<Vec<f32>> = x.iter().map(|&v| vec![v]).collect();
        let model = Design::new(&as_rows(&rows), &t, 2).unwrap().fit(lambda, None).unwrap();
        assert!((model.w[(0, 0)] - w).abs() < 1e-4, "w {} vs Newton {w}", model.w[(0, 0)]);
        assert!((model.b[0] - c).abs() < 1e-4, "b {} vs Newton {c}", model.b[0]);
        let p = model.probabilities(&as_rows(&rows)).unwrap();
        for (i, si) in s.iter().enumerate() {
            let want = 1.0 / (1.0 + (-(w * si + c)).exp());
            assert!((p[(i, 1)] - want).abs() < 1e-5 && (p[(i, 0)] + p[(i, 1)] - 1.0).abs() < 1e-12);
        }
    }

    /// Multinomial: the gradient of an independently written objective, by central finite
    /// differences, vanishes at the fitted parameters, also with nearly collinear features.
    #[test]
    fn multinomial_optimum_has_zero_gradient() {
        let (x, y) = blobs(90, 3, 3, 0.8, 3);
        let x: Vec<Vec<f32>> = x.iter().map(|r| vec![r[0], r[0] + 0.02 * r[1], 100.0 * r[2]]).collect();
        let lambda = 2.0;
        let model = Design::new(&as_rows(&x), &y, 3).unwrap().fit(lambda, None).unwrap();
        let z = model.scaler.transform(&as_rows(&x));
        // Objective over p = (W row-major 3x3 | b 3), written without the library code.
        let objective = |p: &[f64]| -> f64 {
            let mut total = 0.0;
            for i in 0..y.len() {
                let logit: Vec<f64> =
                    (0..3).map(|k| (0..3).map(|j| z[(i, j)] * p[j * 3 + k]).sum::<f64>() + p[9 + k]).collect();
                let lse = logit.iter().map(|v| v.exp()).sum::<f64>().ln();
                total += lse - logit[y[i]];
            }
            total + 0.5 * lambda * p[..9].iter().map(|v| v * v).sum::<f64>()
        };
        let mut p: Vec<f64> = (0..3).flat_map(|j| (0..3).map(move |k| (j, k))).map(|(j, k)| model.w[(j, k)]).collect();
        p.extend(model.b.iter());
        let h = 1e-5;
        for q in 0..p.len() {
            let (mut up, mut dn) = (p.clone(), p.clone());
            up[q] += h;
            dn[q] -= h;
            let g = (objective(&up) - objective(&dn)) / (2.0 * h);
            assert!(g.abs() < 2e-3, "component {q}: gradient {g}");
        }
        // A stronger penalty shrinks the weights.
        let strong = Design::new(&as_rows(&x), &y, 3).unwrap().fit(100.0, Some(&model)).unwrap();
        assert!(strong.w.norm() < model.w.norm());
    }

    #[test]
    fn bad_input_is_an_error() {
        let rows = vec![vec![1.0f32, 2.0], vec![3.0]];
        assert!(Design::new(&as_rows(&rows), &[0, 1], 2).is_err());
        let rows = vec![vec![1.0f32], vec![3.0]];
        assert!(Design::new(&as_rows(&rows), &[0, 2], 2).is_err());
        assert!(Design::new(&as_rows(&rows), &[0], 2).is_err());
        let model = Design::new(&as_rows(&rows), &[0, 1], 2).unwrap().fit(1.0, None).unwrap();
        assert!(model.predict(&[&[1.0f32, 2.0][..]]).is_err());
    }
}
