//! `forwarder` command line (SPEC §7).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "forwarder",
    version = forwarder::VERSION,
    about = "Kernel-bypass TCP/UDP reverse proxy (XDP + sk_lookup)"
)]
struct Cli {
    /// How the agent's own log is written on stderr: `text` lines, or `json`, one
    /// object per line (`ts`, `level`, `target`, `msg`) for log collectors.
    /// RUST_LOG sets the level.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, attach the datapath, serve until SIGINT/SIGTERM.
    Run {
        /// The config file (TOML, docs/config.md); watched for changes.
        #[arg(long, short)]
        config: PathBuf,
        /// How long open TCP connections may drain on shutdown (e.g. 10s).
        #[arg(long, default_value = "10s")]
        drain: String,
        /// Unix socket on which `forwarder stats` reaches this agent.
        #[arg(long, default_value = forwarder::telemetry::control::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
        /// Directory of the single-instance lock and of the journal of host changes
        /// (sysctls, neighbour entries) that a restart after a crash puts back. One
        /// agent per directory.
        #[arg(long, default_value = forwarder::host::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Validate a config file; exit non-zero with one line per problem.
    CheckConfig {
        /// The config file to check.
        #[arg(long, short)]
        config: PathBuf,
        /// Fail (exit 1) on warnings too (lockout risk, tables near capacity).
        #[arg(long)]
        strict: bool,
        /// Print the effective config, every default written out.
        #[arg(long)]
        dump: bool,
    },
    /// Show the running agent's counters (a table, or JSON).
    Stats {
        /// JSON instead of a table (with --watch: one object per line).
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted (a table with per-second rates).
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes (e.g. 1s, 500ms, 5s).
        #[arg(long, default_value = "1s")]
        interval: String,
        /// The agent's control socket.
        #[arg(long, default_value = forwarder::telemetry::control::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// List every origin of every app: weight, health, drain state, traffic.
    Origins {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The agent's control socket.
        #[arg(long, default_value = forwarder::telemetry::control::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// Take an origin out of selection: no new connections or flows, open ones
    /// finish. Until `enable` or a restart.
    Drain {
        /// The app's id.
        app: String,
        /// The origin as `forwarder origins` names it (e.g. 10.0.0.5:22).
        origin: String,
        /// The agent's control socket.
        #[arg(long, default_value = forwarder::telemetry::control::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// Put a drained origin back into selection.
    Enable {
        /// The app's id.
        app: String,
        /// The origin as `forwarder origins` names it (e.g. 10.0.0.5:22).
        origin: String,
        /// The agent's control socket.
        #[arg(long, default_value = forwarder::telemetry::control::DEFAULT_CONTROL_SOCKET)]
        control: PathBuf,
    },
    /// Convert Spectrum API JSON (apps) into `[[apps]]` TOML on stdout.
    ImportSpectrum {
        /// The Spectrum API's JSON (a list of apps, or its `{"result": [...]}`); `-`
        /// reads stdin.
        file: PathBuf,
        /// A file with the `[agent]` table (and firewall) to print first: the output
        /// is then a whole config, checked as such.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Cloudflare IP Access rules JSON (`firewall/access_rules/rules`) to convert
        /// into `[[access_rules]]`.
        #[arg(long)]
        access_rules: Option<PathBuf>,
    },
    /// Write the man pages or the shell completions into a directory (packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        /// Where to write them.
        dir: PathBuf,
    },
}

/// What `forwarder generate` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Generated {
    /// `forwarder.1` and one page per subcommand (`forwarder-run.1`, …).
    Man,
    /// bash, zsh and fish completions.
    Completions,
}

/// Writes the man pages or the completions of the command line into `dir`.
fn generate(what: Generated, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = Cli::command();
    match what {
        Generated::Man => {
            clap_mangen::generate_to(command, dir).context("writing the man pages")?;
        }
        Generated::Completions => {
            for shell in [
                clap_complete::Shell::Bash,
                clap_complete::Shell::Zsh,
                clap_complete::Shell::Fish,
            ] {
                clap_complete::generate_to(shell, &mut command, "forwarder", dir)
                    .with_context(|| format!("writing the {shell} completions"))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if cli.log_format == LogFormat::Json {
        logger.format(|buf, record| {
            use std::io::Write as _;
            let line = serde_json::json!({
                "ts": forwarder::telemetry::events::rfc3339(std::time::SystemTime::now()),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    let result = match cli.command {
        Command::Run {
            config,
            drain,
            control,
            state_dir,
        } => forwarder::agent::parse_duration_arg(&drain).and_then(|drain| {
            forwarder::agent::run_cli(forwarder::agent::RunOptions {
                config,
                drain,
                control,
                state_dir,
            })
        }),
        Command::CheckConfig {
            config,
            strict,
            dump,
        } => forwarder::config::check_config_cli(
            &config,
            forwarder::config::CheckOptions { strict, dump },
        ),
        Command::Stats {
            json,
            watch,
            interval,
            control,
        } => forwarder::agent::parse_duration_arg(&interval).and_then(|interval| {
            if interval.is_zero() {
                anyhow::bail!("--interval must be more than 0");
            }
            let options = forwarder::cli::stats::StatsOptions {
                json,
                watch: watch.then_some(interval),
            };
            forwarder::cli::stats::stats_cli(&control, options)
        }),
        Command::Origins { json, control } => forwarder::cli::origins::origins_cli(&control, json),
        Command::Drain {
            app,
            origin,
            control,
        } => forwarder::cli::origins::drain_cli(&control, &app, &origin, true),
        Command::Enable {
            app,
            origin,
            control,
        } => forwarder::cli::origins::drain_cli(&control, &app, &origin, false),
        Command::ImportSpectrum {
            file,
            agent,
            access_rules,
        } => forwarder::spectrum::import_cli(
            &file,
            &forwarder::spectrum::ImportOptions {
                agent,
                access_rules,
            },
        ),
        Command::Generate { what, dir } => generate(what, &dir),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            // A config `run` refuses: EX_CONFIG, so systemd does not restart in vain.
            if err
                .chain()
                .any(|e| e.is::<forwarder::config::ConfigRejected>())
            {
                ExitCode::from(forwarder::config::EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
