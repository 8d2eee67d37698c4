//! The `storyfarm` binary: the user-facing entry point for every role.

mod generate;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "storyfarm", version, about = "Consistent picture stories: StyleAligned rendering on Stable Diffusion")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render prompts into PNGs, optionally all in the style of a reference image.
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result: Result<()> = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming what went wrong; a backtrace helps nobody who passed a bad flag.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
