//! The `weir` binary, built inside the bench package so the benchmark can find it; the
//! same allocator as `host/src/main.rs`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
