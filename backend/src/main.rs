//! `vtpmd`: arguments → validated configuration → run.

use clap::Parser;
use std::process::ExitCode;
use vtpmd::config::{capabilities_json, Cli, Command};
use vtpmd::storage::StateDir;

fn main() -> ExitCode {
    let Command::Socket(args) = Cli::parse().command;
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return ExitCode::SUCCESS;
    }
    if args.print_states {
        return match args.state() {
            Ok((dir, _)) => {
                let states: Vec<String> = StateDir::list(&dir)
                    .into_iter()
                    .map(|(n, size)| format!("{{\"name\": \"{n}\", \"size\": {size}}}"))
                    .collect();
                println!(
                    "{{ \"type\": \"swtpm\", \"states\": [ {} ] }}",
                    states.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vtpmd: {e}");
                ExitCode::from(2)
            }
        };
    }
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vtpmd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = vtpmd::logging::init(
        cfg.log
            .as_ref()
            .map(|l| (l.file.as_path(), l.level, l.truncate)),
    ) {
        eprintln!("vtpmd: cannot open the log file: {e}");
        return ExitCode::FAILURE;
    }
    match vtpmd::daemon::run(&cfg) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vtpmd: {e}");
            ExitCode::FAILURE
        }
    }
}
