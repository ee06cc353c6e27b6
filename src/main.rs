use clap::Parser;

mod cli;

/// mimalloc instead of glibc malloc: a training step allocates and frees hundreds of large
/// tensors, and glibc returned them to the kernel each time, so that a third of a step went
/// to page faults and zeroing fresh pages (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (not exported by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Keep freed pages instead of handing them back to the OS: the next step reuses them at
    // once. Peak memory is unchanged; resident memory stays at the peak.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
