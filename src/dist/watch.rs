//! The collective watchdog shared by the multi-process engines (MPI, NCCL): a collective that
//! waits longer than `HYPERSPHERE_COLLECTIVE_TIMEOUT_S` seconds (default 600) ends the whole
//! world, so a rank that died or hangs never leaves the others waiting forever.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default collective timeout.
const TIMEOUT_S: u64 = 600;

/// What the watchdog sees: when the current collective began (ms since `epoch`, 0: none) and
/// which it is.
pub struct Watch {
    epoch: Instant,
    since_ms: AtomicU64,
    what: Mutex<&'static str>,
    /// Collectives are not timed while set (they wait for rank 0's own phases).
    patient: AtomicBool,
}

impl Watch {
    /// A watch with its watchdog thread: past the timeout it calls `fatal` with why, then
    /// `end` (which must not return: abort the world, or exit and let the launcher end the
    /// others).
    pub fn start(rank: usize, size: usize, fatal: fn(&str), end: impl Fn() + Send + 'static) -> Arc<Self> {
        let timeout = std::env::var("HYPERSPHERE_COLLECTIVE_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .unwrap_or(TIMEOUT_S);
        let watch = Arc::new(Self {
            epoch: Instant::now(),
            since_ms: AtomicU64::new(0),
            what: Mutex::new(""),
            patient: AtomicBool::new(false),
        });
        let w = watch.clone();
        std::thread::spawn(move || {
            w.wait_for_timeout(Duration::from_secs(timeout));
            let what = w.what.lock().map(|w| *w).unwrap_or("a collective");
            fatal(&format!(
                "rank {rank} of {size}: error: {what} waited {timeout}s for the other ranks (one died or hangs; HYPERSPHERE_COLLECTIVE_TIMEOUT_S sets the limit); ending every rank"
            ));
            end();
            std::process::exit(3);
        });
        watch
    }

    /// Run a collective under the watchdog (unless patient).
    pub fn watched<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        if self.patient.load(Ordering::SeqCst) {
            return f();
        }
        if let Ok(mut w) = self.what.lock() {
            *w = what;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        self.since_ms.store(now.max(1), Ordering::SeqCst);
        let out = f();
        self.since_ms.store(0, Ordering::SeqCst);
        out
    }

    /// A panic on this rank ends every rank: unwinding would leave the others waiting in a
    /// collective for this one. `end` as in [`Watch::start`].
    pub fn end_world_on_panic(rank: usize, size: usize, fatal: fn(&str), end: impl Fn() + Send + Sync + 'static) {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            fatal(&format!("rank {rank} of {size}: error: panicked; ending every rank"));
            end();
            std::process::exit(101);
        }));
    }

    pub fn set_patient(&self, on: bool) {
        self.patient.store(on, Ordering::SeqCst);
    }

    /// Every half second: has the current collective waited longer than `timeout`? Returns
    /// when one has.
    fn wait_for_timeout(&self, timeout: Duration) {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let since = self.since_ms.load(Ordering::SeqCst);
            let now = self.epoch.elapsed().as_millis() as u64;
            if since != 0 && now.saturating_sub(since) >= timeout.as_millis() as u64 {
                return;
            }
        }
    }
}
