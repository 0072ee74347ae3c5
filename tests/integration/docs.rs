//! The README and `docs/`: every link to a file of the repository names
//! one that exists, every `#anchor` names a heading of its page, and the
//! README stays a front door.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The README and every page under `docs/`.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    pages
}

/// A heading's anchor as GitHub makes it: lower case, punctuation dropped
/// except `-` and `_`, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The page's lines outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut in_code = false;
    text.lines().filter(move |line| {
        if line.starts_with("```") {
            in_code = !in_code;
            return false;
        }
        !in_code
    })
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose(text).filter(|line| line.starts_with('#')).map(|line| anchor(line.trim_start_matches('#'))).collect()
}

/// The targets of the page's inline links, `[text](target)`, outside code.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    found
}

#[test]
fn every_link_in_the_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = target.split_once('#').map_or((target.as_str(), None), |(f, a)| (f, Some(a)));
            let file_path = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            if !file_path.exists() {
                broken.push(format!("{}: {target} (no such file)", page.display()));
                continue;
            }
            if let Some(fragment) = fragment
                && file_path.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&file_path).unwrap()).contains(fragment)
            {
                broken.push(format!("{}: {target} (no such heading)", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_a_front_door_of_at_most_400_lines() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.lines().count() <= 400, "README.md has {} lines", readme.lines().count());
}

/// The top-level modules of `src/` and `actors/` use each other without a
/// cycle, as `docs/architecture.md`'s Layout says: read from every
/// `crate::<module>` path in their files.
#[test]
fn the_top_level_modules_use_each_other_without_a_cycle() {
    let modules = [
        ("actors", "actors"),
        ("batch", "src/batch"),
        ("cli", "src/cli"),
        ("config", "src/config"),
        ("db", "src/db"),
        ("domain", "src/domain"),
        ("kafka", "src/kafka"),
        ("ml", "src/ml"),
        ("observability", "src/observability"),
        ("service", "src/service"),
    ];
    let names: BTreeSet<&str> = modules.iter().map(|(name, _)| *name).collect();
    let mut uses: std::collections::BTreeMap<&str, BTreeSet<String>> = Default::default();
    for (name, dir) in modules {
        let mut files = vec![root().join(dir)];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("crate::") {
                let used: String = text[at + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if names.contains(used.as_str()) && used != name {
                    uses.entry(name).or_default().insert(used);
                }
            }
        }
    }
    // Depth-first search for a module that reaches itself.
    fn reaches(
        uses: &std::collections::BTreeMap<&str, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        uses.get(from)
            .into_iter()
            .flatten()
            .any(|next| next == to || (seen.insert(next.clone()) && reaches(uses, next, to, seen)))
    }
    let cycles: Vec<String> = names
        .iter()
        .filter(|name| reaches(&uses, name, name, &mut BTreeSet::new()))
        .map(|name| format!("{name} uses {:?}", uses.get(name)))
        .collect();
    assert!(cycles.is_empty(), "modules that reach themselves:\n{}", cycles.join("\n"));
}
