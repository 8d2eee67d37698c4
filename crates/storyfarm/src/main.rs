//! The `storyfarm` binary: the user-facing entry point for every role.

mod client;
mod farm;
mod generate;
mod models;
mod progress;
mod render;
mod sheet;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "storyfarm",
    version,
    about = "Consistent picture stories: StyleAligned rendering on Stable Diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render a storyboard file on this machine: frames, a contact sheet and manifest.json
    /// (embedded database, queue and artifact store; an interrupted run resumes).
    Render(render::RenderArgs),
    /// Render prompts into PNGs, optionally all in the style of a reference image.
    Generate(generate::GenerateArgs),
    /// Run the coordinator: gRPC API, planner, dispatch, event ingestion.
    Serve(farm::ServeArgs),
    /// Run a worker: take tasks from the queue and render them on this machine's device.
    Worker(farm::WorkerArgs),
    /// Apply the database migrations.
    Migrate(farm::MigrateArgs),
    /// Submit a storyboard file to the coordinator; prints the job id.
    Submit(client::SubmitArgs),
    /// Follow a job with progress bars until it ends.
    Watch(client::WatchArgs),
    /// Download a job's finished frames as PNGs.
    Frames(client::FramesArgs),
    /// Fetch hub models into the local cache, or list the cached ones.
    Models(models::ModelsArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for people; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result: Result<()> = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        // hf-hub's blocking client: outside the tokio runtime, like `generate`.
        Command::Models(args) => models::run(args),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime.block_on(async {
                    match command {
                        Command::Render(args) => render::run(args).await,
                        Command::Serve(args) => farm::serve(args).await,
                        Command::Worker(args) => farm::worker(args).await,
                        Command::Migrate(args) => farm::migrate(args).await,
                        Command::Submit(args) => client::submit(args).await,
                        Command::Watch(args) => client::watch(args).await,
                        Command::Frames(args) => client::frames(args).await,
                        Command::Generate(_) | Command::Models(_) => {
                            unreachable!("handled above")
                        }
                    }
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<render::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            // One line naming what went wrong; a backtrace helps nobody who passed a bad flag.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
