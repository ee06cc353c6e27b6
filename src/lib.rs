//! hypersphere: fine-tune BERT sentence embeddings for alignment and uniformity on the hypersphere.

pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod report;
pub mod train;

pub use error::{Error, Result};
