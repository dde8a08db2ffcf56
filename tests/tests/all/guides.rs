//! The plugin guides stay true: each guide's fenced `sh` blocks run verbatim, in order, in an
//! empty folder, with `WEIR` set to this repository and `weir` on the `PATH`, and must
//! produce a working plugin (each guide ends by running it and checking the output).

use crate::WEIR;
use std::process::Command;

use weir_tests::repo_root;

/// The bodies of the ```sh blocks of a Markdown file.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn run_guide(name: &str) {
    let guide = repo_root().join("docs/plugins").join(name);
    let text = std::fs::read_to_string(&guide).expect("read guide");
    let blocks = sh_blocks(&text);
    assert!(
        blocks.len() >= 2,
        "{name}: expected sh blocks, found {}",
        blocks.len()
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    let bin = scratch.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    std::os::unix::fs::symlink(WEIR, bin.join("weir")).expect("symlink weir");
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let script = format!("set -euo pipefail\n{}", blocks.join("\n"));
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        repo_root().join(".tools/cargo/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("WEIR", repo_root())
        .env("PATH", path)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run bash");
    assert!(
        output.status.success(),
        "{name}: the guide's commands failed ({}).\n--- script ---\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rust_guide() {
    run_guide("rust.md");
}

#[test]
fn python_guide() {
    run_guide("python.md");
}

#[test]
fn javascript_guide() {
    run_guide("javascript.md");
}

#[test]
fn c_guide() {
    run_guide("c.md");
}

#[test]
fn sh_blocks_are_extracted_in_order() {
    let md = "text\n```sh\na\nb\n```\n```toml\nx\n```\n```sh\nc\n```\n";
    assert_eq!(sh_blocks(md), vec!["a\nb\n".to_owned(), "c\n".to_owned()]);
}
