//! The CLI's [`Progress`]: a progress bar on stderr with lines above it; without a terminal (a
//! log file, CI), a plain line every so often with the time left instead of the bar.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::progress::Progress;

/// A plain line at most this often when there is no terminal to draw a bar on.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// What the bar is counting.
struct Job {
    label: String,
    started: Instant,
    first: u64,
    total: u64,
    last_line: Instant,
}

pub struct Console {
    pb: indicatif::ProgressBar,
    job: Mutex<Option<Job>>,
    /// Ranks other than 0 of a data-parallel run keep quiet.
    quiet: bool,
}

impl Default for Console {
    fn default() -> Self {
        let pb = indicatif::ProgressBar::hidden();
        Self { pb, job: Mutex::new(None), quiet: false }
    }
}

impl Console {
    /// A console that reports nothing (the other ranks of a data-parallel run).
    pub fn quiet() -> Self {
        Self { quiet: true, ..Self::default() }
    }

    fn bar(&self, label: &str, done: u64, total: u64) {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            self.pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        let template = format!("{{elapsed_precise}} [{{bar:30}}] {label} {{pos}}/{{len}} {{msg}} ETA {{eta}}");
        if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
            self.pb.set_style(style.progress_chars("=> "));
        }
        self.pb.reset();
        self.pb.set_length(total);
        self.pb.set_position(done);
    }
}

impl Progress for Console {
    fn line(&self, text: &str) {
        if !self.quiet {
            self.pb.suspend(|| eprintln!("{text}"));
        }
    }

    fn start(&self, label: &str, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        self.bar(label, done, total);
        let now = Instant::now();
        if let Ok(mut job) = self.job.lock() {
            *job = Some(Job { label: label.to_string(), started: now, first: done, total, last_line: now });
        }
        if self.pb.is_hidden() {
            eprintln!("{label}: from {done} of {total}");
        }
    }

    fn advance(&self, done: u64, brief: &str) {
        if self.quiet {
            return;
        }
        self.pb.set_position(done);
        self.pb.set_message(brief.to_string());
        if !self.pb.is_hidden() {
            return;
        }
        let Ok(mut guard) = self.job.lock() else { return };
        let Some(job) = guard.as_mut() else { return };
        if job.last_line.elapsed() >= PLAIN_EVERY || done == job.total {
            job.last_line = Instant::now();
            let per = job.started.elapsed().as_secs_f64() / done.saturating_sub(job.first).max(1) as f64;
            let eta = per * job.total.saturating_sub(done) as f64;
            eprintln!("{}: {done}/{}: {brief} | ETA {eta:.0}s", job.label, job.total);
        }
    }

    fn finish(&self) {
        self.pb.finish_and_clear();
        if let Ok(mut job) = self.job.lock() {
            *job = None;
        }
    }
}
