//! The `cachesync` binary: everything lives in the library; see `cachesync::cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cachesync::cli::main()
}
