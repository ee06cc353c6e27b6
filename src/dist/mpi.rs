//! MPI collectives through rsmpi, against the system's MPI (OpenMPI: `mpirun -np R ...`;
//! Slurm: `srun`). A watchdog ends the whole world when a collective waits longer than
//! `HYPERSPHERE_COLLECTIVE_TIMEOUT_S` seconds (default 600): a rank that died or hangs never
//! leaves the others waiting forever. Barriers are not watched: they wait for rank 0's own
//! long phases (measuring, evaluating, exporting).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Collective, Launch};
use crate::error::{Error, Result};

/// Default collective timeout.
const TIMEOUT_S: u64 = 600;

/// What the watchdog sees: when the current collective began (ms since `epoch`, 0: none) and
/// which it is.
struct Watch {
    epoch: Instant,
    since_ms: AtomicU64,
    what: Mutex<&'static str>,
    /// Collectives are not timed while set (they wait for rank 0's own phases).
    patient: AtomicBool,
}

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
        let timeout = std::env::var("HYPERSPHERE_COLLECTIVE_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .unwrap_or(TIMEOUT_S);
        let watch = Arc::new(Watch {
            epoch: Instant::now(),
            since_ms: AtomicU64::new(0),
            what: Mutex::new(""),
            patient: AtomicBool::new(false),
        });
        let (rank, size) = (world.rank(), world.size());
        let can_abort = threading == mpi::Threading::Multiple;
        let w = watch.clone();
        std::thread::spawn(move || watchdog(&w, Duration::from_secs(timeout), rank, size, can_abort, fatal));
        // A panic on one rank ends every rank: unwinding would finalize MPI and wait for ranks
        // that wait for this one.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            fatal(&format!("rank {rank} of {size}: error: panicked; ending every rank"));
            if can_abort {
                // SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE, so any thread may call it.
                unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101) };
            }
            std::process::exit(101);
        }));
        Ok(Self { world, watch, _universe: universe })
    }

    /// Run a collective under the watchdog.
    fn watched<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        if self.watch.patient.load(Ordering::SeqCst) {
            return f();
        }
        if let Ok(mut w) = self.watch.what.lock() {
            *w = what;
        }
        let now = self.watch.epoch.elapsed().as_millis() as u64;
        self.watch.since_ms.store(now.max(1), Ordering::SeqCst);
        let out = f();
        self.watch.since_ms.store(0, Ordering::SeqCst);
        out
    }
}

/// Every half second: has the current collective waited longer than `timeout`? Then say which
/// and end the world (MPI_Abort, or exit when MPI cannot be called from this thread: the
/// launcher then ends the others).
fn watchdog(watch: &Watch, timeout: Duration, rank: i32, size: i32, can_abort: bool, fatal: fn(&str)) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let since = watch.since_ms.load(Ordering::SeqCst);
        let now = watch.epoch.elapsed().as_millis() as u64;
        if since == 0 || now.saturating_sub(since) < timeout.as_millis() as u64 {
            continue;
        }
        let what = watch.what.lock().map(|w| *w).unwrap_or("a collective");
        fatal(&format!(
            "rank {rank} of {size}: error: {what} waited {}s for the other ranks (one died or hangs; HYPERSPHERE_COLLECTIVE_TIMEOUT_S sets the limit); ending every rank",
            timeout.as_secs()
        ));
        if can_abort {
            // SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE, so any thread may call it.
            unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 3) };
        }
        std::process::exit(3);
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
        self.watched("all-gather", || self.world.all_gather_into(local, &mut out[..]));
        Ok(out)
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let local = buf.to_vec();
        self.watched("all-reduce", || self.world.all_reduce_into(&local[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        self.watched("broadcast", || self.world.process_at_rank(0).broadcast_into(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn patient(&self, on: bool) {
        self.watch.patient.store(on, Ordering::SeqCst);
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
