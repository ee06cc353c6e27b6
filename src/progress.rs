//! How the library reports what it is doing without printing: long jobs (training, preparing a
//! corpus, embedding an eval task) call a [`Progress`] that the front end gives them. The CLI
//! draws bars and lines on stderr (`app::console`); tests and other front ends may keep quiet.

/// Receives progress. Every method has a default that does nothing.
pub trait Progress: Sync {
    /// A line worth keeping: a note, a warning, a validation result.
    fn line(&self, _text: &str) {}
    /// Work of `total` units, `label`ed, starts (or resumes) with `done` of them finished.
    fn start(&self, _label: &str, _done: u64, _total: u64) {}
    /// `done` units are finished; `brief` summarises how it goes on one line.
    fn advance(&self, _done: u64, _brief: &str) {}
    /// The work started last is over.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// Keeps every line (and the last position), for tests that check what was reported.
#[derive(Default)]
pub struct Recorded {
    pub lines: std::sync::Mutex<Vec<String>>,
}

impl Progress for Recorded {
    fn line(&self, text: &str) {
        if let Ok(mut l) = self.lines.lock() {
            l.push(text.to_string());
        }
    }
}
