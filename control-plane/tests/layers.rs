//! The control plane's layers only point down, and no two modules lean on each other.
//!
//! Reads the crate's own source (from `src/lib.rs`, following its `mod` declarations,
//! test modules left out), collects every path into the crate — `use crate::…`,
//! `super::…`, `self::…`, a child module's name, in `use` items, types and expressions —
//! and fails on:
//!
//! - an import from a lower layer up to a higher one ([`LAYERS`]);
//! - a cycle: two top-level modules, or two files, that reach each other;
//! - a top-level module with no layer (a new module must say where it stands).
//!
//! The layers are described in `src/lib.rs` and ARCHITECTURE.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Each top-level module's layer, bottom (0) to top. Imports go to the same layer or a
/// lower one.
const LAYERS: &[(&str, u8, &str)] = &[
    ("clock", 0, "foundations"),
    ("hosts_only", 0, "foundations"),
    ("metrics", 0, "foundations"),
    ("redact", 0, "foundations"),
    ("token", 0, "foundations"),
    ("trace_context", 0, "foundations"),
    ("validate", 0, "foundations"),
    ("job", 1, "the job model"),
    ("store", 2, "storage and the way out"),
    ("outbound", 2, "storage and the way out"),
    ("delivery", 3, "delivery"),
    ("broadcast", 4, "use cases"),
    ("notify", 4, "use cases"),
    ("monitor", 4, "use cases"),
    ("submit", 4, "use cases"),
    ("retention", 4, "use cases"),
    ("ingress", 5, "edges"),
    ("api", 5, "edges"),
    ("cli", 5, "edges"),
    ("echo", 5, "edges"),
    ("telemetry", 5, "edges"),
    ("config", 6, "configuration"),
    ("server", 7, "wiring"),
];

/// One reference from a module to another one of the crate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: Vec<String>,
    to: Vec<String>,
    /// The file that holds the reference, and the path as written.
    file: String,
    written: String,
}

/// The crate's modules, read from `root` (a lib.rs) by following `mod` declarations;
/// `#[cfg(test)]` ones are left out. Inline modules count as their parent's file.
fn modules(root: &Path) -> BTreeMap<Vec<String>, (String, syn::File)> {
    let mut out = BTreeMap::new();
    let src = root.parent().expect("lib.rs has a directory").to_path_buf();
    let mut todo = vec![(Vec::<String>::new(), root.to_path_buf())];
    while let Some((path, file)) = todo.pop() {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let parsed = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let dir: PathBuf = if path.is_empty() {
            src.clone()
        } else if file.file_name().is_some_and(|n| n == "mod.rs") {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for item in &parsed.items {
            if let syn::Item::Mod(m) = item {
                if m.content.is_some() || is_test_only(&m.attrs) {
                    continue;
                }
                let name = m.ident.to_string();
                let flat = dir.join(format!("{name}.rs"));
                let nested = dir.join(&name).join("mod.rs");
                let child = if flat.exists() { flat } else { nested };
                let mut child_path = path.clone();
                child_path.push(name);
                todo.push((child_path, child));
            }
        }
        let shown = file
            .strip_prefix(&src)
            .unwrap_or(&file)
            .display()
            .to_string();
        out.insert(path, (shown, parsed));
    }
    out
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Collects the paths of one file, tracking inline modules.
struct Collector<'a> {
    /// The module being read (inline modules pushed onto the file's own).
    module: Vec<String>,
    known: &'a BTreeSet<Vec<String>>,
    file: String,
    edges: Vec<Edge>,
}

impl Collector<'_> {
    /// `segments` as written in module `self.module`, resolved to the longest known
    /// module it names (nothing when it leaves the crate).
    fn reference(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let mut base: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.module.clone(),
            "super" => {
                let mut m = self.module.clone();
                m.pop();
                m
            }
            _ => {
                // A child module of this one, named without `self::`.
                let mut child = self.module.clone();
                child.push(first.clone());
                if !self.known.contains(&child) {
                    return;
                }
                self.module.clone()
            }
        };
        let mut rest: &[String] = if matches!(first.as_str(), "crate" | "self" | "super") {
            &segments[1..]
        } else {
            segments
        };
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
        let mut target = base;
        for s in rest {
            let mut next = target.clone();
            next.push(s.clone());
            if self.known.contains(&next) {
                target = next;
            } else {
                break;
            }
        }
        self.edges.push(Edge {
            from: self.module.clone(),
            to: target,
            file: self.file.clone(),
            written: segments.join("::"),
        });
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.reference(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.reference(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.reference(&prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test_only(&m.attrs) {
            return;
        }
        if m.content.is_some() {
            self.module.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_test_only(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_test_only(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.reference(&segments);
        }
        syn::visit::visit_path(self, p);
    }
}

/// Every reference between modules of the crate rooted at `root`.
fn edges(root: &Path) -> (BTreeMap<Vec<String>, String>, Vec<Edge>) {
    let modules = modules(root);
    let mut known: BTreeSet<Vec<String>> = modules.keys().cloned().collect();
    // Inline modules are known too (their paths resolve like files').
    for (path, (_, file)) in &modules {
        for item in &file.items {
            if let syn::Item::Mod(m) = item {
                if m.content.is_some() {
                    let mut p = path.clone();
                    p.push(m.ident.to_string());
                    known.insert(p);
                }
            }
        }
    }
    let mut all = Vec::new();
    let mut files = BTreeMap::new();
    for (path, (shown, file)) in &modules {
        files.insert(path.clone(), shown.clone());
        let mut c = Collector {
            module: path.clone(),
            known: &known,
            file: shown.clone(),
            edges: Vec::new(),
        };
        c.visit_file(file);
        all.extend(c.edges);
    }
    (files, all)
}

fn layer(top: &str) -> Option<(u8, &'static str)> {
    LAYERS
        .iter()
        .find(|(m, _, _)| *m == top)
        .map(|(_, l, name)| (*l, *name))
}

/// Groups of more than one node that all reach each other (strongly connected
/// components, found by reachability both ways: the graphs have a few dozen nodes).
fn cycles<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    let reach = |from: &N| -> BTreeSet<N> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for next in graph.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<N, BTreeSet<N>> = graph.keys().map(|n| (n.clone(), reach(n))).collect();
    let mut groups: BTreeSet<Vec<N>> = BTreeSet::new();
    for n in graph.keys() {
        let group: Vec<N> = graph
            .keys()
            .filter(|m| {
                *m == n
                    || (reachable[n].contains(*m)
                        && reachable.get(*m).is_some_and(|r| r.contains(n)))
            })
            .cloned()
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

/// What is wrong with the crate rooted at `root`; empty when nothing is.
fn violations(root: &Path) -> Vec<String> {
    let (files, edges) = edges(root);
    let mut problems = BTreeSet::new();
    let mut modules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut file_graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files.keys() {
        if let Some(top) = path.first() {
            if layer(top).is_none() {
                problems.insert(format!(
                    "module `{top}` has no layer: add it to LAYERS in tests/layers.rs \
                     (and to the layout in src/lib.rs)"
                ));
            }
            modules.entry(top.clone()).or_default();
        }
    }
    for e in &edges {
        let (Some(from), Some(to)) = (e.from.first(), e.to.first()) else {
            continue; // the crate root, or a reference to it
        };
        let file_of = |m: &Vec<String>| {
            // An inline module belongs to its file.
            let mut p = m.clone();
            while !files.contains_key(&p) && !p.is_empty() {
                p.pop();
            }
            files.get(&p).cloned().unwrap_or_default()
        };
        let (from_file, to_file) = (file_of(&e.from), file_of(&e.to));
        if from_file != to_file && !e.from.starts_with(&e.to) {
            // A module's own ancestors (its `mod.rs`) are where it is declared, not a
            // dependency; everything else is.
            file_graph
                .entry(from_file.clone())
                .or_default()
                .insert(to_file.clone());
        }
        if from == to {
            continue;
        }
        modules.entry(from.clone()).or_default().insert(to.clone());
        if let (Some((lf, nf)), Some((lt, nt))) = (layer(from), layer(to)) {
            if lt > lf {
                problems.insert(format!(
                    "{}: `{}` points up, from {from} ({nf}, layer {lf}) to {to} ({nt}, layer {lt})",
                    e.file, e.written
                ));
            }
        }
    }
    for group in cycles(&modules) {
        problems.insert(format!(
            "modules that depend on each other: {}",
            group.join(" ↔ ")
        ));
    }
    for group in cycles(&file_graph) {
        problems.insert(format!(
            "files that depend on each other: {}",
            group.join(" ↔ ")
        ));
    }
    problems.into_iter().collect()
}

#[test]
fn the_control_planes_layers_only_point_down_and_nothing_is_circular() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let (files, edges) = edges(&root);
    // The check reads the real crate: every top-level module and most of its files.
    assert!(files.len() > 40, "only {} modules found", files.len());
    assert!(edges.len() > 100, "only {} references found", edges.len());
    let problems = violations(&root);
    assert!(
        problems.is_empty(),
        "the layering is broken:\n  {}",
        problems.join("\n  ")
    );
}

/// A crate written to a temporary directory, to show the check catches what it must.
fn fake_crate(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "knocker-layers-{}-{}",
        std::process::id(),
        files.len() + files.iter().map(|(_, t)| t.len()).sum::<usize>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    dir.join("lib.rs")
}

#[test]
fn an_upward_import_a_cycle_and_a_module_without_a_layer_are_each_caught() {
    let root = fake_crate(&[
        (
            "lib.rs",
            "pub mod job; pub mod store; pub mod gadget; pub mod monitor; pub mod notify;",
        ),
        // The job model reaching up into the store.
        ("job/mod.rs", "pub mod spec;"),
        ("job/spec.rs", "pub fn f() { crate::store::g(); }"),
        (
            "store.rs",
            "pub fn g() {} #[cfg(test)] mod tests { use crate::monitor::X; }",
        ),
        ("gadget.rs", "pub struct G;"),
        // Two use cases leaning on each other.
        ("monitor/mod.rs", "pub mod a; pub struct X;"),
        ("monitor/a.rs", "use crate::notify::N; pub struct A;"),
        ("notify.rs", "use crate::monitor::a::A; pub struct N;"),
    ]);
    let problems = violations(&root);
    let text = problems.join("\n");
    assert!(
        text.contains("job/spec.rs: `crate::store::g` points up, from job"),
        "{text}"
    );
    assert!(text.contains("module `gadget` has no layer"), "{text}");
    assert!(
        text.contains("modules that depend on each other: monitor ↔ notify"),
        "{text}"
    );
    assert!(
        text.contains("files that depend on each other: monitor/a.rs ↔ notify.rs"),
        "{text}"
    );
    // A test module may import anything: it is not part of the layering.
    assert!(!text.contains("store.rs: `crate::monitor"), "{text}");
    assert_eq!(problems.len(), 4, "{text}");
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}
