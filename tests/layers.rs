//! The layers point one way: registry → routing ← request path, health → routing, admin reads.
//! This test reads every file under `src/` and fails on a path into another module
//! (`crate::<module>`, in a `use` or inline; comments and doc links are not read) that points
//! against that direction, naming the file, the line and the rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The request path: the native engine, the hyper gateway, what both share, and the connections
/// to instances.
const REQUEST_PATH: &[&str] = &["engine", "gateway", "proxy", "upstream"];

/// Leaves every layer may use: the clocks and the one way to take a mutex.
const SHARED: &[&str] = &["clock", "sync"];

/// What each layer must not import, and why.
fn rules() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    let above_routing: Vec<&str> = [
        "registry", "health", "admin", "consul", "register", "server",
    ]
    .into_iter()
    .chain(["config"])
    .chain(REQUEST_PATH.iter().copied())
    .collect();
    vec![
        (
            "routing",
            above_routing,
            "the routing snapshot knows nothing of etcd, health checks, request paths or config",
        ),
        (
            "registry",
            ["health", "admin", "consul", "server"]
                .into_iter()
                .chain(REQUEST_PATH.iter().copied())
                .collect(),
            "the registry only builds routing snapshots",
        ),
        (
            "health",
            ["registry", "admin", "consul", "server", "engine", "gateway", "proxy"].to_vec(),
            "health only flips state in routing (probes frame HTTP with http1, not the engine)",
        ),
        (
            "admin",
            ["engine", "gateway", "proxy", "upstream", "health"].to_vec(),
            "admin reads routing, registry status and metrics; it drives nothing",
        ),
        (
            "http1",
            everything_but("http1"),
            "HTTP/1 framing is shared by the engine and the probes: a leaf",
        ),
        (
            "metrics",
            everything_but("metrics"),
            "metrics are counters every layer writes: a leaf (admin hands it the snapshot's counts)",
        ),
        (
            "clock",
            everything_but("clock"),
            "the clocks are read by every layer: a leaf",
        ),
        (
            "sync",
            everything_but("sync"),
            "every layer takes its mutexes this way: a leaf",
        ),
    ]
}

/// Imports allowed against the rules, each with the reason it is still there.
const KNOWN: &[(&str, &str, &str)] = &[(
    "routing",
    "upstream",
    "ServiceSettings carries each service's upstream protocol and TLS (UpstreamSettings), and a \
     Service notes whether any instance needs the gateway",
)];

fn everything_but(me: &'static str) -> Vec<&'static str> {
    (modules().into_iter())
        .filter(|m| *m != me && (!SHARED.contains(m) || SHARED.contains(&me)))
        .collect()
}

/// The crate's top-level modules, from `src/lib.rs`.
fn modules() -> Vec<&'static str> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let name = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?;
            Some(&*Box::leak(
                name.trim_end_matches(';').to_string().into_boxed_str(),
            ))
        })
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The files of top-level module `module`: `src/<module>.rs` or everything under `src/<module>/`.
fn files_of(module: &str) -> Vec<PathBuf> {
    let file = src().join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src().join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no source files for module {module}");
    out
}

/// The top-level modules a line names: `crate::a::...`, and each item of `crate::{a, b::c}`.
fn imported(line: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // top-level names of the group: after `{` and after each `,` at depth 0
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        found.insert(ident(&group[j..]));
                        start = false;
                    }
                    c if start && !c.is_whitespace() => start = false,
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn imports_point_one_way() {
    let known: BTreeSet<(&str, &str)> = KNOWN.iter().map(|(a, b, _)| (*a, *b)).collect();
    let all = modules();
    assert!(
        all.contains(&"routing"),
        "modules read from src/lib.rs: {all:?}"
    );
    let mut violations = Vec::new();
    let mut used_known = BTreeSet::new();
    for (layer, forbidden, why) in rules() {
        for file in files_of(layer) {
            let text = std::fs::read_to_string(&file).unwrap();
            // a multi-line `use crate::{...}` is read as one line
            let joined = join_use_groups(&text);
            for (n, line) in joined {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for target in imported(&line) {
                    if !forbidden.contains(&target.as_str()) {
                        continue;
                    }
                    if known.contains(&(layer, target.as_str())) {
                        used_known.insert((layer, target.clone()));
                        continue;
                    }
                    violations.push(format!(
                        "{}:{n}: {layer} imports {target} ({why})\n    {}",
                        file.strip_prefix(src().parent().unwrap())
                            .unwrap()
                            .display(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layer direction:\n{}",
        violations.join("\n")
    );
    for (layer, target, _) in KNOWN {
        assert!(
            used_known.contains(&(*layer, target.to_string())),
            "{layer} no longer imports {target}: remove the exception from KNOWN"
        );
    }
}

/// Lines with their 1-based numbers; a `crate::{` group spanning lines is joined onto its first.
fn join_use_groups(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut open: Option<(usize, String, i32)> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some((n, mut acc, depth)) = open.take() {
            acc.push(' ');
            acc.push_str(line.trim());
            let depth = depth + line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if depth > 0 {
                open = Some((n, acc, depth));
            } else {
                out.push((n, acc));
            }
            continue;
        }
        if let Some(at) = line.find("crate::{") {
            let tail = &line[at..];
            let depth = tail.matches('{').count() as i32 - tail.matches('}').count() as i32;
            if depth > 0 {
                open = Some((i + 1, line.to_string(), depth));
                continue;
            }
        }
        out.push((i + 1, line.to_string()));
    }
    out.extend(open.map(|(n, acc, _)| (n, acc)));
    out
}

/// Every file under `src/`, relative to it (`routing/outlier.rs`).
fn source_files() -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![src()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src()).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_layout_in_lib_rs_names_every_file() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let layout = lib
        .split("# Layout")
        .nth(1)
        .expect("src/lib.rs has a # Layout section");
    let missing: Vec<String> = source_files()
        .into_iter()
        .filter(|f| f != "lib.rs" && !layout.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "src/lib.rs's # Layout does not name these files (as `dir/file.rs`): {missing:?}"
    );
}

#[test]
fn the_import_reader_sees_every_form() {
    let names = |l: &str| imported(l).into_iter().collect::<Vec<_>>();
    assert_eq!(names("use crate::registry::codec::HostPort;"), ["registry"]);
    assert_eq!(
        names("use crate::{metrics::{A, B}, routing::Health};"),
        ["metrics", "routing"]
    );
    assert_eq!(
        names("let x = crate::health::passive_failure(a);"),
        ["health"]
    );
    let joined = join_use_groups("use crate::{\n    a::B,\n    c,\n};\nfn x() {}\n");
    assert_eq!(joined[0].0, 1);
    assert_eq!(names(&joined[0].1), ["a", "c"]);
    assert_eq!(joined[1], (5, "fn x() {}".to_string()));
}
