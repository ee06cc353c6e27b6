//! Past one process: data-parallel training and sharded embedding over R ranks. A small
//! collectives interface ([`Collective`]: all-gather, summed all-reduce, broadcast, barrier,
//! abort) with one implementation per engine — one process ([`Single`]), threads in one process
//! for tests ([`threads::Threads`]), MPI (`mpi.rs`, the `mpi` feature: `mpirun`, `srun`) and
//! NCCL between GPUs (`nccl.rs`, the `cuda` feature) — and the operations the trainer and
//! `embed` build on them ([`World`]).
//!
//! Rank 0 owns every file a run writes; the others compute and exchange numbers only.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod threads;
#[cfg(any(feature = "mpi", feature = "nccl"))]
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Values per all-reduce of gradients: MiniLM-L6's 22.6 M trained values go in 6 buckets.
pub const BUCKET: usize = 4 << 20;

/// A gradient matrix with at least this many rows is reduced as its non-zero rows only.
pub const SPARSE_ROWS: usize = 4096;

/// Gradients under this many values are packed together into buckets (one collective for many
/// biases and norms); larger ones are summed in place.
const SMALL: usize = 1 << 16;

/// The collective operations of one rank. Every rank must call the same operations in the same
/// order with the same lengths; each call blocks until every rank has made it.
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `local` (equal lengths), concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// `buf` summed element-wise over the ranks, on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's `buf` (the same length on every rank) to every rank.
    fn broadcast(&self, buf: &mut [u8]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Whether this engine works in device memory (NCCL: GPU tensors are reduced where they
    /// are, so the gradients go as one dense tensor instead of sparse host buffers).
    fn works_on_device(&self) -> bool {
        false
    }
    /// `t` (f32) summed element-wise over the ranks, on `t`'s device. By default through host
    /// memory and [`Collective::all_reduce_sum`].
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
    /// Every rank's `t` [n, ...] (f32, the same shape everywhere) in rank order [R n, ...], on
    /// `t`'s device. By default through host memory and [`Collective::all_gather`].
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.all_gather(&t.flatten_all()?.to_vec1::<f32>()?)?;
        let mut dims = t.dims().to_vec();
        dims[0] *= self.size();
        Ok(Tensor::from_vec(all, dims, t.device())?)
    }
    /// While `on`, collectives may wait as long as rank 0's own phases take (validation,
    /// checkpoints): a watchdog, if the engine has one, leaves them alone.
    fn patient(&self, _on: bool) {}
    /// End every rank now, with exit code `code` (an error on this rank; it printed why).
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// How this process was started: by a launcher as one of `size` ranks, or alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub size: usize,
    /// Ranks on this machine, and this one's index among them, when the launcher says.
    pub local_size: Option<usize>,
    pub local_rank: Option<usize>,
    /// The variable that said so (for messages).
    pub var: &'static str,
}

/// What the launcher's environment says: OpenMPI's `mpirun` (`OMPI_COMM_WORLD_SIZE`), MPICH's
/// and Intel MPI's (`PMI_SIZE`), Slurm's `srun` (`SLURM_STEP_NUM_TASKS`: a job step's tasks;
/// not `SLURM_NTASKS`, which a batch script's own commands see too), torchrun's
/// (`WORLD_SIZE`). None: not launched, or one rank.
pub fn launched(env: &dyn Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    let found = [
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),
        ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_LOCALID"),
        ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK"),
    ]
    .into_iter()
    .find_map(|(size, rank, local, local_rank)| {
        let n = num(size)?;
        Some(Launch { rank: num(rank)?, size: n, local_size: num(local), local_rank: num(local_rank), var: size })
    });
    found.filter(|l| l.size > 1)
}

/// The ranks of a run and the operations the pipeline needs of them.
pub struct World {
    comm: Box<dyn Collective>,
    /// Nanoseconds spent in, and bytes given to, the collectives of the training step.
    nanos: AtomicU64,
    bytes: AtomicU64,
}

/// What this rank spent on collectives: wall seconds inside them (waiting for slower ranks
/// included) and the bytes it contributed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub seconds: f64,
    pub bytes: u64,
}

impl World {
    pub fn single() -> Self {
        Self::new(Box::new(Single))
    }

    pub fn new(comm: Box<dyn Collective>) -> Self {
        Self { comm, nanos: AtomicU64::new(0), bytes: AtomicU64::new(0) }
    }

    /// The collectives' time and bytes on this rank so far.
    pub fn traffic(&self) -> Traffic {
        Traffic { seconds: self.nanos.load(Ordering::Relaxed) as f64 * 1e-9, bytes: self.bytes.load(Ordering::Relaxed) }
    }

    /// Run `f`, a collective over `values` f32 of this rank, counting its time and bytes.
    fn counted<T>(&self, values: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let out = f();
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(4 * values as u64, Ordering::Relaxed);
        out
    }

    /// The world this process belongs to: when a launcher started several ranks, NCCL's
    /// between GPUs (the `nccl` feature and a `--device cuda[:N]` flag: `device`) or MPI's (the
    /// `mpi` feature), else a world of one. Without an engine for the ranks that is an error,
    /// instead of R independent runs fighting over one run folder. `fatal` says why a rank ends
    /// the world from outside the main thread (the collective watchdog).
    pub fn from_env(fatal: fn(&str), device: Option<&str>) -> Result<Self> {
        let Some(launch) = launched(&|k| std::env::var(k).ok()) else { return Ok(Self::single()) };
        let gpu = device.is_some_and(|d| d == "cuda" || d.starts_with("cuda:"));
        #[cfg(feature = "nccl")]
        if gpu {
            return Ok(Self::new(Box::new(nccl::Nccl::init(&launch, device.unwrap_or("cuda"), fatal)?)));
        }
        #[cfg(feature = "mpi")]
        {
            let _ = gpu;
            Ok(Self::new(Box::new(mpi::Mpi::init(&launch, fatal)?)))
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = fatal;
            // (A build with NCCL took GPU ranks above.)
            let how = if gpu {
                "GPU ranks need NCCL: build with `FEATURES=cuda,nccl scripts/build-cuda.sh`"
            } else {
                "build with `cargo build --release --features mpi` (needs OpenMPI: Debian's openmpi-bin libopenmpi-dev libclang-dev), or, on GPUs, `--features nccl` with `--device cuda`"
            };
            Err(Error::invalid(format!(
                "started as rank {} of {} by a launcher ({}={}), but this build has no engine for these ranks: {how}; or run one process",
                launch.rank, launch.size, launch.var, launch.size
            )))
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Rank 0, which owns the run folder and reports.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    pub fn barrier(&self) -> Result<()> {
        self.comm.barrier()
    }

    /// A barrier that may wait as long as rank 0's own phases take (no collective timeout).
    pub fn barrier_patiently(&self) -> Result<()> {
        self.patiently(|| self.comm.barrier())
    }

    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }

    /// Every rank's rows of `local` [n, d] (the same n everywhere), in rank order [R n, d], on
    /// `local`'s device, without a graph.
    pub fn gather_rows(&self, local: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(local.detach());
        }
        let rows = local.detach().to_dtype(candle_core::DType::F32)?.contiguous()?;
        let all = self.counted(rows.elem_count(), || self.comm.all_gather_tensor(&rows))?;
        Ok(all.to_dtype(local.dtype())?)
    }

    /// Whether `flag` is set on any rank (every rank gets the same answer). `patient` where it
    /// may wait for rank 0's validation or checkpoint: then not under the collective timeout.
    pub fn any(&self, flag: bool, patient: bool) -> Result<bool> {
        let mut v = [f32::from(u8::from(flag))];
        match patient {
            true => self.patiently(|| self.comm.all_reduce_sum(&mut v))?,
            false => self.comm.all_reduce_sum(&mut v)?,
        }
        Ok(v[0] > 0.0)
    }

    /// Run `f` with the collective timeout off.
    fn patiently<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.comm.patient(true);
        let out = f();
        self.comm.patient(false);
        out
    }

    /// `value` as rank 0 has it, on every rank (rank 0 passes `Some`, the others anything);
    /// not under a collective timeout.
    pub fn broadcast_json<T: Serialize + DeserializeOwned>(&self, value: Option<&T>) -> Result<T> {
        let bytes = match value {
            Some(v) if self.is_root() => serde_json::to_vec(v).map_err(|e| Error::json("a broadcast value", e))?,
            _ => Vec::new(),
        };
        let mut len = (bytes.len() as u64).to_le_bytes();
        // Broadcasts follow rank 0's own phases (opening the run, validating): not timed.
        self.patiently(|| self.comm.broadcast(&mut len))?;
        let mut buf = bytes;
        buf.resize(u64::from_le_bytes(len) as usize, 0);
        self.patiently(|| self.comm.broadcast(&mut buf))?;
        serde_json::from_slice(&buf).map_err(|e| Error::json("a broadcast value", e))
    }

    /// The embeddings of `texts` ([n, hidden] row-major, input order) on every rank: each rank
    /// embeds a contiguous share (the last ones may be short by a row), and the ranks gather.
    pub fn embed(
        &self,
        encoder: &crate::model::Encoder,
        tokenizer: &crate::data::batch::TextTokenizer,
        texts: &[&str],
        batch: usize,
        device: &candle_core::Device,
    ) -> Result<Vec<f32>> {
        if self.size() == 1 {
            return crate::model::embed_texts(encoder, tokenizer, texts, batch, device);
        }
        let hidden = encoder.config.hidden_size;
        let share = texts.len().div_ceil(self.size());
        let start = (self.rank() * share).min(texts.len());
        let mine = &texts[start..(start + share).min(texts.len())];
        let mut rows = if mine.is_empty() {
            Vec::new()
        } else {
            crate::model::embed_texts(encoder, tokenizer, mine, batch, device)?
        };
        rows.resize(share * hidden, 0.0);
        let mut all = self.comm.all_gather(&rows)?;
        all.truncate(texts.len() * hidden);
        Ok(all)
    }

    /// The gradients of `params` summed over the ranks, in place in the gradients' own buffers:
    /// a large gradient in chunks of [`BUCKET`] values, the small ones (biases, norms) packed
    /// together into buckets; a parameter without a gradient on this rank counts as zeros. A
    /// vocabulary-sized matrix (at least [`SPARSE_ROWS`] rows: the word embeddings, half of
    /// MiniLM's values) goes as the rows that are non-zero on some rank only: the ranks first
    /// sum a 0/1 mask of their non-zero rows. A batch touches a few thousand of 30,522 rows, so
    /// this halves the bytes; the sum is the dense one (the rows left out are zero everywhere).
    pub fn all_reduce_grads(&self, params: &[(String, Var)], mut grads: GradStore) -> Result<GradStore> {
        if self.size() == 1 {
            return Ok(grads);
        }
        if self.comm.works_on_device() {
            return self.all_reduce_grads_dense(params, &grads);
        }
        // Each gradient as a contiguous f32 tensor that this step owns (zeros where none here).
        let mut local = Vec::with_capacity(params.len());
        for (_, var) in params {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.to_dtype(candle_core::DType::F32)?.contiguous()?,
                None => Tensor::zeros(var.shape(), candle_core::DType::F32, var.device())?,
            };
            local.push(g);
        }
        let rows = self.sparse_rows(params, &local)?;
        let mut small: Vec<&Tensor> = Vec::new();
        let mut staged = 0;
        for (g, rows) in local.iter().zip(&rows) {
            match rows {
                Some(rows) => self.reduce_rows(g, rows)?,
                None if g.elem_count() >= SMALL => {
                    crate::cpu::with_f32s_mut(g, |data| self.reduce_in_buckets(data))??;
                }
                None => {
                    if staged + g.elem_count() > BUCKET {
                        self.reduce_staged(&std::mem::take(&mut small))?;
                        staged = 0;
                    }
                    staged += g.elem_count();
                    small.push(g);
                }
            }
        }
        self.reduce_staged(&small)?;
        for ((_, var), g) in params.iter().zip(local) {
            grads.insert(var.as_tensor(), g.to_dtype(var.dtype())?);
        }
        Ok(grads)
    }

    /// `data` summed over the ranks in place, [`BUCKET`] values per collective.
    fn reduce_in_buckets(&self, data: &mut [f32]) -> Result<()> {
        for chunk in data.chunks_mut(BUCKET) {
            self.counted(chunk.len(), || self.comm.all_reduce_sum(chunk))?;
        }
        Ok(())
    }

    /// Small gradients summed in one collective: copied into one buffer and back.
    fn reduce_staged(&self, small: &[&Tensor]) -> Result<()> {
        if small.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(small.iter().map(|g| g.elem_count()).sum());
        for g in small {
            let (data, layout) = g.storage_and_layout();
            buf.extend_from_slice(crate::cpu::storage_f32(&data, layout)?);
        }
        self.reduce_in_buckets(&mut buf)?;
        let mut offset = 0;
        for g in small {
            crate::cpu::with_f32s_mut(g, |data| {
                data.copy_from_slice(&buf[offset..offset + data.len()]);
                offset += data.len();
            })?;
        }
        Ok(())
    }

    /// The rows `rows` of matrix gradient `g` summed over the ranks, in place (its other rows
    /// are zero on every rank).
    fn reduce_rows(&self, g: &Tensor, rows: &[usize]) -> Result<()> {
        let width = g.elem_count() / g.dims()[0].max(1);
        let mut packed = Vec::with_capacity(rows.len() * width);
        {
            let (data, layout) = g.storage_and_layout();
            let data = crate::cpu::storage_f32(&data, layout)?;
            for &r in rows {
                packed.extend_from_slice(&data[r * width..(r + 1) * width]);
            }
        }
        self.reduce_in_buckets(&mut packed)?;
        crate::cpu::with_f32s_mut(g, |data| {
            for (&r, sums) in rows.iter().zip(packed.chunks(width)) {
                data[r * width..(r + 1) * width].copy_from_slice(sums);
            }
        })?;
        Ok(())
    }

    /// The gradients summed as one dense tensor in one collective, where they live (NCCL on
    /// GPUs: no host copies; the links are fast enough that the sparse rows are not worth a
    /// mask exchange and a gather).
    fn all_reduce_grads_dense(&self, params: &[(String, Var)], grads: &GradStore) -> Result<GradStore> {
        let device = params.first().map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        let mut pieces = Vec::with_capacity(params.len());
        for (_, var) in params {
            pieces.push(match grads.get(var.as_tensor()) {
                Some(g) => g.to_dtype(candle_core::DType::F32)?.flatten_all()?,
                None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, &device)?,
            });
        }
        let flat = Tensor::cat(&pieces, 0)?;
        let sums = self.counted(flat.elem_count(), || self.comm.all_reduce_tensor(&flat))?;
        let mut out = Var::new(0f32, &device)?.as_tensor().backward()?;
        let mut offset = 0;
        for (_, var) in params {
            let n = var.elem_count();
            let g = sums.narrow(0, offset, n)?.reshape(var.shape())?;
            offset += n;
            out.insert(var.as_tensor(), g.to_dtype(var.dtype())?);
        }
        Ok(out)
    }

    /// For each vocabulary-sized parameter: the rows (ascending) whose gradient is non-zero (or
    /// NaN, which must be sent) on at least one rank; None for the others.
    fn sparse_rows(&self, params: &[(String, Var)], local: &[Tensor]) -> Result<Vec<Option<Vec<usize>>>> {
        let sparse = |var: &Var| var.rank() >= 2 && var.dims()[0] >= SPARSE_ROWS;
        let mut masks = Vec::new();
        for ((_, var), g) in params.iter().zip(local) {
            if sparse(var) {
                let width = var.elem_count() / var.dims()[0];
                let (data, layout) = g.storage_and_layout();
                let used = |row: &[f32]| f32::from(u8::from(row.iter().any(|&x| x != 0.0)));
                masks.extend(crate::cpu::storage_f32(&data, layout)?.chunks(width).map(used));
            }
        }
        if masks.is_empty() {
            return Ok(vec![None; params.len()]);
        }
        self.counted(masks.len(), || self.comm.all_reduce_sum(&mut masks))?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(params.len());
        for (_, var) in params {
            if !sparse(var) {
                out.push(None);
                continue;
            }
            let n = var.dims()[0];
            out.push(Some((0..n).filter(|&i| masks[offset + i] > 0.0).collect()));
            offset += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Option<Launch> {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        launched(&|k| map.get(k).cloned())
    }

    #[test]
    fn launchers_are_read_from_their_variables() {
        let ompi = [
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ];
        let expect = Launch { rank: 3, size: 4, local_size: Some(2), local_rank: Some(1), var: "OMPI_COMM_WORLD_SIZE" };
        assert_eq!(env(&ompi), Some(expect));
        let srun = [
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x4)"),
            ("SLURM_LOCALID", "1"),
        ];
        let expect = Launch { rank: 5, size: 8, local_size: None, local_rank: Some(1), var: "SLURM_STEP_NUM_TASKS" };
        assert_eq!(env(&srun), Some(expect));
        let torchrun = [("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
        let expect = Launch { rank: 1, size: 2, local_size: Some(2), local_rank: Some(1), var: "WORLD_SIZE" };
        assert_eq!(env(&torchrun), Some(expect));
        // A batch script's own commands: the job's task count, but no step of several tasks.
        assert_eq!(env(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")]), None);
        assert_eq!(env(&[("PMI_SIZE", "1"), ("PMI_RANK", "0")]), None);
        assert_eq!(env(&[]), None);
    }
}
