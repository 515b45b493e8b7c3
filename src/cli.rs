//! Command line, environment and config file: one effective [`Config`].
//!
//! Precedence: flags > `WSE_*` environment variables > the `--config` TOML file > defaults.

use std::path::PathBuf;

use wse_shards::Config;

/// What the command line asked for.
#[derive(Debug)]
pub struct Options {
    /// The effective configuration, validated.
    pub config: Config,
    /// `--print-config`: print the effective configuration as TOML and exit.
    pub print_config: bool,
    /// The file the configuration came from, if any.
    pub config_file: Option<PathBuf>,
}

/// A configuration that cannot be used; `Display` is one line naming the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// Parses the process's flags and environment, reads the config file, merges and validates.
/// (`--help` and `--version` print and exit inside.)
///
/// # Errors
/// Unreadable or invalid file, invalid value, invalid combination.
pub fn parse() -> Result<Options, CliError> {
    todo!()
}

/// The configuration as TOML, every key present.
pub fn render_toml(cfg: &Config) -> String {
    let _ = cfg;
    todo!()
}
