//! Which step's weights a run keeps: a policy that sees each validation and answers with an
//! action, as burn's checkpointing strategies do. The weights themselves are written and read
//! by `checkpoint` (the kept best in `<run>/best/`).

use serde::{Deserialize, Serialize};

use super::monitor::{LogLine, Validation};
use crate::config::Select;

/// The step whose weights the run keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selected {
    pub by: Select,
    pub step: usize,
    /// The STS-B dev Spearman x 100 of that step, when selecting on it.
    pub sts_dev: Option<f64>,
}

/// What to do with the weights after a validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing to keep.
    None,
    /// These weights are the best so far: keep them as `Selected`.
    Keep(Selected),
}

/// The selection policy of a run.
#[derive(Debug, Clone)]
pub struct Selection {
    by: Select,
    best: Option<Selected>,
}

impl Selection {
    /// `by = Select::StsbDev` keeps the step with the best STS-B dev score (its validations
    /// must carry one); `Select::Last` keeps the last step.
    pub fn new(by: Select) -> Self {
        Self { by, best: None }
    }

    /// The best so far, from a resumed run's log lines.
    pub fn replay(by: Select, lines: &[LogLine]) -> Self {
        let mut s = Self::new(by);
        for l in lines {
            let _ = s.observe(l.step, &l.val);
        }
        s
    }

    pub fn best(&self) -> Option<&Selected> {
        self.best.as_ref()
    }

    /// See step `step`'s validation.
    pub fn observe(&mut self, step: usize, val: &Validation) -> Action {
        if self.by != Select::StsbDev {
            return Action::None;
        }
        let Some(s) = val.sts_dev else { return Action::None };
        // Strictly better (a NaN never is, but may be the first).
        if !self.best.as_ref().is_none_or(|b| s > b.sts_dev.unwrap_or(f64::NEG_INFINITY)) {
            return Action::None;
        }
        let kept = Selected { by: Select::StsbDev, step, sts_dev: Some(s) };
        self.best = Some(kept.clone());
        Action::Keep(kept)
    }

    /// The step whose weights the run ends with: the best, unless the run stopped early (its
    /// weights are then the last good ones) or nothing was selected; else `last`.
    pub fn result(&self, last: usize, stopped: bool) -> Selected {
        match &self.best {
            Some(b) if !stopped => b.clone(),
            _ => Selected { by: Select::Last, step: last, sts_dev: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(sts: Option<f64>) -> Validation {
        Validation { sts_dev: sts, ..Validation::default() }
    }

    #[test]
    fn keeps_the_best_dev_score_and_only_that() {
        let mut s = Selection::new(Select::StsbDev);
        assert!(matches!(s.observe(0, &val(Some(80.0))), Action::Keep(k) if k.step == 0));
        assert_eq!(s.observe(25, &val(Some(79.0))), Action::None);
        assert!(matches!(s.observe(50, &val(Some(81.5))), Action::Keep(k) if k.step == 50));
        assert_eq!(s.observe(75, &val(Some(81.5))), Action::None, "a tie keeps the earlier step");
        assert_eq!(s.observe(100, &val(None)), Action::None);
        assert_eq!(s.result(150, false).step, 50);
        assert_eq!(s.result(150, true), Selected { by: Select::Last, step: 150, sts_dev: None });
        let last = Selection::new(Select::Last);
        assert_eq!(last.result(9, false).by, Select::Last);
        // A resumed run's log gives the same best.
        let lines: Vec<LogLine> = [(0, 80.0), (25, 82.0), (50, 81.0)]
            .iter()
            .map(|&(step, s)| LogLine { step, val: val(Some(s)), ..LogLine::default() })
            .collect();
        assert_eq!(Selection::replay(Select::StsbDev, &lines).best().map(|b| b.step), Some(25));
    }
}
