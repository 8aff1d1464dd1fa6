//! The `cachesync` binary: everything lives in the library; see `cachesync::cli`.
#![forbid(unsafe_code)]

/// mimalloc: the sidecar makes many small, short-lived allocations (entries, events, request
/// buffers); glibc's allocator spent a large share of a warm load consolidating free chunks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cachesync::cli::main()
}
