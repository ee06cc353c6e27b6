//! Loading books: plain-text novels into chapters, paragraphs and sentences.
//!
//! Pairs never cross a chapter, so chapter structure is kept. Sentences are stored once as
//! `Arc<str>` so that pairs can share them; files are read one at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sentences::{is_heading, split_sentences, CLOSERS, TERMINALS};
use crate::error::{Error, Result};

/// One book: its chapters, in order.
#[derive(Clone, Debug)]
pub struct Book {
    /// File stem, e.g. "ENG18481_Dickens".
    pub name: String,
    pub path: PathBuf,
    pub chapters: Vec<Chapter>,
}

/// A chapter: the sentences of each paragraph, in order. Never empty once in a [`Book`].
#[derive(Clone, Debug, Default)]
pub struct Chapter {
    pub paragraphs: Vec<Vec<Arc<str>>>,
}

/// A `.txt` file (any file named directly is taken), or a folder searched recursively for
/// `.txt` files; sorted by path.
pub fn list_book_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::data(path, "no such file or folder; give a .txt book or a folder of them"));
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let p = entry.map_err(|e| Error::io(&dir, e))?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt")) {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        return Err(Error::data(path, "folder has no .txt files; add UTF-8 .txt books (one paragraph per line)"));
    }
    files.sort();
    Ok(files)
}

/// Read one book (UTF-8 text; see [`parse_book`] for the layouts).
pub fn read_book(path: &Path) -> Result<Book> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Error::data(
            path,
            format!("not valid UTF-8 at byte {at}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
        )
    })?;
    let name = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    parse_book(&name, path, &text)
}

/// Parse a book's text; `path` is only used in errors and stored in the [`Book`].
///
/// Two layouts, detected per file:
/// - one paragraph per line, an empty line between chapters (ELTeC);
/// - hard-wrapped: paragraphs are blocks of lines separated by one blank line (lines joined with
///   a space), chapters are separated by two or more blank lines. Chosen when more than half of
///   the non-empty lines run on: the next line is non-empty and the line does not end a sentence.
///
/// In both, a heading ([`is_heading`]; a whole block when hard-wrapped) ends the chapter and is
/// dropped; empty chapters are dropped. A UTF-8 BOM and `\r\n` line ends are accepted.
pub fn parse_book(name: &str, path: &Path, text: &str) -> Result<Book> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::data(path, "empty file"));
    }
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut chapters = Vec::new();
    let mut chapter = Chapter::default();
    let mut add = |block: Option<&str>| match block {
        Some(p) if !is_heading(p) => {
            let sentences = split_sentences(p).into_iter().map(Arc::from).collect();
            chapter.paragraphs.push(sentences);
        }
        _ if !chapter.paragraphs.is_empty() => chapters.push(std::mem::take(&mut chapter)),
        _ => {}
    };
    if is_hard_wrapped(&lines) {
        // Splitting on blank lines leaves an empty block between consecutive blanks: a chapter break.
        for block in lines.split(|l| l.is_empty()) {
            add((!block.is_empty()).then(|| block.join(" ")).as_deref());
        }
    } else {
        for line in &lines {
            add((!line.is_empty()).then_some(*line));
        }
    }
    add(None);
    if chapters.is_empty() {
        return Err(Error::data(path, "no sentences found (only headings or blank lines)"));
    }
    Ok(Book { name: name.to_string(), path: path.to_path_buf(), chapters })
}

/// Whether most non-empty lines continue on the next line (see [`parse_book`]).
fn is_hard_wrapped(lines: &[&str]) -> bool {
    let non_empty = lines.iter().filter(|l| !l.is_empty()).count();
    let run_on = lines.windows(2).filter(|w| !w[0].is_empty() && !w[1].is_empty() && !ends_sentence(w[0])).count();
    run_on * 2 > non_empty
}

fn ends_sentence(line: &str) -> bool {
    line.trim_end_matches(CLOSERS).ends_with(TERMINALS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Book {
        parse_book("t", Path::new("t.txt"), text).unwrap()
    }

    fn shape(book: &Book) -> Vec<Vec<usize>> {
        book.chapters.iter().map(|c| c.paragraphs.iter().map(Vec::len).collect()).collect()
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hs-corpus-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn paragraph_per_line() {
        let text = "\u{feff}CHAPTER I.\r\nThe boat left at dawn. Nobody waved.\r\n“Where to?” asked Mr. Gray.\r\n\r\nCHAPTER II.\nIt rained all week.\n\n\n";
        let book = parse(text);
        assert_eq!(shape(&book), vec![vec![2, 1], vec![1]]);
        assert_eq!(&*book.chapters[0].paragraphs[1][0], "“Where to?” asked Mr. Gray.");
        assert_eq!(&*book.chapters[0].paragraphs[0][0], "The boat left at dawn.");
    }

    #[test]
    fn heading_ends_chapter_without_blank_line() {
        let book = parse("One line here.\nTHE SECOND PART\nAnother line. And more.\n");
        assert_eq!(shape(&book), vec![vec![1], vec![2]]);
    }

    #[test]
    fn hard_wrapped() {
        let text = "THE FIRST DAY\n\nThe old road ran\nalong the river, and the\nmill stood by it. Mrs. Lane\nlived there.\n\n“Come in,” she\nsaid to the boy.\n\n\nTHE SECOND DAY\n\nThe boy came\nback the next morning\nwith his sister.\n";
        let book = parse(text);
        assert_eq!(shape(&book), vec![vec![2, 1], vec![1]]);
        assert_eq!(&*book.chapters[0].paragraphs[0][0], "The old road ran along the river, and the mill stood by it.");
        assert_eq!(&*book.chapters[1].paragraphs[0][0], "The boy came back the next morning with his sister.");
        // Two blank lines without a heading also break the chapter.
        let book = parse(
            "The first block\nis wrapped over\nthree lines.\n\nThe second\nblock too.\n\n\nA third\nblock starts it.\n",
        );
        assert_eq!(shape(&book), vec![vec![1, 1], vec![1]]);
    }

    #[test]
    fn short_paragraph_lines_are_not_hard_wrapped() {
        let book = parse("Yes.\n“No!”\nWhy not?\nBecause.\n");
        assert_eq!(shape(&book), vec![vec![1, 1, 1, 1]]);
    }

    #[test]
    fn parse_errors() {
        let p = Path::new("dir/quiet.txt");
        for text in ["", " \n\n\t\n", "\u{feff}"] {
            let e = parse_book("quiet", p, text).unwrap_err().to_string();
            assert!(e.contains("quiet.txt") && e.contains("empty file"), "{e}");
        }
        let e = parse_book("quiet", p, "CHAPTER ONE\n\nTHE END\n").unwrap_err().to_string();
        assert!(e.contains("quiet.txt") && e.contains("no sentences"), "{e}");
    }

    #[test]
    fn file_errors() {
        let dir = temp_path("files");
        let bad = dir.join("latin.txt");
        std::fs::write(&bad, b"Fine text. \xff\xfe").unwrap();
        let e = read_book(&bad).unwrap_err().to_string();
        assert!(e.contains("latin.txt") && e.contains("UTF-8") && e.contains("byte 11"), "{e}");

        let empty = dir.join("blank.txt");
        std::fs::write(&empty, "\n\n").unwrap();
        let e = read_book(&empty).unwrap_err().to_string();
        assert!(e.contains("blank.txt") && e.contains("empty file"), "{e}");

        let e = read_book(&dir.join("gone.txt")).unwrap_err().to_string();
        assert!(e.contains("gone.txt"), "{e}");

        let e = list_book_files(&dir.join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("nowhere") && e.contains("no such file"), "{e}");

        let other = dir.join("notes");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("readme.md"), "hi").unwrap();
        let e = list_book_files(&other).unwrap_err().to_string();
        assert!(e.contains("notes") && e.contains("no .txt files"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lists_and_reads_folder() {
        let dir = temp_path("list");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.txt"), "Bee one. Bee two.\n").unwrap();
        std::fs::write(dir.join("sub/a.txt"), "Ay.\n").unwrap();
        std::fs::write(dir.join("c.md"), "skip").unwrap();
        let files = list_book_files(&dir).unwrap();
        assert_eq!(files, vec![dir.join("b.txt"), dir.join("sub/a.txt")]);
        assert_eq!(list_book_files(&files[0]).unwrap(), vec![files[0].clone()]);
        let book = read_book(&files[0]).unwrap();
        assert_eq!((book.name.as_str(), shape(&book)), ("b", vec![vec![2]]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fixture_books() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/books");
        if !dir.is_dir() {
            eprintln!("skipped: no {}", dir.display());
            return;
        }
        let books: Vec<Book> = list_book_files(&dir).unwrap().iter().map(|p| read_book(p).unwrap()).collect();
        let got: Vec<_> = books.iter().map(|b| (b.name.as_str(), shape(b))).collect();
        let want = vec![
            ("the_canal", vec![vec![2, 4, 3], vec![2, 3]]),
            ("the_lighthouse", vec![vec![3, 2, 2, 2], vec![2, 2, 2, 2]]),
            ("the_market", vec![vec![2, 2, 2, 2, 3], vec![2]]),
            ("the_orchard", vec![vec![2, 2, 2, 2], vec![2, 2, 3]]),
        ];
        assert_eq!(got, want);
        let canal = &books[0].chapters[0].paragraphs[1];
        assert_eq!(&*canal[2], "“How many more?” she asked.");
    }
}
