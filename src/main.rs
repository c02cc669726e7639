//! The `netra` binary: parses the command line, runs the library, maps errors to exit
//! codes (2 for bad configuration or usage, 1 for a failed start or run).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
