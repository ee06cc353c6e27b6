//! The SentEval evaluation protocols: stratified folds, penalty selection, CV and train/test runs.
//!
//! Kept apart from the loaders and the classifier so each protocol is a few lines that read like
//! the paper's description. Independent fits (outer folds, inner folds) run on all cores with
//! scoped threads; results do not depend on the thread count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::logreg::{Design, Model};
use super::stats::accuracy;
use crate::error::{Error, Result};

/// L2 penalties λ on the summed cross-entropy (sklearn C = 1/λ) searched: 4⁻¹..4⁶, strongest
/// first (the order of the warm-started path; ties go to the stronger penalty). On standardised
/// features this spans almost unregularised (¼) to strongly shrunk (4096; MRPC's 1536 pair
/// features on 4076 pairs need it). SentEval's sklearn grid C ∈ 2⁻²..2³ corresponds to
/// λ ≈ 50..1500 here on raw unit-norm 384-d embeddings (coordinate sd ≈ 0.05).
pub const PENALTIES: [f64; 8] = [4096.0, 1024.0, 256.0, 64.0, 16.0, 4.0, 1.0, 0.25];
/// Penalty used without a search (quick mode).
pub const QUICK_PENALTY: f64 = 16.0;
/// Outer folds of the cross-validated tasks (MR, CR, SUBJ, MPQA).
pub const OUTER_FOLDS: usize = 10;
/// Folds of every penalty search by cross-validation.
pub const INNER_FOLDS: usize = 5;

/// Fold number (0..k) of each example: within each class, a seeded shuffle dealt round-robin,
/// the deal continuing across classes, so every fold holds ⌊n_c/k⌋ or ⌈n_c/k⌉ of class c and
/// fold sizes differ by at most one.
pub fn stratified_folds(y: &[usize], k: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let classes = y.iter().max().map_or(0, |m| m + 1);
    let mut fold = vec![0; y.len()];
    let mut next = 0;
    for c in 0..classes {
        let mut members: Vec<usize> = (0..y.len()).filter(|&i| y[i] == c).collect();
        members.shuffle(&mut rng);
        for i in members {
            fold[i] = next % k.max(1);
            next += 1;
        }
    }
    fold
}

/// `k`-fold CV needs 2 ≤ k ≤ number of examples.
fn check_k(k: usize, n: usize) -> Result<()> {
    if k < 2 || n < k {
        return Err(Error::Invalid(format!("{k}-fold cross-validation on {n} examples")));
    }
    Ok(())
}

/// Seed of sub-problem `i` of a run seeded with `seed`.
fn subseed(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn pick<T: Copy>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i]).collect()
}

/// (Indices outside fold `f`, indices in it): training and held-out parts.
fn split(fold: &[usize], f: usize) -> (Vec<usize>, Vec<usize>) {
    (0..fold.len()).partition(|&i| fold[i] != f)
}

thread_local! {
    static IN_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` over `jobs` on up to `available_parallelism` threads (sequentially when already inside
/// a worker), results in job order; `done(i)` is called on this thread as job `i` finishes.
fn par_map<T: Sync, R: Send>(jobs: &[T], f: impl Fn(&T) -> R + Sync, done: &mut dyn FnMut(usize)) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len());
    if threads <= 1 || IN_WORKER.with(|w| w.get()) {
        return jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let r = f(j);
                done(i);
                r
            })
            .collect();
    }
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, f) = (&next, &f);
            s.spawn(move || {
                IN_WORKER.with(|w| w.set(true));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs.len() || tx.send((i, f(&jobs[i]))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut out: Vec<Option<R>> = (0..jobs.len()).map(|_| None).collect();
        for (i, r) in rx {
            out[i] = Some(r);
            done(i);
        }
        out.into_iter().flatten().collect()
    })
}

/// Fit the whole penalty grid on `train`, each fit warm-started from the previous (stronger) one.
fn path(train: &Design) -> Result<Vec<Model>> {
    let mut models: Vec<Model> = Vec::with_capacity(PENALTIES.len());
    for &lambda in &PENALTIES {
        let m = train.fit(lambda, models.last())?;
        models.push(m);
    }
    Ok(models)
}

/// Mean validation accuracy of each penalty in [`PENALTIES`] by stratified `k`-fold CV on
/// (`rows`, `y`); each training fold is standardised with its own statistics.
pub fn cv_penalties(rows: &[&[f32]], y: &[usize], classes: usize, k: usize, seed: u64) -> Result<Vec<f64>> {
    check_k(k, y.len())?;
    let fold = stratified_folds(y, k, seed);
    let folds: Vec<usize> = (0..k).collect();
    let per_fold = par_map(
        &folds,
        |&f| -> Result<Vec<f64>> {
            let (tr, va) = split(&fold, f);
            let design = Design::new(&pick(rows, &tr), &pick(y, &tr), classes)?;
            let (vx, vy) = (pick(rows, &va), pick(y, &va));
            path(&design)?.iter().map(|m| Ok(accuracy(&m.predict(&vx)?, &vy))).collect()
        },
        &mut |_| {},
    );
    let mut mean = vec![0.0; PENALTIES.len()];
    for accs in per_fold {
        for (m, a) in mean.iter_mut().zip(accs?) {
            *m += a / k as f64;
        }
    }
    Ok(mean)
}

/// Index of the best score (the first, i.e. strongest penalty, on ties).
fn best(scores: &[f64]) -> usize {
    (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b })
}

/// How a train/test protocol picks its penalty.
pub enum Penalty<'a> {
    /// Use this λ.
    Fixed(f64),
    /// Stratified k-fold CV on the training set.
    KFold(usize),
    /// Accuracy on a development set (rows, labels).
    Dev(&'a [&'a [f32]], &'a [usize]),
}

/// Outcome of one train/test run.
#[derive(Debug, Clone)]
pub struct Fit {
    /// Test predictions.
    pub pred: Vec<usize>,
    /// The penalty used.
    pub lambda: f64,
    /// Selection accuracy (CV or dev, as a fraction) of that penalty; None for `Fixed`.
    pub dev_accuracy: Option<f64>,
}

/// Choose λ as `select` says, refit on the whole training set with it, predict `test`.
pub fn train_test(
    train: &[&[f32]],
    y: &[usize],
    classes: usize,
    test: &[&[f32]],
    select: Penalty,
    seed: u64,
) -> Result<Fit> {
    let design = Design::new(train, y, classes)?;
    let (model, lambda, dev_accuracy) = match select {
        Penalty::Fixed(lambda) => (design.fit(lambda, None)?, lambda, None),
        Penalty::KFold(k) => {
            let scores = cv_penalties(train, y, classes, k, seed)?;
            let b = best(&scores);
            (design.fit(PENALTIES[b], None)?, PENALTIES[b], Some(scores[b]))
        }
        Penalty::Dev(dx, dy) => {
            let models = path(&design)?;
            let scores = models.iter().map(|m| Ok(accuracy(&m.predict(dx)?, dy))).collect::<Result<Vec<f64>>>()?;
            let b = best(&scores);
            let model = models.into_iter().nth(b).ok_or_else(|| Error::Invalid("empty penalty grid".into()))?;
            (model, PENALTIES[b], Some(scores[b]))
        }
    };
    Ok(Fit { pred: model.predict(test)?, lambda, dev_accuracy })
}

/// Outcome of a cross-validated task.
#[derive(Debug, Clone)]
pub struct CvOutcome {
    /// Mean test-fold accuracy (fraction).
    pub accuracy: f64,
    /// Mean over outer folds of the inner-CV accuracy of the chosen penalty (None without search).
    pub dev_accuracy: Option<f64>,
    /// Penalty chosen on each outer fold.
    pub lambdas: Vec<f64>,
}

/// Stratified `k`-fold CV; on each training fold λ is chosen by inner stratified
/// `inner`-fold CV (or fixed to [`QUICK_PENALTY`] when `inner` is None), the model refitted on
/// the training fold and scored on the held-out fold. `done(f)` reports finished folds.
pub fn cross_validate(
    rows: &[&[f32]],
    y: &[usize],
    classes: usize,
    k: usize,
    inner: Option<usize>,
    seed: u64,
    done: &mut dyn FnMut(usize),
) -> Result<CvOutcome> {
    check_k(k, y.len())?;
    let fold = stratified_folds(y, k, seed);
    let folds: Vec<usize> = (0..k).collect();
    let fits = par_map(
        &folds,
        |&f| -> Result<(f64, Fit)> {
            let (tr, te) = split(&fold, f);
            let select = inner.map_or(Penalty::Fixed(QUICK_PENALTY), Penalty::KFold);
            let fit = train_test(&pick(rows, &tr), &pick(y, &tr), classes, &pick(rows, &te), select, subseed(seed, f))?;
            Ok((accuracy(&fit.pred, &pick(y, &te)), fit))
        },
        done,
    );
    let fits = fits.into_iter().collect::<Result<Vec<_>>>()?;
    let kf = fits.len().max(1) as f64;
    Ok(CvOutcome {
        accuracy: fits.iter().map(|(a, _)| a).sum::<f64>() / kf,
        dev_accuracy: inner.map(|_| fits.iter().filter_map(|(_, f)| f.dev_accuracy).sum::<f64>() / kf),
        lambdas: fits.iter().map(|(_, f)| f.lambda).collect(),
    })
}

/// Cosine similarity of two vectors (0 if either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa * bb).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn folds_are_stratified_and_deterministic() {
        // 3 classes, unbalanced (50, 33, 17 examples), interleaved.
        let y: Vec<usize> = (0..100).map(|i| [0, 1, 0, 2, 1, 0][i % 6]).collect();
        assert_eq!((0..3).map(|c| y.iter().filter(|&&v| v == c).count()).collect::<Vec<_>>(), [50, 33, 17]);
        for k in [5, 10] {
            let a = stratified_folds(&y, k, 42);
            assert_eq!(a, stratified_folds(&y, k, 42));
            assert_ne!(a, stratified_folds(&y, k, 43));
            for c in 0..3 {
                let nc = y.iter().filter(|&&v| v == c).count();
                for f in 0..k {
                    let in_fold = (0..y.len()).filter(|&i| a[i] == f && y[i] == c).count();
                    assert!(in_fold == nc / k || in_fold == nc.div_ceil(k), "class {c} fold {f}: {in_fold}");
                }
            }
            let sizes: Vec<usize> = (0..k).map(|f| a.iter().filter(|&&v| v == f).count()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn par_map_keeps_order_and_reports() {
        let jobs: Vec<u64> = (0..23).collect();
        let mut seen = Vec::new();
        let out = par_map(&jobs, |&j| j * j, &mut |i| seen.push(i));
        assert_eq!(out, jobs.iter().map(|j| j * j).collect::<Vec<_>>());
        seen.sort();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
    }

    /// Two noisy classes along one direction of 8 features.
    fn noisy(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let y: Vec<usize> = (0..n).map(|i| (i * 7 % 10 < 4) as usize).collect();
        let x = y
            .iter()
            .map(|&c| (0..8).map(|j| if j == 0 { c as f32 * 1.5 } else { 0.0 } + rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        (x, y)
    }

    #[test]
    fn protocols_run_and_are_deterministic() {
        let (x, y) = noisy(300, 1);
        let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
        let a = cross_validate(&rows, &y, 2, 5, Some(3), 9, &mut |_| {}).unwrap();
        let b = cross_validate(&rows, &y, 2, 5, Some(3), 9, &mut |_| {}).unwrap();
        assert_eq!(a.accuracy, b.accuracy);
        assert_eq!(a.lambdas, b.lambdas);
        assert!(a.accuracy > 0.75 && a.dev_accuracy.unwrap() > 0.75, "{a:?}");
        let (tx, ty) = noisy(200, 2);
        let test: Vec<&[f32]> = tx.iter().map(|r| r.as_slice()).collect();
        for select in [Penalty::Fixed(1.0), Penalty::KFold(4), Penalty::Dev(&test[..100], &ty[..100])] {
            let fit = train_test(&rows, &y, 2, &test, select, 3).unwrap();
            assert!(accuracy(&fit.pred, &ty) > 0.75);
        }
        assert!(cross_validate(&rows[..3], &y[..3], 2, 5, None, 9, &mut |_| {}).is_err());
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
