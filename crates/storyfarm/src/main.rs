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

/// The service name a command's spans carry (OTEL_SERVICE_NAME overrides it).
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) | Command::Migrate(_) => "storyfarm-coordinator",
        Command::Worker(_) => "storyfarm-worker",
        Command::Render(_) => "storyfarm-render",
        _ => "storyfarm-cli",
    }
}

/// Runs a command outside any async runtime, with logs but no trace export.
fn without_runtime(service: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    let tracing = storyfarm_telemetry::init_tracing(service, "warn", false)?;
    let result = run();
    tracing.shutdown();
    result
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    let service = service_name(&command);
    let result: Result<()> = match command {
        // hf-hub's blocking client: outside the tokio runtime, like `generate`; they export no
        // traces (the OTLP client lives on a runtime).
        Command::Generate(args) => without_runtime(service, || generate::run(args)),
        Command::Models(args) => without_runtime(service, || models::run(args)),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime.block_on(async {
                    let tracing = storyfarm_telemetry::init_tracing(service, "warn", true)?;
                    let result = match command {
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
                    };
                    // The exporter's last batch goes out while the runtime still runs.
                    tokio::task::spawn_blocking(move || tracing.shutdown())
                        .await
                        .ok();
                    result
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
