//! The house rules, checked by reading the source (ARCHITECTURE.md, "Rooms"):
//! the pipeline's rooms import one way, and no two files of any workspace crate
//! import each other, directly or around a longer circle.
//!
//! What counts as an import: a path written `crate::a::b…` anywhere in a file's
//! code (a `use` line, a grouped `use crate::{a, b::c}`, or an inline path), comments
//! left out. Items the crate root re-exports (`crate::Metrics`) count as the room
//! they come from. A file's own module ancestors (its `mod.rs`, `lib.rs`) are not a
//! circle: that is the module tree. The workspace writes `crate::` paths; `super::`
//! appears only as `use super::*` in test modules, which names the file itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room and the rooms its non-test code may import. Test code (a `*tests.rs`
/// file, or a `#[cfg(test)] mod tests` block) may also import `tools` (the simulator).
const ROOMS: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("obs", &["config"]),
    ("kafka", &["config", "obs"]),
    ("tools", &["config", "kafka"]),
    ("engine", &["config", "kafka", "obs"]),
    ("sql", &["config", "kafka", "obs", "engine"]),
    ("app", &["config", "kafka", "obs", "engine", "sql", "tools"]),
];
const TEST_ONLY: &[&str] = &["tools"];

fn workspace() -> PathBuf {
    twinguard_schemas::testing::manifest_dir().join("..")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's code with `//` comments blanked (string literals are kept: a
/// `"crate::"` inside one would be a false hit, and the test would say where).
fn code_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let mut in_str = false;
            let b = l.as_bytes();
            for i in 0..b.len() {
                match b[i] {
                    b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
                    b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return l[..i].to_string(),
                    _ => {}
                }
            }
            l.to_string()
        })
        .collect()
}

/// Every `crate::` path in `code` as its segments (a grouped `use crate::{…}` gives
/// one path per item), with the line it is on.
fn crate_paths(code: &[String]) -> Vec<(usize, Vec<String>)> {
    let joined: String = code.iter().map(|l| format!("{l}\n")).collect();
    let line_of = |pos: usize| joined[..pos].matches('\n').count() + 1;
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = joined[from..].find("crate::") {
        let at = from + i;
        from = at + 7;
        // `twinguard_schemas::crate::` never occurs; `$crate::` is a macro path.
        if at > 0 && (joined.as_bytes()[at - 1].is_ascii_alphanumeric() || matches!(joined.as_bytes()[at - 1], b'_' | b'$')) {
            continue;
        }
        let rest = &joined[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items up to the matching brace, split at top-level commas.
            let (mut depth, mut item, mut items) = (0, String::new(), Vec::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            items.push(item);
            for it in items {
                let segs: Vec<String> = it.split("::").map(|s| ident(s.trim())).take_while(|s| !s.is_empty()).collect();
                if !segs.is_empty() && segs[0] != "self" {
                    out.push((line_of(at), segs));
                }
            }
        } else {
            // Segments while each is a whole identifier followed by `::`.
            let mut segs = Vec::new();
            for seg in rest.split("::") {
                let id = ident(seg);
                if id.is_empty() {
                    break;
                }
                let whole = id.len() == seg.len();
                segs.push(id);
                if !whole {
                    break;
                }
            }
            if !segs.is_empty() {
                out.push((line_of(at), segs));
            }
        }
    }
    out
}

/// Lines of `code` inside test code: from a `#[cfg(test)]` line to the end of the
/// item it opens (brace depth), or the whole file for a `*tests.rs` file.
fn test_lines(file: &Path, code: &[String]) -> BTreeSet<usize> {
    if file.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("tests.rs")) {
        return (1..=code.len()).collect();
    }
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < code.len() {
        if code[i].trim() == "#[cfg(test)]" {
            let (mut depth, mut opened) = (0i32, false);
            let mut j = i;
            while j < code.len() {
                out.insert(j + 1);
                for c in code[j].chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && code[j].trim_end().ends_with(';')) {
                    break;
                }
                j += 1;
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// The room (top folder under `src/`) of a pipeline file; `None` for `lib.rs`,
/// `main.rs` and crate-level test files.
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?.to_string();
    parts.next().map(|_| first)
}

/// What the crate root re-exports: name -> the room it comes from
/// (`pub use obs::Metrics;` makes `crate::Metrics` an import of `obs`).
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for l in code_lines(lib) {
        let Some(rest) = l.trim().strip_prefix("pub use ") else { continue };
        let rest = rest.trim_end_matches(';');
        let room = rest.split("::").next().unwrap_or("").to_string();
        let names = match rest.find('{') {
            Some(b) => rest[b + 1..].trim_end_matches('}').split(',').map(|s| s.trim().to_string()).collect(),
            None => vec![rest.rsplit("::").next().unwrap_or("").to_string()],
        };
        for n in names {
            out.insert(n, room.clone());
        }
    }
    out
}

#[test]
fn pipeline_rooms_import_one_way() {
    let src = workspace().join("pipeline/src");
    let rooms: BTreeMap<&str, &[&str]> = ROOMS.iter().copied().collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen_rooms = BTreeSet::new();
    for f in &files {
        let Some(room) = room_of(&src, f) else { continue };
        let allowed = rooms.get(room.as_str()).unwrap_or_else(|| panic!("{}: room `{room}` is not in ROOMS (add it, with what it may import)", f.display()));
        seen_rooms.insert(room.clone());
        let code = code_lines(&std::fs::read_to_string(f).unwrap());
        let tests = test_lines(f, &code);
        for (line, segs) in crate_paths(&code) {
            let target = match reexports.get(&segs[0]) {
                Some(r) => r.clone(),
                None if rooms.contains_key(segs[0].as_str()) => segs[0].clone(),
                None => continue, // a root item (PipelineError)
            };
            if target == room {
                continue;
            }
            let ok = allowed.contains(&target.as_str()) || (tests.contains(&line) && TEST_ONLY.contains(&target.as_str()));
            if !ok {
                wrong.push(format!("{}:{line}: room `{room}` imports `{target}` (crate::{})", f.strip_prefix(&src).unwrap().display(), segs.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the rooms' direction (ARCHITECTURE.md, Rooms):\n{}", wrong.join("\n"));
    let declared: BTreeSet<String> = ROOMS.iter().map(|(r, _)| r.to_string()).collect();
    assert_eq!(seen_rooms, declared, "every room has files and every folder is a room");
}

/// The file a module path resolves to in a crate's `src`: the deepest file that
/// exists for a prefix of `segs` (`a/b.rs`, `a/b/mod.rs`, `a.rs`, `a/mod.rs`);
/// the crate root when none does (a root item).
fn resolve(src: &Path, root: &Path, segs: &[String]) -> PathBuf {
    for n in (1..=segs.len()).rev() {
        let dir: PathBuf = segs[..n - 1].iter().collect();
        for cand in [src.join(&dir).join(format!("{}.rs", segs[n - 1])), src.join(&dir).join(&segs[n - 1]).join("mod.rs")] {
            if cand.is_file() {
                return cand;
            }
        }
    }
    root.to_path_buf()
}

/// Whether `a` is a module ancestor of `b` (`x/mod.rs` or `x.rs` of `x/y.rs`, and
/// the crate root of everything).
fn ancestor(src: &Path, a: &Path, b: &Path) -> bool {
    let a_rel = a.strip_prefix(src).unwrap();
    let name = a_rel.file_name().unwrap().to_str().unwrap();
    if matches!(name, "lib.rs" | "main.rs") && a_rel.parent() == Some(Path::new("")) {
        return true;
    }
    let a_dir = if name == "mod.rs" { a.parent().unwrap().to_path_buf() } else { a.with_extension("") };
    b != a && b.starts_with(&a_dir)
}

#[test]
fn no_import_circles_between_files_in_the_workspace() {
    let ws = workspace();
    let mut circles = Vec::new();
    let mut edges_seen = 0;
    for krate in ["schemas", "operators", "models", "train", "pipeline"] {
        let src = ws.join(krate).join("src");
        let root = src.join("lib.rs");
        let mut files = Vec::new();
        rs_files(&src, &mut files);
        let mut graph: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for f in &files {
            let code = code_lines(&std::fs::read_to_string(f).unwrap());
            let deps = graph.entry(f.clone()).or_default();
            for (_, segs) in crate_paths(&code) {
                let to = resolve(&src, &root, &segs);
                if to != *f && !ancestor(&src, &to, f) && !ancestor(&src, f, &to) {
                    deps.insert(to);
                }
            }
            edges_seen += deps.len();
        }
        // Depth-first search for a back edge; report each circle once.
        fn visit(n: &PathBuf, g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>, state: &mut BTreeMap<PathBuf, u8>, stack: &mut Vec<PathBuf>, out: &mut Vec<Vec<PathBuf>>) {
            state.insert(n.clone(), 1);
            stack.push(n.clone());
            for m in g.get(n).into_iter().flatten() {
                match state.get(m).copied().unwrap_or(0) {
                    0 => visit(m, g, state, stack, out),
                    1 => {
                        let at = stack.iter().position(|x| x == m).unwrap();
                        out.push(stack[at..].to_vec());
                    }
                    _ => {}
                }
            }
            stack.pop();
            state.insert(n.clone(), 2);
        }
        let mut state = BTreeMap::new();
        let mut found = Vec::new();
        for n in graph.keys() {
            if !state.contains_key(n) {
                visit(n, &graph, &mut state, &mut Vec::new(), &mut found);
            }
        }
        for c in found {
            let names: Vec<String> = c.iter().map(|p| p.strip_prefix(&ws).unwrap().display().to_string()).collect();
            circles.push(format!("{} -> {}", names.join(" -> "), names[0]));
        }
    }
    assert!(edges_seen > 50, "the scan found only {edges_seen} imports: it is not reading the code");
    assert!(circles.is_empty(), "files that import each other:\n{}", circles.join("\n"));
}

/// The scanner itself: grouped imports, nested groups, comments, test blocks.
#[test]
fn the_import_scanner_reads_what_rust_writes() {
    let code = code_lines(
        "use crate::{config::Config, kafka::{self, X}, PipelineError};\n// crate::sql::view in a comment\nlet x = crate::obs::events::Y; // crate::app\nfoo($crate::bar);\n#[cfg(test)]\nmod tests {\n    use crate::tools::sim;\n}\nfn after() {}\n",
    );
    let paths: Vec<(usize, String)> = crate_paths(&code).into_iter().map(|(l, s)| (l, s.join("::"))).collect();
    assert_eq!(
        paths,
        vec![(1, "config::Config".into()), (1, "kafka".into()), (1, "PipelineError".into()), (3, "obs::events::Y".into()), (7, "tools::sim".into())]
    );
    let tests = test_lines(Path::new("x.rs"), &code);
    assert!(tests.contains(&7) && !tests.contains(&3) && !tests.contains(&9), "{tests:?}");
    assert_eq!(root_reexports("pub use obs::Metrics;\npub use engine::{run, RunReport};\n").get("RunReport").map(String::as_str), Some("engine"));
}

/// `text` with comments, string and char literals blanked (newlines kept), so
/// braces count only where they are code.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, s: &[u8]| out.extend(s.iter().map(|&c| if c == b'\n' { '\n' } else { ' ' }));
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            rest.windows(2).position(|w| w == b"*/").map_or(rest.len(), |p| p + 2)
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") || rest.starts_with(b"br#\"") || rest.starts_with(b"br\"") {
            let open = rest.iter().position(|&c| c == b'"').unwrap();
            let hashes = rest[..open].iter().filter(|&&c| c == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            rest[open + 1..].windows(close.len()).position(|w| w == close.as_slice()).map_or(rest.len(), |p| open + 1 + p + close.len())
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == b'\'' && (rest.get(2) == Some(&b'\'') || (rest.get(1) == Some(&b'\\') && rest[2..].contains(&b'\''))) {
            // A char literal ('{', '\n', '\u{7b}'), not a lifetime.
            2 + rest[2..].iter().position(|&c| c == b'\'').unwrap() + 1
        } else {
            out.push(rest[0] as char);
            i += 1;
            continue;
        };
        blank(&mut out, &rest[..end]);
        i += end;
    }
    out
}

/// Functions longer than `max` lines in `text`: (first line, lines, name), unless a
/// comment within the six lines above says "Kept whole" (and why).
fn long_functions(text: &str, max: usize) -> Vec<(usize, usize, String)> {
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let raw: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(at) = l.find("fn ").filter(|&p| p == 0 || !l.as_bytes()[p - 1].is_ascii_alphanumeric() && l.as_bytes()[p - 1] != b'_') else { continue };
        let name: String = l[at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            continue;
        }
        let (mut depth, mut started, mut end) = (0i64, false, None);
        'scan: for (j, line) in lines.iter().enumerate().skip(i) {
            let from = if j == i { at } else { 0 };
            for c in line[from..].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    ';' if !started => break 'scan,
                    _ => {}
                }
                if started && depth == 0 {
                    end = Some(j);
                    break 'scan;
                }
            }
        }
        let Some(end) = end else { continue };
        let n = end - i + 1;
        let marked = raw[i.saturating_sub(6)..i].iter().any(|r| r.contains("Kept whole"));
        if n > max && !marked {
            out.push((i + 1, n, name));
        }
    }
    out
}

#[test]
fn files_and_functions_stay_small() {
    let ws = workspace();
    let mut files = Vec::new();
    for dir in ["schemas/src", "operators/src", "models/src", "train/src", "pipeline/src", "tests", "benches", "fuzz/fuzz_targets"] {
        if ws.join(dir).is_dir() {
            rs_files(&ws.join(dir), &mut files);
        }
    }
    assert!(files.len() > 50, "the scan found only {} files", files.len());
    let mut big = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(&ws).unwrap_or(f).display().to_string();
        let n = text.lines().count();
        if n > 600 {
            big.push(format!("{rel}: {n} lines (> 600)"));
        }
        for (line, len, name) in long_functions(&text, 120) {
            big.push(format!("{rel}:{line}: fn {name} is {len} lines (> 120; split it, or say at its top why it is \"Kept whole\")"));
        }
    }
    assert!(big.is_empty(), "too large:\n{}", big.join("\n"));
}

#[test]
fn the_size_scanner_sees_only_code_braces() {
    let f = "fn a() {\n    let s = \"{ not a brace\";\n    let c = '{';\n    // }\n    let r = r#\"}\"#;\n    x.map(|v: &'static str| v);\n}\nfn b();\n";
    assert_eq!(long_functions(f, 6), vec![(1, 7, "a".to_string())]);
    assert!(long_functions(f, 7).is_empty());
    let kept = format!("// Kept whole: a table.\n{f}");
    assert!(long_functions(&kept, 6).is_empty());
}
