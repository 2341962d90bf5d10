//! The `mudsc` command line: a thin shell over the library (see `cli/`).

use std::process::ExitCode;

fn main() -> ExitCode {
    mudsc::cli::main(std::env::args_os())
}
