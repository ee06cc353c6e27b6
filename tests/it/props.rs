//! Property tests (the fuzzing of this project): the sentence splitter, the book reader, the
//! config parser and the corpus walker on arbitrary input never panic (or hang), sentences are
//! substrings of the input in order, and a walk lists every book once. `PROPTEST_CASES` sets the number of cases (CI runs the default 256 per property).

use std::path::Path;

use hypersphere::config::RunConfig;
use hypersphere::data::books::corpus::parse_book;
use hypersphere::data::books::sentences::split_sentences;
use proptest::prelude::*;

/// Text that looks like fiction: words, titles, initials, quotes, dashes, ellipses, newlines.
fn prose() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[A-Za-z]{1,8}",
        Just("Mr.".to_string()),
        Just("Dr.".to_string()),
        Just("St.".to_string()),
        Just("J.".to_string()),
        Just("...".to_string()),
        Just("…".to_string()),
        Just("—".to_string()),
        Just("“".to_string()),
        Just("”".to_string()),
        Just("‘".to_string()),
        Just("’".to_string()),
        Just("?”".to_string()),
        Just(".’".to_string()),
        Just("3.5".to_string()),
        Just("CHAPTER IV.".to_string()),
        "[.!?,;:]",
        Just("\n".to_string()),
        Just("\n\n".to_string()),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec((piece, prop_oneof![Just(" "), Just(""), Just("  ")]), 0..60)
        .prop_map(|v| v.into_iter().map(|(p, s)| p + s).collect())
}

/// Each sentence is a slice of `text` at or after the end of the previous one.
fn in_order(text: &str, sentences: &[&str]) -> bool {
    let mut at = 0;
    for s in sentences {
        match text[at..].find(s) {
            Some(i) => at += i + s.len(),
            None => return false,
        }
    }
    true
}

proptest! {
    #[test]
    fn splitter_returns_trimmed_substrings_in_order(text in prose()) {
        let sentences = split_sentences(&text);
        prop_assert!(in_order(&text, &sentences), "{text:?} -> {sentences:?}");
        for s in &sentences {
            prop_assert!(!s.is_empty() && s.trim() == *s);
            // Slices of the input, not copies.
            let (p, q) = (text.as_ptr() as usize, s.as_ptr() as usize);
            prop_assert!(q >= p && q + s.len() <= p + text.len());
        }
    }

    #[test]
    fn splitter_survives_arbitrary_unicode(text in any::<String>()) {
        let sentences = split_sentences(&text);
        prop_assert!(in_order(&text, &sentences));
    }

    #[test]
    fn book_reader_never_panics_and_keeps_text(text in prose()) {
        if let Ok(book) = parse_book("b", Path::new("b.txt"), &text) {
            let joined: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            for s in book.chapters.iter().flat_map(|c| c.paragraphs.iter().flatten()) {
                let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
                prop_assert!(joined.contains(&s), "{s:?} not in {joined:?}");
            }
        }
    }

    #[test]
    fn config_parser_never_panics(text in "[\\[\\]a-z_.= \"0-9\n-]{0,80}", key in "[a-z_.]{1,20}", value in "[a-z0-9.\"\\[\\]-]{0,12}") {
        let _ = RunConfig::from_toml(&text, Path::new("fuzz.toml"), &[]);
        let _ = RunConfig::from_toml("", Path::new("fuzz.toml"), &[format!("{key}={value}")]);
    }

    /// A real key with any value: accepted, or an error that names the key or the --set.
    #[test]
    fn config_errors_name_the_key(
        key in prop::sample::select(vec!["train.steps", "train.lr", "loss.kind", "loss.t", "model.pooling", "data.corpus", "eval.tasks", "seed", "train.select"]),
        value in "[a-z0-9.\"\\[\\]-]{0,12}",
    ) {
        let kv = format!("{key}={value}");
        if let Err(e) = RunConfig::from_toml("", Path::new("fuzz.toml"), std::slice::from_ref(&kv)) {
            let e = e.to_string();
            prop_assert!(e.contains(key) || e.contains(&kv), "{e}");
        }
    }

    /// Random trees of folders (deep, odd names), books and links (to folders above, to each
    /// other, dangling): the walk ends, and lists each book file exactly once.
    #[cfg(unix)]
    #[test]
    fn corpus_walk_lists_every_book_once(ops in prop::collection::vec((0usize..4, 0usize..64, name()), 1..24)) {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("corpus");
        std::fs::create_dir(&root).unwrap();
        let mut dirs = vec![root.clone()];
        let mut books = std::collections::BTreeSet::new();
        for (kind, at, name) in ops {
            let parent = dirs[at % dirs.len()].clone();
            let path = match kind {
                1 | 3 => parent.join(format!("{name}.txt")),
                _ => parent.join(&name),
            };
            if path.symlink_metadata().is_ok() {
                continue;
            }
            match kind {
                0 => {
                    std::fs::create_dir(&path).unwrap();
                    dirs.push(path);
                }
                1 => {
                    std::fs::write(&path, "One line. Two lines.\n").unwrap();
                    books.insert(std::fs::metadata(&path).unwrap().ino());
                }
                // A link to some folder: an ancestor (a loop), a sibling or itself.
                2 => std::os::unix::fs::symlink(&dirs[(at / 2) % dirs.len()], &path).unwrap(),
                _ => std::os::unix::fs::symlink(parent.join("nowhere"), &path).unwrap(),
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let r = root.clone();
        std::thread::spawn(move || { let _ = tx.send(hypersphere::data::books::corpus::walk_books(&r)); });
        let walk = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk did not end in 20 s");
        match walk {
            Ok(w) => {
                let listed: Vec<u64> = w.files.iter().map(|f| std::fs::metadata(f).unwrap().ino()).collect();
                let unique: std::collections::BTreeSet<u64> = listed.iter().copied().collect();
                prop_assert_eq!(listed.len(), unique.len(), "a book listed twice: {:?}", w.files);
                prop_assert_eq!(unique, books);
            }
            Err(e) => prop_assert!(books.is_empty() && e.to_string().contains("no .txt files"), "{e}"),
        }
    }
}

/// File and folder names with spaces, dots, dashes, unicode and long runs.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}",
        "[ .a-zé中-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != ".." && !s.contains('/')),
        "a{100,200}",
    ]
}
