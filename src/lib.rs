//! hypersphere: fine-tune BERT sentence embeddings for alignment and uniformity on the hypersphere.

pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device_check;
pub mod dist;
pub mod embedding_file;
pub mod error;
pub mod eval;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod report;
pub mod retrieval;
pub mod run_dir;
pub mod train;
pub mod whiten;

#[cfg(test)]
mod test_data;

pub use error::{Error, Result};
