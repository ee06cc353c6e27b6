//! The objective a run minimises, built once from `[loss]`: a list of terms, each with the
//! views it compares, how it scores them and its weight. [`Objective::loss`] loops over it.
//!
//! Each weight means one thing whatever `loss.kind`: `w_align` weighs the adjacent (or given)
//! positive pairs, `w_uniform` uniformity, `w_infonce` an InfoNCE term over the same pairs,
//! `w_dropout`, `w_mean`, `w_distill` and `w_simcorr` their views. `kind` picks how positive
//! views are scored: alignment (`align_uniform`), InfoNCE (`infonce`: then it is InfoNCE that
//! `w_align` weighs, and uniformity is only measured), or both (`mix`: alignment at `w_align`,
//! InfoNCE at `w_infonce`, extra views by InfoNCE).

use candle_core::{DType, Result, Tensor};

use super::{align, distill, infonce, sim_corr, uniform};
use crate::config::{LossConfig, LossKind};

/// How a pair of views is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scorer {
    /// `mean ||a - b||^alpha`.
    Align { alpha: f64 },
    /// Symmetric InfoNCE at temperature `tau`, the other rows as negatives.
    InfoNce { tau: f64 },
}

impl Scorer {
    fn score(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self {
            Scorer::Align { alpha } => align(a, b, alpha),
            Scorer::InfoNce { tau } => infonce(a, b, None, tau),
        }
    }
}

/// What a term compares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term {
    /// Anchors against their positives.
    Pairs(Scorer),
    /// `(L_uniform(anchors) + L_uniform(positives and hard negatives)) / 2` at temperature `t`.
    Uniformity { t: f64 },
    /// Anchors against themselves under other dropout masks (SimCSE's positives).
    Dropout(Scorer),
    /// Anchors and positives against their mean-pooled vectors (the same pass's or a frozen
    /// teacher's).
    Mean(Scorer),
    /// Relational distillation from the mean-pooled vectors ([`super::distill`]).
    Distill { tau: f64, standardize: bool },
    /// Similarity correlation with the mean-pooled vectors ([`super::sim_corr`]).
    SimCorr,
}

/// A term, its name in logs and its weight; `None`: measured and logged, not trained on.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighted {
    pub name: &'static str,
    pub term: Term,
    pub weight: Option<f64>,
}

/// The terms in the order they are computed and summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    terms: Vec<Weighted>,
}

/// One step's unit embeddings, by role.
pub struct Views<'a> {
    /// Anchors [n, d].
    pub x: &'a Tensor,
    /// Their positives [n, d].
    pub y: &'a Tensor,
    /// The anchors again under independent dropout masks [n, d] (with a dropout term).
    pub x_drop: Option<&'a Tensor>,
    /// Each anchor's hard negative [n, d] (from a pairs file with a negative column): more
    /// negatives for InfoNCE and more points for uniformity.
    pub neg: Option<&'a Tensor>,
    /// The mean-pooled vectors of the anchors then the positives [2n, d], detached: a fixed
    /// target (with a mean, distillation or correlation term).
    pub mean_xy: Option<&'a Tensor>,
}

/// The loss and its named parts as scalars (the log and the step stats follow this list).
pub struct LossParts {
    pub total: Tensor,
    pub parts: Vec<(&'static str, f32)>,
}

impl LossParts {
    /// The value of part `name`, if the objective has it.
    pub fn get(&self, name: &str) -> Option<f32> {
        part(&self.parts, name)
    }
}

/// The value named `name` in a list of named loss parts.
pub fn part(parts: &[(&'static str, f32)], name: &str) -> Option<f32> {
    parts.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
}

impl Objective {
    /// The terms `cfg` asks for. Alignment and uniformity are always measured (the log shows
    /// them whatever trains); the other terms appear only with a weight above 0.
    pub fn new(cfg: &LossConfig) -> Self {
        let (aligned, nce) = (Scorer::Align { alpha: cfg.alpha }, Scorer::InfoNce { tau: cfg.tau });
        let weighted = |name, term, w: f64| Weighted { name, term, weight: Some(w) };
        let measured = |name, term| Weighted { name, term, weight: None };
        let (pairs, uniformity) = (Term::Pairs(aligned), Term::Uniformity { t: cfg.t });
        let mut terms = match cfg.kind {
            LossKind::AlignUniform => {
                vec![weighted("align", pairs, cfg.w_align), weighted("uniform", uniformity, cfg.w_uniform)]
            }
            LossKind::Infonce => vec![
                measured("align", pairs),
                measured("uniform", uniformity),
                weighted("infonce", Term::Pairs(nce), cfg.w_align),
            ],
            LossKind::Mix => vec![
                weighted("align", pairs, cfg.w_align),
                weighted("uniform", uniformity, cfg.w_uniform),
                weighted("infonce", Term::Pairs(nce), cfg.w_infonce),
            ],
        };
        let views = if cfg.kind == LossKind::AlignUniform { aligned } else { nce };
        let distill_term = match cfg.distill_z_tau {
            z if z > 0.0 => Term::Distill { tau: z, standardize: true },
            _ => Term::Distill { tau: cfg.tau, standardize: false },
        };
        let extra = [
            ("dropout", Term::Dropout(views), cfg.w_dropout),
            ("mean", Term::Mean(views), cfg.w_mean),
            ("distill", distill_term, cfg.w_distill),
            ("simcorr", Term::SimCorr, cfg.w_simcorr),
        ];
        terms.extend(extra.into_iter().filter(|(_, _, w)| *w > 0.0).map(|(n, t, w)| weighted(n, t, w)));
        Self { terms }
    }

    /// Whether any term trains (a weight above 0); with none, every step would change nothing.
    pub fn trains(&self) -> bool {
        self.terms.iter().any(|w| w.weight.is_some_and(|v| v > 0.0))
    }

    pub fn terms(&self) -> &[Weighted] {
        &self.terms
    }

    /// Whether a term compares the anchors with their dropout views (a third block of rows).
    pub fn needs_dropout_view(&self) -> bool {
        self.terms.iter().any(|w| matches!(w.term, Term::Dropout(_)))
    }

    /// Whether a term reads the mean-pooled vectors (so the encoder, or a teacher, gives them).
    pub fn needs_mean_view(&self) -> bool {
        self.terms.iter().any(|w| matches!(w.term, Term::Mean(_) | Term::Distill { .. } | Term::SimCorr))
    }

    /// Whether a trained term repels by itself (InfoNCE over the pairs); without one, only
    /// uniformity keeps alignment from collapsing everything (see `train::monitor::balance`).
    pub fn repels(&self) -> bool {
        self.terms
            .iter()
            .any(|w| w.weight.is_some_and(|v| v > 0.0) && matches!(w.term, Term::Pairs(Scorer::InfoNce { .. })))
    }

    /// The weight of the trained term named `name` (0 when it is absent or only measured).
    pub fn weight(&self, name: &str) -> f64 {
        self.terms.iter().find(|w| w.name == name).and_then(|w| w.weight).unwrap_or(0.0)
    }

    /// The uniformity temperature.
    pub fn t(&self) -> f64 {
        self.terms
            .iter()
            .find_map(|w| match w.term {
                Term::Uniformity { t } => Some(t),
                _ => None,
            })
            .unwrap_or(2.0)
    }

    /// Every term on `v`, its value logged; the weighted ones summed in order. A term whose views
    /// are absent is skipped.
    pub fn loss(&self, v: &Views) -> Result<LossParts> {
        let scalar = |t: &Tensor| t.to_dtype(DType::F32)?.to_scalar::<f32>();
        // The pooled rows of x then y (what the mean view compares), made when first needed.
        let mut xy: Option<Tensor> = None;
        let mut parts = Vec::with_capacity(self.terms.len());
        let mut total: Option<Tensor> = None;
        for w in &self.terms {
            let reads_mean = matches!(w.term, Term::Mean(_) | Term::Distill { .. } | Term::SimCorr);
            if reads_mean && xy.is_none() && v.mean_xy.is_some() {
                xy = Some(Tensor::cat(&[v.x, v.y], 0)?);
            }
            let Some(value) = self.term(w.term, v, xy.as_ref())? else { continue };
            parts.push((w.name, scalar(&value)?));
            if let Some(weight) = w.weight {
                let scaled = (value * weight)?;
                total = Some(match total {
                    None => scaled,
                    Some(t) => (t + scaled)?,
                });
            }
        }
        let total = match total {
            Some(t) => t,
            None => v.x.zeros_like()?.sum_all()?,
        };
        Ok(LossParts { total, parts })
    }

    /// One term's value, or None when its views are absent.
    fn term(&self, term: Term, v: &Views, xy: Option<&Tensor>) -> Result<Option<Tensor>> {
        Ok(Some(match (term, v.x_drop, xy.zip(v.mean_xy)) {
            (Term::Pairs(Scorer::InfoNce { tau }), ..) if v.neg.is_some() => infonce(v.x, v.y, v.neg, tau)?,
            (Term::Pairs(s), ..) => s.score(v.x, v.y)?,
            (Term::Uniformity { t }, ..) => {
                let others = match v.neg {
                    Some(neg) => uniform(&Tensor::cat(&[v.y, neg], 0)?, t)?,
                    None => uniform(v.y, t)?,
                };
                ((uniform(v.x, t)? + others)? / 2.0)?
            }
            (Term::Dropout(s), Some(x2), _) => s.score(v.x, x2)?,
            (Term::Mean(s), _, Some((xy, m))) => s.score(xy, m)?,
            (Term::Distill { tau, standardize }, _, Some((xy, m))) => distill(xy, m, tau, standardize)?,
            (Term::SimCorr, _, Some((xy, m))) => sim_corr(xy, m)?,
            _ => return Ok(None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ref_align, ref_distill, ref_infonce, ref_uniform, tensor, unit_rows};
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn objective(v: &Views, cfg: &LossConfig) -> Result<LossParts> {
        Objective::new(cfg).loss(v)
    }

    /// Each positive source enters with its own weight; dropout views use the same distance
    /// (alignment, or InfoNCE for kind = infonce) as the adjacent pairs.
    #[test]
    fn objective_weights_each_source() {
        let mut rng = StdRng::seed_from_u64(11);
        let (x, y, x2) = (unit_rows(&mut rng, 6, 5), unit_rows(&mut rng, 6, 5), unit_rows(&mut rng, 6, 5));
        let (tx, ty, tx2) = (tensor(&x), tensor(&y), tensor(&x2));
        let u = (ref_uniform(&x, 2.0) + ref_uniform(&y, 2.0)) / 2.0;
        let cfg = LossConfig { w_align: 0.7, w_uniform: 0.4, w_dropout: 1.5, ..Default::default() };
        let parts = objective(&Views { x: &tx, y: &ty, x_drop: Some(&tx2), mean_xy: None, neg: None }, &cfg).unwrap();
        let want = 0.7 * ref_align(&x, &y, 2.0) + 0.4 * u + 1.5 * ref_align(&x, &x2, 2.0);
        assert!((parts.total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        let names: Vec<&str> = parts.parts.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["align", "uniform", "dropout"]);
        assert!((parts.get("dropout").unwrap() as f64 - ref_align(&x, &x2, 2.0)).abs() < 1e-5);
        // Without dropout views (or with weight 0) the term is absent.
        let off = LossConfig { w_dropout: 0.0, ..cfg.clone() };
        let parts = objective(&Views { x: &tx, y: &ty, x_drop: Some(&tx2), mean_xy: None, neg: None }, &off).unwrap();
        assert!((parts.total.to_scalar::<f64>().unwrap() - (0.7 * ref_align(&x, &y, 2.0) + 0.4 * u)).abs() < 1e-9);
        assert_eq!(parts.get("dropout"), None);
        // InfoNCE: w_align * InfoNCE(x, y) + w_dropout * InfoNCE(x, x').
        let nce = LossConfig { kind: LossKind::Infonce, tau: 0.1, ..cfg };
        let parts = objective(&Views { x: &tx, y: &ty, x_drop: Some(&tx2), mean_xy: None, neg: None }, &nce).unwrap();
        let want = 0.7 * ref_infonce(&x, &y, 0.1) + 1.5 * ref_infonce(&x, &x2, 0.1);
        assert!((parts.total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        assert!(Objective::new(&nce).needs_dropout_view() && !Objective::new(&off).needs_dropout_view());
        // The mean-pooled view: its distance from the pooled rows of x then y, weighted.
        let (mx, my) = (unit_rows(&mut rng, 6, 5), unit_rows(&mut rng, 6, 5));
        let mrows = [mx, my].concat();
        let m = tensor(&mrows);
        let cfg = LossConfig { w_align: 0.7, w_uniform: 0.4, w_mean: 2.0, ..Default::default() };
        let v = Views { x: &tx, y: &ty, x_drop: None, mean_xy: Some(&m), neg: None };
        let xy = [x.clone(), y.clone()].concat();
        let want = 0.7 * ref_align(&x, &y, 2.0) + 0.4 * u + 2.0 * ref_align(&xy, &mrows, 2.0);
        assert!((objective(&v, &cfg).unwrap().total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        let mix = LossConfig { kind: LossKind::Mix, w_infonce: 1.0, tau: 0.1, ..cfg };
        let want =
            0.7 * ref_align(&x, &y, 2.0) + 0.4 * u + ref_infonce(&x, &y, 0.1) + 2.0 * ref_infonce(&xy, &mrows, 0.1);
        assert!((objective(&v, &mix).unwrap().total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        // Distillation of the mean-pooled rows' similarity structure, weighted, with its own name.
        let dis = LossConfig { w_mean: 0.0, w_distill: 3.0, ..mix };
        let parts = objective(&v, &dis).unwrap();
        let want = 0.7 * ref_align(&x, &y, 2.0)
            + 0.4 * u
            + ref_infonce(&x, &y, 0.1)
            + 3.0 * ref_distill(&xy, &mrows, 0.1, false);
        assert!((parts.total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        assert_eq!(parts.parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["align", "uniform", "infonce", "distill"]);
        // With distill_z_tau > 0 the same term is standardised, at that temperature.
        let z = LossConfig { distill_z_tau: 0.7, ..dis };
        let want = 0.7 * ref_align(&x, &y, 2.0)
            + 0.4 * u
            + ref_infonce(&x, &y, 0.1)
            + 3.0 * ref_distill(&xy, &mrows, 0.7, true);
        assert!((objective(&v, &z).unwrap().total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        // Hard negatives join the positives' side of uniformity; alignment ignores them.
        let negs = unit_rows(&mut rng, 6, 5);
        let tn = tensor(&negs);
        let cfg = LossConfig { w_align: 0.7, w_uniform: 0.4, t: 2.0, ..Default::default() };
        let v = Views { x: &tx, y: &ty, x_drop: None, mean_xy: None, neg: Some(&tn) };
        let yn = [y.clone(), negs].concat();
        let want = 0.7 * ref_align(&x, &y, 2.0) + 0.4 * (ref_uniform(&x, 2.0) + ref_uniform(&yn, 2.0)) / 2.0;
        assert!((objective(&v, &cfg).unwrap().total.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
    }
}
