//! The command line: one subcommand per scenario plus `compare`, and [`run`] which executes a
//! parsed command and returns its report (the binary prints it; tests assert on it).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::dist::agent::{self, AgentArgs};
use crate::report::{self, Report};
use crate::scenarios::{self, Common, Setup};

#[derive(Parser, Debug)]
#[command(
    name = "wse-bench",
    version,
    about = "Load generator and benchmark harness for wse-server (and the upstream WSE server)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N connections as fast as possible: accept rate and handshake latency.
    ConnectStorm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::connect_storm::StormArgs,
    },
    /// Open N connections, subscribe each to K topics and hold them: survival and memory per
    /// connection.
    Hold {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::hold::HoldArgs,
    },
    /// S subscribers over T topics, publishers at a fixed open-loop rate (or `--rate max`):
    /// deliveries/s, latency, gaps, server CPU per million deliveries.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::fanout::FanoutArgs,
    },
    /// `fanout` against a minimal sender in this process (plain TCP, canned upgrade and set-up,
    /// then only frame writes; no protocol, no fabric): the floor the server's CPU per delivery
    /// and latency are quoted against (`compare floor.json fanout.json`).
    Floor {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::fanout::FanoutArgs,
        #[command(flatten)]
        floor: scenarios::floor::FloorArgs,
    },
    /// Application-level ping/PONG round trips on N concurrent connections.
    Ping {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::ping::PingArgs,
    },
    /// N connections each sending messages at a rate: processed msg/s from the server's metrics.
    Inbound {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::inbound::InboundArgs,
    },
    /// Subscribers disconnect and reconnect with recovery while publishers run: verifies every
    /// subscriber gets every publication exactly once, in order; recoveries, replay sizes,
    /// reconnect latency.
    Recovery {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: scenarios::recovery::RecoveryArgs,
    },
    /// Serve slices of scenarios for a controller (`<scenario> --agents ADDR,...`).
    Agent {
        #[command(flatten)]
        args: AgentArgs,
    },
    /// Print the main figures of two JSON results side by side with ratios (b/a).
    Compare { a: PathBuf, b: PathBuf },
    /// Render JSON results as one self-contained HTML page: latency percentile plots and
    /// figure tables (inline SVG, no external assets).
    Report {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The HTML file to write.
        #[arg(long)]
        html: PathBuf,
    },
    /// Write the per-figure median of repeated runs' JSON results to `--out` (and print it).
    Median {
        #[arg(short, long)]
        out: PathBuf,
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

/// What a command produced.
pub enum Outcome {
    Report(Box<Report>),
    Text(String),
}

/// Runs a parsed command.
///
/// # Errors
/// Bad flags (URLs, sources, secret) or unreadable compare inputs. Connection failures are
/// figures in the report, not errors.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let report = match cli.command {
        Command::Compare { a, b } => {
            let (ra, rb) = (Report::read_json(&a)?, Report::read_json(&b)?);
            let name = |p: &PathBuf| {
                p.file_stem()
                    .map_or_else(|| "?".into(), |s| s.to_string_lossy().into_owned())
            };
            return Ok(Outcome::Text(report::compare(
                &ra,
                &rb,
                &name(&a),
                &name(&b),
            )));
        }
        Command::Agent { args } => {
            agent::run(&args)?;
            return Ok(Outcome::Text(String::new()));
        }
        Command::Report { runs, html } => {
            let reports = runs
                .iter()
                .map(|p| {
                    let name = p
                        .file_stem()
                        .map_or_else(|| "?".into(), |s| s.to_string_lossy().into_owned());
                    Report::read_json(p).map(|r| (name, r))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let page = crate::html::render(&reports);
            std::fs::write(&html, page)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", html.display()))?;
            return Ok(Outcome::Text(format!(
                "wrote {} ({} results)\n",
                html.display(),
                reports.len()
            )));
        }
        Command::Median { out, runs } => {
            let runs = runs
                .iter()
                .map(|p| Report::read_json(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let m = report::median(&runs);
            m.write_json(&out)?;
            return Ok(Outcome::Text(m.table()));
        }
        Command::ConnectStorm { common, args } => {
            scenarios::connect_storm::run(&Setup::new(common)?, &args)
        }
        Command::Hold { common, args } => scenarios::hold::run(&Setup::new(common)?, &args),
        Command::Fanout { common, args } => scenarios::fanout::run(&Setup::new(common)?, &args),
        Command::Floor {
            common,
            args,
            floor,
        } => {
            wse_only(&common, "floor")?;
            scenarios::floor::run(common, &args, &floor)?
        }
        Command::Ping { common, args } => {
            wse_only(&common, "ping")?;
            scenarios::ping::run(&Setup::new(common)?, &args)
        }
        Command::Inbound { common, args } => {
            wse_only(&common, "inbound")?;
            scenarios::inbound::run(&Setup::new(common)?, &args)
        }
        Command::Recovery { common, args } => {
            wse_only(&common, "recovery")?;
            scenarios::recovery::run(&Setup::new(common)?, &args)
        }
    };
    Ok(Outcome::Report(Box::new(report)))
}

/// Refuses `--protocol centrifuge` for a scenario that speaks WSE only.
fn wse_only(common: &scenarios::Common, scenario: &str) -> anyhow::Result<()> {
    if common.protocol != scenarios::Protocol::Wse {
        anyhow::bail!(
            "{scenario} speaks WSE only: --protocol centrifuge runs connect-storm, hold and fanout"
        );
    }
    Ok(())
}

/// Parses `argv` (including the program name) and runs it; for tests.
///
/// # Errors
/// As [`run`], plus flag parsing errors.
pub fn run_args<I, T>(argv: I) -> anyhow::Result<Outcome>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run(Cli::try_parse_from(argv)?)
}
