//! NCCL collectives between GPUs (the `nccl` feature), through cudarc: one rank per GPU, started
//! by any launcher (`mpirun`, `srun`, `torchrun`, whose variables [`super::launched`] reads).
//! Rank 0 makes NCCL's unique id and hands it to the others over TCP ([`super::rendezvous`]:
//! `MASTER_ADDR`, `MASTER_PORT`), so no MPI library is needed. Gradients and gathered rows are
//! reduced in GPU memory on the device's own stream; the small host-side collectives (flags,
//! broadcasts of the run's decisions) go through device buffers. The MPI engine's watchdog
//! ends every rank when a collective waits too long.

use std::sync::Arc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::CudaStream;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::watch::Watch;
use super::{rendezvous, Collective, Launch};
use crate::config::resolved::parse_device;
use crate::error::{Error, Result};

/// How long ranks wait for each other at start.
const RENDEZVOUS: Duration = Duration::from_secs(300);

/// This process's rank of an NCCL world, bound to its GPU's stream.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    watch: Arc<Watch>,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::invalid(format!("NCCL {what}: {e:?}"))
}

fn cuda_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::invalid(format!("CUDA {what}: {e:?}"))
}

impl Nccl {
    /// Join the world: open `device` (`cuda`: this rank's local GPU), share the unique id from
    /// rank 0, and create the communicator on the device's stream, the one candle's kernels
    /// run on.
    pub fn init(launch: &Launch, device: &str, fatal: fn(&str)) -> Result<Self> {
        let device = parse_device(device, "--device")?;
        let stream = device.as_cuda_device()?.cuda_stream();
        let addr = rendezvous::address(&|k| std::env::var(k).ok())?;
        let id = if launch.rank == 0 { Some(Id::new().map_err(|e| nccl_error("unique id", e))?) } else { None };
        let mine: Option<Vec<u8>> = id.map(|id| id.internal().iter().map(|&c| c as u8).collect());
        let bytes = rendezvous::share(&addr, launch.rank, launch.size, mine.as_deref(), 128, RENDEZVOUS)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        // NCCL takes the thread's current device for the communicator's GPU.
        stream.context().bind_to_thread().map_err(|e| cuda_error("context", e))?;
        let comm = Comm::from_rank(stream.clone(), launch.rank, launch.size, Id::uninit(internal))
            .map_err(|e| nccl_error(&format!("init of rank {} of {}", launch.rank, launch.size), e))?;
        // NCCL cannot be aborted from another thread through `Comm` (not Send): the watchdog
        // exits, and the launcher ends the others (or their own watchdogs do).
        let watch = Watch::start(launch.rank, launch.size, fatal, || {});
        Watch::end_world_on_panic(launch.rank, launch.size, fatal, || {});
        Ok(Self { comm, stream, watch })
    }

    /// Wait for the stream (a host-side collective's result is read right after).
    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| nccl_error("stream", e))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let src = self.stream.clone_htod(local).map_err(|e| cuda_error("copy", e))?;
        let mut dst = self.stream.alloc_zeros::<f32>(local.len() * self.size()).map_err(|e| cuda_error("alloc", e))?;
        self.watch.watched("all-gather", || {
            self.comm.all_gather(&src, &mut dst).map_err(|e| nccl_error("all-gather", e))?;
            self.sync()
        })?;
        self.stream.clone_dtoh(&dst).map_err(|e| cuda_error("copy", e))
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut dev = self.stream.clone_htod(&*buf).map_err(|e| cuda_error("copy", e))?;
        self.watch.watched("all-reduce", || {
            self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(|e| nccl_error("all-reduce", e))?;
            self.sync()
        })?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| cuda_error("copy", e))?;
        self.sync()
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        let mut dev = self.stream.clone_htod(&*buf).map_err(|e| cuda_error("copy", e))?;
        self.watch.watched("broadcast", || {
            self.comm.broadcast_in_place(&mut dev, 0).map_err(|e| nccl_error("broadcast", e))?;
            self.sync()
        })?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(|e| cuda_error("copy", e))?;
        self.sync()
    }
    fn barrier(&self) -> Result<()> {
        // Not watched, as MPI's: it waits for rank 0's own long phases.
        let mut one = [0f32];
        let mut dev = self.stream.clone_htod(&one[..]).map_err(|e| cuda_error("copy", e))?;
        self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum).map_err(|e| nccl_error("barrier", e))?;
        self.stream.memcpy_dtoh(&dev, &mut one[..]).map_err(|e| cuda_error("copy", e))?;
        self.sync()
    }
    fn works_on_device(&self) -> bool {
        true
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        self.watch.watched("all-reduce", || Ok(t.apply_op1_no_bwd(&DeviceOp { comm: &self.comm, gather: false })?))
    }
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        self.watch.watched("all-gather", || Ok(t.apply_op1_no_bwd(&DeviceOp { comm: &self.comm, gather: true })?))
    }
    fn patient(&self, on: bool) {
        self.watch.set_patient(on);
    }
    fn abort(&self, code: i32) -> ! {
        // Exiting leaves the others in their next collective: their watchdogs (or the
        // launcher, which sees this exit code) end them.
        std::process::exit(code)
    }
}

/// An all-reduce (sum) or all-gather of an f32 CUDA tensor into a new one, queued on the
/// tensor's stream (the communicator's).
struct DeviceOp<'a> {
    comm: &'a Comm,
    gather: bool,
}

impl CustomOp1 for DeviceOp<'_> {
    fn name(&self) -> &'static str {
        if self.gather {
            "nccl-all-gather"
        } else {
            "nccl-all-reduce"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: NCCL works on CUDA tensors only (run with --device cuda)", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: the tensor is not contiguous", self.name())
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        let ranks = self.comm.world_size();
        let mut dims = l.dims().to_vec();
        let fail = |e: candle_core::cuda::cudarc::nccl::result::NcclError| {
            candle_core::Error::Msg(format!("{}: {e:?}", self.name()))
        };
        let dst = if self.gather {
            dims[0] *= ranks;
            let mut dst = dev.alloc_zeros::<f32>((end - start) * ranks)?;
            self.comm.all_gather(&src, &mut dst).map_err(fail)?;
            dst
        } else {
            let mut dst = dev.alloc_zeros::<f32>(end - start)?;
            self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(fail)?;
            dst
        };
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(dims)))
    }
}
