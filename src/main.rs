use clap::Parser;

mod cli;

/// mimalloc instead of glibc malloc: a training step allocates and frees hundreds of large
/// tensors, and glibc returned them to the kernel each time, so that a third of a step went
/// to page faults and zeroing fresh pages (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (not exported by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turn transparent huge pages off for this process (and the processes it starts), unless
/// `MIMALLOC_ALLOW_THP` is set (mimalloc's own switch; `=1` keeps them). mimalloc asks the kernel
/// for 2 MiB pages, and on a virtual machine whose host backs guest memory lazily, the first touch
/// of one ran at 75 MB/s against 2.9 GB/s for 4 KiB pages: loading a model took 3 s longer and
/// int8 `embed` ran 15% slower, while steady-state training was the same (BENCHMARKS.md, AMX,
/// "Embedding, fourth round"). Returns whether the kernel took the request.
fn small_pages() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return false;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments only; it changes a flag of this process.
    return unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 };
    #[cfg(not(target_os = "linux"))]
    false
}

fn main() {
    // Keep freed pages instead of handing them back to the OS: the next step reuses them at
    // once. Peak memory is unchanged; resident memory stays at the peak.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    small_pages();
    // An empty HYPERSPHERE_DATA means unset (clap would report "a value is required for --data").
    if std::env::var_os("HYPERSPHERE_DATA").is_some_and(|v| v.is_empty()) {
        // Single-threaded here: nothing else reads the environment yet.
        unsafe { std::env::remove_var("HYPERSPHERE_DATA") };
    }
    // Ranks launched together on one machine share its cores: one rayon pool each of its share,
    // unless RAYON_NUM_THREADS says otherwise (else every rank starts a thread per core).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let launch = hypersphere::dist::launched(&|k| std::env::var(k).ok());
        if let Some(local) = launch.and_then(|l| l.local_size).filter(|&n| n > 1) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Single-threaded here: nothing else reads the environment yet.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string()) };
        }
    }
    let cli = cli::Cli::parse();
    let code = match cli::run(cli) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    /// The kernel reports the flag in /proc/self/status ("THP_enabled: 0" once disabled).
    #[test]
    fn small_pages_turns_huge_pages_off() {
        let status = || std::fs::read_to_string("/proc/self/status").unwrap();
        let thp = |s: String| {
            s.lines().find(|l| l.starts_with("THP_enabled:")).map(|l| l.split_whitespace().last().unwrap().to_string())
        };
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() || thp(status()).is_none() {
            return; // kept on purpose, or a kernel without the field
        }
        assert!(super::small_pages());
        assert_eq!(thp(status()).as_deref(), Some("0"));
    }
}
