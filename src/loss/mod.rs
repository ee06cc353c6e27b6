//! Losses on L2-normalised embeddings: alignment, uniformity (Wang & Isola 2020) and
//! symmetric InfoNCE as the baseline. Pure tensor functions.

pub mod objective;

use candle_core::{Result, Tensor, D};

/// `mean_i ||x_i - y_i||^alpha`.
///
/// # Shapes
/// `x`, `y`: [n, d] unit rows -> scalar.
pub fn align(x: &Tensor, y: &Tensor, alpha: f64) -> Result<Tensor> {
    let sq = (x - y)?.sqr()?.sum(1)?;
    // ||.||^2 needs no root: keeps the gradient finite at zero distance.
    let d = if alpha == 2.0 { sq } else { sq.powf(alpha / 2.0)? };
    d.mean_all()
}

/// Squared distances `2 - 2 x xᵀ` between unit rows, clamped at 0. [n, d] -> [n, n].
fn sq_dists(x: &Tensor) -> Result<Tensor> {
    let sims = x.matmul(&x.t()?)?;
    (1.0 - sims)?.affine(2.0, 0.0)?.relu()
}

/// Ones off the diagonal, zeros on it. [n, n].
fn off_diagonal(n: usize, x: &Tensor) -> Result<Tensor> {
    let eye = Tensor::eye(n, x.dtype(), x.device())?;
    1.0 - eye
}

/// `log mean_{i != j} exp(-t ||x_i - x_j||^2)`; self-pairs excluded as in the reference code.
/// 0 means collapse; more negative is more uniform.
///
/// # Shapes
/// `x`: [n, d] unit rows with n >= 2 -> scalar.
pub fn uniform(x: &Tensor, t: f64) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n < 2 {
        candle_core::bail!("uniformity needs at least 2 embeddings, got {n}")
    }
    let kernel = (sq_dists(x)? * -t)?.exp()?;
    let total = (kernel * off_diagonal(n, x)?)?.sum_all()?;
    (total / (n * (n - 1)) as f64)?.log()
}

/// Symmetric InfoNCE: cross-entropy of `x yᵀ / tau` towards the diagonal, both directions.
/// With hard negatives `neg`, each anchor's candidates are every positive and every hard
/// negative (`x [y; neg]ᵀ / tau`, SimCSE's supervised form); each positive's candidates stay
/// the anchors.
///
/// # Shapes
/// `x`, `y`, `neg`: [n, d] unit rows -> scalar.
pub fn infonce(x: &Tensor, y: &Tensor, neg: Option<&Tensor>, tau: f64) -> Result<Tensor> {
    let n = x.dim(0)?;
    let logits = (x.matmul(&y.t()?)? / tau)?;
    let eye = Tensor::eye(n, x.dtype(), x.device())?;
    let xent = |l: &Tensor| -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(l, D::Minus1)?.narrow(1, 0, n)?;
        (logp * &eye)?.sum_all()? / (-(n as f64))
    };
    let forward = match neg {
        Some(neg) => xent(&Tensor::cat(&[&logits, &(x.matmul(&neg.t()?)? / tau)?], 1)?)?,
        None => xent(&logits)?,
    };
    (forward + xent(&logits.t()?)?)? / 2.0
}

/// Relational distillation: each row's softmax over its similarities to the other rows
/// (`z zᵀ / tau`, self excluded), the student's pulled towards the teacher's by
/// `mean_i KL(teacher_i || student_i)`. Only similarity *differences* within a row count, so a
/// shared offset (the cone) is neither copied nor protected: another term may remove it.
/// With `standardize`, each row's similarities are first z-scored over the other rows, so the
/// *scale* of the differences is free too: a student may spread the space (which stretches
/// every row's similarities) and still match the teacher exactly.
///
/// # Shapes
/// `student`, `teacher`: [n, d] unit rows with n >= 2 (3 when standardising) -> scalar; no
/// gradient reaches `teacher`.
pub fn distill(student: &Tensor, teacher: &Tensor, tau: f64, standardize: bool) -> Result<Tensor> {
    let n = student.dim(0)?;
    let least = if standardize { 3 } else { 2 };
    if n < least {
        candle_core::bail!("distillation needs at least {least} embeddings, got {n}")
    }
    // A finite large negative keeps the diagonal out of the softmax in any dtype (no -inf).
    let self_mask = (Tensor::eye(n, student.dtype(), student.device())? * -1e4)?;
    let others = off_diagonal(n, student)?;
    let log_probs = |z: &Tensor| -> Result<Tensor> {
        let mut sims = z.matmul(&z.t()?)?;
        if standardize {
            sims = row_zscores(&sims, &others)?;
        }
        candle_nn::ops::log_softmax(&((sims / tau)? + &self_mask)?, D::Minus1)
    };
    let (ls, lt) = (log_probs(student)?, log_probs(&teacher.detach())?);
    (lt.exp()? * (lt - ls)?)?.sum_all()? / n as f64
}

/// Similarity correlation: `1 - r`, with r the Pearson correlation between the student's and
/// the teacher's cosine similarities over all pairs of distinct rows. Blind to any affine map
/// of the similarities as a whole (a stretch and a shared offset: spreading the space is free)
/// but, unlike a row-wise softmax, not to one sentence being closer to all the others than
/// another sentence is, which is what a cone's norms of deviation from its axis encode.
///
/// # Shapes
/// `student`, `teacher`: [n, d] unit rows with n >= 3 -> scalar in [0, 2]; no gradient
/// reaches `teacher`.
pub fn sim_corr(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let n = student.dim(0)?;
    if n < 3 {
        candle_core::bail!("similarity correlation needs at least 3 embeddings, got {n}")
    }
    let others = off_diagonal(n, student)?;
    let pairs = (n * (n - 1)) as f64;
    let standardized = |z: &Tensor| -> Result<Tensor> {
        let sims = z.matmul(&z.t()?)?;
        let mean = ((&sims * &others)?.sum_all()? / pairs)?;
        let centered = (sims.broadcast_sub(&mean)? * &others)?;
        let sd = ((centered.sqr()?.sum_all()? / pairs)? + 1e-12)?.sqrt()?;
        centered.broadcast_div(&sd)
    };
    let r = ((standardized(student)? * standardized(&teacher.detach())?)?.sum_all()? / pairs)?;
    1.0 - r
}

/// Each row of `sims` [n, n] standardised over the entries where `others` is 1 (zero mean,
/// unit variance); the other entries become 0.
fn row_zscores(sims: &Tensor, others: &Tensor) -> Result<Tensor> {
    let k = others.sum_keepdim(1)?;
    let mean = ((sims * others)?.sum_keepdim(1)? / &k)?;
    let centered = (sims.broadcast_sub(&mean)? * others)?;
    let var = (centered.sqr()?.sum_keepdim(1)? / &k)?;
    // The epsilon keeps a row of equal similarities finite (its z-scores are then all 0).
    centered.broadcast_div(&(var + 1e-12)?.sqrt()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::pooling::l2_normalize;
    use candle_core::{DType, Device, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    pub(crate) fn unit_rows(rng: &mut StdRng, n: usize, d: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| {
                let v: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                v.iter().map(|a| a / norm).collect()
            })
            .collect()
    }

    pub(crate) fn tensor(rows: &[Vec<f64>]) -> Tensor {
        Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn sqdist(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }

    // Independent references: plain loops over pairs, as in the paper's definitions.
    pub(crate) fn ref_align(x: &[Vec<f64>], y: &[Vec<f64>], alpha: f64) -> f64 {
        x.iter().zip(y).map(|(a, b)| sqdist(a, b).sqrt().powf(alpha)).sum::<f64>() / x.len() as f64
    }
    pub(crate) fn ref_uniform(x: &[Vec<f64>], t: f64) -> f64 {
        let (mut s, mut c) = (0.0, 0.0);
        for i in 0..x.len() {
            for j in i + 1..x.len() {
                s += (-t * sqdist(&x[i], &x[j])).exp();
                c += 1.0;
            }
        }
        (s / c).ln()
    }
    pub(crate) fn ref_infonce(x: &[Vec<f64>], y: &[Vec<f64>], tau: f64) -> f64 {
        let n = x.len();
        let dir = |a: &[Vec<f64>], b: &[Vec<f64>]| {
            (0..n)
                .map(|i| {
                    let lse = (0..n).map(|j| (dot(&a[i], &b[j]) / tau).exp()).sum::<f64>().ln();
                    lse - dot(&a[i], &b[i]) / tau
                })
                .sum::<f64>()
                / n as f64
        };
        (dir(x, y) + dir(y, x)) / 2.0
    }

    /// InfoNCE's anchor-to-positive direction alone.
    fn ref_infonce_dir(x: &[Vec<f64>], y: &[Vec<f64>], tau: f64) -> f64 {
        let n = x.len();
        (0..n)
            .map(|i| (0..n).map(|j| (dot(&x[i], &y[j]) / tau).exp()).sum::<f64>().ln() - dot(&x[i], &y[i]) / tau)
            .sum::<f64>()
            / n as f64
    }

    pub(crate) fn ref_distill(s: &[Vec<f64>], t: &[Vec<f64>], tau: f64, standardize: bool) -> f64 {
        let n = s.len();
        let row = |z: &[Vec<f64>], i: usize| -> Vec<f64> {
            let mut sims: Vec<f64> = (0..n).map(|j| dot(&z[i], &z[j])).collect();
            if standardize {
                let others = (0..n).filter(|&j| j != i);
                let mean = others.clone().map(|j| sims[j]).sum::<f64>() / (n - 1) as f64;
                let sd = (others.map(|j| (sims[j] - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
                sims.iter_mut().for_each(|v| *v = (*v - mean) / sd);
            }
            let e: Vec<f64> = (0..n).map(|j| if j == i { 0.0 } else { (sims[j] / tau).exp() }).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        };
        (0..n)
            .map(|i| {
                let (p, q) = (row(t, i), row(s, i));
                (0..n).filter(|&j| j != i).map(|j| p[j] * (p[j] / q[j]).ln()).sum::<f64>()
            })
            .sum::<f64>()
            / n as f64
    }

    #[test]
    fn losses_match_pairwise_loops() {
        let mut rng = StdRng::seed_from_u64(7);
        let (x, y) = (unit_rows(&mut rng, 6, 5), unit_rows(&mut rng, 6, 5));
        let (tx, ty) = (tensor(&x), tensor(&y));
        for alpha in [2.0, 1.0, 3.0] {
            let got = align(&tx, &ty, alpha).unwrap().to_scalar::<f64>().unwrap();
            assert!((got - ref_align(&x, &y, alpha)).abs() < 1e-9, "alpha {alpha}");
        }
        for t in [2.0, 5.0] {
            let got = uniform(&tx, t).unwrap().to_scalar::<f64>().unwrap();
            assert!((got - ref_uniform(&x, t)).abs() < 1e-9, "t {t}");
        }
        let got = infonce(&tx, &ty, None, 0.05).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - ref_infonce(&x, &y, 0.05)).abs() < 1e-9);
        // Hard negatives: each anchor's denominator also sums over every negative; the
        // positives' direction is unchanged.
        let neg = unit_rows(&mut rng, 6, 5);
        let got = infonce(&tx, &ty, Some(&tensor(&neg)), 0.1).unwrap().to_scalar::<f64>().unwrap();
        let tau = 0.1;
        let forward = (0..6)
            .map(|i| {
                let all = (0..6).map(|j| (dot(&x[i], &y[j]) / tau).exp() + (dot(&x[i], &neg[j]) / tau).exp());
                all.sum::<f64>().ln() - dot(&x[i], &y[i]) / tau
            })
            .sum::<f64>()
            / 6.0;
        let backward = 2.0 * ref_infonce(&x, &y, tau) - ref_infonce_dir(&x, &y, tau);
        assert!((got - (forward + backward) / 2.0).abs() < 1e-9, "{got}");
        for (tau, z) in [(0.05, false), (0.5, false), (0.5, true), (2.0, true)] {
            let got = distill(&tx, &ty, tau, z).unwrap().to_scalar::<f64>().unwrap();
            assert!((got - ref_distill(&x, &y, tau, z)).abs() < 1e-9, "tau {tau} standardize {z}");
        }
    }

    /// Distillation is zero when the student's rows are the teacher's, and blind to a shared
    /// similarity offset: only how a row ranks the others matters.
    #[test]
    fn distill_known_answers() {
        let mut rng = StdRng::seed_from_u64(5);
        let x = tensor(&unit_rows(&mut rng, 7, 4));
        assert!(distill(&x, &x, 0.1, false).unwrap().to_scalar::<f64>().unwrap().abs() < 1e-12);
        // An orthonormal teacher makes every row's target uniform over the others; a student
        // whose rows all have cosine c with each other matches it for any c.
        let eye = Tensor::eye(4, DType::F64, &Device::Cpu).unwrap();
        let c: f64 = 0.6;
        let (a, b) = ((c).sqrt(), (1.0 - c).sqrt());
        let cone: Vec<Vec<f64>> = (0..4)
            .map(|i| {
                (0..5)
                    .map(|j| {
                        if j == 0 {
                            a
                        } else if j == i + 1 {
                            b
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let got = distill(&tensor(&cone), &eye, 0.05, false).unwrap().to_scalar::<f64>().unwrap();
        assert!(got.abs() < 1e-9, "cone student vs orthonormal teacher: {got}");
        assert!(distill(&tensor(&[vec![1.0, 0.0]]), &tensor(&[vec![1.0, 0.0]]), 0.1, false).is_err());
        let two = tensor(&unit_rows(&mut rng, 2, 3));
        assert!(distill(&two, &two, 0.1, true).is_err());
    }

    /// Standardised distillation is blind to the scale of the differences too: a teacher and
    /// its centred, renormalised copy (the cone removed, every similarity stretched) match
    /// exactly when the rows' deviations from the shared direction have equal norms, while the
    /// raw version charges for the stretch.
    #[test]
    fn standardized_distill_ignores_spreading() {
        let mut rng = StdRng::seed_from_u64(9);
        let dev = unit_rows(&mut rng, 8, 6);
        // Teacher: a shared axis plus unit deviations in the other six coordinates.
        let (a, b) = (0.8f64, 0.6f64);
        let teacher: Vec<Vec<f64>> =
            dev.iter().map(|d| std::iter::once(a).chain(d.iter().map(|v| b * v)).collect()).collect();
        let spread: Vec<Vec<f64>> =
            dev.iter().map(|d| std::iter::once(0.0).chain(d.iter().copied()).collect()).collect();
        let (t, s) = (tensor(&teacher), tensor(&spread));
        let z = distill(&s, &t, 0.5, true).unwrap().to_scalar::<f64>().unwrap();
        assert!(z.abs() < 1e-9, "standardised: {z}");
        let raw = distill(&s, &t, 0.05, false).unwrap().to_scalar::<f64>().unwrap();
        assert!(raw > 0.1, "raw distillation should charge for the stretch: {raw}");
        let c = sim_corr(&s, &t).unwrap().to_scalar::<f64>().unwrap();
        assert!(c.abs() < 1e-9, "similarity correlation: {c}");
    }

    /// The similarity correlation against a direct Pearson correlation, and its known answers:
    /// 0 for the teacher itself, 2 for exactly reversed similarities.
    #[test]
    fn sim_corr_is_one_minus_pearson() {
        let mut rng = StdRng::seed_from_u64(13);
        let (s, t) = (unit_rows(&mut rng, 7, 4), unit_rows(&mut rng, 7, 4));
        let offdiag = |z: &[Vec<f64>]| -> Vec<f64> {
            (0..7)
                .flat_map(|i| (0..7).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| dot(&z[i], &z[j]))
                .collect()
        };
        let (a, b) = (offdiag(&s), offdiag(&t));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (ma, mb) = (mean(&a), mean(&b));
        let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let sd = |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>().sqrt();
        let want = 1.0 - cov / (sd(&a, ma) * sd(&b, mb));
        let got = sim_corr(&tensor(&s), &tensor(&t)).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(sim_corr(&tensor(&t), &tensor(&t)).unwrap().to_scalar::<f64>().unwrap().abs() < 1e-9);
        // Four points on a circle at 0, 60, 120 and 180 degrees: sims 0.5, -0.5, -1 / 0.5, -0.5 / 0.5.
        // Swapping which sentence is which (0 <-> 1) changes the structure: the loss sees it.
        let deg = |a: f64| vec![a.to_radians().cos(), a.to_radians().sin()];
        let arc: Vec<Vec<f64>> = [0.0, 60.0, 120.0, 180.0].map(deg).to_vec();
        let swapped: Vec<Vec<f64>> = [60.0, 0.0, 120.0, 180.0].map(deg).to_vec();
        let r = sim_corr(&tensor(&arc), &tensor(&swapped)).unwrap().to_scalar::<f64>().unwrap();
        assert!(r > 0.1, "a relabelled structure: {r}");
        assert!(sim_corr(&tensor(&t[..2]), &tensor(&t[..2])).is_err());
    }

    /// The training loss and the report's metric are two implementations of one definition:
    /// they agree on the same rows (and so the log's `val_uniform` and the report can be compared).
    #[test]
    fn loss_uniform_and_alignment_equal_the_report_metrics() {
        let mut rng = StdRng::seed_from_u64(21);
        let (x, y) = (unit_rows(&mut rng, 40, 7), unit_rows(&mut rng, 40, 7));
        let flat = |r: &[Vec<f64>]| r.concat();
        for t in [0.5, 2.0, 5.0] {
            let ours = uniform(&tensor(&x), t).unwrap().to_scalar::<f64>().unwrap();
            let metric = crate::metrics::uniformity(&flat(&x), 40, 7, t);
            assert!((ours - metric).abs() < 1e-9, "t {t}: loss {ours} vs metric {metric}");
        }
        let ours = align(&tensor(&x), &tensor(&y), 2.0).unwrap().to_scalar::<f64>().unwrap();
        let metric = crate::metrics::alignment(&flat(&x), &flat(&y), 7, 2.0);
        assert!((ours - metric).abs() < 1e-9, "alignment: loss {ours} vs metric {metric}");
    }

    #[test]
    fn limits_are_right() {
        // Identical embeddings: alignment 0, uniformity 0 (collapse).
        let same = tensor(&[vec![0.6, 0.8], vec![0.6, 0.8], vec![0.6, 0.8]]);
        assert!(align(&same, &same, 2.0).unwrap().to_scalar::<f64>().unwrap().abs() < 1e-12);
        assert!(uniform(&same, 2.0).unwrap().to_scalar::<f64>().unwrap().abs() < 1e-12);
        // Two antipodal points: distance^2 = 4, so uniformity = -4t.
        let anti = tensor(&[vec![1.0, 0.0], vec![-1.0, 0.0]]);
        let u = uniform(&anti, 2.0).unwrap().to_scalar::<f64>().unwrap();
        assert!((u + 8.0).abs() < 1e-9);
        assert!(uniform(&tensor(&[vec![1.0, 0.0]]), 2.0).is_err());
    }

    /// Gradients of each loss, through L2 normalisation, against central finite differences.
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(3);
        let raw: Vec<Vec<f64>> = (0..5).map(|_| (0..4).map(|_| rng.gen_range(-1.0..1.0)).collect()).collect();
        let other = unit_rows(&mut rng, 5, 4);
        let ty = tensor(&other);
        type LossFn<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
        let losses: Vec<(&str, LossFn)> = vec![
            ("align", Box::new(|x: &Tensor| align(&l2_normalize(x)?, &ty, 2.0))),
            ("align1", Box::new(|x: &Tensor| align(&l2_normalize(x)?, &ty, 1.0))),
            ("uniform", Box::new(|x: &Tensor| uniform(&l2_normalize(x)?, 2.0))),
            ("infonce", Box::new(|x: &Tensor| infonce(&l2_normalize(x)?, &ty, None, 0.1))),
            ("distill", Box::new(|x: &Tensor| distill(&l2_normalize(x)?, &ty, 0.1, false))),
            ("distill_z", Box::new(|x: &Tensor| distill(&l2_normalize(x)?, &ty, 0.5, true))),
            ("simcorr", Box::new(|x: &Tensor| sim_corr(&l2_normalize(x)?, &ty))),
        ];
        for (name, f) in losses {
            let var = Var::new(raw.clone(), &Device::Cpu).unwrap();
            let grads = f(var.as_tensor()).unwrap().backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            let h = 1e-6;
            for i in 0..raw.len() {
                for j in 0..raw[0].len() {
                    let eval = |delta: f64| {
                        let mut m = raw.clone();
                        m[i][j] += delta;
                        f(&tensor(&m)).unwrap().to_scalar::<f64>().unwrap()
                    };
                    let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                    assert!((numeric - g[i][j]).abs() < 1e-6, "{name} [{i},{j}]: fd {numeric} vs autograd {}", g[i][j]);
                }
            }
        }
    }
}
