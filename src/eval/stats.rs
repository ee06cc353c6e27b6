//! Scores of the downstream tasks: Spearman correlation (STS-B), accuracy, binary F1 (MRPC).
//!
//! A few lines each, so written here; what matters is the convention: ties get the average of
//! the ranks they span (as `scipy.stats.spearmanr`, which SentEval uses), and Spearman is the
//! Pearson correlation of those ranks.

/// 1-based ranks of `x`; tied values share the mean of the ranks they span. NaN sorts last.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold ranks start+1..=end; their mean:
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            out[i] = rank;
        }
        start = end;
    }
    out
}

/// Pearson correlation; NaN when the lengths differ, fewer than 2 points, or either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    if x.len() != y.len() || x.len() < 2 {
        return f64::NAN;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman rank correlation (Pearson of average ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Share of positions where `pred` equals `gold` (0 for empty input).
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    let hits = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    hits as f64 / pred.len().max(1) as f64
}

/// F1 of class `positive`: 2·TP / (2·TP + FP + FN); 0 when there is no positive anywhere.
pub fn f1(pred: &[usize], gold: &[usize], positive: usize) -> f64 {
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == positive, g == positive) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            (false, false) => {}
        }
    }
    let denom = 2 * tp + fp + fneg;
    if denom == 0 {
        0.0
    } else {
        2.0 * tp as f64 / denom as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties_by_hand() {
        // values:   3.0  1.0  4.0  1.0  5.0  9.0  2.0  6.0  5.0  3.0
        // sorted: 1,1 (ranks 1,2 -> 1.5), 2 (3), 3,3 (4,5 -> 4.5), 4 (6), 5,5 (7,8 -> 7.5), 6 (9), 9 (10)
        let x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0];
        assert_eq!(ranks(&x), vec![4.5, 1.5, 6.0, 1.5, 7.5, 10.0, 3.0, 9.0, 7.5, 4.5]);
        assert_eq!(ranks(&[2.0, 2.0, 2.0]), vec![2.0, 2.0, 2.0]);
        assert!(ranks(&[]).is_empty());
    }

    #[test]
    fn spearman_with_ties_by_hand() {
        // x ranks: [1.5, 1.5, 3, 4]; y ranks: [1, 2.5, 2.5, 4].
        // deviations from 2.5: x [-1,-1,0.5,1.5], y [-1.5,0,0,1.5];
        // sxy = 1.5+0+0+2.25 = 3.75, sxx = 1+1+0.25+2.25 = 4.5, syy = 2.25+0+0+2.25 = 4.5.
        let x = [10.0, 10.0, 20.0, 30.0];
        let y = [0.1, 0.5, 0.5, 0.9];
        let want = 3.75 / 4.5;
        assert!((spearman(&x, &y) - want).abs() < 1e-12);
        // Equal to Pearson of hand-written ranks, and invariant to monotone transforms.
        let rx = [1.5, 1.5, 3.0, 4.0];
        let ry = [1.0, 2.5, 2.5, 4.0];
        assert!((pearson(&rx, &ry) - want).abs() < 1e-12);
        let ex: Vec<f64> = x.iter().map(|v: &f64| v.exp().ln_1p()).collect();
        assert!((spearman(&ex, &y) - want).abs() < 1e-12);
        assert!((spearman(&x, &x) - 1.0).abs() < 1e-12);
        let neg: Vec<f64> = x.iter().map(|v| -v).collect();
        assert!((spearman(&x, &neg) + 1.0).abs() < 1e-12);
        assert!(spearman(&x, &[1.0; 4]).is_nan());
    }

    #[test]
    fn accuracy_and_f1() {
        let gold = [1, 1, 1, 0, 0, 1];
        let pred = [1, 0, 1, 1, 0, 1];
        // TP 3, FP 1, FN 1 -> F1 = 6/8; 4 of 6 correct.
        assert!((accuracy(&pred, &gold) - 4.0 / 6.0).abs() < 1e-12);
        assert!((f1(&pred, &gold, 1) - 0.75).abs() < 1e-12);
        // Class 0: TP 1, FP 1, FN 1 -> 0.5.
        assert!((f1(&pred, &gold, 0) - 0.5).abs() < 1e-12);
        assert_eq!(f1(&[0, 0], &[0, 0], 1), 0.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }
}
