//! `storyfarm models fetch|list` as a user runs them, against a fake Hugging Face hub: an
//! HTTP/1.1 server on loopback answering the requests of hf-hub's blocking client the way
//! huggingface.co does, and serving the tiny SD 1.5 fixture as repo `org/tiny-sd15` (and, with
//! its text encoder split into two shards, as `org/tiny-sd15-sharded`; as `org/tiny-sd15-stalling`
//! its CDN sends half of each weight file and then nothing while holding the connection open).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const REPO: &str = "org/tiny-sd15";
const COMMIT: &str = "5d2c1f0b9e8a7d6c5b4a39281706f5e4d3c2b1a0";
const SHARDED: &str = "org/tiny-sd15-sharded";
const SHARDED_COMMIT: &str = "e0f1a2b3c4d5e6f708192a3b4c5d6e7f80910a1b";
const STALLING: &str = "org/tiny-sd15-stalling";
/// How long the stalling CDN holds a connection after the half it sends.
const STALL: Duration = Duration::from_secs(30);
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A file the fake hub serves. Weights are LFS files on the real hub: their `resolve` URL
/// redirects to a content-addressed CDN URL and names the sha256 in `x-linked-etag`.
#[derive(Clone)]
struct HubFile {
    bytes: Vec<u8>,
    sha256: String,
    lfs: bool,
}

/// One repo at one commit (`main` points at it).
struct HubRepo {
    commit: &'static str,
    files: BTreeMap<String, HubFile>,
    /// LFS redirects go to the stalling CDN.
    stalls: bool,
}

impl HubRepo {
    fn add(&mut self, name: &str, bytes: Vec<u8>) {
        let sha256 = hex(&Sha256::digest(&bytes));
        let lfs = name.ends_with(".safetensors") || name.ends_with(".bin");
        self.files
            .insert(name.to_string(), HubFile { bytes, sha256, lfs });
    }
}

type Repos = BTreeMap<&'static str, HubRepo>;

/// One request as the fake hub saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    authorization: bool,
}

struct FakeHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeHub {
    /// Serves the files of `fixtures/models/tiny-sd15` plus what real pipeline repos also hold
    /// and a pipeline never needs (a README, pickle weights), and the sharded variant.
    fn start() -> Self {
        let root = fixtures().join("models/tiny-sd15");
        let mut plain = HubRepo {
            commit: COMMIT,
            files: BTreeMap::new(),
            stalls: false,
        };
        for path in walk(&root) {
            let name = path.strip_prefix(&root).unwrap().to_str().unwrap();
            plain.add(name, std::fs::read(&path).unwrap());
        }
        plain.add("README.md", b"# tiny-sd15\n".to_vec());
        plain.add("unet/diffusion_pytorch_model.bin", vec![0x80; 4096]);

        let mut sharded = HubRepo {
            commit: SHARDED_COMMIT,
            files: BTreeMap::new(),
            stalls: false,
        };
        for (name, file) in &plain.files {
            if name != "text_encoder/model.safetensors" {
                sharded.add(name, file.bytes.clone());
            }
        }
        let (index, shards) =
            split_safetensors(&plain.files["text_encoder/model.safetensors"].bytes);
        sharded.add("text_encoder/model.safetensors.index.json", index);
        for (name, bytes) in SHARDS.iter().zip(shards) {
            sharded.add(&format!("text_encoder/{name}"), bytes);
        }
        let stalling = HubRepo {
            commit: COMMIT,
            files: plain.files.clone(),
            stalls: true,
        };
        let repos: Repos = [(REPO, plain), (SHARDED, sharded), (STALLING, stalling)]
            .into_iter()
            .collect();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new((repos, endpoint.clone(), seen.clone()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = state.clone();
                std::thread::spawn(move || {
                    let (repos, endpoint, seen) = &*state;
                    // A client that hangs up early (hf-hub reads only the headers of its
                    // one-byte metadata requests) is not the server's problem.
                    let _ = serve(stream, repos, endpoint, seen);
                });
            }
        });
        Self { endpoint, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests for file contents or metadata (everything but the repo info API).
    fn file_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| !s.path.starts_with("/api/"))
            .collect()
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits a safetensors file in two by tensor name, as `save_pretrained(max_shard_size=...)`
/// does: the shards of [`SHARDS`] and the transformers index mapping each tensor to its shard.
fn split_safetensors(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    for (shard, part) in SHARDS.iter().zip([first, second]) {
        let mut shard_header = serde_json::Map::new();
        let mut shard_data = Vec::new();
        for name in part {
            let mut info = header[*name].clone();
            let offsets = info["data_offsets"].as_array().unwrap();
            let (begin, end) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            info["data_offsets"] =
                serde_json::json!([shard_data.len(), shard_data.len() + end - begin]);
            shard_data.extend_from_slice(&data[begin..end]);
            shard_header.insert((*name).clone(), info);
            weight_map.insert((*name).clone(), (*shard).into());
        }
        let mut json = serde_json::to_vec(&shard_header).unwrap();
        // Tensor data stays 8-byte aligned, as the safetensors writer keeps it.
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&json);
        file.extend_from_slice(&shard_data);
        shards.push(file);
    }
    let index =
        serde_json::json!({"metadata": {"total_size": data.len()}, "weight_map": weight_map});
    (serde_json::to_vec_pretty(&index).unwrap(), shards)
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this much of the body, then hold the connection for [`STALL`].
    stall_after: Option<usize>,
}

impl Response {
    fn new(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
            stall_after: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The hub's answer for a repo, revision or file that does not exist.
    fn not_found(code: &str, message: &str) -> Self {
        Self::new(404, format!(r#"{{"error":"{message}"}}"#).into_bytes())
            .header("content-type", "application/json")
            .header("x-error-code", code)
            .header("x-error-message", message)
    }
}

/// Reads one request, answers it, and closes the connection (`Connection: close`, so the
/// client never reuses it).
fn serve(
    stream: TcpStream,
    repos: &Repos,
    endpoint: &str,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let range = headers.get("range").cloned();
    seen.lock().unwrap().push(Seen {
        path: path.to_string(),
        range: range.clone(),
        authorization: headers.contains_key("authorization"),
    });

    let response = if method != "GET" {
        Response::new(405, Vec::new())
    } else {
        route(path, range.as_deref(), repos, endpoint)
    };
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    match response.stall_after {
        None => out.write_all(&response.body)?,
        Some(sent) => {
            out.write_all(&response.body[..sent])?;
            out.flush()?;
            std::thread::sleep(STALL);
        }
    }
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Unknown",
    }
}

/// The three kinds of URL hf-hub 0.4's blocking client asks for.
fn route(path: &str, range: Option<&str>, repos: &Repos, endpoint: &str) -> Response {
    // Repo info: which files exist, and the commit `revision` points at.
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, revision)) = rest.split_once("/revision/") else {
            return Response::not_found("RepositoryNotFound", "Repository not found");
        };
        let Some(found) = repos.get(repo) else {
            return Response::not_found("RepositoryNotFound", "Repository not found");
        };
        if revision != "main" && revision != found.commit {
            return Response::not_found("RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<String> = found
            .files
            .keys()
            .map(|f| format!(r#"{{"rfilename":"{f}"}}"#))
            .collect();
        let body = format!(
            r#"{{"_id":"0","id":"{repo}","modelId":"{repo}","sha":"{}","private":false,"siblings":[{}]}}"#,
            found.commit,
            siblings.join(",")
        );
        return Response::new(200, body.into_bytes()).header("content-type", "application/json");
    }
    // The CDN behind LFS redirects: content by sha256, no repo headers.
    let (cdn, stalls) = match (
        path.strip_prefix("/cdn/"),
        path.strip_prefix("/cdn-stalling/"),
    ) {
        (Some(sha256), _) => (Some(sha256), false),
        (None, sha256) => (sha256, true),
    };
    if let Some(sha256) = cdn {
        return match repos
            .values()
            .flat_map(|r| r.files.values())
            .find(|f| f.sha256 == sha256)
        {
            Some(file) => {
                let mut response =
                    ranged(&file.bytes, range).header("etag", format!("\"{sha256}\""));
                if stalls {
                    response.stall_after = Some(response.body.len() / 2);
                }
                response
            }
            None => Response::new(404, Vec::new()),
        };
    }
    // `/{repo}/resolve/{revision}/{file}`: small files directly, LFS files by redirect.
    let Some((repo, rest)) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once("/resolve/"))
    else {
        return Response::not_found("RepositoryNotFound", "Repository not found");
    };
    let Some((revision, name)) = rest.split_once('/') else {
        return Response::not_found("EntryNotFound", "Entry not found");
    };
    let Some(found) = repos.get(repo) else {
        return Response::not_found("RepositoryNotFound", "Repository not found");
    };
    if revision != "main" && revision != found.commit {
        return Response::not_found("RevisionNotFound", "Invalid rev id");
    }
    let Some(file) = found.files.get(name) else {
        return Response::not_found("EntryNotFound", "Entry not found");
    };
    if file.lfs {
        Response::new(302, Vec::new())
            .header(
                "location",
                format!(
                    "{endpoint}/{}/{}",
                    if found.stalls { "cdn-stalling" } else { "cdn" },
                    file.sha256
                ),
            )
            .header("x-repo-commit", found.commit)
            .header("x-linked-etag", format!("\"{}\"", file.sha256))
            .header("x-linked-size", file.bytes.len().to_string())
            // The pointer file's own etag, which the client must not use for the blob.
            .header("etag", "\"lfs-pointer\"")
    } else {
        // The hub's etag of a regular file is its git blob id; any content hash does here.
        ranged(&file.bytes, range)
            .header("x-repo-commit", found.commit)
            .header("etag", format!("\"{}\"", &file.sha256[..40]))
    }
}

/// `Range: bytes=a-b` / `bytes=a-` as HTTP servers answer it.
fn ranged(bytes: &[u8], range: Option<&str>) -> Response {
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Response::new(200, bytes.to_vec());
    };
    let len = bytes.len();
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end
        .parse()
        .map_or(len.saturating_sub(1), |e: usize| e.min(len - 1));
    if start >= len || start > end {
        return Response::new(416, Vec::new()).header("content-range", format!("bytes */{len}"));
    }
    Response::new(206, bytes[start..=end].to_vec())
        .header("content-range", format!("bytes {start}-{end}/{len}"))
}

/// The binary with a clean Hugging Face environment: its own cache, no token, no proxy (ureq
/// would send even loopback requests through one), no log filter that adds lines.
fn storyfarm(cache: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storyfarm"));
    for var in [
        "HF_TOKEN",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_HUB_DOWNLOAD_TIMEOUT",
        "XDG_CACHE_HOME",
        "RUST_LOG",
        "STORYFARM_MODEL",
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        c.env_remove(var);
    }
    c.env("HF_HUB_CACHE", cache).env("HF_ENDPOINT", endpoint);
    c
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failed run whose stderr is exactly one line.
fn one_line_failure(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

/// A port on loopback that nothing listens on.
fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

/// The files of the fixture a pipeline loads (tiny_init.json only documents how the fixture
/// was made).
fn pipeline_files() -> Vec<String> {
    let root = fixtures().join("models/tiny-sd15");
    walk(&root)
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().to_str().unwrap().to_string())
        .filter(|f| f != "tiny_init.json")
        .collect()
}

#[test]
fn fetch_then_list_then_render_offline_from_the_cache() {
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let snapshot = cache.join("models--org--tiny-sd15/snapshots").join(COMMIT);

    let out = run(storyfarm(&cache, &hub.endpoint).args(["models", "fetch", REPO]));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout).trim(), snapshot.to_str().unwrap());
    let wanted = pipeline_files();
    assert_eq!(wanted.len(), 13);
    for file in &wanted {
        let got = std::fs::read(snapshot.join(file)).unwrap();
        let expected = std::fs::read(fixtures().join("models/tiny-sd15").join(file)).unwrap();
        assert!(got == expected, "{file} differs from the fixture");
        // Stderr is not a terminal here: one line per downloaded file instead of a bar.
        assert!(
            stderr.contains(&format!("/13] {file} (")),
            "{file}: {stderr}"
        );
    }
    assert!(
        stderr.contains("fetched org/tiny-sd15 (sd) at 5d2c1f0: 13 files"),
        "{stderr}"
    );
    // Weights are stored once, under their sha256, and linked from the snapshot.
    let unet = snapshot.join("unet/diffusion_pytorch_model.safetensors");
    assert!(std::fs::symlink_metadata(&unet).unwrap().is_symlink());
    let blob = std::fs::canonicalize(&unet).unwrap();
    let unet_sha = hex(&Sha256::digest(std::fs::read(&unet).unwrap()));
    assert!(
        blob.ends_with(Path::new("blobs").join(&unet_sha)),
        "{}",
        blob.display()
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny-sd15/refs/main")).unwrap(),
        COMMIT
    );
    let requested: Vec<Seen> = hub.file_requests();
    for never in [
        "README.md",
        "unet/diffusion_pytorch_model.bin",
        "tiny_init.json",
    ] {
        assert!(!snapshot.join(never).exists(), "{never} was stored");
        assert!(
            !requested.iter().any(|s| s.path.ends_with(never)),
            "{never} was requested"
        );
    }
    // Every file was resolved at the pinned commit, not at a branch that may move meanwhile.
    assert!(
        requested
            .iter()
            .filter(|s| s.path.contains("/resolve/"))
            .all(|s| s.path.contains(&format!("/resolve/{COMMIT}/"))),
        "{requested:?}"
    );
    // Each file: one metadata probe and one full download (LFS ones through the redirect).
    let downloads = requested
        .iter()
        .filter(|s| s.range.as_deref() == Some("bytes=0-"))
        .count();
    assert_eq!(downloads, 13 + 3, "{requested:?}");
    assert!(
        !hub.seen().iter().any(|s| s.authorization),
        "a token was sent"
    );

    let out = run(storyfarm(&cache, &hub.endpoint).args(["models", "list"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("REPO") && lines[0].contains("STATUS"),
        "{table}"
    );
    let columns: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(columns[..4], [REPO, "sd", "5d2c1f0", "(main)"], "{table}");
    assert_eq!(columns.last(), Some(&"complete"), "{table}");
    assert!(lines[1].contains("MiB"), "{table}");

    // Fetching again asks the hub for the commit and downloads nothing.
    let before = hub.file_requests().len();
    let out = run(storyfarm(&cache, &hub.endpoint).args(["models", "fetch", REPO]));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout).trim(), snapshot.to_str().unwrap());
    assert!(stderr.contains("nothing to download"), "{stderr}");
    assert_eq!(
        hub.file_requests().len(),
        before,
        "{:?}",
        &hub.file_requests()[before..]
    );

    // With the hub gone, the complete cached copy serves both fetch and an offline render.
    let gone = closed_endpoint();
    let out = run(storyfarm(&cache, &gone).args(["models", "fetch", REPO]));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("hub unreachable"), "{stderr}");
    let out = run(storyfarm(&cache, &gone)
        .env("HF_HUB_OFFLINE", "1")
        .args(["models", "fetch", REPO]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("offline"),
        "{}",
        text(&out.stderr)
    );

    let frames = dir.path().join("frames");
    let out = run(storyfarm(&cache, &gone)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            REPO,
            "--prompt",
            "a red barn",
            "--steps",
            "2",
        ])
        .args(["--width", "64", "--height", "64", "--out"])
        .arg(&frames));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = std::fs::read(frames.join("frame-001.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Offline and not cached: one line naming the repo and the way out.
    let out = run(storyfarm(&cache, &hub.endpoint)
        .env("HF_HUB_OFFLINE", "1")
        .args(["models", "fetch", "org/not-cached"]));
    let stderr = one_line_failure(&out);
    assert!(
        stderr.contains("org/not-cached") && stderr.contains("--model"),
        "{stderr}"
    );
}

#[test]
fn sharded_weights_come_after_their_index_and_render_like_the_unsharded_model() {
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = run(storyfarm(&cache, &hub.endpoint).args(["models", "fetch", SHARDED]));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let snapshot = PathBuf::from(text(&out.stdout).trim());
    assert!(snapshot.ends_with(SHARDED_COMMIT), "{}", snapshot.display());
    // The index is among the small files; the shards it names join the plan before the
    // first weight file starts.
    let lines: Vec<&str> = stderr.lines().map(str::trim).collect();
    assert!(
        lines[0].starts_with("[1/13] model_index.json ("),
        "{stderr}"
    );
    assert!(
        lines[10].starts_with("[11/13] text_encoder/model.safetensors.index.json ("),
        "{stderr}"
    );
    assert!(
        lines[11].starts_with("[12/15] unet/diffusion_pytorch_model.safetensors"),
        "{stderr}"
    );
    assert!(
        lines[13].starts_with("[14/15] text_encoder/model-00001-of-00002.safetensors"),
        "{stderr}"
    );
    assert!(
        lines[14].starts_with("[15/15] text_encoder/model-00002-of-00002.safetensors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fetched org/tiny-sd15-sharded (sd) at e0f1a2b: 15 files"),
        "{stderr}"
    );
    assert!(!snapshot.join("text_encoder/model.safetensors").exists());

    // Same tensors, same seed: the same frame as the unsharded fixture folder.
    let render = |model: &str, out_dir: &Path| {
        let out = run(storyfarm(&cache, &closed_endpoint())
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate",
                "--model",
                model,
                "--prompt",
                "a lighthouse",
                "--steps",
                "2",
            ])
            .args(["--width", "64", "--height", "64", "--seed", "7", "--out"])
            .arg(out_dir));
        assert!(out.status.success(), "{model}: {}", text(&out.stderr));
        std::fs::read(out_dir.join("frame-001.png")).unwrap()
    };
    let fixture = fixtures().join("models/tiny-sd15");
    assert!(
        render(SHARDED, &dir.path().join("sharded"))
            == render(fixture.to_str().unwrap(), &dir.path().join("plain")),
        "the sharded model renders differently"
    );
}

#[test]
fn unreachable_hub_without_a_cached_copy_fails_fast_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out =
        run(storyfarm(&dir.path().join("hub"), &closed_endpoint()).args(["models", "fetch", REPO]));
    let stderr = one_line_failure(&out);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(REPO) && stderr.contains("--model"),
        "{stderr}"
    );
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn missing_repo_or_revision_is_named_in_one_line() {
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = run(storyfarm(&cache, &hub.endpoint).args(["models", "fetch", "org/no-such-model"]));
    let stderr = one_line_failure(&out);
    assert!(stderr.contains("`org/no-such-model`"), "{stderr}");
    assert!(
        stderr.contains("HTTP 404: Repository not found"),
        "{stderr}"
    );

    let out =
        run(storyfarm(&cache, &hub.endpoint).args(["models", "fetch", REPO, "--revision", "v9"]));
    let stderr = one_line_failure(&out);
    assert!(stderr.contains(REPO) && stderr.contains("`v9`"), "{stderr}");
    assert!(hub.file_requests().is_empty(), "{:?}", hub.file_requests());
    assert!(!cache.join("models--org--tiny-sd15/snapshots").exists());
}

#[test]
fn list_of_an_empty_cache_says_how_to_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let out = run(storyfarm(&cache, &closed_endpoint())
        .args(["models", "list", "--cache-dir"])
        .arg(&cache));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains(cache.to_str().unwrap()) && stdout.contains("storyfarm models fetch"),
        "{stdout}"
    );
}

#[test]
fn local_folders_are_checked_and_bad_specs_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let gone = closed_endpoint();
    let local = fixtures().join("models/tiny-sdxl");
    let out = run(storyfarm(&cache, &gone)
        .args(["models", "fetch"])
        .arg(&local));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("already local (sdxl pipeline)"), "{stderr}");
    assert_eq!(text(&out.stdout).trim(), local.to_str().unwrap());
    assert!(!cache.exists(), "a local folder touched the cache");

    // A local folder that cannot load names what it lacks.
    let partial = dir.path().join("partial");
    std::fs::create_dir_all(partial.join("scheduler")).unwrap();
    for file in ["model_index.json", "scheduler/scheduler_config.json"] {
        std::fs::copy(
            fixtures().join("models/tiny-sd15").join(file),
            partial.join(file),
        )
        .unwrap();
    }
    let out = run(storyfarm(&cache, &gone)
        .args(["models", "fetch"])
        .arg(&partial));
    let stderr = one_line_failure(&out);
    assert!(
        stderr.contains("unet/config.json") && stderr.contains("tokenizer/"),
        "{stderr}"
    );

    for (spec, needle) in [
        ("nowhere", "not a hugging face repo id"),
        (
            "https://huggingface.co/org/x",
            "`https://` locations are not supported",
        ),
        ("org/a/b", "not a hugging face repo id"),
    ] {
        let out = run(storyfarm(&cache, &gone).args(["models", "fetch", spec]));
        let stderr = one_line_failure(&out);
        assert!(
            stderr.contains(&format!("`{spec}`")) && stderr.contains(needle),
            "{stderr}"
        );
    }
}

#[test]
fn a_download_that_stalls_fails_after_the_download_timeout_and_names_the_file() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();

    // The hub answers and sends half of the first weight file, then nothing: the fetch gives
    // up after HF_HUB_DOWNLOAD_TIMEOUT instead of waiting on the open connection.
    let out = run(storyfarm(cache.path(), &hub.endpoint)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        .args(["models", "fetch", STALLING]));
    assert!(!out.status.success());
    // The files before it are listed as they finish; the error is the last line.
    let stderr = text(&out.stderr)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        stderr.contains("could not fetch `unet/diffusion_pytorch_model.safetensors`")
            && stderr.contains("nothing arrived for 1.0 s")
            && stderr.contains("HF_HUB_DOWNLOAD_TIMEOUT"),
        "{stderr}"
    );
    assert!(
        hub.file_requests()
            .iter()
            .any(|s| s.path.starts_with("/cdn-stalling/")),
        "the weights were asked for"
    );

    // A timeout that is not a number of seconds is refused before anything is fetched.
    let before = hub.seen().len();
    let out = run(storyfarm(cache.path(), &hub.endpoint)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "soon")
        .args(["models", "fetch", REPO]));
    let stderr = one_line_failure(&out);
    assert!(
        stderr.contains("HF_HUB_DOWNLOAD_TIMEOUT") && stderr.contains("`soon`"),
        "{stderr}"
    );
    assert_eq!(hub.seen().len(), before, "no request after a bad setting");
}
