//! `vtpm-setup` (also installed as `swtpm_setup`): provisions a TPM 2.0
//! state directory with swtpm_setup's command line. See `vtpmd::provision`.

#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    let mut args = std::env::args();
    let prog = args.next().unwrap_or_else(|| "vtpm-setup".into());
    vtpmd::provision::main(&prog, args.collect())
}
