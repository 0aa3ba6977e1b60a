//! `scaled-bench`: the load generator's command line; everything else is in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = scaled_bench::run(std::env::args_os(), &mut std::io::stdout());
    ExitCode::from(code)
}
