//! The `netra` binary: parses the command line, runs the library, maps errors to exit
//! codes (2 for bad configuration or usage, 1 for a failed start or run).

mod cli;

/// mimalloc instead of the system allocator: netra's hot path allocates small buffers on
/// one thread (a run, the SQLite writer) and frees them on another (a connection's
/// writer). glibc serialized those frees on its arena locks (futex waits in profiles of
/// `wsload chat`) and spent more time consolidating free lists; mimalloc frees them to
/// the owning thread's page without a lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
