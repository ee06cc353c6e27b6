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

/// The books a corpus path names, each file once, and the links the walk left out.
#[derive(Debug, Default)]
pub struct BookFiles {
    /// Sorted by path; a file reached by several paths (links) is listed once, by its first path.
    pub files: Vec<PathBuf>,
    /// Paths not followed: broken links, links to a folder that contains them (loops), and
    /// folders and books already reached through another path (links, hard links).
    pub skipped: Vec<PathBuf>,
}

/// A `.txt` file (any file named directly is taken), or a folder searched recursively for
/// `.txt` files; sorted by path. See [`walk_books`].
pub fn list_book_files(path: &Path) -> Result<Vec<PathBuf>> {
    walk_books(path).map(|w| w.files)
}

/// Identity of a file or folder, whatever path reaches it (device and inode on Unix).
fn file_id(path: &Path, meta: &std::fs::Metadata) -> Result<(u64, u64, PathBuf)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = path;
        Ok((meta.dev(), meta.ino(), PathBuf::new()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok((0, 0, std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?))
    }
}

/// Whether folder `link`'s target is `dir` or one of its ancestors.
fn contains(link: &Path, dir: &Path) -> Result<bool> {
    let target = std::fs::canonicalize(link).map_err(|e| Error::io(link, e))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    Ok(dir.starts_with(target))
}

/// Walk a corpus folder once: links are followed, but every folder and file is visited once
/// (by identity, so links and hard links cannot repeat a book or loop), and a link to a folder
/// that contains it (`ln -s .. up`) is skipped rather than walked out of the corpus. Entries
/// are visited in name order, so which path names a repeated file does not vary.
pub fn walk_books(path: &Path) -> Result<BookFiles> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::data(path, "no such file or folder; give a .txt book or a folder of them")
        }
        _ => Error::io(path, e),
    })?;
    if meta.is_file() {
        return Ok(BookFiles { files: vec![path.to_path_buf()], skipped: Vec::new() });
    }
    let mut walk = BookFiles::default();
    let mut seen = std::collections::HashSet::new();
    seen.insert(file_id(path, &meta)?);
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let mut entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .map(|e| {
                let e = e.map_err(|e| Error::io(&dir, e))?;
                let is_link = e.file_type().map_err(|err| Error::io(e.path(), err))?.is_symlink();
                Ok((is_link, e.file_name(), e.path()))
            })
            .collect::<Result<Vec<_>>>()?;
        // Real entries before links, so a book and a link to it are listed under the book's name.
        entries.sort();
        let mut subdirs = Vec::new();
        for (is_link, _, p) in entries {
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(_) if is_link => {
                    walk.skipped.push(p);
                    continue;
                }
                Err(e) => return Err(Error::io(&p, e)),
            };
            let is_txt = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"));
            if !(meta.is_dir() || (meta.is_file() && is_txt)) {
                continue;
            }
            if is_link && meta.is_dir() && contains(&p, &dir)? {
                walk.skipped.push(p);
                continue;
            }
            if !seen.insert(file_id(&p, &meta)?) {
                // Already listed or walked: a link (or hard link) back to it, a loop or a
                // repeat; skipped, and listed so the note names it.
                walk.skipped.push(p);
                continue;
            }
            if meta.is_dir() {
                subdirs.push(p);
            } else {
                walk.files.push(p);
            }
        }
        // Reversed onto the stack, so folders are walked in name order.
        dirs.extend(subdirs.into_iter().rev());
    }
    if walk.files.is_empty() {
        return Err(Error::data(path, "folder has no .txt files; add UTF-8 .txt books (one paragraph per line)"));
    }
    walk.files.sort();
    Ok(walk)
}

/// Read one book (UTF-8 text; see [`parse_book`] for the layouts).
pub fn read_book(path: &Path) -> Result<Book> {
    let text = crate::data::read_text(path)?;
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
/// dropped; empty chapters are dropped. A UTF-8 BOM is accepted, and `\r\n` and lone `\r`
/// (old Mac text) end lines as `\n` does.
pub fn parse_book(name: &str, path: &Path, text: &str) -> Result<Book> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::data(path, "empty file"));
    }
    let text: std::borrow::Cow<str> = match text.contains('\r') {
        true => text.replace("\r\n", "\n").replace('\r', "\n").into(),
        false => text.into(),
    };
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

    /// Lone CR line ends (old Mac text) read as the same book as LF and CRLF ones.
    #[test]
    fn every_line_end_convention_reads_the_same_book() {
        let lf =
            "CHAPTER I.\nThe boat left at dawn. Nobody waved.\nA gull cried.\n\nCHAPTER II.\nIt rained all week.\n";
        let book = parse(lf);
        assert_eq!(shape(&book), vec![vec![2, 1], vec![1]]);
        for text in [lf.replace('\n', "\r"), lf.replace('\n', "\r\n")] {
            let other = parse(&text);
            assert_eq!(shape(&other), shape(&book), "{text:?}");
            assert_eq!(other.chapters[0].paragraphs, book.chapters[0].paragraphs);
        }
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

    /// Links are followed once: loops, links to an ancestor, repeats, hard links and broken
    /// links neither hang the walk nor count a book twice. Run on a thread with a deadline,
    /// since the failure this guards against is a walk that never ends.
    #[cfg(unix)]
    #[test]
    fn links_never_loop_or_repeat() {
        use std::os::unix::fs::symlink;
        let root = temp_path("links");
        let dir = root.join("L");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("book.txt"), "One. Two.\n").unwrap();
        std::fs::write(root.join("outside.txt"), "Out.\n").unwrap();
        symlink(".", dir.join("x")).unwrap();
        symlink(".", dir.join("y")).unwrap();
        symlink("..", dir.join("up")).unwrap();
        symlink("..", dir.join("sub/back")).unwrap();
        symlink("book.txt", dir.join("alias.txt")).unwrap();
        symlink("nowhere", dir.join("broken.txt")).unwrap();
        std::fs::hard_link(dir.join("book.txt"), dir.join("sub/hard.txt")).unwrap();
        std::fs::write(dir.join("sub/other.txt"), "Three.\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || tx.send(walk_books(&d).unwrap()).unwrap());
        let walk = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the walk did not finish in 20 s");
        assert_eq!(walk.files, vec![dir.join("book.txt"), dir.join("sub/other.txt")]);
        let mut skipped = walk.skipped.clone();
        skipped.sort();
        // Every path not followed is named, the links and the hard link to a counted book too.
        let want = ["alias.txt", "broken.txt", "sub/back", "sub/hard.txt", "up", "x", "y"].map(|p| dir.join(p));
        assert_eq!(skipped, want);
        std::fs::remove_dir_all(&root).unwrap();
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
