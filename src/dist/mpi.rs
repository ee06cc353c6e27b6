//! MPI collectives through rsmpi, against the system's MPI (OpenMPI: `mpirun -np R ...`;
//! Slurm: `srun`). A watchdog ends the whole world when a collective waits longer than
//! `HYPERSPHERE_COLLECTIVE_TIMEOUT_S` seconds (default 600): a rank that died or hangs never
//! leaves the others waiting forever. Barriers are not watched: they wait for rank 0's own
//! long phases (measuring, evaluating, exporting).

use std::sync::Arc;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::watch::Watch;
use super::{Collective, Launch};
use crate::error::{Error, Result};

/// This process's rank of an MPI world.
pub struct Mpi {
    world: SimpleCommunicator,
    watch: Arc<Watch>,
    // Dropped last: finalizes MPI.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialise MPI (asking for MPI_THREAD_MULTIPLE, so the watchdog may abort while the main
    /// thread waits in a collective) and check it agrees with the launcher about the ranks.
    pub fn init(launch: &Launch, fatal: fn(&str)) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| Error::invalid("MPI was already initialised in this process"))?;
        let world = universe.world();
        if world.size() as usize != launch.size {
            return Err(Error::invalid(format!(
                "MPI reports {} ranks, the launcher {} ({}={}): is the binary built against the MPI that launched it?",
                world.size(),
                launch.size,
                launch.var,
                launch.size
            )));
        }
        let (rank, size) = (world.rank(), world.size());
        let can_abort = threading == mpi::Threading::Multiple;
        let watch = Watch::start(rank as usize, size as usize, fatal, move || {
            if can_abort {
                // SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE, so any thread may call it.
                unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 3) };
            }
        });
        // Unwinding would also finalize MPI.
        Watch::end_world_on_panic(rank as usize, size as usize, fatal, move || {
            if can_abort {
                // SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE, so any thread may call it.
                unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101) };
            }
        });
        Ok(Self { world, watch, _universe: universe })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; local.len() * self.size()];
        self.watch.watched("all-gather", || self.world.all_gather_into(local, &mut out[..]));
        Ok(out)
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let local = buf.to_vec();
        self.watch.watched("all-reduce", || self.world.all_reduce_into(&local[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        self.watch.watched("broadcast", || self.world.process_at_rank(0).broadcast_into(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn patient(&self, on: bool) {
        self.watch.set_patient(on);
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
