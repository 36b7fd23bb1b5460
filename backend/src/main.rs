//! `vtpmd`: arguments → validated configuration → run.

use clap::Parser;
use std::process::ExitCode;
use vtpmd::config::{self, Cli, Command, ConfigError, InstanceConfig, LogTarget};
use vtpmd::daemon::{detach, RunError};
use vtpmd::exit::Exit;
use vtpmd::logging::Output;
use vtpmd::storage::at_rest::{AtRestKey, Format};
use vtpmd::storage::StateDir;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Socket(args) => {
            if args.socket.print_capabilities {
                let sizes = vtpmd::engine::libtpms::rsa_key_sizes();
                println!("{}", config::capabilities_json(&sizes));
                return ExitCode::SUCCESS;
            }
            if args.socket.print_states {
                return print_states(&args.instance);
            }
            let cfg = args.validate();
            if cfg.as_ref().is_ok_and(|c| c.daemon) {
                match detach::take_ready_pipe() {
                    // The process the caller started: it waits for the daemon.
                    Ok(false) => return detach::spawn_and_wait(),
                    Ok(true) => {}
                    Err(e) => {
                        eprintln!("vtpmd: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
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
    let key = match args.key.as_deref().map(|k| {
        let spec = config::key::parse_key("--key", k).map_err(|e| e.to_string())?;
        vtpmd::daemon::keys::load("--key", &spec).map_err(|e| e.to_string())
    }) {
        None => None,
        Some(Ok(k)) => Some(AtRestKey::forced(k, Format::Swtpm)),
        Some(Err(e)) => {
            eprintln!("vtpmd: {e}");
            return ExitCode::from(2);
        }
    };
    let done = StateDir::open(&dir, 0o640, key).and_then(|s| s.convert_to_swtpm());
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

/// Sets the logger up as `--log` says.
fn init_logging(instance: &InstanceConfig) -> Result<(), String> {
    let Some(log) = &instance.log else {
        return vtpmd::logging::init(Output::Stderr, None, None)
            .map_err(|e| format!("cannot log to stderr: {e}"));
    };
    let output = match &log.target {
        LogTarget::File { path, truncate } => Output::File {
            path: path.clone(),
            truncate: *truncate,
        },
        LogTarget::Fd(fd) => Output::Fd(std::fs::File::from(
            vtpmd::fdpass::inherited_fd(*fd).map_err(|e| format!("--log fd={fd}: {e}"))?,
        )),
        LogTarget::Stderr => Output::Stderr,
    };
    vtpmd::logging::init(output, Some(log.level), log.prefix.as_deref())
        .map_err(|e| format!("cannot open the log: {e}"))
}

/// Logging set-up, then the frontend's `run`. Every error is printed once
/// on stderr (libvirt keeps it in the domain's TPM log), and written to the
/// log as well when the log is not stderr.
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
    if let Err(e) = init_logging(instance) {
        eprintln!("vtpmd: {e}");
        return ExitCode::FAILURE;
    }
    let failure = match run(&cfg) {
        Ok(Exit::Failed(why)) => why,
        Ok(_) => return ExitCode::SUCCESS,
        Err(e) => e.to_string(),
    };
    // Logged (a log file's errors are also copied to stderr), or said on
    // stderr: once each place.
    let to_stderr = vtpmd::logging::logs_to_stderr();
    let copied = !to_stderr && vtpmd::logging::errors_reach_stderr();
    if !to_stderr {
        log::error!("{failure}");
    }
    if !copied {
        eprintln!("vtpmd: {failure}");
    }
    ExitCode::FAILURE
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
