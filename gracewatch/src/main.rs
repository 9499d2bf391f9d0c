//! The `gracewatch` binary: everything lives in the library; errors print once, here.
fn main() -> std::process::ExitCode {
    gracewatch::cli::main()
}
