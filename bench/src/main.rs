//! The `wse-bench` binary: parse, run, print the table on stdout, write `--json`.

use std::process::ExitCode;

use clap::Parser;
use wse_bench::cli::{self, Cli, Command, Outcome};
use wse_bench::scenarios;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::ConnectStorm { common, .. }
        | Command::Hold { common, .. }
        | Command::Fanout { common, .. }
        | Command::Floor { common, .. }
        | Command::Ping { common, .. }
        | Command::Inbound { common, .. }
        | Command::Recovery { common, .. } => common.json.clone(),
        Command::Compare { .. }
        | Command::Median { .. }
        | Command::Agent { .. }
        | Command::Report { .. } => None,
    };
    if let Err(e) = scenarios::install_signal_handlers() {
        eprintln!("wse-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    match cli::run(cli) {
        Ok(Outcome::Text(t)) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Report(r)) => {
            print!("{}", r.table());
            if let Some(path) = json
                && let Err(e) = r.write_json(&path)
            {
                eprintln!("wse-bench: {e:#}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wse-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
