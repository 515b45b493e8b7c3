//! A check on the crate's module graph (docs/ARCHITECTURE.md, "Layers"): the building blocks
//! (every top-level module but `shard`, `runtime` and `server`) never name a module above them
//! and form no cycle; `shard` names no module above it; `runtime` does not name `server`.
//!
//! It reads the sources: every `crate::module` a file names outside comments and its test
//! module, grouped imports (`use crate::{a, b::c}`) included. A new top-level file is a
//! building block unless listed in [`LAYERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules above the building blocks, lowest first; each may name the ones before it.
const LAYERS: [&str; 3] = ["shard", "runtime", "server"];

/// The layer of a top-level module: 0 for a building block, else its place in [`LAYERS`] + 1.
fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| *l == module)
        .map_or(0, |i| i + 1)
}

/// Every top-level module (a file in `src/` with its directory of submodules, or a directory
/// with a `mod.rs`) and the text of its files.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let text = if path.is_dir() {
            let mut text = String::new();
            for file in std::fs::read_dir(&path).expect("a module directory") {
                let file = file.expect("a directory entry").path();
                if file.extension().is_some_and(|e| e == "rs") {
                    text += &std::fs::read_to_string(&file).expect("a source file");
                    text.push('\n');
                }
            }
            text
        } else if path.extension().is_some_and(|e| e == "rs") {
            std::fs::read_to_string(&path).expect("a source file")
        } else {
            continue;
        };
        if name != "lib" && name != "layering" {
            // `config.rs` and its submodules in `config/` are one module.
            out.entry(name).or_default().push_str(&text);
        }
    }
    out
}

/// The text without comments and without test modules (which may name anything).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]" && lines.peek().is_some_and(|l| l.contains("mod tests")) {
            // A test module runs to the end of its file, or to the closing brace at its indent.
            let indent = &line[..line.len() - trimmed.len()];
            let close = format!("{indent}}}");
            for l in lines.by_ref() {
                if l == close {
                    break;
                }
            }
            continue;
        }
        let code_part = trimmed.split("//").next().unwrap_or("");
        code.push_str(code_part);
        code.push('\n');
    }
    code
}

/// The top-level modules `code` names through `crate::` (or `super::`, from a top-level file).
fn named(code: &str, top_level_file: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let prefixes: &[&str] = if top_level_file {
        &["crate::", "super::"]
    } else {
        &["crate::"]
    };
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `my_crate::`, not `crate::`
            }
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                found.extend(grouped(group));
            } else {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The first-level names of a `{a, b::c, d::{e}}` group (`group` starts after its `{`).
fn grouped(group: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0;
    let mut expect_name = true;
    let mut i = 0;
    while i < group.len() {
        let c = group[i..].chars().next().expect("in bounds");
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect_name = true,
            c if c.is_whitespace() => {}
            _ if expect_name && depth == 0 => {
                let name = ident(&group[i..]);
                i += name.len().max(1);
                names.push(name);
                expect_name = false;
                continue;
            }
            _ => {}
        }
        i += c.len_utf8();
    }
    names
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every top-level module and the top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    modules()
        .into_iter()
        .map(|(name, text)| {
            let top_level_file = src.join(format!("{name}.rs")).is_file();
            let mut deps = named(&code_of(&text), top_level_file);
            deps.remove(&name);
            (name, deps)
        })
        .collect()
}

#[test]
fn no_module_names_one_above_it() {
    let graph = graph();
    assert!(
        graph.contains_key("conn") && graph.contains_key("shard"),
        "{graph:?}"
    );
    let mut upward = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            // Names the crate root re-exports (`crate::Config`) are not modules.
            if graph.contains_key(dep) && layer(dep) > layer(module) {
                upward.push(format!("{module} -> {dep}"));
            }
        }
    }
    assert!(upward.is_empty(), "upward imports: {upward:?}");
}

#[test]
fn the_building_blocks_form_no_cycle() {
    let graph = graph();
    // Depth-first search over the building blocks; a module met again on the current path
    // closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            if graph.contains_key(dep)
                && layer(dep) == 0
                && let Some(cycle) = visit(dep, graph, path, done)
            {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys().filter(|m| layer(m) == 0) {
        let cycle = visit(m, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "a cycle: {}", cycle.unwrap().join(" -> "));
    }
}

#[test]
fn the_reader_finds_what_it_should() {
    let code = code_of(
        "use crate::a::X;\n// use crate::b;\nuse crate::{c, d::{e, f}, g};\nlet x = crate::h::y(); // crate::i\nuse my_crate::j;\n#[cfg(test)]\nmod tests {\n    use crate::k;\n}\n",
    );
    let names: Vec<String> = named(&code, true).into_iter().collect();
    assert_eq!(names, ["a", "c", "d", "g", "h"]);
}
