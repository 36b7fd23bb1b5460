//! `vtpm-setup` (also installed as `swtpm_setup`): provisions a TPM 2.0
//! state directory with swtpm_setup's command line. See `vtpmd::provision`.

#![deny(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut raw = std::env::args_os();
    let prog = raw
        .next()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vtpm-setup".into());
    let mut args = Vec::new();
    for a in raw {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(bad) => {
                eprintln!(
                    "{prog}: argument {:?} is not valid UTF-8; paths and names must be UTF-8",
                    bad
                );
                return ExitCode::FAILURE;
            }
        }
    }
    vtpmd::provision::main(&prog, args)
}
