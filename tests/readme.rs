//! The README's code snippets are excerpts of compiled code: every line of every `rust`
//! block in README.md appears in a doc-tested guide (`src/docs/*.md`), the crate's doc
//! comments or an example. A snippet edited in the README alone, or code changed under it,
//! fails here.

use std::fs;
use std::path::Path;

/// The code of a line: trimmed, without a trailing `// comment` (a `//` inside a string such
/// as `"http://…"` has no space before it and stays).
fn code(line: &str) -> &str {
    let line = line.trim();
    let line = line.strip_prefix("# ").unwrap_or(line); // rustdoc's hidden lines
    match line.find(" // ") {
        Some(i) => line[..i].trim_end(),
        None if line.starts_with("//") => "",
        None => line,
    }
}

fn rust_blocks(markdown: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) if info.starts_with("rust") => current = Some(Vec::new()),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some(block), None) => block.push(line),
            _ => {}
        }
    }
    blocks
}

/// A doc comment's text (`//! …`, `/// …`), or the line itself.
fn doc_text(line: &str) -> &str {
    let trimmed = line.trim_start();
    ["//! ", "/// ", "//!", "///"]
        .iter()
        .find_map(|p| trimmed.strip_prefix(p))
        .unwrap_or(line)
}

/// The text of the guides, the examples and every source file of the crate.
fn compiled_sources(dir: &Path, text: &mut String) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            compiled_sources(&path, text);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("md" | "rs")) {
            text.push_str(&fs::read_to_string(path).unwrap());
            text.push('\n');
        }
    }
}

#[test]
fn readme_snippets_are_excerpts_of_compiled_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let mut sources = String::new();
    compiled_sources(&root.join("src"), &mut sources);
    compiled_sources(&root.join("examples"), &mut sources);
    let known: std::collections::HashSet<&str> =
        sources.lines().map(|l| code(doc_text(l))).collect();

    let blocks = rust_blocks(&readme);
    assert!(
        blocks.len() >= 3,
        "the quick start shows axum, tonic and an outbound client"
    );
    let mut missing = Vec::new();
    for line in blocks.iter().flatten() {
        let code = code(line);
        if !code.is_empty() && !known.contains(code) {
            missing.push(code);
        }
    }
    assert!(
        missing.is_empty(),
        "README lines found in no guide, crate doc or example:\n{}",
        missing.join("\n")
    );
}

#[test]
fn code_keeps_urls_and_drops_comments() {
    assert_eq!(
        code(r#"    let u = format!("http://{a}"); // note"#),
        r#"let u = format!("http://{a}");"#
    );
    assert_eq!(code("// only a comment"), "");
    assert_eq!(code("# let hidden = 1;"), "let hidden = 1;");
    assert_eq!(code(doc_text("//! let a = 1; // why")), "let a = 1;");
    assert_eq!(code(doc_text("    /// x.build()?;")), "x.build()?;");
}
