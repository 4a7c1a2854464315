//! The module structure holds: no import cycles and the boundaries the README's design section
//! draws. The crate is one package (see the README for why not a workspace), so this test keeps
//! what separate crates would make the compiler keep.
//!
//! It reads `src/` as text: every `use` and every `crate::`/`super::` path outside
//! `#[cfg(test)]` items is an edge from the file that names it to the module file it resolves
//! to (the longest module prefix of the path). Two graphs must be acyclic:
//! - top-level modules (`auth`, `storage`, …), where a file counts for the module it is in;
//! - within each module, its files, leaving out the module's own `mod.rs` (a facade may
//!   re-export its children, and children may take shared items from it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source file and the module path it defines (`["auth", "flow"]` for `src/auth/flow.rs`).
struct SourceFile {
    module: Vec<String>,
    code: String,
}

fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_owned();
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem);
    }
    parts
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            out.push(SourceFile {
                module: module_of(rel),
                code: strip_tests(&strip_comments(&text)),
            });
        }
    }
}

/// Drops `//` comments (doc comments name modules without importing them) and the contents
/// of string literals (which may hold anything).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = '\0';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && !(prev == '\'' && chars.get(i + 1) == Some(&'\'')) {
                in_str = !in_str;
                kept.push('"');
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { '\0' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Removes every item that follows `#[cfg(test)]` (a module or a function), by brace matching.
fn strip_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item ends at the `;` of `mod x;` or at the brace that closes its body.
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the code names, as segments, already made absolute (`crate::` dropped).
fn paths_named(file: &SourceFile, modules: &BTreeSet<Vec<String>>) -> Vec<Vec<String>> {
    let code = &file.code;
    let mut found = Vec::new();
    // `use` trees, with their braces expanded.
    let mut rest = code.as_str();
    while let Some(at) = rest.find("use ") {
        let before_ok = at == 0 || !is_ident(rest[..at].chars().last().unwrap());
        let after = &rest[at + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if before_ok {
            for p in expand_use(&drop_aliases(&after[..end])) {
                found.push(p);
            }
        }
        rest = &after[end.min(after.len())..];
    }
    // Inline `crate::a::b` and `super::a` paths.
    for prefix in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before_ok = at == 0 || !is_ident(rest[..at].chars().last().unwrap());
            let tail = &rest[at..];
            let len = tail
                .char_indices()
                .find(|&(_, c)| !(is_ident(c) || c == ':'))
                .map_or(tail.len(), |(i, _)| i);
            if before_ok {
                found.push(tail[..len].split("::").map(str::to_owned).collect());
            }
            rest = &rest[at + prefix.len()..];
        }
    }
    found
        .into_iter()
        .filter_map(|p| absolute(file, p, modules))
        .collect()
}

/// A `use` tree without whitespace and without its `as` renames (`a::{B as C, d}` → `a::{B,d}`).
fn drop_aliases(tree: &str) -> String {
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut kept = String::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "as" && i + 1 < words.len() {
            // Keep whatever punctuation follows the alias (`C},` → `},`).
            kept.push_str(words[i + 1].trim_start_matches(is_ident));
            i += 2;
        } else {
            kept.push_str(words[i]);
            i += 1;
        }
    }
    kept
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<&str> {
        let mut parts = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts.into_iter().filter(|p| !p.is_empty()).collect()
    }
    let tree = tree.trim_start_matches("::");
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim_end_matches("::");
        let inner = tree[open + 1..]
            .strip_suffix('}')
            .unwrap_or(&tree[open + 1..]);
        let mut out = Vec::new();
        for part in split_top(inner) {
            for mut tail in expand_use(part) {
                let mut p: Vec<String> = if prefix.is_empty() {
                    Vec::new()
                } else {
                    prefix.split("::").map(str::to_owned).collect()
                };
                p.append(&mut tail);
                out.push(p);
            }
        }
        out
    } else {
        vec![tree.split("::").map(str::to_owned).collect()]
    }
}

/// Resolves a named path against the file's own module; `None` for outside crates.
fn absolute(
    file: &SourceFile,
    path: Vec<String>,
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = path.first()?.as_str();
    let mut base: Vec<String> = match first {
        "crate" => Vec::new(),
        "self" => file.module.clone(),
        "super" => {
            let mut m = file.module.clone();
            let mut segs = path.iter().peekable();
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                m.pop();
                segs.next();
            }
            let mut out = m;
            out.extend(segs.cloned());
            return Some(out);
        }
        other => {
            // A child module of this file's module (`use records::X;` in `storage/mod.rs`).
            let mut child = file.module.clone();
            child.push(other.to_owned());
            if modules.contains(&child) {
                file.module.clone()
            } else {
                return None;
            }
        }
    };
    let skip = usize::from(matches!(first, "crate" | "self"));
    base.extend(path.into_iter().skip(skip));
    Some(base)
}

/// The longest prefix of `path` that is a module file.
fn resolve(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
}

/// Every cycle's members, found by Tarjan's strongly connected components.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(edges) = s.graph.get(v) {
            for w in edges {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.found.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

struct Graphs {
    /// Top-level module → top-level modules it imports.
    top: BTreeMap<String, BTreeSet<String>>,
    /// Per top-level module: file → sibling files it imports (facades left out).
    inner: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// File → every module file it imports.
    files: BTreeMap<String, BTreeSet<String>>,
}

fn graphs(files: &[SourceFile]) -> Graphs {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let facades: BTreeSet<Vec<String>> = modules
        .iter()
        .filter(|m| {
            modules
                .iter()
                .any(|o| o.len() == m.len() + 1 && o.starts_with(m))
        })
        .cloned()
        .collect();
    let mut g = Graphs {
        top: BTreeMap::new(),
        inner: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    for f in files {
        let name = f.module.join("::");
        g.files.entry(name.clone()).or_default();
        let Some(top) = f.module.first().cloned() else {
            continue; // lib.rs / main.rs
        };
        g.top.entry(top.clone()).or_default();
        for path in paths_named(f, &modules) {
            let Some(target) = resolve(&path, &modules) else {
                continue;
            };
            if target == f.module || target.is_empty() {
                continue;
            }
            g.files.get_mut(&name).unwrap().insert(target.join("::"));
            let target_top = target[0].clone();
            if target_top != top {
                g.top.get_mut(&top).unwrap().insert(target_top);
            } else if !facades.contains(&f.module) && !facades.contains(&target) {
                // Siblings inside one module. Nested children count for their parent file.
                let from = f.module[..f.module.len().min(2)].join("::");
                let to = target[..target.len().min(2)].join("::");
                if from != to {
                    g.inner
                        .entry(top.clone())
                        .or_default()
                        .entry(from)
                        .or_default()
                        .insert(to);
                }
            }
        }
    }
    g
}

fn source() -> Vec<SourceFile> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    assert!(files.len() > 20, "src/ was not read");
    files
}

#[test]
fn top_level_modules_form_no_cycle() {
    let g = graphs(&source());
    let found = cycles(&g.top);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules: {found:?}\nedges: {:#?}",
        g.top
    );
}

#[test]
fn files_inside_a_module_form_no_cycle() {
    let g = graphs(&source());
    let mut all = Vec::new();
    for (module, graph) in &g.inner {
        for c in cycles(graph) {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|b| c.contains(b))
                        .map(move |b| format!("{a} -> {b}"))
                })
                .collect();
            all.push(format!("in {module}: {}", edges.join(", ")));
        }
    }
    assert!(
        all.is_empty(),
        "import cycles between files:\n{}",
        all.join("\n")
    );
}

#[test]
fn boundaries_hold() {
    let files = source();
    let g = graphs(&files);
    // Only the storage module touches redb.
    for f in &files {
        let uses_redb = f.code.contains("redb::") || f.code.contains("use redb");
        assert!(
            !uses_redb || f.module.first().map(String::as_str) == Some("storage"),
            "{} imports redb; only storage may",
            f.module.join("::")
        );
    }
    // The sandbox is started only by the entry points (cli, daemon); no service module imports
    // it, and it imports nothing of the service but the wire formats and the shared net/TLS.
    for (from, to) in &g.top {
        if to.contains("sandbox") {
            assert!(
                matches!(from.as_str(), "cli" | "daemon"),
                "{from} imports the sandbox"
            );
        }
    }
    // Leaf layers import no service layer above them.
    for leaf in ["net", "schedule", "storage"] {
        let above: BTreeSet<&str> = [
            "auth",
            "callbacks",
            "cli",
            "daemon",
            "events",
            "http",
            "longconn",
            "mcp",
            "sandbox",
        ]
        .into_iter()
        .collect();
        let bad: Vec<&String> = g
            .top
            .get(leaf)
            .into_iter()
            .flatten()
            .filter(|m| above.contains(m.as_str()))
            .collect();
        assert!(bad.is_empty(), "{leaf} imports {bad:?}");
    }
}

#[test]
fn the_reader_sees_imports_it_must_see() {
    // The parser's own check, on code written here: a cycle is found when there is one.
    let a = SourceFile {
        module: vec!["m".into(), "a".into()],
        code: strip_tests(&strip_comments(
            "use super::b::{X as Y, y::Z};\n// use crate::m::c;\n#[cfg(test)]\nmod tests { use crate::m::c::W; }\n",
        )),
    };
    let b = SourceFile {
        module: vec!["m".into(), "b".into()],
        code: "fn f() { crate::m::a::go(); }\n".into(),
    };
    let c = SourceFile {
        module: vec!["m".into(), "c".into()],
        code: "use crate::n::Q;\n".into(),
    };
    let n = SourceFile {
        module: vec!["n".into()],
        code: strip_comments("pub fn q() { let _ = \"crate::m::c\"; }\n"),
    };
    let g = graphs(&[a, b, c, n]);
    assert_eq!(cycles(&g.top), Vec::<Vec<String>>::new());
    let inner = &g.inner["m"];
    assert_eq!(
        cycles(inner),
        vec![vec!["m::a".to_owned(), "m::b".to_owned()]]
    );
    assert!(
        !inner.get("m::a").unwrap().contains("m::c"),
        "test and comment imports count"
    );
    assert_eq!(g.top["m"], BTreeSet::from(["n".to_owned()]));
}
