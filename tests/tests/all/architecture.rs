//! The shape of `host/src` (docs/architecture.md): no import cycle between its top-level
//! modules; each uses only those on its line of `lib.rs`'s module map or below; the record
//! model, the clock, the configuration tree, error display and the task set import nothing
//! else of the crate. Read from the source files themselves: every `crate::<module>` their
//! code names counts, tests included (comments do not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use weir_tests::repo_root;

/// Top-level module → the top-level modules its files name.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo_root().join("host/src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("host/src") {
        let path = entry.expect("entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if matches!(name, "lib" | "main") {
            continue;
        }
        let mut names = BTreeSet::new();
        for file in rust_files(&path) {
            let text = std::fs::read_to_string(&file).expect("source file");
            let code: Vec<&str> = (text.lines())
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect();
            names.extend(crate_paths(&code.join("\n")));
        }
        names.remove(name);
        graph.insert(name.to_owned(), names);
    }
    graph
}

fn rust_files(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).expect("module directory") {
        files.extend(rust_files(&entry.expect("entry").path()));
    }
    files
}

/// The first segment of every `crate::...` path, `crate::{a, b::c}` included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|p| ident(p.trim())));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// A cycle, as the path that closes it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node.to_owned()) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let graph = imports();
    assert!(graph.len() > 10, "host/src was not read: {graph:?}");
    if let Some(cycle) = cycle(&graph) {
        panic!("an import cycle: {}", cycle.join(" → "));
    }
}

/// The layers of `host/src/lib.rs`'s module map, bottom first: the modules each bullet
/// names (``[`name`]``).
fn layers_of_the_map() -> Vec<BTreeSet<String>> {
    let lib = std::fs::read_to_string(repo_root().join("host/src/lib.rs")).expect("lib.rs");
    let mut layers: Vec<BTreeSet<String>> = Vec::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//!")) {
        if line.starts_with(" - ") {
            layers.push(BTreeSet::new());
        }
        let Some(layer) = layers.last_mut() else {
            continue;
        };
        for (at, _) in line.match_indices("[`") {
            let rest = &line[at + 2..];
            layer.insert(rest[..rest.find('`').unwrap_or(0)].to_owned());
        }
    }
    layers
}

#[test]
fn every_module_uses_only_those_on_its_line_of_the_map_or_below() {
    let graph = imports();
    let layers = layers_of_the_map();
    let layer = |module: &str| layers.iter().position(|l| l.contains(module));
    for (module, uses) in &graph {
        let own = layer(module).unwrap_or_else(|| panic!("{module} is not in lib.rs's map"));
        for used in uses {
            let theirs = layer(used).unwrap_or_else(|| panic!("{used} is not in lib.rs's map"));
            assert!(
                theirs <= own,
                "{module} uses {used}, which lib.rs's map puts above it"
            );
        }
    }
}

#[test]
fn the_record_model_clock_config_errors_and_tasks_import_nothing_of_the_crate() {
    let graph = imports();
    for bottom in ["record", "clock", "config", "errors", "tasks"] {
        assert_eq!(
            graph.get(bottom),
            Some(&BTreeSet::new()),
            "{bottom} imports"
        );
    }
}

#[test]
fn the_checker_sees_grouped_and_nested_paths() {
    let names = crate_paths("use crate::{a::B, c};\nlet x = crate::d::e(); use crate::self;");
    assert_eq!(names, ["a", "c", "d"].map(String::from).into());
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
