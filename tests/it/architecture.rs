//! The layering rules of the source tree, checked on the source itself (tests aside): no
//! import cycle between files, one error type, printing only in the front end, small files and
//! functions, settings where 0 means "the default" decoded only where the config is
//! resolved, and gradients of an encoder taken through `model::backward`. A change that breaks a rule fails here, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, by path relative to the crate root, with its text up to its
/// first `#[cfg(test)]` (the tests).
fn sources() -> BTreeMap<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeMap::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), code);
            }
        }
    }
    out
}

/// The module path of a file: `src/train/step.rs` -> [train, step]; `mod.rs`, `lib.rs` and
/// `main.rs` stand for their folder.
fn module_of(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        file.strip_prefix("src").unwrap().with_extension("").iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Code without comments and string contents, so neither is mistaken for a path.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        '\n' => out.push('\n'),
                        _ => {}
                    }
                }
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

/// `a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e].
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.to_string()] };
    let (prefix, body) = (&tree[..open], &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())]);
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts.iter().filter(|p| !p.trim().is_empty()).flat_map(|p| expand(p)).map(|p| format!("{prefix}{p}")).collect()
}

/// The file a path used in `from` names, if it is one of `modules`.
fn resolve(from: &[String], path: &str, modules: &BTreeMap<Vec<String>, PathBuf>) -> Option<PathBuf> {
    let segs: Vec<String> = path
        .split("::")
        .map(|s| s.split(" as ").next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut abs: Vec<String> = match segs.first()?.as_str() {
        "crate" => segs[1..].to_vec(),
        "super" => {
            let ups = segs.iter().take_while(|s| *s == "super").count();
            let mut base = from[..from.len().saturating_sub(ups)].to_vec();
            base.extend(segs[ups..].iter().cloned());
            base
        }
        "self" => from.iter().chain(&segs[1..]).cloned().collect(),
        first => {
            let child: Vec<String> = from.iter().cloned().chain([first.to_string()]).collect();
            if !modules.contains_key(&child) {
                return None;
            }
            from.iter().chain(&segs).cloned().collect()
        }
    };
    while !abs.is_empty() && !modules.contains_key(&abs) {
        abs.pop();
    }
    modules.get(&abs).cloned()
}

/// Which files each file uses (`use` items and `crate::`/`super::` paths in code).
fn imports(files: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let modules: BTreeMap<Vec<String>, PathBuf> = files.keys().map(|f| (module_of(f), f.clone())).collect();
    let mut out = BTreeMap::new();
    for (file, text) in files {
        let from = module_of(file);
        let code = code_only(text);
        let mut used = BTreeSet::new();
        let mut add = |path: &str| {
            if let Some(f) = resolve(&from, path, &modules).filter(|f| f != file) {
                used.insert(f);
            }
        };
        for stmt in code.split(';') {
            if let Some(tree) =
                stmt.trim_start().strip_prefix("use ").or_else(|| stmt.trim_start().strip_prefix("pub use "))
            {
                expand(tree).iter().for_each(|p| add(p));
            }
        }
        for (i, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
            let before = code[..i].chars().last().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' || before == ':' {
                continue;
            }
            let end =
                code[i..].find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).map_or(code.len(), |e| i + e);
            add(&code[i..end]);
        }
        out.insert(file.clone(), used);
    }
    out
}

#[test]
fn no_file_imports_itself_through_others() {
    let graph = imports(&sources());
    assert!(graph.len() > 40, "found only {} source files", graph.len());
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        f: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        state.insert(f.clone(), 1);
        stack.push(f.clone());
        for g in &graph[f] {
            match state.get(g).copied().unwrap_or(0) {
                1 => return Some(stack[stack.iter().position(|s| s == g).unwrap()..].to_vec()),
                0 => {
                    if let Some(c) = visit(g, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(f.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for f in graph.keys() {
        if state.get(f).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(f, &graph, &mut state, &mut Vec::new()) {
                panic!("files importing each other: {cycle:?}");
            }
        }
    }
    // The checker sees real edges: the trainer uses the step, and the step does not use the loop.
    let step = PathBuf::from("src/train/step.rs");
    assert!(graph[&PathBuf::from("src/train/loop.rs")].contains(&step));
    assert!(!graph[&step].contains(&PathBuf::from("src/train/loop.rs")));
}

/// The top-level generic arguments at the start of `s` (just after a `<`), up to its `>`.
fn generic_args(s: &str) -> Vec<String> {
    let (mut args, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' if depth == 0 => break,
            '>' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                args.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    args.push(cur);
    args
}

#[test]
fn one_error_type_and_printing_only_in_the_front_end() {
    assert_eq!(generic_args("T,String>rest"), ["T", "String"]);
    assert_eq!(generic_args("BTreeMap<String,String>>"), ["BTreeMap<String,String>"]);
    for (file, text) in sources() {
        let code = code_only(&text);
        let compact: String = code.split_whitespace().collect();
        for (i, _) in compact.match_indices("Result<") {
            assert!(
                generic_args(&compact[i + "Result<".len()..]).get(1).map(String::as_str) != Some("String"),
                "{}: a Result with a String error; use crate::Error",
                file.display()
            );
        }
        let front = file.starts_with("src/app") || file.ends_with("main.rs") || file.ends_with("cli.rs");
        if !front {
            for what in ["println!", "eprintln!", "print!(", "eprint!(", "indicatif"] {
                assert!(!code.contains(what), "{}: {what} outside main.rs, cli.rs and src/app/", file.display());
            }
        }
    }
}

/// candle's own `.backward()` leaves the parameters of fused training layers without gradients
/// (they leave by a sink that `model::backward` empties), and AdamW skips a parameter without
/// one: so outside tests it is called only where no encoder is on the graph. `train/step.rs`:
/// the loss over gathered, detached embeddings, and an empty store; `dist/mod.rs`: an empty
/// store; `model/ops/layer.rs`: `model::backward` itself.
#[test]
fn encoder_gradients_go_through_model_backward() {
    let allowed = [("src/model/ops/layer.rs", 1), ("src/train/step.rs", 2), ("src/dist/mod.rs", 1)];
    for (file, text) in sources().into_iter().filter(|(f, _)| !f.ends_with("tests.rs")) {
        let calls = code_only(&text).matches(".backward()").count();
        let expect = allowed.iter().find(|(f, _)| Path::new(f) == file).map_or(0, |(_, n)| *n);
        assert_eq!(
            calls,
            expect,
            "{}: .backward() calls; an encoder's loss goes through model::backward",
            file.display()
        );
    }
}

#[test]
fn files_and_functions_stay_small() {
    for (file, text) in sources() {
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() <= 600, "{}: {} lines before its tests (600 at most)", file.display(), lines.len());
        let code = code_only(&text);
        let code_lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < code_lines.len() {
            let l = code_lines[i].trim_start();
            let is_fn = l.split_whitespace().take(4).any(|w| w == "fn") && !l.starts_with("//");
            if !is_fn {
                i += 1;
                continue;
            }
            let (mut depth, mut started, mut j) = (0i32, false, i);
            while j < code_lines.len() {
                for c in code_lines[j].chars() {
                    match c {
                        '{' => (depth, started) = (depth + 1, true),
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (started && depth == 0) || (!started && code_lines[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            assert!(j - i < 80, "{}:{}: a function of {} lines (80 at most)", file.display(), i + 1, j - i + 1);
            i = j + 1;
        }
    }
}

/// Settings where 0 means "the default" are decoded once, in `config/resolved.rs`: nothing
/// else reads the raw keys.
#[test]
fn zero_means_default_settings_are_read_only_where_resolved() {
    let raw = [".train.steps", ".train.epochs", ".micro_batch_pairs", ".eval.max_len", ".max_books", ".distill_z_tau"];
    for (file, text) in sources() {
        if file.starts_with("src/config") || file.starts_with("src/loss/objective.rs") {
            continue;
        }
        let code = code_only(&text);
        for key in raw {
            for (i, _) in code.match_indices(key) {
                let next = code[i + key.len()..].chars().next().unwrap_or(' ');
                let read = !(next.is_alphanumeric() || next == '_' || next == '(');
                assert!(!read, "{}: reads {key}; use config::resolved::Resolved", file.display());
            }
        }
    }
}
