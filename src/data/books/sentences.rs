//! Rule-based sentence splitting and heading detection for 19th-century prose.
//!
//! Training pairs are adjacent sentences, so a wrong break makes a wrong pair; the rules
//! below are tuned for novels (curly and straight quotes, titles such as "Mr.", initials),
//! and keep every sentence a slice of its paragraph.

/// Characters that can end a sentence.
pub(super) const TERMINALS: &[char] = &['.', '!', '?', '…'];
/// Closing quotes and brackets that belong to the sentence they follow (`´` closes in some ELTeC texts).
pub(super) const CLOSERS: &[char] = &['"', '\'', '”', '’', '´', ')', ']'];
/// Opening quotes and brackets that may start a sentence.
const OPENERS: &[char] = &['"', '\'', '“', '‘', '`', '(', '['];
/// Punctuation that ends a paragraph without ending a sentence (broken-off speech, a colon before a quote).
const RUN_ON_ENDS: &[char] = &['—', '–', '-', ':', ';', ','];
/// Words that take a full stop but rarely end a sentence (compared case-insensitively).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "messrs", "dr", "st", "jr", "sr", "prof", "rev", "hon", "capt", "col", "gen", "maj", "sgt",
    "lt", "mt", "vs", "etc",
];
/// Headings are short: a longer line without final punctuation is taken as unfinished prose.
const MAX_HEADING_WORDS: usize = 20;

/// Split a paragraph into sentences: trimmed, non-empty substrings of the input, in order.
///
/// A break needs a run of `.` `!` `?` `…` (an ellipsis counts like a full stop), then any closing
/// quotes or brackets (kept with the sentence), then whitespace, then an upper-case letter, a
/// digit or an opening quote/bracket. A single `.` after a title ("Mr."), an initial ("J.") or
/// dotted initials ("A.D."), or "No." before a digit, is not a break. Known limit: a speech tag
/// starting with a capital after a question or exclamation ("“Stop!” Tom cried.") is split off.
pub fn split_sentences(paragraph: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = paragraph.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !TERMINALS.contains(&c) {
            continue;
        }
        let mut end = i + c.len_utf8();
        let mut single_dot = c == '.';
        while let Some((j, d)) = chars.next_if(|&(_, d)| TERMINALS.contains(&d)) {
            single_dot = false;
            end = j + d.len_utf8();
        }
        while let Some((j, d)) = chars.next_if(|&(_, d)| CLOSERS.contains(&d)) {
            single_dot = false;
            end = j + d.len_utf8();
        }
        let rest = &paragraph[end..];
        let next = rest.trim_start();
        let Some(first) = next.chars().next() else {
            break;
        };
        let starts = first.is_uppercase() || first.is_ascii_digit() || OPENERS.contains(&first);
        if next.len() == rest.len() || !starts {
            continue;
        }
        if single_dot && is_abbreviation(&paragraph[start..i], first) {
            continue;
        }
        push_trimmed(&mut out, &paragraph[start..end]);
        start = paragraph.len() - next.len();
    }
    push_trimmed(&mut out, &paragraph[start..]);
    out
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let s = s.trim();
    if !s.is_empty() {
        out.push(s);
    }
}

/// Whether the word just before a full stop (`before` ends right before the dot) is an abbreviation.
fn is_abbreviation(before: &str, next: char) -> bool {
    let word = before.rsplit(char::is_whitespace).next().unwrap_or("");
    let word = word.trim_start_matches(OPENERS);
    ABBREVIATIONS.iter().any(|a| a.eq_ignore_ascii_case(word))
        || (word == "No" && next.is_ascii_digit())
        || word.split('.').all(|p| {
            let mut cs = p.chars();
            matches!((cs.next(), cs.next()), (Some(c), None) if c.is_alphabetic())
        })
}

/// A line that is a heading, not prose.
///
/// Either all its letters are upper-case ("CHAPTER XII.", "BOOK THE FIRST", "III", "THE END.";
/// a lone capital inside quotes, as in "“I?”", is speech), or it has at most 20 words and does
/// not end (before closing quotes/brackets) in sentence punctuation `. ! ? …` nor in `— – - : ; ,`,
/// which end broken-off or introducing paragraphs ("The Return", "Chapter 4", "* * *").
/// Empty lines are not headings.
pub fn is_heading(line: &str) -> bool {
    let line = line.trim();
    if line.is_empty() {
        return false;
    }
    let letters = line.chars().filter(|c| c.is_alphabetic());
    let n_letters = letters.clone().count();
    let quoted = line.contains(OPENERS) || line.contains(CLOSERS);
    let upper = n_letters > 0 && letters.clone().all(|c| !c.is_lowercase()) && letters.clone().any(char::is_uppercase);
    if upper && (n_letters >= 2 || !quoted) {
        return true;
    }
    let body = line.trim_end_matches(|c: char| CLOSERS.contains(&c) || c.is_whitespace());
    let ends_prose = body.chars().next_back().is_some_and(|c| TERMINALS.contains(&c) || RUN_ON_ENDS.contains(&c));
    !ends_prose && line.split_whitespace().count() <= MAX_HEADING_WORDS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &str, want: &[&str]) {
        assert_eq!(split_sentences(p), want, "paragraph: {p}");
    }

    #[test]
    fn plain_breaks() {
        check("The cat slept. The dog barked! Did it rain?", &["The cat slept.", "The dog barked!", "Did it rain?"]);
        check("  One here.   Two   there.  ", &["One here.", "Two   there."]);
        check("", &[]);
        check("   ", &[]);
        check("no final stop", &["no final stop"]);
        check("Wait?! Then go.", &["Wait?!", "Then go."]);
    }

    #[test]
    fn titles_and_initials() {
        check(
            "Mr. Hale and Mrs. Orme met Dr. Pike at St. Bede's. Capt. Rowe came too.",
            &["Mr. Hale and Mrs. Orme met Dr. Pike at St. Bede's.", "Capt. Rowe came too."],
        );
        check(
            "Ask Prof. Lind, Rev. Moss, Col. Dane and Lt. Fry. They know.",
            &["Ask Prof. Lind, Rev. Moss, Col. Dane and Lt. Fry.", "They know."],
        );
        check(
            "A letter from J. R. Tolley arrived. Mr. A. Brown read it.",
            &["A letter from J. R. Tolley arrived.", "Mr. A. Brown read it."],
        );
        check(
            "It was built in 870 A.D. By then the town had grown.",
            &["It was built in 870 A.D. By then the town had grown."],
        );
        check("Bring pens, ink, etc. Tomorrow we write.", &["Bring pens, ink, etc. Tomorrow we write."]);
        check("We bought pens, ink, etc.", &["We bought pens, ink, etc."]);
        check(
            "He lived at No. 12 Mill Lane. No. I will not go.",
            &["He lived at No. 12 Mill Lane.", "No.", "I will not go."],
        );
        check("(Mr. Vane was late.) Nobody minded.", &["(Mr. Vane was late.)", "Nobody minded."]);
    }

    #[test]
    fn quotes_and_brackets() {
        check("“Who is there?” she asked. “Only me.”", &["“Who is there?” she asked.", "“Only me.”"]);
        // Known limit: a capitalised word after `?”` breaks, even when it starts the speech tag.
        check("“Stop!” Mr. Vane cried.", &["“Stop!”", "Mr. Vane cried."]);
        check("‘Run!’ he cried. ‘Now!’ And they ran.", &["‘Run!’ he cried.", "‘Now!’", "And they ran."]);
        check("She said, ‘It is late.’ Then she left.", &["She said, ‘It is late.’", "Then she left."]);
        check("\"Go home.\" \"Why?\" he asked.", &["\"Go home.\"", "\"Why?\" he asked."]);
        check("He smiled (it was rare.) Then he spoke.", &["He smiled (it was rare.)", "Then he spoke."]);
        check(
            "`Good day,´ said he. `Good day.´ Then silence.",
            &["`Good day,´ said he.", "`Good day.´", "Then silence."],
        );
    }

    #[test]
    fn dashes_decimals_ellipses() {
        check(
            "He came — late, as usual — and sat down. We ate.",
            &["He came — late, as usual — and sat down.", "We ate."],
        );
        check("It cost 3.5 pounds. That was dear.", &["It cost 3.5 pounds.", "That was dear."]);
        check("The year ended. 1850 began badly.", &["The year ended.", "1850 began badly."]);
        check("Well... perhaps not. I waited… Nobody came.", &["Well... perhaps not.", "I waited…", "Nobody came."]);
        check("“If only…” she said, and stopped.", &["“If only…” she said, and stopped."]);
        check("He paused. . . . Then he went on.", &["He paused. . . .", "Then he went on."]);
    }

    #[test]
    fn headings() {
        for h in [
            "CHAPTER XII.",
            "BOOK THE FIRST",
            "III",
            "THE END.",
            "IV.",
            "The Return",
            "Chapter 4",
            "* * * * *",
            "  THE OLD MILL  ",
            "“HOME AGAIN.”",
        ] {
            assert!(is_heading(h), "{h}");
        }
        for p in [
            "The rain stopped.",
            "“Who is it?” she asked.",
            "He began to say—",
            "He wrote as follows:",
            "“I?”",
            "“But I never—”",
            "",
            "Oh, it is you, Tom!’",
        ] {
            assert!(!is_heading(p), "{p}");
        }
        let long = "and so the long day went on and on without a pause while the men worked in the far fields until the sun went down at last";
        assert!(!is_heading(long));
    }

    /// Every sentence is a non-empty trimmed slice of the paragraph, in order, without overlap.
    #[test]
    fn real_corpus_substrings_in_order() {
        let dir = crate::test_data::root();
        let books = dir.join("books/eltec-eng");
        let mut files: Vec<_> = std::fs::read_dir(&books).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "txt"));
        files.sort();
        let (mut paragraphs, mut sentences) = (0, 0);
        for f in files.iter().step_by(4) {
            let text = std::fs::read_to_string(f).unwrap();
            for para in text.lines().filter(|l| !l.trim().is_empty()) {
                let base = para.as_ptr() as usize;
                let mut pos = 0;
                for s in split_sentences(para) {
                    let off = s.as_ptr() as usize - base;
                    assert!(off >= pos && off + s.len() <= para.len(), "{s:?} in {para:?}");
                    assert!(!s.is_empty() && s.trim() == s);
                    assert_eq!(&para[off..off + s.len()], s);
                    pos = off + s.len();
                    sentences += 1;
                }
                paragraphs += 1;
            }
        }
        assert!(paragraphs > 10_000 && sentences > paragraphs, "{paragraphs} {sentences}");
    }
}
