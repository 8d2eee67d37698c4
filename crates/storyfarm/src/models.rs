//! `storyfarm models`: bring a hub pipeline into the local Hugging Face cache ahead of a run
//! (`fetch`, with a progress bar), and show which pipelines the cache holds (`list`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use storyfarm_diffusion::device::Precision;
use storyfarm_diffusion::model::{
    list_cached, CachedModel, FetchProgress, HubOptions, ModelFolder, ModelLocation,
};

#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Download a hub pipeline into the Hugging Face cache; prints its snapshot folder.
    Fetch(FetchArgs),
    /// List the diffusers pipelines in the Hugging Face cache.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct FetchArgs {
    /// A Hugging Face repo id (org/name); a local diffusers folder is only checked.
    model: String,
    /// Branch, tag or commit (default: main).
    #[arg(long)]
    revision: Option<String>,
    /// The hub cache (default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The precision the model will run in: f32 fetches full-precision weights, f16 and bf16
    /// the `.fp16` variant where the repo has one.
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// The hub cache (default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(args: ModelsArgs) -> Result<()> {
    match args.command {
        ModelsCommand::Fetch(args) => fetch(args),
        ModelsCommand::List(args) => list(args),
    }
}

fn hub_options(cache_dir: Option<PathBuf>) -> Result<HubOptions> {
    let mut hub = HubOptions::from_env()?;
    if cache_dir.is_some() {
        hub.cache_dir = cache_dir;
    }
    Ok(hub)
}

/// The snapshot folder goes to stdout and everything else to stderr, so that
/// `--model "$(storyfarm models fetch org/name)"` works in scripts.
fn fetch(args: FetchArgs) -> Result<()> {
    let dtype = args.precision.to_dtype();
    let mut hub = hub_options(args.cache_dir)?;
    hub.revision = args.revision;
    let folder = match ModelLocation::parse(&args.model)? {
        ModelLocation::Local(_) => {
            if hub.revision.is_some() {
                bail!(
                    "--revision applies to hub repo ids, and `{}` is a local folder",
                    args.model
                );
            }
            let folder = ModelFolder::open_for_dtype(&args.model, &hub, dtype)?;
            let missing = folder.missing_files(dtype);
            if !missing.is_empty() {
                bail!(
                    "model folder {} lacks {}",
                    folder.root().display(),
                    missing.join(", ")
                );
            }
            eprintln!(
                "{} is already local ({} pipeline); nothing to fetch",
                args.model,
                folder.family().name()
            );
            folder
        }
        ModelLocation::Hub(repo_id) => {
            let (folder, summary, _) = fetch_with_bar(&repo_id, &hub, args.precision)?;
            eprintln!("{summary}");
            folder
        }
    };
    println!("{}", folder.root().display());
    Ok(())
}

/// Finds `spec` before a render starts: a local folder is opened, a hub repo id is fetched into
/// the cache with the download bar (nothing to download when it is complete there).
pub fn prepare_model(spec: &str, hub: &HubOptions, precision: Precision) -> Result<ModelFolder> {
    Ok(match ModelLocation::parse(spec)? {
        ModelLocation::Local(_) => ModelFolder::open_for_dtype(spec, hub, precision.to_dtype())?,
        ModelLocation::Hub(repo_id) => {
            let (folder, summary, downloaded) = fetch_with_bar(&repo_id, hub, precision)?;
            // A render says nothing about a model the cache already held.
            if downloaded {
                eprintln!("{summary}");
            }
            folder
        }
    })
}

/// Fetches a hub pipeline with the download bar; returns the folder, the summary line and
/// whether anything was downloaded.
fn fetch_with_bar(
    repo_id: &str,
    hub: &HubOptions,
    precision: Precision,
) -> Result<(ModelFolder, String, bool)> {
    let mut bar = DownloadBar::new();
    let folder = ModelFolder::fetch(repo_id, hub, precision.to_dtype(), &mut bar)?;
    bar.bar.finish_and_clear();
    let summary = bar.summary(hub, &folder);
    Ok((folder, summary, bar.started > 0))
}

/// One bar for the file being downloaded, prefixed with its place among the files to fetch;
/// a line per finished file stays above it (or is all there is when stderr is not a terminal).
struct DownloadBar {
    bar: ProgressBar,
    /// `None` until the hub answered: offline runs and cache fallbacks never plan anything.
    planned: Option<usize>,
    started: usize,
    file_bytes: u64,
    total_bytes: u64,
    unreachable: Option<String>,
}

impl DownloadBar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Self {
            bar,
            planned: None,
            started: 0,
            file_bytes: 0,
            total_bytes: 0,
            unreachable: None,
        }
    }

    fn place(&self) -> String {
        format!("[{}/{}]", self.started, self.planned.unwrap_or(0))
    }

    fn summary(&self, hub: &HubOptions, folder: &ModelFolder) -> String {
        let what = format!("{} ({})", folder.id(), folder.family().name());
        let commit = folder
            .root()
            .file_name()
            .map(|c| c.to_string_lossy().chars().take(7).collect::<String>())
            .unwrap_or_default();
        if let Some(error) = &self.unreachable {
            return format!(
                "hub unreachable ({error}); using the complete cached snapshot of {what}"
            );
        }
        match self.planned {
            None if hub.offline => {
                format!("offline (HF_HUB_OFFLINE is set): using the cached snapshot of {what}")
            }
            None | Some(0) => {
                format!("{what} at {commit} is complete in the cache; nothing to download")
            }
            Some(files) => format!(
                "fetched {what} at {commit}: {files} file{} ({})",
                if files == 1 { "" } else { "s" },
                HumanBytes(self.total_bytes)
            ),
        }
    }
}

impl FetchProgress for DownloadBar {
    fn files_planned(&mut self, files: usize) {
        self.planned = Some(files);
    }

    fn file_started(&mut self, file: &str, bytes: u64) {
        self.started += 1;
        self.file_bytes = bytes;
        self.bar.set_length(bytes);
        self.bar.set_prefix(self.place());
        self.bar.set_message(file.to_string());
        // The bar shows one file at a time: its position, elapsed time and speed start over.
        self.bar.reset();
    }

    fn advanced(&mut self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn file_finished(&mut self, file: &str) {
        self.total_bytes += self.file_bytes;
        let line = format!(
            "{:>9} {file} ({})",
            self.place(),
            HumanBytes(self.file_bytes)
        );
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn hub_unreachable(&mut self, error: &str) {
        self.unreachable = Some(error.to_string());
    }
}

fn list(args: ListArgs) -> Result<()> {
    let hub = hub_options(args.cache_dir)?;
    let models = list_cached(&hub)?;
    if models.is_empty() {
        let place = hub
            .cache_dir
            .map(|d| format!(" at {}", d.display()))
            .unwrap_or_default();
        println!(
            "no diffusers pipelines in the Hugging Face cache{place}; \
             download one with `storyfarm models fetch org/name`"
        );
        return Ok(());
    }
    let header = ["REPO", "FAMILY", "REVISION", "SIZE", "STATUS"].map(String::from);
    let rows: Vec<[String; 5]> = models.iter().map(row).collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

fn row(model: &CachedModel) -> [String; 5] {
    let mut revision: String = model.commit.chars().take(7).collect();
    if !model.refs.is_empty() {
        revision.push_str(&format!(" ({})", model.refs.join(", ")));
    }
    let status = if model.missing.is_empty() {
        "complete".to_string()
    } else {
        format!("incomplete: lacks {}", model.missing.join(", "))
    };
    [
        model.repo_id.clone(),
        model.family.map_or("unsupported", |f| f.name()).to_string(),
        revision,
        HumanBytes(model.size).to_string(),
        status,
    ]
}
