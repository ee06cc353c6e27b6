//! Damaged files on disk (issue 25): random byte edits of every file of a prepared corpus and
//! of a checkpoint give clean errors naming a file, never a panic, and a damaged checkpoint
//! tensor file is never loaded. 1,000 cases each.

use std::path::{Path, PathBuf};

use candle_core::Device;
use hypersphere::checkpoint::{self, TrainState};
use hypersphere::config::TrainConfig;
use hypersphere::data::batch::TextTokenizer;
use hypersphere::data::books::{build, pairs::PairOptions, prepared, BookPairs};
use hypersphere::data::source::PairSource;
use hypersphere::model::pooling::Pooling;
use hypersphere::model::Encoder;
use hypersphere::optim::AdamW;
use proptest::prelude::*;

use crate::common::*;

/// One edit of a file's bytes.
#[derive(Debug, Clone)]
enum Edit {
    /// XOR the byte at (position modulo the length) with a non-zero mask.
    Flip(usize, u8),
    /// Keep the first (position modulo the length) bytes.
    Truncate(usize),
    /// Append bytes.
    Append(Vec<u8>),
    /// Overwrite 8 bytes from (position modulo the length) with a little-endian u64.
    Word(usize, u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Edit::Flip(p, m)),
        any::<usize>().prop_map(Edit::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Append),
        (any::<usize>(), prop_oneof![any::<u64>(), 0u64..64, Just(u64::MAX)]).prop_map(|(p, w)| Edit::Word(p, w)),
    ]
}

/// Apply `edits` to `path`; whether the bytes changed.
fn damage(path: &Path, edits: &[Edit]) -> bool {
    let before = std::fs::read(path).unwrap();
    let mut b = before.clone();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match e {
            Edit::Flip(p, m) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] ^= m;
            }
            Edit::Truncate(p) => b.truncate(at(*p, b.len())),
            Edit::Append(extra) => b.extend(extra),
            Edit::Word(p, w) if b.len() >= 8 => {
                let i = at(*p, b.len() - 7);
                b[i..i + 8].copy_from_slice(&w.to_le_bytes());
            }
            _ => {}
        }
    }
    std::fs::write(path, &b).unwrap();
    b != before
}

/// Copy the flat folder `from` to `to` (emptied first).
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Everything a run reads of a prepared corpus: open (recipe, sizes), stats, every sentence's
/// text and ids against the vocabulary, every pair.
fn read_everything(dir: &Path, recipe: &prepared::Recipe, vocab: usize) -> hypersphere::Result<()> {
    let corpus = prepared::Prepared::open(dir, recipe)?.with_vocab(vocab);
    let _ = corpus.stats(None);
    corpus.verify()?;
    let split = corpus.split(None, 0.25, 1);
    for range in [&split.train, &split.val] {
        let pairs = BookPairs::new(&corpus, range);
        for k in 0..pairs.len() {
            pairs.ids(k)?;
            pairs.max_tokens(k)?;
            pairs.pair(k)?;
        }
    }
    Ok(())
}

struct Fixture {
    _tmp: tempfile::TempDir,
    clean: PathBuf,
    work: PathBuf,
    recipe: prepared::Recipe,
    vocab: usize,
}

fn prepared_fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 1, "");
    let tok = TextTokenizer::load(&files.tokenizer, 32).unwrap();
    let vocab = tok.vocab_size();
    let opts = PairOptions { min_tokens: 2, ..Default::default() };
    let recipe = prepared::Recipe::new("test".into(), &opts);
    let clean = tmp.path().join("clean");
    build::prepare(
        &fixtures().join("books"),
        &clean,
        &recipe,
        &opts,
        &tok.encoder().unwrap(),
        &hypersphere::progress::Quiet,
    )
    .unwrap();
    read_everything(&clean, &recipe, vocab).expect("the clean corpus reads");
    let work = tmp.path().join("work");
    Fixture { _tmp: tmp, clean, work, recipe, vocab }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any edit of any file of a prepared corpus: reading it all is Ok or an error naming a file
    /// of the folder; no panic.
    #[test]
    fn damaged_prepared_corpora_give_clean_errors(
        file in 0usize..7,
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        thread_local!(static FIX: Fixture = prepared_fixture());
        FIX.with(|f| {
            copy_dir(&f.clean, &f.work);
            let names = ["manifest.json", "text.bin", "text.idx", "tokens.bin", "tokens.idx", "pairs.bin", "pair_tokens.bin"];
            damage(&f.work.join(names[file]), &edits);
            let read = std::panic::catch_unwind(|| read_everything(&f.work, &f.recipe, f.vocab));
            match read {
                Err(_) => panic!("reading {} after {edits:?} panicked", names[file]),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert!(names.iter().any(|n| msg.contains(n)), "the error names no file: {msg}");
                }
                Ok(Ok(())) => {}
            }
        });
    }
}

/// A run folder with one checkpoint of the tiny model, and what restoring needs.
struct CheckpointFixture {
    _tmp: tempfile::TempDir,
    clean: PathBuf,
    run: PathBuf,
    encoder: Encoder,
    tc: TrainConfig,
}

fn checkpoint_fixture() -> CheckpointFixture {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 1, "");
    let encoder = Encoder::load(&files, Pooling::Cls, true, &Device::Cpu).unwrap();
    let tc = TrainConfig::default();
    let opt = AdamW::new(encoder.vars(), tc.adamw()).unwrap();
    let state = TrainState { step: 7, epoch: 1, model: encoder.files.spec.clone(), ..TrainState::default() };
    let clean = tmp.path().join("clean");
    let saved = checkpoint::save(&clean, &state, &encoder, &opt, 2).unwrap();
    assert!(saved.starts_with(&clean));
    let run = tmp.path().join("run");
    CheckpointFixture { _tmp: tmp, clean, run, encoder, tc }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any edit of a checkpoint's tensor files makes restoring skip it (their sha256 is in
    /// `state.json`); an edit of `state.json` is skipped or restores; never a panic.
    #[test]
    fn damaged_checkpoints_are_skipped(
        file in 0usize..3,
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        thread_local!(static FIX: CheckpointFixture = checkpoint_fixture());
        FIX.with(|f| {
            let step_dir = Path::new("checkpoints/step-0000007");
            let _ = std::fs::remove_dir_all(&f.run);
            std::fs::create_dir_all(f.run.join(step_dir)).unwrap();
            copy_dir(&f.clean.join(step_dir), &f.run.join(step_dir));
            let name = ["model.safetensors", "optimizer.safetensors", "state.json"][file];
            let changed = damage(&f.run.join(step_dir).join(name), &edits);
            let mut opt = AdamW::new(f.encoder.vars(), f.tc.adamw()).unwrap();
            let mut warnings = Vec::new();
            let restored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                checkpoint::restore_latest(&f.run, &f.encoder, &mut opt, &mut |w| warnings.push(w))
            }))
            .unwrap_or_else(|_| panic!("restoring after {edits:?} of {name} panicked"))
            .unwrap();
            if changed && file < 2 {
                assert!(restored.is_none(), "a damaged {name} was loaded");
                assert!(warnings.iter().any(|w| w.contains(name)), "{warnings:?}");
            }
        });
    }
}
