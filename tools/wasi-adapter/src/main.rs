//! `wasi-adapter <path>`: writes the WASI preview1 reactor adapter matching this workspace's
//! wasmtime, which `wasm-tools component new --adapt` uses to turn a wasm32-wasi core module
//! (a C plugin) into a component.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: wasi-adapter <output.wasm>");
        return ExitCode::FAILURE;
    };
    let bytes = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
    match std::fs::write(&path, bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "wasi-adapter: cannot write {}: {e}",
                std::path::Path::new(&path).display()
            );
            ExitCode::FAILURE
        }
    }
}
