//! `vtpmd convert-state`: rewrites an encrypted state directory in swtpm's
//! `--key` format or in vtpmd's sealed format (how a directory goes back to
//! swtpm, or moves to the sealed format for good).

use super::key::{parse_key, KeySpec};
use super::{invalid, ConfigError, InstanceArgs};
use crate::storage::at_rest::Format;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The state directory: dir=DIR (no daemon may be running on it).
    #[arg(long, value_name = "dir=DIR[,mode=MODE]")]
    pub tpmstate: Option<String>,
    /// The key, with the same option as `vtpmd socket --key` (and swtpm's).
    #[arg(long, value_name = "file=PATH|fd=N|pwdfile=PATH|pwdfd=N[,...]")]
    pub key: Option<String>,
    /// The format to write: swtpm (swtpm --key opens it) or sealed
    /// (vtpmd's own: binds each file to its name, separate cipher and MAC
    /// keys).
    #[arg(long, value_name = "swtpm|sealed")]
    pub to: Option<String>,
}

/// A validated `convert-state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertConfig {
    pub state_dir: PathBuf,
    pub state_mode: u32,
    pub key: KeySpec,
    pub to: Format,
}

impl ConvertArgs {
    pub fn validate(&self) -> Result<ConvertConfig, ConfigError> {
        let (state_dir, state_mode) = InstanceArgs::parse_state(self.tpmstate.as_deref())?;
        let key = self
            .key
            .as_deref()
            .ok_or_else(|| invalid("--key", "the directory's key is required"))
            .and_then(|k| parse_key("--key", k))?;
        let to = match self.to.as_deref() {
            Some("swtpm") => Format::Swtpm,
            Some("sealed") => Format::Sealed,
            Some(o) => return Err(invalid("--to", format!("'{o}': use swtpm or sealed"))),
            None => return Err(invalid("--to", "give --to swtpm or --to sealed")),
        };
        Ok(ConvertConfig {
            state_dir,
            state_mode,
            key,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<ConvertConfig, String> {
        let mut v = vec!["vtpmd", "convert-state"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::ConvertState(a) = cli.command else {
            return Err("not convert-state".into());
        };
        a.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn options_and_refusals() {
        let c = args(&[
            "--tpmstate",
            "dir=/s",
            "--key",
            "pwdfile=/p",
            "--to",
            "swtpm",
        ])
        .unwrap();
        assert_eq!((c.state_dir, c.to), (PathBuf::from("/s"), Format::Swtpm));
        assert!(args(&["--tpmstate", "dir=/s", "--key", "pwdfile=/p"])
            .unwrap_err()
            .contains("--to swtpm"));
        assert!(args(&["--tpmstate", "dir=/s", "--to", "sealed"])
            .unwrap_err()
            .contains("key is required"));
        assert!(args(&["--key", "file=/k", "--to", "sealed"])
            .unwrap_err()
            .contains("--tpmstate"));
        assert!(
            args(&["--tpmstate", "dir=/s", "--key", "file=/k", "--to", "plain"])
                .unwrap_err()
                .contains("'plain'")
        );
    }
}
