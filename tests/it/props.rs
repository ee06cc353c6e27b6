//! Property tests (the fuzzing of this project): the sentence splitter, the book reader and the
//! config parser on arbitrary input never panic, and sentences are substrings of the input in
//! order. `PROPTEST_CASES` sets the number of cases (CI runs the default 256 per property).

use std::path::Path;

use hypersphere::config::RunConfig;
use hypersphere::data::corpus::parse_book;
use hypersphere::data::sentences::split_sentences;
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
}
