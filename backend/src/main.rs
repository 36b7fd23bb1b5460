//! `vtpmd`: arguments → validated configuration → run.

use clap::Parser;
use std::process::ExitCode;
use vtpmd::config::{self, Cli, Command, ConfigError, InstanceConfig};
use vtpmd::daemon::RunError;
use vtpmd::exit::Exit;
use vtpmd::storage::StateDir;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Socket(args) => {
            if args.print_capabilities {
                println!("{}", config::capabilities_json());
                return ExitCode::SUCCESS;
            }
            if args.print_states {
                return print_states(&args.instance);
            }
            let cfg = args.validate();
            launch(cfg, |c| {
                (&c.instance, vtpmd::daemon::swtpm::run as fn(&_) -> _)
            })
        }
        Command::VhostUser(args) => {
            if args.print_capabilities {
                println!("{}", config::vhost_user::capabilities_json(args.virtio_id));
                return ExitCode::SUCCESS;
            }
            let cfg = args.validate();
            launch(cfg, |c| {
                (&c.instance, vtpmd::daemon::vhost_user::run as fn(&_) -> _)
            })
        }
        Command::SwtpmExport(args) => swtpm_export(&args),
    }
}

/// `vtpmd swtpm-export`: vtpmd's state files → swtpm's.
fn swtpm_export(args: &config::SwtpmExportArgs) -> ExitCode {
    let dir = match args.tpmstate.strip_prefix("dir=") {
        Some(d) if !d.is_empty() && !d.contains(',') => std::path::PathBuf::from(d),
        _ => {
            eprintln!("vtpmd: --tpmstate: expected dir=DIR");
            return ExitCode::from(2);
        }
    };
    let done = StateDir::open(&dir, 0o640, None).and_then(|s| s.convert_to_swtpm());
    match done {
        Ok(files) => {
            for f in files {
                println!("{f}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vtpmd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logging set-up, then the frontend's `run`.
fn launch<C>(
    cfg: Result<C, ConfigError>,
    parts: impl FnOnce(&C) -> (&InstanceConfig, fn(&C) -> Result<Exit, RunError>),
) -> ExitCode {
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vtpmd: {e}");
            return ExitCode::from(2);
        }
    };
    let (instance, run) = parts(&cfg);
    if let Err(e) = vtpmd::logging::init(
        instance
            .log
            .as_ref()
            .map(|l| (l.file.as_deref(), l.level, l.truncate)),
    ) {
        eprintln!("vtpmd: cannot open the log file: {e}");
        return ExitCode::FAILURE;
    }
    match run(&cfg) {
        Ok(Exit::Failed(why)) => {
            eprintln!("vtpmd: {why}");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            // stderr always says why (libvirt keeps it in the domain's
            // TPM log); the log file too, when there is one.
            if !vtpmd::logging::logs_to_stderr() {
                log::error!("{e}");
            }
            eprintln!("vtpmd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_states(args: &config::InstanceArgs) -> ExitCode {
    match args.state() {
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
    }
}
