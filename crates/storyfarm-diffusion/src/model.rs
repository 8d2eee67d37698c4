//! Where a diffusers pipeline folder lives (a local folder or a Hugging Face hub repo fetched
//! into the hub cache) and how its configs and safetensors weights are found inside it.
//!
//! A hub snapshot has the same relative layout as a local folder, so everything after
//! [`ModelFolder::open`] works on a plain directory. [`ModelFolder::fetch`] downloads with a
//! caller's [`FetchProgress`], and [`list_cached`] reports the pipelines already in the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{DType, Device};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use serde::de::DeserializeOwned;

use crate::component::read_json;
use crate::error::{DiffusionError, Result};
use crate::weights::Weights;

/// Components whose weights a pipeline loads.
const WEIGHT_COMPONENTS: [&str; 4] = ["unet", "vae", "text_encoder", "text_encoder_2"];
const TOKENIZER_COMPONENTS: [&str; 2] = ["tokenizer", "tokenizer_2"];
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];
/// diffusers names its models `diffusion_pytorch_model`, transformers names them `model`.
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Bounds the first request to the hub, so that a machine without network access fails in
/// seconds instead of waiting for the operating system's connect timeout (minutes).
const HUB_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a download may go without a byte before it is abandoned, unless
/// `HF_HUB_DOWNLOAD_TIMEOUT` says otherwise (the Python hub client's variable and default).
const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10);
const DOWNLOAD_TIMEOUT_VAR: &str = "HF_HUB_DOWNLOAD_TIMEOUT";

const NO_CACHE_DIR: &str = "no hugging face cache directory: set HF_HOME or HF_HUB_CACHE";

/// Which pipeline a model folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    StableDiffusion,
    StableDiffusionXl,
}

impl ModelFamily {
    /// The family's name as the farm's queues and storyboards spell it: `sd` or `sdxl`.
    pub fn name(self) -> &'static str {
        match self {
            Self::StableDiffusion => "sd",
            Self::StableDiffusionXl => "sdxl",
        }
    }
}

/// How to reach the Hugging Face hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache (`.../huggingface/hub`); `None` means the standard location.
    pub cache_dir: Option<PathBuf>,
    /// Use only what is already in the cache; never touch the network.
    pub offline: bool,
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
    /// Access token for gated or private repos; `None` uses the token file of `huggingface-cli
    /// login` if there is one.
    pub token: Option<String>,
    /// Hub URL; `None` means `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// How long a file download may receive nothing before it fails; `None` means 10 s.
    pub download_timeout: Option<Duration>,
}

impl HubOptions {
    /// Reads the variables the Python `huggingface_hub` reads: `HF_HUB_CACHE`, `HF_HOME`,
    /// `XDG_CACHE_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_ENDPOINT`,
    /// `HF_HUB_DOWNLOAD_TIMEOUT` (seconds). A timeout that is not a positive number is an
    /// error naming the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`HubOptions::from_env`] over any variable lookup (tests pass a map, not the process
    /// environment, which all tests share).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let non_empty = |name: &str| non_blank(var(name));
        let cache_dir = cache_dir_from(&non_empty);
        let offline = non_empty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let download_timeout = match non_empty(DOWNLOAD_TIMEOUT_VAR) {
            None => None,
            Some(value) => match value.trim().parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 => Some(Duration::from_secs_f64(secs)),
                _ => {
                    return Err(DiffusionError::InvalidArgument {
                        field: DOWNLOAD_TIMEOUT_VAR.into(),
                        reason: format!("`{value}` is not a positive number of seconds"),
                    })
                }
            },
        };
        Ok(Self {
            cache_dir,
            offline,
            revision: None,
            token: non_empty("HF_TOKEN"),
            endpoint: non_empty("HF_ENDPOINT"),
            download_timeout,
        })
    }

    fn cache_dir_or_default(&self, repo_id: &str) -> Result<PathBuf> {
        self.cache_root().ok_or_else(|| DiffusionError::ModelSpec {
            spec: repo_id.to_string(),
            message: NO_CACHE_DIR.into(),
        })
    }

    fn cache_root(&self) -> Option<PathBuf> {
        self.cache_dir
            .clone()
            .or_else(|| cache_dir_from(&|name| non_blank(std::env::var(name).ok())))
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// A variable's value unless it is unset or blank (the Python client treats both alike).
fn non_blank(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// The hub cache the Python client would use, from its variables.
fn cache_dir_from(non_empty: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    non_empty("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| non_empty("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface/hub")))
        .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
}

/// A diffusers pipeline folder on local disk (possibly a hub cache snapshot).
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    id: String,
    family: ModelFamily,
}

impl ModelFolder {
    /// Opens a local folder, or fetches a hub repo (`org/name`) into the hub cache preferring
    /// full-precision weights. See [`ModelFolder::open_for_dtype`].
    pub fn open(spec: &str, hub: &HubOptions) -> Result<Self> {
        Self::open_for_dtype(spec, hub, DType::F32)
    }

    /// Opens `spec`: an existing directory is used as is; a hub repo id is fetched (configs,
    /// tokenizers and the safetensors weights of the variant that suits `dtype`) into the hub
    /// cache, or in offline mode looked up there only.
    pub fn open_for_dtype(spec: &str, hub: &HubOptions, dtype: DType) -> Result<Self> {
        match classify_spec(spec)? {
            ModelLocation::Local(root) => Self::from_dir(root, spec.to_string()),
            ModelLocation::Hub(repo_id) => {
                open_hub(&repo_id, hub, dtype, &mut DownloadLog::new(&repo_id))
            }
        }
    }

    /// Brings hub repo `repo_id` into the hub cache as [`ModelFolder::open_for_dtype`] does,
    /// reporting each download to `progress`; files already in the snapshot are not
    /// downloaded again. Offline, or when the hub does not answer, a complete cached snapshot
    /// is used instead (the latter reported through [`FetchProgress::hub_unreachable`]).
    pub fn fetch(
        repo_id: &str,
        hub: &HubOptions,
        dtype: DType,
        progress: &mut dyn FetchProgress,
    ) -> Result<Self> {
        if !is_repo_id(repo_id) {
            return Err(DiffusionError::ModelSpec {
                spec: repo_id.to_string(),
                message: "not a hugging face repo id (org/name)".into(),
            });
        }
        open_hub(repo_id, hub, dtype, progress)
    }

    fn from_dir(root: PathBuf, id: String) -> Result<Self> {
        if !root.join("model_index.json").is_file() {
            return Err(DiffusionError::ModelLayout {
                path: root,
                message: "missing model_index.json: expected a diffusers pipeline folder \
                          (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
                    .into(),
            });
        }
        let family = detect_family(&root)?;
        Ok(Self { root, id, family })
    }

    /// The folder holding `model_index.json`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the user asked for: the local path or the hub repo id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// What loading the pipeline in `dtype` would lack (configs, tokenizer files, weights,
    /// shards), described for people; empty when the folder is complete.
    pub fn missing_files(&self, dtype: DType) -> Vec<String> {
        missing_pipeline_files(&self.root, dtype)
    }

    pub fn component_dir(&self, component: &str) -> PathBuf {
        self.root.join(component)
    }

    /// Reads and parses `file` from the model root or from a component folder.
    pub fn read_json<T: DeserializeOwned>(&self, component: Option<&str>, file: &str) -> Result<T> {
        let path = match component {
            Some(component) => self.component_dir(component).join(file),
            None => self.root.join(file),
        };
        read_json(&path)
    }

    /// The safetensors files of `component`: see [`weight_files_in`].
    pub fn weight_files(&self, component: &str, dtype: DType) -> Result<Vec<PathBuf>> {
        let dir = self.component_dir(component);
        if !dir.is_dir() {
            return Err(DiffusionError::ModelLayout {
                path: self.root.clone(),
                message: format!("missing component folder `{component}`"),
            });
        }
        weight_files_in(&dir, dtype)
    }

    /// Memory-maps the weights of `component` for a model running in `dtype` on `device`.
    pub fn weights(&self, component: &str, dtype: DType, device: &Device) -> Result<Weights> {
        Weights::from_safetensors(&self.weight_files(component, dtype)?, dtype, device)
    }
}

/// The safetensors files of one component folder: the `.fp16` variant for f16/bf16 and the plain
/// one for f32, falling back to whichever exists; a sharded index gives all its shards.
pub fn weight_files_in(dir: &Path, dtype: DType) -> Result<Vec<PathBuf>> {
    let names = file_names(dir)?;
    let choice = choose_weights(&names, dtype).ok_or_else(|| DiffusionError::ModelLayout {
        path: dir.to_path_buf(),
        message: no_weights_message(&names),
    })?;
    match choice {
        WeightChoice::Single(name) => Ok(vec![dir.join(name)]),
        WeightChoice::Index(index) => {
            let index_path = dir.join(&index);
            shard_names(&index_path)?
                .into_iter()
                .map(|shard| {
                    let path = dir.join(&shard);
                    if path.is_file() {
                        Ok(path)
                    } else {
                        Err(DiffusionError::ModelLayout {
                            path: dir.to_path_buf(),
                            message: format!("shard `{shard}` listed in {index} is missing"),
                        })
                    }
                })
                .collect()
        }
    }
}

/// Where a model location (`--model`) points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// An existing directory, used as is.
    Local(PathBuf),
    /// A Hugging Face hub repo id (`org/name`).
    Hub(String),
}

impl ModelLocation {
    /// An existing directory is local; otherwise `spec` must be a hub repo id. Anything else
    /// (a file, a URL, a name without `org/`) is a [`DiffusionError::ModelSpec`] naming it.
    pub fn parse(spec: &str) -> Result<Self> {
        classify_spec(spec)
    }
}

fn classify_spec(spec: &str) -> Result<ModelLocation> {
    let invalid = |message: String| DiffusionError::ModelSpec {
        spec: spec.to_string(),
        message,
    };
    if spec.trim().is_empty() {
        return Err(invalid("empty model location".into()));
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return Err(invalid(format!(
            "`{scheme}://` locations are not supported; pass a local folder or a hugging face \
             repo id (org/name)"
        )));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelLocation::Local(path.to_path_buf()));
    }
    if path.exists() {
        return Err(invalid(
            "is a file; expected a diffusers pipeline folder holding model_index.json".into(),
        ));
    }
    if is_repo_id(spec) {
        return Ok(ModelLocation::Hub(spec.to_string()));
    }
    Err(invalid(
        "no such folder, and not a hugging face repo id (org/name)".into(),
    ))
}

/// The hub's rules for `org/name`: one slash, letters, digits, `-`, `_`, `.`, no leading or
/// trailing `-`/`.`, no `--` or `..` (which would collide with the cache's folder naming).
fn is_repo_id(spec: &str) -> bool {
    let Some((org, name)) = spec.split_once('/') else {
        return false;
    };
    let part_ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    part_ok(org) && part_ok(name)
}

fn detect_family(root: &Path) -> Result<ModelFamily> {
    let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
    match index.get("_class_name") {
        Some(serde_json::Value::String(class)) => match class.as_str() {
            "StableDiffusionPipeline" => Ok(ModelFamily::StableDiffusion),
            "StableDiffusionXLPipeline" => Ok(ModelFamily::StableDiffusionXl),
            other => Err(DiffusionError::unsupported(
                "model_index.json",
                "_class_name",
                other,
            )),
        },
        Some(other) => Err(DiffusionError::unsupported(
            "model_index.json",
            "_class_name",
            other,
        )),
        // Hand-assembled folders may lack the class name; a second text encoder is what makes
        // a pipeline SDXL.
        None if declares_component(&index, "text_encoder_2")
            || root.join("text_encoder_2").is_dir() =>
        {
            Ok(ModelFamily::StableDiffusionXl)
        }
        None => Ok(ModelFamily::StableDiffusion),
    }
}

/// Whether model_index.json lists `component` with a class (`[null, null]` means absent).
fn declares_component(index: &serde_json::Value, component: &str) -> bool {
    index
        .get(component)
        .and_then(|v| v.as_array())
        .is_some_and(|pair| pair.iter().any(|v| !v.is_null()))
}

/// Names of the regular files (symlinks followed, as in hub snapshots) directly in `dir`.
fn file_names(dir: &Path) -> Result<BTreeSet<String>> {
    let io_error = |source| DiffusionError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        if entry.path().is_file() {
            if let Some(name) = entry.file_name().to_str() {
                names.insert(name.to_string());
            }
        }
    }
    Ok(names)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum WeightChoice {
    Single(String),
    /// A `*.safetensors.index.json` whose `weight_map` names the shards.
    Index(String),
}

/// Picks the weight file of one component among the file names of its folder.
fn choose_weights(names: &BTreeSet<String>, dtype: DType) -> Option<WeightChoice> {
    let plain = WEIGHT_STEMS.iter().flat_map(|stem| {
        [
            WeightChoice::Single(format!("{stem}.safetensors")),
            WeightChoice::Index(format!("{stem}.safetensors.index.json")),
        ]
    });
    // diffusers writes variant indexes as `x.safetensors.index.fp16.json`; some hand-made
    // repos use `x.fp16.safetensors.index.json`.
    let fp16 = WEIGHT_STEMS.iter().flat_map(|stem| {
        [
            WeightChoice::Single(format!("{stem}.fp16.safetensors")),
            WeightChoice::Index(format!("{stem}.safetensors.index.fp16.json")),
            WeightChoice::Index(format!("{stem}.fp16.safetensors.index.json")),
        ]
    });
    let ordered: Vec<WeightChoice> = if matches!(dtype, DType::F16 | DType::BF16) {
        fp16.chain(plain).collect()
    } else {
        plain.chain(fp16).collect()
    };
    ordered.into_iter().find(|choice| match choice {
        WeightChoice::Single(name) | WeightChoice::Index(name) => names.contains(name),
    })
}

fn no_weights_message(names: &BTreeSet<String>) -> String {
    let pickles: Vec<&str> = names
        .iter()
        .filter(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt"))
        .map(String::as_str)
        .collect();
    let mut message =
        "no safetensors weights (looked for diffusion_pytorch_model[.fp16].safetensors, \
                       model[.fp16].safetensors and their sharded .index.json)"
            .to_string();
    if !pickles.is_empty() {
        message.push_str(&format!(
            "; found only pickle weights ({}), which are never loaded: convert them to safetensors",
            pickles.join(", ")
        ));
    }
    message
}

/// The distinct shard file names in a sharded index's `weight_map`.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: BTreeMap<String, String>,
    }
    let index: ShardIndex = read_json(index_path)?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(DiffusionError::ConfigFile {
            path: index_path.to_path_buf(),
            message: "`weight_map` is empty".into(),
        });
    }
    // Shards live next to their index; anything else would let an index read arbitrary files.
    if let Some(bad) = shards
        .iter()
        .find(|s| s.contains('/') || s.contains('\\') || s.starts_with('.'))
    {
        return Err(DiffusionError::ConfigFile {
            path: index_path.to_path_buf(),
            message: format!("shard `{bad}` is not a file name next to the index"),
        });
    }
    Ok(shards.into_iter().collect())
}

/// What a pipeline needs that `root` lacks, described for an error message; empty when the
/// folder is complete for loading in `dtype` (any weight variant counts).
fn missing_pipeline_files(root: &Path, dtype: DType) -> Vec<String> {
    let index: serde_json::Value = match read_json(&root.join("model_index.json")) {
        Ok(index) => index,
        Err(_) => return vec!["model_index.json".into()],
    };
    let mut missing = Vec::new();
    if declares_component(&index, "scheduler")
        && !root.join("scheduler/scheduler_config.json").is_file()
    {
        missing.push("scheduler/scheduler_config.json".into());
    }
    for tokenizer in TOKENIZER_COMPONENTS {
        let dir = root.join(tokenizer);
        let complete = dir.join("tokenizer.json").is_file()
            || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file());
        if declares_component(&index, tokenizer) && !complete {
            missing.push(format!(
                "{tokenizer}/tokenizer.json (or vocab.json + merges.txt)"
            ));
        }
    }
    for component in WEIGHT_COMPONENTS {
        if !declares_component(&index, component) {
            continue;
        }
        let dir = root.join(component);
        if !dir.join("config.json").is_file() {
            missing.push(format!("{component}/config.json"));
        }
        let names = file_names(&dir).unwrap_or_default();
        match choose_weights(&names, dtype) {
            None => missing.push(format!("{component}/ safetensors weights")),
            Some(WeightChoice::Single(_)) => {}
            Some(WeightChoice::Index(index_name)) => match shard_names(&dir.join(&index_name)) {
                Ok(shards) => missing.extend(
                    shards
                        .into_iter()
                        .filter(|s| !dir.join(s).is_file())
                        .map(|s| format!("{component}/{s}")),
                ),
                Err(_) => missing.push(format!("{component}/{index_name} (unreadable)")),
            },
        }
    }
    missing
}

/// The snapshot folder of `revision` in the hub cache, if `model_index.json` of it is there.
fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(Repo::model(repo_id.to_string()).folder_name());
    // A commit hash names its snapshot folder directly; branches and tags go through refs/,
    // read here rather than by hf_hub::Cache, which does not trim a ref's trailing newline.
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let ref_text = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
        ref_text.trim().to_string()
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let root = repo_dir.join("snapshots").join(commit);
    root.join("model_index.json").is_file().then_some(root)
}

fn open_cached(
    repo_id: &str,
    cache_dir: &Path,
    revision: &str,
    dtype: DType,
) -> Result<ModelFolder> {
    let offline_error = |reason: String| DiffusionError::HubOffline {
        repo: repo_id.to_string(),
        reason,
    };
    let root = cached_snapshot(cache_dir, repo_id, revision).ok_or_else(|| {
        offline_error(format!(
            "no snapshot of revision `{revision}` in {}",
            cache_dir.display()
        ))
    })?;
    let missing = missing_pipeline_files(&root, dtype);
    if !missing.is_empty() {
        return Err(offline_error(format!(
            "cached snapshot {} lacks {}",
            root.display(),
            missing.join(", ")
        )));
    }
    ModelFolder::from_dir(root, repo_id.to_string())
}

fn open_hub(
    repo_id: &str,
    hub: &HubOptions,
    dtype: DType,
    progress: &mut dyn FetchProgress,
) -> Result<ModelFolder> {
    let cache_dir = hub.cache_dir_or_default(repo_id)?;
    let revision = hub.revision();
    if hub.offline {
        return open_cached(repo_id, &cache_dir, revision, dtype);
    }
    let fetch_error = |file: &str, message: String| DiffusionError::HubFetch {
        repo: repo_id.to_string(),
        file: file.to_string(),
        message,
    };

    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.clone())).with_progress(false);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| fetch_error("(client setup)", e.to_string()))?;
    let user_repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());

    // The listing is the first request: it tells which files exist and pins the commit, and
    // its timeout makes an unreachable hub fail fast.
    let listing = "file listing";
    let info = match api
        .repo(user_repo.clone())
        .info_request()
        .timeout(HUB_PROBE_TIMEOUT)
        .call()
    {
        Ok(response) => response
            .into_string()
            .map_err(|e| fetch_error(listing, e.to_string()))
            .and_then(|body| {
                serde_json::from_str::<hf_hub::api::RepoInfo>(&body)
                    .map_err(|e| fetch_error(listing, format!("unexpected answer: {e}")))
            })?,
        Err(e) => {
            let message = e.to_string();
            match e.into_response() {
                None => {
                    // No answer at all (no network): a complete cached copy is as good as the
                    // hub's, which is what the Python hub client does too.
                    if let Ok(folder) = open_cached(repo_id, &cache_dir, revision, dtype) {
                        progress.hub_unreachable(&message);
                        return Ok(folder);
                    }
                }
                // The hub answers 401 for repos that do not exist (as for private ones), 403
                // for gated ones, 404 for unknown revisions: retrying cannot help.
                Some(response) if matches!(response.status(), 401 | 403 | 404) => {
                    let mut detail = format!("HTTP {}", response.status());
                    if let Some(reason) = response
                        .header("x-error-message")
                        .or_else(|| response.header("x-error-code"))
                    {
                        detail.push_str(&format!(": {reason}"));
                    }
                    return Err(DiffusionError::HubRepoNotFound {
                        repo: repo_id.to_string(),
                        revision: revision.to_string(),
                        detail,
                    });
                }
                Some(_) => {}
            }
            return Err(fetch_error(listing, message));
        }
    };

    let remote: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !remote.contains("model_index.json") {
        return Err(DiffusionError::ModelSpec {
            spec: repo_id.to_string(),
            message: "the hub repo has no model_index.json; not a diffusers pipeline".into(),
        });
    }
    // Every weight file is chosen before the first download, so a repo without usable weights
    // fails before anything is fetched.
    let mut small = files_to_fetch(&remote);
    let mut weights = Vec::new();
    let mut indexes = Vec::new();
    for component in WEIGHT_COMPONENTS {
        let prefix = format!("{component}/");
        let names: BTreeSet<String> = remote
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|f| !f.contains('/'))
            .map(str::to_string)
            .collect();
        if !names.contains("config.json") {
            continue;
        }
        match choose_weights(&names, dtype) {
            None => {
                return Err(DiffusionError::ModelSpec {
                    spec: repo_id.to_string(),
                    message: format!("`{component}`: {}", no_weights_message(&names)),
                })
            }
            Some(WeightChoice::Single(name)) => weights.push(format!("{prefix}{name}")),
            Some(WeightChoice::Index(index)) => {
                small.push(format!("{prefix}{index}"));
                indexes.push((component, index));
            }
        }
    }

    // Downloading by commit keeps every file in one snapshot even if the branch moves meanwhile.
    let pinned = Repo::with_revision(repo_id.to_string(), RepoType::Model, info.sha.clone());
    let stall = hub.download_timeout.unwrap_or(DEFAULT_DOWNLOAD_TIMEOUT);
    let root = cache_dir
        .join(user_repo.folder_name())
        .join("snapshots")
        .join(&info.sha);
    let fetch = |file: &str, progress: &mut dyn FetchProgress| -> Result<()> {
        download_watched(&api, &pinned, file, stall, progress).map_err(|e| fetch_error(file, e))?;
        progress.file_finished(file);
        Ok(())
    };

    // Small files (configs, tokenizers, shard indexes) come first: the indexes name the
    // shards, so the count of files to download is final before the large ones start.
    small.retain(|f| !root.join(f).is_file());
    weights.retain(|f| !root.join(f).is_file());
    progress.files_planned(small.len() + weights.len());
    for file in &small {
        fetch(file, progress)?;
    }
    let planned = weights.len();
    for (component, index) in indexes {
        for shard in shard_names(&root.join(component).join(&index))? {
            let file = format!("{component}/{shard}");
            if !root.join(&file).is_file() && !weights.contains(&file) {
                weights.push(file);
            }
        }
    }
    if weights.len() != planned {
        progress.files_planned(small.len() + weights.len());
    }
    for file in &weights {
        fetch(file, progress)?;
    }

    // Offline runs resolve the user's revision through refs/, so record where it points.
    if revision != info.sha {
        Cache::new(cache_dir.clone())
            .repo(user_repo)
            .create_ref(&info.sha)
            .map_err(|source| DiffusionError::Io {
                path: cache_dir.clone(),
                source,
            })?;
    }
    let missing = missing_pipeline_files(&root, dtype);
    if !missing.is_empty() {
        return Err(DiffusionError::ModelLayout {
            path: root,
            message: format!("hub repo `{repo_id}` lacks {}", missing.join(", ")),
        });
    }
    ModelFolder::from_dir(root, repo_id.to_string())
}

/// The configs and tokenizer files of a pipeline among a repo's files (weights are chosen per
/// component afterwards).
fn files_to_fetch(remote: &BTreeSet<String>) -> Vec<String> {
    let mut wanted = vec![
        "model_index.json".to_string(),
        "scheduler/scheduler_config.json".to_string(),
    ];
    wanted.extend(WEIGHT_COMPONENTS.iter().map(|c| format!("{c}/config.json")));
    for tokenizer in TOKENIZER_COMPONENTS {
        wanted.extend(TOKENIZER_FILES.iter().map(|f| format!("{tokenizer}/{f}")));
    }
    wanted.retain(|f| remote.contains(f));
    wanted
}

/// What [`ModelFolder::fetch`] reports while it brings a hub repo into the cache.
pub trait FetchProgress {
    /// How many files this fetch downloads, as known now: called before the first download,
    /// and again with a larger number when a sharded index names shards the cache lacks.
    /// Zero means the cached snapshot is already complete.
    fn files_planned(&mut self, files: usize);
    /// The download of `file` (`bytes` long) begins.
    fn file_started(&mut self, file: &str, bytes: u64);
    /// `bytes` more bytes of the current file arrived (or were already there from an
    /// interrupted download that is resumed).
    fn advanced(&mut self, bytes: u64);
    /// `file` is complete in the snapshot.
    fn file_finished(&mut self, file: &str);
    /// The hub did not answer (`error`), and the complete cached snapshot is used instead.
    fn hub_unreachable(&mut self, error: &str);
}

/// What a download thread tells the fetch loop.
enum Transfer {
    Started(String, u64),
    Advanced(u64),
    Done(std::result::Result<(), String>),
}

/// Carries hf-hub's per-file callbacks from the download thread to the fetch loop.
struct ChannelProgress {
    events: mpsc::Sender<Transfer>,
    started: bool,
}

impl hf_hub::api::Progress for ChannelProgress {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls `init` twice per download (before opening the file and again once the
        // response arrives); the sink hears of the file once.
        if !self.started {
            self.started = true;
            let _ = self
                .events
                .send(Transfer::Started(filename.to_string(), size as u64));
        }
    }

    fn update(&mut self, size: usize) {
        if size > 0 {
            let _ = self.events.send(Transfer::Advanced(size as u64));
        }
    }

    // The fetch loop reports a finished file itself, once the file is in the snapshot.
    fn finish(&mut self) {}
}

/// Downloads `file` of `repo` into the cache on a thread of its own and gives up once nothing
/// has arrived for `stall`. hf-hub's blocking client sets no read timeout, so a connection
/// that stalls without closing would otherwise hold a worker forever. The abandoned thread
/// cannot be interrupted: it ends when its connection does, and until then it holds hf-hub's
/// lock on that blob (another download of the same file in this process fails with a lock
/// error; a new process resumes the partial file).
fn download_watched(
    api: &Api,
    repo: &Repo,
    file: &str,
    stall: Duration,
    progress: &mut dyn FetchProgress,
) -> std::result::Result<(), String> {
    let (events, received) = mpsc::channel();
    let (api, repo, name) = (api.clone(), repo.clone(), file.to_string());
    std::thread::Builder::new()
        .name("hub-download".into())
        .spawn(move || {
            let progress = ChannelProgress {
                events: events.clone(),
                started: false,
            };
            let result = api.repo(repo).download_with_progress(&name, progress);
            let _ = events.send(Transfer::Done(result.map(drop).map_err(|e| e.to_string())));
        })
        .map_err(|e| format!("could not start a download thread: {e}"))?;
    loop {
        match received.recv_timeout(stall) {
            Ok(Transfer::Started(name, bytes)) => progress.file_started(&name, bytes),
            Ok(Transfer::Advanced(bytes)) => progress.advanced(bytes),
            Ok(Transfer::Done(result)) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "nothing arrived for {:.1} s, so the download was abandoned (set {DOWNLOAD_TIMEOUT_VAR} to wait longer)",
                    stall.as_secs_f64()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the download thread ended without a result".into())
            }
        }
    }
}

/// Logs download progress through `tracing` every tenth of a file, so workers' logs show it
/// without a terminal progress bar.
struct DownloadLog {
    repo: String,
    file: String,
    total: u64,
    done: u64,
    next_report: u64,
}

impl DownloadLog {
    fn new(repo: &str) -> Self {
        Self {
            repo: repo.to_string(),
            file: String::new(),
            total: 0,
            done: 0,
            next_report: 0,
        }
    }
}

impl FetchProgress for DownloadLog {
    fn files_planned(&mut self, files: usize) {
        if files > 0 {
            tracing::info!(repo = %self.repo, files, "files to download");
        }
    }

    fn file_started(&mut self, file: &str, bytes: u64) {
        tracing::info!(repo = %self.repo, file, bytes, "downloading");
        self.file = file.to_string();
        self.total = bytes;
        self.done = 0;
        self.next_report = bytes / 10;
    }

    fn advanced(&mut self, bytes: u64) {
        self.done += bytes;
        if self.total > 0 && self.done >= self.next_report {
            tracing::info!(
                file = %self.file,
                percent = self.done * 100 / self.total,
                "download progress"
            );
            self.next_report = self.done + self.total / 10;
        }
    }

    fn file_finished(&mut self, file: &str) {
        tracing::info!(file, bytes = self.total, "downloaded");
    }

    fn hub_unreachable(&mut self, error: &str) {
        tracing::warn!(
            repo = %self.repo,
            error,
            "hub unreachable, using the cached snapshot"
        );
    }
}

/// One snapshot of a diffusers pipeline in the hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    pub repo_id: String,
    /// The commit the snapshot holds (its folder name).
    pub commit: String,
    /// Branches and tags (`refs/`) pointing at this commit, e.g. `main`.
    pub refs: Vec<String>,
    /// The snapshot folder, usable as `--model`.
    pub path: PathBuf,
    /// `None` when model_index.json names a pipeline this crate does not run.
    pub family: Option<ModelFamily>,
    /// What loading would lack (see [`ModelFolder::missing_files`]); empty when complete.
    pub missing: Vec<String>,
    /// Bytes of the snapshot's files, following the links into `blobs/`.
    pub size: u64,
}

/// The pipelines in the hub cache: every snapshot of a model repo that holds a
/// `model_index.json` (other repos, e.g. language models, are not diffusers pipelines and are
/// skipped), sorted by repo id with the snapshots that a branch or tag points at first. A cache
/// folder that does not exist yet is an empty list.
pub fn list_cached(hub: &HubOptions) -> Result<Vec<CachedModel>> {
    let cache_dir = hub
        .cache_root()
        .ok_or_else(|| DiffusionError::invalid_argument("HF_HUB_CACHE", NO_CACHE_DIR))?;
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiffusionError::Io { path, source }
    };
    let entries = match std::fs::read_dir(&cache_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&cache_dir)(e)),
    };
    let mut models = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(&cache_dir))?;
        let name = entry.file_name();
        // The cache spells `org/name` as `models--org--name`; repo ids never hold `--`.
        let Some(repo_id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("models--"))
            .map(|n| n.replacen("--", "/", 1))
            .filter(|id| is_repo_id(id))
        else {
            continue;
        };
        let repo_dir = entry.path();
        let snapshots_dir = repo_dir.join("snapshots");
        if !snapshots_dir.is_dir() {
            continue;
        }
        let refs = read_refs(&repo_dir.join("refs"))?;
        for snapshot in std::fs::read_dir(&snapshots_dir).map_err(io_error(&snapshots_dir))? {
            let snapshot = snapshot.map_err(io_error(&snapshots_dir))?;
            let root = snapshot.path();
            if !root.join("model_index.json").is_file() {
                continue;
            }
            let commit = snapshot.file_name().to_string_lossy().into_owned();
            models.push(CachedModel {
                refs: refs
                    .iter()
                    .filter(|(_, target)| **target == commit)
                    .map(|(name, _)| name.clone())
                    .collect(),
                family: detect_family(&root).ok(),
                missing: missing_pipeline_files(&root, DType::F32),
                size: tree_size(&root)?,
                repo_id: repo_id.clone(),
                commit,
                path: root,
            });
        }
    }
    models.sort_by(|a, b| {
        (&a.repo_id, a.refs.is_empty(), &a.commit).cmp(&(&b.repo_id, b.refs.is_empty(), &b.commit))
    });
    Ok(models)
}

/// The refs of a cached repo (`refs/main`, `refs/pr/1`, ...) as (name, commit), sorted by name.
fn read_refs(refs_dir: &Path) -> Result<Vec<(String, String)>> {
    let mut refs = Vec::new();
    let mut pending = vec![refs_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(DiffusionError::Io { path: dir, source }),
        };
        for entry in entries {
            let path = entry
                .map_err(|source| DiffusionError::Io {
                    path: dir.clone(),
                    source,
                })?
                .path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let Ok(name) = path.strip_prefix(refs_dir) else {
                continue;
            };
            let name = name.to_string_lossy().replace('\\', "/");
            // hf-hub writes `refs/<commit>` when it downloads by commit; such a "ref" names
            // nothing a person chose.
            if is_commit_hash(&name) {
                continue;
            }
            let target = std::fs::read_to_string(&path)
                .map_err(|source| DiffusionError::Io {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_string();
            refs.push((name, target));
        }
    }
    refs.sort();
    Ok(refs)
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Bytes of the files under `dir`, following symlinks (a hub snapshot links into `blobs/`); a
/// dangling link counts nothing, which the completeness check reports as missing.
fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|source| DiffusionError::Io {
        path: dir.to_path_buf(),
        source,
    })? {
        let path = entry
            .map_err(|source| DiffusionError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => total += tree_size(&path)?,
            Ok(meta) => total += meta.len(),
            Err(_) => {}
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    fn offline(cache_dir: &Path) -> HubOptions {
        HubOptions {
            cache_dir: Some(cache_dir.to_path_buf()),
            offline: true,
            ..HubOptions::default()
        }
    }

    fn load_all(path: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// Writes `tensors` (f32 values) to a safetensors file in `dtype` (F32 or F16).
    fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>, f16: bool) {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, t)| {
                let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let data = if f16 {
                    values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect()
                } else {
                    values.iter().flat_map(|v| v.to_le_bytes()).collect()
                };
                (name.clone(), t.dims().to_vec(), data)
            })
            .collect();
        let dtype = if f16 {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::F32
        };
        let views = bytes.iter().map(|(name, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        });
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn opens_tiny_models_and_detects_their_family() {
        let hub = HubOptions::default();
        let sd15 = fixture("tiny-sd15");
        let folder = ModelFolder::open(sd15.to_str().unwrap(), &hub).unwrap();
        assert_eq!(folder.family(), ModelFamily::StableDiffusion);
        assert_eq!(folder.root(), sd15.as_path());
        assert_eq!(
            folder.weight_files("unet", DType::F32).unwrap(),
            vec![sd15.join("unet/diffusion_pytorch_model.safetensors")]
        );
        assert_eq!(
            folder.weight_files("text_encoder", DType::F16).unwrap(),
            vec![sd15.join("text_encoder/model.safetensors")]
        );
        let scheduler: serde_json::Value = folder
            .read_json(Some("scheduler"), "scheduler_config.json")
            .unwrap();
        assert_eq!(scheduler["_class_name"], "DDIMScheduler");

        let xl = ModelFolder::open(fixture("tiny-sdxl").to_str().unwrap(), &hub).unwrap();
        assert_eq!(xl.family(), ModelFamily::StableDiffusionXl);
        assert_eq!(
            xl.component_dir("text_encoder_2"),
            fixture("tiny-sdxl").join("text_encoder_2")
        );
        assert!(xl
            .weights("text_encoder_2", DType::F32, &Device::Cpu)
            .is_ok());
    }

    #[test]
    fn family_comes_from_class_name_then_from_a_second_text_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let write_index = |json: &str| {
            std::fs::write(dir.path().join("model_index.json"), json).unwrap();
        };
        write_index(r#"{"_class_name": "StableDiffusionImg2ImgPipeline"}"#);
        let err =
            ModelFolder::open(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::UnsupportedConfig { .. }),
            "{message}"
        );
        assert!(
            message.contains("_class_name") && message.contains("StableDiffusionImg2ImgPipeline")
        );

        write_index(r#"{"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}"#);
        let folder =
            ModelFolder::open(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap();
        assert_eq!(folder.family(), ModelFamily::StableDiffusionXl);

        write_index(r#"{"text_encoder_2": [null, null]}"#);
        let folder =
            ModelFolder::open(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap();
        assert_eq!(folder.family(), ModelFamily::StableDiffusion);
    }

    #[test]
    fn folder_without_model_index_is_a_layout_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        let err =
            ModelFolder::open(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::ModelLayout { .. }),
            "{message}"
        );
        assert!(message.contains("model_index.json"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn specs_that_are_neither_folders_nor_repo_ids_are_named_in_the_error() {
        let hub = HubOptions::default();
        for spec in [
            "./foo/bar",
            "s3://bucket/models/sd15",
            "",
            "a/b/c",
            "-org/name",
            "org--x/y",
        ] {
            let err = ModelFolder::open(spec, &hub).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, DiffusionError::ModelSpec { .. }), "{message}");
            assert!(message.contains(&format!("`{spec}`")), "{message}");
        }
        let message = ModelFolder::open("s3://bucket/x", &hub)
            .unwrap_err()
            .to_string();
        assert!(message.contains("s3://"), "{message}");
        let file = fixture("tiny-sd15").join("model_index.json");
        let message = ModelFolder::open(file.to_str().unwrap(), &hub)
            .unwrap_err()
            .to_string();
        assert!(message.contains("is a file"), "{message}");
    }

    #[test]
    fn repo_ids_follow_the_hub_rules() {
        for good in [
            "stabilityai/stable-diffusion-xl-base-1.0",
            "a/b",
            "org_1/Name.v2",
        ] {
            assert!(is_repo_id(good), "{good}");
        }
        for bad in [
            "gpt2",
            "/abs",
            "org/",
            "a/b/c",
            "org/na me",
            "org/.hidden",
            "a--b/c",
            "a/b..c",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn variant_follows_the_dtype_and_fp16_weights_load_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(
            fixture("tiny-sd15").join("model_index.json"),
            root.join("model_index.json"),
        )
        .unwrap();
        copy_dir(&fixture("tiny-sd15").join("unet"), &root.join("unet"));
        let plain = root.join("unet/diffusion_pytorch_model.safetensors");
        let fp16 = root.join("unet/diffusion_pytorch_model.fp16.safetensors");
        let reference = load_all(&plain);
        write_safetensors(&fp16, &reference, true);

        let folder = ModelFolder::open(root.to_str().unwrap(), &HubOptions::default()).unwrap();
        assert_eq!(
            folder.weight_files("unet", DType::F32).unwrap(),
            vec![plain.clone()]
        );
        assert_eq!(
            folder.weight_files("unet", DType::F16).unwrap(),
            vec![fp16.clone()]
        );
        assert_eq!(
            folder.weight_files("unet", DType::BF16).unwrap(),
            vec![fp16.clone()]
        );

        // Fallback both ways: only fp16 serves f32, only plain serves f16.
        std::fs::rename(&plain, root.join("unet/elsewhere")).unwrap();
        assert_eq!(
            folder.weight_files("unet", DType::F32).unwrap(),
            vec![fp16.clone()]
        );
        let weights =
            Weights::from_safetensors(std::slice::from_ref(&fp16), DType::F32, &Device::Cpu)
                .unwrap();
        let mut checked = 0;
        for (name, expected) in &reference {
            let loaded = weights.get(expected.dims(), name).unwrap();
            assert_eq!(loaded.dtype(), DType::F32);
            let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let loaded = loaded.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (e, l) in expected.iter().zip(&loaded) {
                // Rounding to f16 (11 significant bits) errs by at most 2^-11 relative for
                // normal values and 2^-25 absolute for subnormals.
                let tolerance = e.abs() * 2f32.powi(-11) + 2f32.powi(-24);
                assert!((e - l).abs() <= tolerance, "{name}: {e} vs {l}");
            }
            checked += 1;
        }
        assert_eq!(checked, reference.len());
        std::fs::rename(root.join("unet/elsewhere"), &plain).unwrap();
        std::fs::remove_file(&fp16).unwrap();
        assert_eq!(
            folder.weight_files("unet", DType::F16).unwrap(),
            vec![plain]
        );
    }

    #[test]
    fn missing_weights_name_the_folder_and_pickles_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::copy(
            fixture("tiny-sd15").join("model_index.json"),
            root.join("model_index.json"),
        )
        .unwrap();
        std::fs::create_dir(root.join("vae")).unwrap();
        std::fs::write(root.join("vae/diffusion_pytorch_model.bin"), b"pickle").unwrap();
        let folder = ModelFolder::open(root.to_str().unwrap(), &HubOptions::default()).unwrap();
        let message = folder
            .weight_files("vae", DType::F32)
            .unwrap_err()
            .to_string();
        assert!(message.contains("diffusion_pytorch_model.bin"), "{message}");
        assert!(message.contains("safetensors"), "{message}");
        let message = folder
            .weight_files("unet", DType::F32)
            .unwrap_err()
            .to_string();
        assert!(message.contains("`unet`"), "{message}");
    }

    #[test]
    fn sharded_index_loads_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::copy(
            fixture("tiny-sd15").join("model_index.json"),
            root.join("model_index.json"),
        )
        .unwrap();
        let component = root.join("text_encoder");
        std::fs::create_dir(&component).unwrap();
        let reference = load_all(&fixture("tiny-sd15").join("text_encoder/model.safetensors"));
        let mut names: Vec<&String> = reference.keys().collect();
        names.sort();
        let (first, second) = names.split_at(names.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (shard, part) in [
            ("model-00001-of-00002.safetensors", first),
            ("model-00002-of-00002.safetensors", second),
        ] {
            let tensors: HashMap<String, Tensor> = part
                .iter()
                .map(|n| ((*n).clone(), reference[*n].clone()))
                .collect();
            write_safetensors(&component.join(shard), &tensors, false);
            for name in part {
                weight_map.insert((*name).clone(), shard.into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            component.join("model.safetensors.index.json"),
            serde_json::to_string(&index).unwrap(),
        )
        .unwrap();

        let folder = ModelFolder::open(root.to_str().unwrap(), &HubOptions::default()).unwrap();
        let files = folder.weight_files("text_encoder", DType::F32).unwrap();
        assert_eq!(
            files,
            vec![
                component.join("model-00001-of-00002.safetensors"),
                component.join("model-00002-of-00002.safetensors"),
            ]
        );
        let weights = folder
            .weights("text_encoder", DType::F32, &Device::Cpu)
            .unwrap();
        for (name, expected) in &reference {
            let loaded = weights.get(expected.dims(), name).unwrap();
            let diff = (loaded - expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }

        std::fs::remove_file(component.join("model-00002-of-00002.safetensors")).unwrap();
        let message = folder
            .weight_files("text_encoder", DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("model-00002-of-00002.safetensors"),
            "{message}"
        );
    }

    #[test]
    fn weight_errors_name_the_tensor_and_the_file() {
        let folder = ModelFolder::open(
            fixture("tiny-sd15").to_str().unwrap(),
            &HubOptions::default(),
        )
        .unwrap();
        let weights = folder.weights("unet", DType::F32, &Device::Cpu).unwrap();
        let err = weights
            .pp("down_blocks.0")
            .get(&[16], "no_such.weight")
            .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::MissingTensor { .. }),
            "{message}"
        );
        assert!(
            message.contains("down_blocks.0.no_such.weight"),
            "{message}"
        );
        assert!(
            message.contains("unet/diffusion_pytorch_model.safetensors"),
            "{message}"
        );

        let err = weights.pp("conv_in").get(&[3, 3], "weight").unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::TensorShape { .. }),
            "{message}"
        );
        assert!(message.contains("conv_in.weight"), "{message}");
    }

    #[test]
    fn offline_with_an_empty_cache_fails_at_once_pointing_to_model() {
        let cache = tempfile::tempdir().unwrap();
        let err = ModelFolder::open("some-org/some-model", &offline(cache.path())).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::HubOffline { .. }),
            "{message}"
        );
        assert!(message.contains("some-org/some-model"), "{message}");
        assert!(message.contains("--model"), "{message}");
    }

    #[test]
    fn offline_resolves_a_cached_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--some-org--tiny-sd15");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = repo.join("snapshots").join(commit);
        copy_dir(&fixture("tiny-sd15"), &snapshot);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();

        let folder = ModelFolder::open("some-org/tiny-sd15", &offline(cache.path())).unwrap();
        assert_eq!(folder.root(), snapshot.as_path());
        assert_eq!(folder.id(), "some-org/tiny-sd15");
        assert_eq!(folder.family(), ModelFamily::StableDiffusion);
        assert_eq!(
            folder.weight_files("vae", DType::F16).unwrap(),
            vec![snapshot.join("vae/diffusion_pytorch_model.safetensors")]
        );

        // A pinned commit resolves without refs/, an unknown branch does not.
        let pinned = HubOptions {
            revision: Some(commit.into()),
            ..offline(cache.path())
        };
        assert_eq!(
            ModelFolder::open("some-org/tiny-sd15", &pinned)
                .unwrap()
                .root(),
            snapshot.as_path()
        );
        let branch = HubOptions {
            revision: Some("dev".into()),
            ..offline(cache.path())
        };
        let message = ModelFolder::open("some-org/tiny-sd15", &branch)
            .unwrap_err()
            .to_string();
        assert!(message.contains("`dev`"), "{message}");

        // An incomplete snapshot is refused up front, naming what is missing.
        std::fs::remove_file(snapshot.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        let err = ModelFolder::open("some-org/tiny-sd15", &offline(cache.path())).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiffusionError::HubOffline { .. }),
            "{message}"
        );
        assert!(message.contains("unet/"), "{message}");
    }

    #[test]
    fn unreachable_hub_is_a_fetch_error_unless_the_cache_is_complete() {
        let cache = tempfile::tempdir().unwrap();
        // Port 9 (discard) on loopback refuses connections at once: a network failure without
        // depending on the outside world.
        let hub = HubOptions {
            cache_dir: Some(cache.path().to_path_buf()),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..HubOptions::default()
        };
        let err = ModelFolder::open("some-org/some-model", &hub).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DiffusionError::HubFetch { .. }), "{message}");
        assert!(err.is_retryable());
        assert!(
            message.contains("some-org/some-model") && message.contains("--model"),
            "{message}"
        );

        let repo = cache.path().join("models--some-org--some-model");
        let commit = "89abcdef0123456789abcdef0123456789abcdef";
        copy_dir(&fixture("tiny-sdxl"), &repo.join("snapshots").join(commit));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let folder = ModelFolder::open("some-org/some-model", &hub).unwrap();
        assert_eq!(folder.family(), ModelFamily::StableDiffusionXl);
        assert!(folder.root().ends_with(commit));

        // A caller's progress sink hears that the cache stood in for the hub.
        let mut events = Events::default();
        let folder =
            ModelFolder::fetch("some-org/some-model", &hub, DType::F32, &mut events).unwrap();
        assert!(folder.root().ends_with(commit));
        assert_eq!(events.0.len(), 1, "{:?}", events.0);
        assert!(events.0[0].starts_with("unreachable "), "{:?}", events.0);
        assert!(events.0[0].contains("127.0.0.1:9"), "{:?}", events.0);
    }

    /// Every [`FetchProgress`] event, in order.
    #[derive(Default)]
    struct Events(Vec<String>);

    impl FetchProgress for Events {
        fn files_planned(&mut self, files: usize) {
            self.0.push(format!("planned {files}"));
        }
        fn file_started(&mut self, file: &str, bytes: u64) {
            self.0.push(format!("start {file} {bytes}"));
        }
        fn advanced(&mut self, bytes: u64) {
            self.0.push(format!("bytes {bytes}"));
        }
        fn file_finished(&mut self, file: &str) {
            self.0.push(format!("done {file}"));
        }
        fn hub_unreachable(&mut self, error: &str) {
            self.0.push(format!("unreachable {error}"));
        }
    }

    #[test]
    fn fetch_takes_only_repo_ids() {
        let cache = tempfile::tempdir().unwrap();
        let hub = offline(cache.path());
        let local = fixture("tiny-sd15");
        for spec in [local.to_str().unwrap(), "gpt2", "a/b/c", "org/x--y"] {
            let err =
                ModelFolder::fetch(spec, &hub, DType::F32, &mut Events::default()).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, DiffusionError::ModelSpec { .. }), "{message}");
            assert!(message.contains(&format!("`{spec}`")), "{message}");
        }
        assert_eq!(
            ModelLocation::parse(local.to_str().unwrap()).unwrap(),
            ModelLocation::Local(local.clone())
        );
        assert_eq!(
            ModelLocation::parse("org/name").unwrap(),
            ModelLocation::Hub("org/name".into())
        );
        let message = ModelLocation::parse("nowhere").unwrap_err().to_string();
        assert!(
            message.contains("`nowhere`") && message.contains("org/name"),
            "{message}"
        );
    }

    /// Moves every file of `snapshot` into `blobs` and links it back, as the hub cache does.
    fn link_into_blobs(snapshot: &Path, blobs: &Path) {
        std::fs::create_dir_all(blobs).unwrap();
        for entry in std::fs::read_dir(snapshot).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                link_into_blobs(&path, blobs);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let blob = blobs.join(format!("blob-{:x}-{}", bytes.len(), blob_count(blobs)));
            std::fs::rename(&path, &blob).unwrap();
            std::os::unix::fs::symlink(&blob, &path).unwrap();
        }
    }

    fn blob_count(blobs: &Path) -> usize {
        std::fs::read_dir(blobs).unwrap().count()
    }

    fn tree_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                if path.is_dir() {
                    tree_bytes(&path)
                } else {
                    std::fs::metadata(&path).unwrap().len()
                }
            })
            .sum()
    }

    #[test]
    fn list_cached_reports_each_pipeline_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let hub = offline(cache.path());
        assert_eq!(list_cached(&hub).unwrap(), vec![]);
        let nowhere = offline(&cache.path().join("not-created-yet"));
        assert_eq!(list_cached(&nowhere).unwrap(), vec![]);

        let main = "0123456789abcdef0123456789abcdef01234567";
        let old = "1111111111111111111111111111111111111111";
        let sd = cache.path().join("models--org--tiny-sd15");
        copy_dir(&fixture("tiny-sd15"), &sd.join("snapshots").join(main));
        link_into_blobs(&sd.join("snapshots").join(main), &sd.join("blobs"));
        copy_dir(&fixture("tiny-sd15"), &sd.join("snapshots").join(old));
        std::fs::remove_file(sd.join("snapshots").join(old).join("vae/config.json")).unwrap();
        std::fs::create_dir_all(sd.join("refs/pr")).unwrap();
        std::fs::write(sd.join("refs/main"), format!("{main}\n")).unwrap();
        std::fs::write(sd.join("refs/pr/1"), main).unwrap();
        // What hf-hub leaves after downloading by commit.
        std::fs::write(sd.join("refs").join(main), main).unwrap();

        let xl_commit = "89abcdef0123456789abcdef0123456789abcdef";
        let xl = cache.path().join("models--other--tiny-sdxl");
        copy_dir(&fixture("tiny-sdxl"), &xl.join("snapshots").join(xl_commit));

        // Not pipelines: a language model's snapshot, a dataset, the lock folder.
        let llm = cache
            .path()
            .join("models--org--some-llm/snapshots")
            .join(main);
        std::fs::create_dir_all(&llm).unwrap();
        std::fs::write(llm.join("config.json"), "{}").unwrap();
        copy_dir(
            &fixture("tiny-sd15"),
            &cache
                .path()
                .join("datasets--org--data/snapshots")
                .join(main),
        );
        std::fs::create_dir_all(cache.path().join(".locks/models--org--tiny-sd15")).unwrap();

        let listed = list_cached(&hub).unwrap();
        let summary: Vec<(&str, &str, Vec<&str>, Option<ModelFamily>)> = listed
            .iter()
            .map(|m| {
                (
                    m.repo_id.as_str(),
                    m.commit.as_str(),
                    m.refs.iter().map(String::as_str).collect(),
                    m.family,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "org/tiny-sd15",
                    main,
                    vec!["main", "pr/1"],
                    Some(ModelFamily::StableDiffusion)
                ),
                (
                    "org/tiny-sd15",
                    old,
                    vec![],
                    Some(ModelFamily::StableDiffusion)
                ),
                (
                    "other/tiny-sdxl",
                    xl_commit,
                    vec![],
                    Some(ModelFamily::StableDiffusionXl)
                ),
            ]
        );
        let fixture_bytes = tree_bytes(&fixture("tiny-sd15"));
        assert_eq!(listed[0].path, sd.join("snapshots").join(main));
        assert_eq!(listed[0].missing, Vec::<String>::new());
        // Sizes follow the links into blobs/ (the links themselves are a few bytes).
        assert_eq!(listed[0].size, fixture_bytes);
        assert_eq!(listed[1].missing, vec!["vae/config.json".to_string()]);
        assert_eq!(
            listed[1].size,
            fixture_bytes
                - std::fs::metadata(fixture("tiny-sd15/vae/config.json"))
                    .unwrap()
                    .len()
        );
        assert!(listed[2].missing.is_empty());

        // A blob lost from under its link is missing, not an error.
        let unet = sd
            .join("snapshots")
            .join(main)
            .join("unet/diffusion_pytorch_model.safetensors");
        std::fs::remove_file(std::fs::read_link(&unet).unwrap()).unwrap();
        let listed = list_cached(&hub).unwrap();
        assert_eq!(listed[0].commit, main);
        assert_eq!(
            listed[0].missing,
            vec!["unet/ safetensors weights".to_string()]
        );
        assert_eq!(
            listed[0].size,
            fixture_bytes
                - std::fs::metadata(fixture(
                    "tiny-sd15/unet/diffusion_pytorch_model.safetensors"
                ))
                .unwrap()
                .len()
        );
    }

    #[test]
    fn hub_options_read_the_hugging_face_variables() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            HubOptions::from_vars(move |k| map.get(k).cloned()).unwrap()
        };
        let options = vars(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", "hf_abc"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(options.cache_dir, Some(PathBuf::from("/hf/hub")));
        assert!(options.offline);
        assert_eq!(options.token.as_deref(), Some("hf_abc"));
        assert_eq!(options.revision, None);

        let options = vars(&[
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/hf"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(options.cache_dir, Some(PathBuf::from("/c")));
        assert!(!options.offline);

        let options = vars(&[
            ("HOME", "/home/u"),
            ("HF_HUB_OFFLINE", "TRUE"),
            ("HF_TOKEN", ""),
        ]);
        assert_eq!(
            options.cache_dir,
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert!(options.offline);
        assert_eq!(options.token, None);
        assert_eq!(vars(&[]).cache_dir, None);
        assert_eq!(vars(&[]).download_timeout, None);
        assert_eq!(
            vars(&[("HF_HUB_DOWNLOAD_TIMEOUT", "2.5")]).download_timeout,
            Some(Duration::from_millis(2500))
        );
        for bad in ["0", "-1", "ten", "inf"] {
            let err = HubOptions::from_vars(|k| {
                (k == "HF_HUB_DOWNLOAD_TIMEOUT").then(|| bad.to_string())
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("HF_HUB_DOWNLOAD_TIMEOUT") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn hub_file_selection_takes_configs_tokenizers_and_no_pickles() {
        let remote: BTreeSet<String> = [
            "model_index.json",
            "README.md",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "safety_checker/config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(
            files_to_fetch(&remote),
            vec![
                "model_index.json",
                "scheduler/scheduler_config.json",
                "unet/config.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
            ]
        );
        let unet: BTreeSet<String> = remote
            .iter()
            .filter_map(|f| f.strip_prefix("unet/"))
            .map(String::from)
            .collect();
        assert_eq!(
            choose_weights(&unet, DType::F16),
            Some(WeightChoice::Single(
                "diffusion_pytorch_model.fp16.safetensors".into()
            ))
        );
        assert_eq!(
            choose_weights(&unet, DType::F32),
            Some(WeightChoice::Single(
                "diffusion_pytorch_model.safetensors".into()
            ))
        );
        let sharded: BTreeSet<String> = [
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(
            choose_weights(&sharded, DType::BF16),
            Some(WeightChoice::Index(
                "diffusion_pytorch_model.safetensors.index.fp16.json".into()
            ))
        );
        let pickles_only: BTreeSet<String> =
            ["pytorch_model.bin".to_string()].into_iter().collect();
        assert_eq!(choose_weights(&pickles_only, DType::F32), None);
    }
}
