//! Training: one step (`step`: the rows' layout, GradCache, the update), the checks between
//! steps (`monitor`: validation, health, the log), which step's weights to keep (`selection`),
//! and the loop that drives them (`loop`).

pub mod r#loop;
pub mod monitor;
pub mod selection;
pub mod step;

pub use r#loop::{train, TrainInputs, TrainSummary};
