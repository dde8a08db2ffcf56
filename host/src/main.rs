//! The `weir` binary. It allocates with mimalloc: with glibc's malloc, allocating and
//! freeing records passed between threads took about a fifth of a busy worker's CPU.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
