//! Concord's libraries hold no entity: their source (`crates/*/src/**/*.rs`, outside comments
//! and `#[cfg(test)]` items) never names a seed entity, message or field. The entities are
//! configuration (the `.proto` files a policy names); only tests, benches, fuzz targets, the
//! examples and the benchmark binary (`concord-bench`, which drives the seed Customer) may know
//! the seed scenario.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Crates whose `src` may name the seed entities: the benchmark binary's workload is the seed
/// Customer (through `concord-seed-model`).
const ALLOWED: [&str; 1] = ["concord-bench"];

/// Identifiers (whole tokens, compared case-insensitively, or containing `customer`; and the
/// message `Address`, case-sensitive: "address" is an ordinary word) that belong to the seed
/// scenario.
const SEED_TOKENS: [&str; 8] = [
    "warehouse",
    "amount_paid",
    "delivery_status",
    "open_tickets",
    "support_agent",
    "delivery_notes",
    "postal_code",
    "customer_fields",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without comments and without the items marked `#[cfg(test)]`. Strings are kept
/// (a seed name in a string literal is what this test is for).
fn code_only(text: &str) -> String {
    // Comments first: line comments (outside string literals) and block comments.
    let mut code = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_string => {
                code.push(c);
                if let Some(n) = chars.next() {
                    code.push(n);
                }
            }
            '"' => {
                in_string = !in_string;
                code.push(c);
            }
            '/' if !in_string && chars.peek() == Some(&'/') => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        code.push('\n');
                        break;
                    }
                }
            }
            '/' if !in_string && chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for n in chars.by_ref() {
                    if prev == '*' && n == '/' {
                        break;
                    }
                    prev = n;
                }
            }
            _ => code.push(c),
        }
    }
    // Then every item that follows `#[cfg(test)]`, up to its closing brace (or `;`).
    let mut out = String::with_capacity(code.len());
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, c) in item.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
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
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The seed names found in `code`.
fn seed_names(code: &str) -> Vec<String> {
    let mut found: Vec<String> = code
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| {
            let lower = t.to_ascii_lowercase();
            *t == "Address" || lower.contains("customer") || SEED_TOKENS.contains(&lower.as_str())
        })
        .map(str::to_owned)
        .collect();
    if code.contains("seed.v1") {
        found.push("seed.v1".into());
    }
    found
}

#[test]
fn the_scanner_finds_seed_names_in_code_and_skips_comments_and_tests() {
    let text = r#"
        // The Customer is not named here.
        /* nor a warehouse here */
        fn f() -> &'static str { "seed.v1.Customer" }
        fn g() { let amount_paid = 1; }
        #[cfg(test)]
        mod tests {
            fn h() { let c = Customer { warehouse: None }; }
        }
        #[cfg(test)]
        fn helper() -> u8 { let Address = 1; Address }
        fn url() -> &'static str { "amqp://host/customer" }
        fn http() -> &'static str { "the HTTP address" }
    "#;
    let code = code_only(text);
    assert!(!code.contains("mod tests"), "{code}");
    assert!(!code.contains("helper"), "{code}");
    assert_eq!(
        seed_names(&code),
        ["Customer", "amount_paid", "customer", "seed.v1"]
    );
    assert_eq!(
        seed_names("struct Address; fn f(a: SocketAddr) {}"),
        ["Address"]
    );
}

#[test]
fn library_source_names_no_seed_entity_or_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).unwrap() {
        let krate = krate.unwrap().path();
        let name = krate.file_name().unwrap().to_string_lossy().into_owned();
        if ALLOWED.contains(&name.as_str()) {
            continue;
        }
        rust_files(&krate.join("src"), &mut files);
        // Build scripts are library code too.
        if krate.join("build.rs").exists() {
            files.push(krate.join("build.rs"));
        }
    }
    assert!(
        files.len() > 40,
        "the walk found only {} files",
        files.len()
    );
    let mut offences = Vec::new();
    for path in &files {
        let code = code_only(&std::fs::read_to_string(path).unwrap());
        let names = seed_names(&code);
        if !names.is_empty() {
            offences.push(format!("{}: {names:?}", path.display()));
        }
    }
    assert!(
        offences.is_empty(),
        "library code names the seed scenario (entities are configuration):\n{}",
        offences.join("\n")
    );
}
