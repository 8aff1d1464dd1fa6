//! The `cachesync` binary: everything lives in the library; see `cachesync::cli`.
#![forbid(unsafe_code)]

/// mimalloc: the sidecar makes many small, short-lived allocations (entries, events, request
/// buffers); glibc's allocator spent a large share of a warm load consolidating free chunks.
/// Its v2 line, by measurement (`cargo bench --bench memory`, README "Memory per entry"): v3
/// (the crate's default) puts an 8-aligned request within 7 bytes of a size class in the next
/// class up, which cost the compact store 34 bytes per 100-byte entry; glibc's allocator held
/// 1 KiB entries tighter (99 against 285 bytes beyond key and value) but 100-byte ones looser
/// (111 against 100), and the cache store's entries looser at both sizes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cachesync::cli::main()
}
