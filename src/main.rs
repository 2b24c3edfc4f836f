use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = drover::cli::Cli::parse();
    ExitCode::from(drover::commands::run(cli))
}
