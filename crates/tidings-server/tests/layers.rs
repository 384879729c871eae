//! The server crate's arrows point down: the protocol layer (`src/net/`) names no module of
//! the application above it. Read from the source, so an import that runs back up fails here
//! (and the checker is itself checked against a line that must fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// The crate's top-level modules the protocol layer may name: only itself.
const NET_MAY_NAME: &[&str] = &["net"];

/// Every `crate::<module>` a line of Rust names (in `use` lines and inline paths alike),
/// with `use crate::{a, b}` groups opened.
fn crate_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `tidings_crate::x` or `my_crate::x` are not this crate.
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the source directory is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `file:line: crate::module` for every name a file under `dir` may not use.
fn violations(dir: &Path, allowed: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    assert!(!files.is_empty(), "no Rust files under {}", dir.display());
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        for (n, line) in text.lines().enumerate() {
            for module in crate_modules(line) {
                if !allowed.contains(&module.as_str()) {
                    found.push(format!("{}:{}: crate::{module}", file.display(), n + 1));
                }
            }
        }
    }
    found
}

#[test]
fn the_protocol_layer_names_no_module_of_the_application() {
    let net = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/net");
    let found = violations(&net, NET_MAY_NAME);
    assert!(
        found.is_empty(),
        "src/net/ is the protocol layer: it reaches the application only through \
         net::Service, never by naming its modules. Arrows pointing up:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_every_way_a_module_is_named() {
    assert_eq!(crate_modules("use crate::app::routes;"), ["app"]);
    assert_eq!(
        crate_modules("    let s = crate::state::AppState::new(c);"),
        ["state"]
    );
    assert_eq!(
        crate_modules("use crate::{net::h1, transport::sse};"),
        ["net", "transport"]
    );
    assert_eq!(
        crate_modules("use tidings_crate::x; // crate::app in a comment"),
        Vec::<String>::new()
    );
    assert_eq!(crate_modules("use crate::net::h1::Socket;"), ["net"]);
}

#[test]
fn an_import_of_the_application_from_the_protocol_layer_fails_the_check() {
    let dir = std::env::temp_dir().join(format!("tidings-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    std::fs::write(
        dir.join("bad.rs"),
        "use crate::net::h1;\nuse crate::app::service::App;\n",
    )
    .expect("a temp file");
    let found = violations(&dir, NET_MAY_NAME);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("bad.rs:2: crate::app"), "{found:?}");
}
