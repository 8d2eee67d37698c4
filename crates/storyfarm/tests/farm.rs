//! The farm end to end on real services: a coordinator process and worker processes against the
//! machine's Postgres and RabbitMQ and an S3 server (scripts/s3-server), the tiny SD 1.5 model.
//! Every test gets its own database, queue namespace and bucket.
//!
//! Needs DATABASE_URL (a Postgres where databases can be created), STORYFARM_AMQP_URL and the
//! STORYFARM_S3_* / AWS_* variables that scripts/s3-server prints; scripts/test sets them all.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storyfarm_blob::{BlobKey, BlobStore, S3Config, S3Store};
use storyfarm_diffusion::frames::{
    compare_latents, invert_image, render_frames, FrameRequest, StyleRequest,
};
use storyfarm_diffusion::model::{HubOptions, ModelFolder};
use storyfarm_diffusion::pipeline::{GenerationSettings, StableDiffusion};
use storyfarm_diffusion::style_aligned::StyleAlignedOptions;
use storyfarm_proto::v1 as pb;
use storyfarm_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn require(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests through scripts/test (it starts Postgres, RabbitMQ and S3)"))
}

fn psql(database_url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([database_url, "-tAc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One isolated farm: database, queue namespace, bucket, and the processes started on them.
struct Farm {
    name: String,
    database_url: String,
    admin_url: String,
    bucket: String,
    blobs: Arc<dyn BlobStore>,
    port: u16,
    coordinator: Option<Child>,
    workers: Vec<Child>,
    logs: PathBuf,
    /// Variables every process of this farm gets on top of the usual ones.
    extra_env: Vec<(&'static str, &'static str)>,
    /// Containers started for this farm (removed at the end; killing `docker run` leaves them).
    containers: Vec<String>,
}

impl Farm {
    async fn new() -> Farm {
        let admin_url = require("DATABASE_URL");
        require("STORYFARM_S3_ENDPOINT");
        let name = format!(
            "sf_e2e_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let database_url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("DATABASE_URL without a database name: {admin_url}"),
        };
        let bucket = name.replace('_', "-");
        let config = S3Config::from_vars(|v| {
            if v == "STORYFARM_S3_BUCKET" {
                Some(bucket.clone())
            } else {
                std::env::var(v).ok()
            }
        })
        .unwrap();
        let s3 = S3Store::new(config).await.unwrap();
        s3.ensure_bucket().await.unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let logs = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&logs).unwrap();
        Farm {
            name,
            database_url,
            admin_url,
            bucket,
            blobs: Arc::new(s3),
            port,
            coordinator: None,
            workers: Vec::new(),
            logs,
            extra_env: Vec::new(),
            containers: Vec::new(),
        }
    }

    /// `docker run` of `image` as one of this farm's processes: host networking (loopback only),
    /// the same variables as [`Farm::command`], the fixtures mounted read-only at the same path
    /// (boards name the tiny model by path).
    fn container(&mut self, image: &str, role: &str, args: &[&str]) -> Command {
        let name = format!("{}-{role}", self.name);
        self.containers.push(name.clone());
        let fixtures = repo().join("tests/fixtures");
        let mut c = Command::new(require("STORYFARM_DOCKER"));
        c.args([
            "run",
            "--rm",
            "--init",
            "--network",
            "host",
            "--name",
            &name,
        ])
        .arg("-v")
        .arg(format!("{0}:{0}:ro", fixtures.display()));
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("STORYFARM_QUEUE_NAMESPACE".into(), self.name.clone()),
            ("STORYFARM_BLOBS".into(), format!("s3://{}", self.bucket)),
            ("STORYFARM_FAMILIES".into(), "sd".into()),
            ("RUST_LOG".into(), "info".into()),
            ("HF_HUB_OFFLINE".into(), "1".into()),
            // The images serve metrics on 0.0.0.0:9464; on the host's network every container
            // (and every concurrent test) needs a port of its own.
            (
                "STORYFARM_METRICS_LISTEN".into(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ];
        for (k, v) in std::env::vars() {
            if k == "STORYFARM_AMQP_URL" || k.starts_with("STORYFARM_S3_") || k.starts_with("AWS_")
            {
                env.push((k, v));
            }
        }
        for (k, v) in env {
            c.arg("-e").arg(format!("{k}={v}"));
        }
        c.arg(image)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.logs.join(format!("{role}.log"))).unwrap());
        c
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, role: &str, log: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_storyfarm"));
        c.arg(role)
            .env("DATABASE_URL", &self.database_url)
            .env("STORYFARM_QUEUE_NAMESPACE", &self.name)
            .env("STORYFARM_BLOBS", format!("s3://{}", self.bucket))
            .env("STORYFARM_FAMILIES", "sd")
            .env("RUST_LOG", "info")
            // No model hub here: a hub id fails at once instead of after network timeouts.
            .env("HF_HUB_OFFLINE", "1")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.logs.join(log)).unwrap());
        c.envs(self.extra_env.iter().copied());
        c
    }

    fn start_coordinator(&mut self) {
        let mut command = self.command("serve", "coordinator.log");
        command.args([
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--retry-base-ms",
            "200",
        ]);
        self.start_coordinator_with(command);
    }

    fn start_coordinator_with(&mut self, mut command: Command) {
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on"),
            "coordinator did not start: {line:?}, see {}",
            self.logs.display()
        );
        self.coordinator = Some(child);
    }

    fn start_worker(&mut self, id: &str) {
        let child = self.worker_command(id).spawn().unwrap();
        self.workers.push(child);
    }

    fn worker_command(&self, id: &str) -> Command {
        let mut c = self.command("worker", &format!("{id}.log"));
        c.args([
            "--worker-id",
            id,
            "--recorded-timeout-seconds",
            "2",
            "--heartbeat-seconds",
            "1",
        ])
        .arg("--cache-dir")
        .arg(self.logs.join(format!("{id}-cache")));
        c
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(name)).unwrap_or_default()
    }

    async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.endpoint()).await.unwrap()
    }

    fn submit(&self, board: &Path) -> String {
        self.submit_with(board, &[])
    }

    /// `storyfarm submit` with `env` on top of this process's environment.
    fn submit_with(&self, board: &Path, env: &[(&str, &str)]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_storyfarm"))
            .args(["submit", "--coordinator", &self.endpoint()])
            .arg(board)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    async fn wait_for(&self, job: &str, timeout: Duration) -> pb::Job {
        let started = Instant::now();
        let mut jobs = self.jobs().await;
        loop {
            let j = jobs
                .get_job(pb::GetJobRequest { id: job.into() })
                .await
                .unwrap()
                .into_inner();
            if j.state >= pb::JobState::Succeeded as i32 {
                return j;
            }
            assert!(
                started.elapsed() < timeout,
                "job {job} not finished after {timeout:?}: {j:?}\ncoordinator log:\n{}",
                tail(&self.log("coordinator.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Farm {
    fn drop(&mut self) {
        for child in self.coordinator.iter_mut().chain(self.workers.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.containers.is_empty() {
            let _ = Command::new(require("STORYFARM_DOCKER"))
                .args(["rm", "-f"])
                .args(&self.containers)
                .output();
        }
        let _ = Command::new("psql")
            .args([
                &self.admin_url,
                "-tAc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
        let _ = Command::new("rabbitmqctl")
            .args(["list_queues", "-q"])
            .output();
    }
}

/// A storyboard file of `frames` frames in the style of the fixture image.
fn write_board(dir: &Path, frames: usize, steps: u32, per_task: u32) -> PathBuf {
    std::fs::copy(
        repo().join("tests/fixtures/sd15/inversion_image.png"),
        dir.join("style.png"),
    )
    .unwrap();
    let mut board = format!(
        "model: {}\nwidth: 64\nheight: 64\nsteps: {steps}\nguidance: 7.5\nseed: 500\nframes_per_task: {per_task}\nstyle:\n  image: style.png\n  prompt: a colorful geometric pattern\n  offset: 1\n  inversion_guidance: 2.0\nframes:\n",
        repo().join("tests/fixtures/models/tiny-sd15").display()
    );
    for i in 0..frames {
        board.push_str(&format!(
            "  - prompt: frame {i} of a story, flat illustration\n"
        ));
    }
    let path = dir.join(format!("board-{frames}-{steps}.yaml"));
    std::fs::write(&path, board).unwrap();
    path
}

/// `board` with its model replaced by `model` (a hub id, say).
fn with_model(board: PathBuf, model: &str) -> PathBuf {
    let text = std::fs::read_to_string(&board).unwrap();
    let model_line = text.lines().next().unwrap().to_string();
    std::fs::write(
        &board,
        text.replace(&model_line, &format!("model: {model}")),
    )
    .unwrap();
    board
}

/// `storyfarm render` of `board` on one machine (SQLite, in-process queue, artifacts under
/// `dir/data`, output in `dir/out`): the manifest, the data folder and the output folder.
fn render_locally(dir: &Path, board: &Path) -> (serde_json::Value, PathBuf, PathBuf) {
    let (data, out) = (dir.join("data"), dir.join("out"));
    let local = Command::new(env!("CARGO_BIN_EXE_storyfarm"))
        .arg("render")
        .arg(board)
        .arg("--out")
        .arg(&out)
        .env("STORYFARM_DATA_DIR", &data)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let manifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    (manifest, data, out)
}

/// The farm job's frames are the local render's: the same seeds, latents within 1e-4 of the
/// largest value.
async fn assert_frames_equal_local(
    farm: &Farm,
    job_id: &str,
    manifest: &serde_json::Value,
    data: &Path,
) {
    let local_frames = manifest["frames"].as_array().unwrap();
    let farm_frames = frames_of(farm, job_id).await;
    assert_eq!(local_frames.len(), farm_frames.len());
    for (l, f) in local_frames.iter().zip(&farm_frames) {
        assert_eq!(l["seed"].as_u64(), Some(f.seed));
        let local_latents = std::fs::read(
            data.join("artifacts")
                .join(l["latents_key"].as_str().unwrap()),
        )
        .unwrap();
        let farm_latents = farm
            .blobs
            .get(&BlobKey::new(f.latents_key.clone()).unwrap())
            .await
            .unwrap();
        let (diff, scale) = compare_latents(&local_latents, &farm_latents).unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "frame {}: max-abs {diff} > 1e-4 x {scale}",
            f.index
        );
    }
}

async fn frames_of(farm: &Farm, job: &str) -> Vec<pb::Frame> {
    farm.jobs()
        .await
        .list_frames(pb::ListFramesRequest { job_id: job.into() })
        .await
        .unwrap()
        .into_inner()
        .frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_frames_on_two_workers_equal_frames_rendered_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("worker-a");
    farm.start_worker("worker-b");
    let board = write_board(dir.path(), 12, 5, 2);
    let job_id = farm.submit(&board);
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(
        (
            job.frames_total,
            job.frames_succeeded,
            job.inversion_tasks,
            job.render_tasks
        ),
        (12, 12, 1, 6)
    );
    let frames = frames_of(&farm, &job_id).await;
    // Both workers took tasks.
    for w in ["worker-a.log", "worker-b.log"] {
        assert!(
            farm.log(w).contains("task succeeded"),
            "{w} rendered nothing:\n{}",
            tail(&farm.log(w))
        );
    }

    // Every frame equals the same frame rendered alone in this process.
    let model = repo().join("tests/fixtures/models/tiny-sd15");
    let folder = ModelFolder::open(model.to_str().unwrap(), &HubOptions::default()).unwrap();
    let sd = StableDiffusion::load(
        &folder,
        storyfarm_diffusion::device::Precision::F32.to_dtype(),
        &storyfarm_diffusion::device::DeviceSpec::Cpu
            .device()
            .unwrap(),
    )
    .unwrap();
    let settings = GenerationSettings {
        height: 64,
        width: 64,
        steps: 5,
        guidance_scale: 7.5,
    };
    let image = std::fs::read(dir.path().join("style.png")).unwrap();
    let trajectory = invert_image(
        &sd,
        &image,
        "style.png",
        "a colorful geometric pattern",
        &settings,
        2.0,
        &mut |_| Ok(()),
    )
    .unwrap();
    let style = StyleRequest {
        trajectory: &trajectory,
        reference_prompt: "a colorful geometric pattern",
        offset: 1,
        options: StyleAlignedOptions::default(),
    };
    let mut jobs = farm.jobs().await;
    for f in &frames {
        assert_eq!(f.state, pb::FrameState::Succeeded as i32, "{f:?}");
        let alone = render_frames(
            &sd,
            &settings,
            Some(&style),
            &[FrameRequest {
                index: f.index,
                prompt: f.prompt.clone(),
                negative_prompt: String::new(),
                seed: f.seed,
            }],
            &mut |_| Ok(()),
        )
        .unwrap();
        let farm_latents = farm
            .blobs
            .get(&BlobKey::new(f.latents_key.clone()).unwrap())
            .await
            .unwrap();
        let (diff, scale) = compare_latents(&farm_latents, &alone[0].latents).unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "frame {}: max-abs {diff} > 1e-4 x {scale}",
            f.index
        );
        // The PNG comes through the API.
        let mut stream = jobs
            .download_frame(pb::DownloadFrameRequest {
                job_id: job_id.clone(),
                index: f.index,
            })
            .await
            .unwrap()
            .into_inner();
        let mut png = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            png.extend_from_slice(&chunk.data);
        }
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
    }
    assert_eq!(
        frames.iter().map(|f| f.seed).collect::<Vec<_>>(),
        (500..512).collect::<Vec<u64>>()
    );
    // A frame the job does not have is named.
    let missing = jobs
        .download_frame(pb::DownloadFrameRequest {
            job_id: job_id.clone(),
            index: 12,
        })
        .await;
    assert_status(
        missing.map(|_| ()),
        tonic::Code::NotFound,
        "frame 12 of job",
    );

    // `storyfarm frames` downloads them all.
    let out = dir.path().join("frames");
    let listed = Command::new(env!("CARGO_BIN_EXE_storyfarm"))
        .args([
            "frames",
            &job_id,
            "--coordinator",
            &farm.endpoint(),
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    for i in 1..=12 {
        let png = std::fs::read(out.join(format!("frame-{i:03}.png"))).unwrap();
        assert_eq!(image::load_from_memory(&png).unwrap().width(), 64);
    }
    // gRPC health says the coordinator serves.
    let channel = Channel::from_shared(farm.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "storyfarm.v1.JobService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A second storyboard with the same reference reuses the inversion.
    let second = farm.submit(&write_board(dir.path(), 3, 5, 2));
    let job2 = farm.wait_for(&second, Duration::from_secs(120)).await;
    assert_eq!(
        (job2.state, job2.inversion_tasks),
        (pb::JobState::Succeeded as i32, 0),
        "{job2:?}"
    );
    // The watch command follows a finished job to its end and reports success.
    let watch = Command::new(env!("CARGO_BIN_EXE_storyfarm"))
        .args(["watch", &second, "--coordinator", &farm.endpoint()])
        .output()
        .unwrap();
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    assert!(String::from_utf8_lossy(&watch.stdout).contains("succeeded"));
}

/// Waits until `log` contains `needle` (a worker has reached a point in a task).
async fn wait_for_log(farm: &Farm, log: &str, needle: &str, timeout: Duration) {
    let started = Instant::now();
    while !farm.log(log).contains(needle) {
        assert!(
            started.elapsed() < timeout,
            "{log} never said {needle:?}:\n{}",
            tail(&farm.log(log))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_task_is_redelivered_and_every_frame_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("doomed");
    // Enough steps that the kill lands mid-task.
    let board = write_board(dir.path(), 4, 40, 2);
    let job_id = farm.submit(&board);
    // Past the inversion, into a render task: then SIGKILL.
    wait_for_log(&farm, "doomed.log", "rendering", Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !farm.log("doomed.log").contains("task succeeded frames=2"),
        "the render finished before the kill; make it longer"
    );
    farm.workers[0].kill().unwrap(); // SIGKILL
    farm.workers[0].wait().unwrap();
    farm.start_worker("rescuer");
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    let frames = frames_of(&farm, &job_id).await;
    assert_eq!(frames.len(), 4);
    assert!(
        frames
            .iter()
            .all(|f| f.state == pb::FrameState::Succeeded as i32 && !f.png_key.is_empty()),
        "{frames:?}"
    );
    // The killed worker's task came back to the rescuer as a redelivery.
    assert!(
        farm.log("rescuer.log").contains("redelivered=true"),
        "{}",
        tail(&farm.log("rescuer.log"))
    );
    // Exactly once: one success recorded per task, whatever was delivered twice.
    let successes = psql(
        &farm.database_url,
        "SELECT count(*) FROM task_events WHERE kind = 'succeeded'",
    );
    let tasks = psql(&farm.database_url, "SELECT count(*) FROM tasks");
    assert_eq!(successes, tasks);
    let succeeded_frames = psql(
        &farm.database_url,
        "SELECT count(DISTINCT (job_id, frame_index)) FROM frames WHERE state = 'succeeded'",
    );
    assert_eq!(succeeded_frames, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_workers_is_dead_lettered_and_fails_its_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    // One redelivery, then the broker dead-letters the task.
    farm.extra_env.push(("STORYFARM_DELIVERY_LIMIT", "1"));
    farm.start_coordinator();
    // One render task (two frames per task), long enough to be killed in.
    let job_id = farm.submit(&write_board(dir.path(), 2, 400, 2));
    for (n, worker) in ["first", "second"].into_iter().enumerate() {
        farm.start_worker(worker);
        let log = format!("{worker}.log");
        wait_for_log(&farm, &log, "rendering", Duration::from_secs(120)).await;
        if n == 1 {
            assert!(
                farm.log(&log).contains("redelivered=true"),
                "{}",
                tail(&farm.log(&log))
            );
        }
        farm.workers[n].kill().unwrap(); // SIGKILL, as a crash on this task would
        farm.workers[n].wait().unwrap();
    }
    // No third worker is needed: the coordinator's dead-letter consumer fails the task.
    let job = farm.wait_for(&job_id, Duration::from_secs(60)).await;
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    let frames = frames_of(&farm, &job_id).await;
    assert!(
        frames
            .iter()
            .all(|f| f.state == pb::FrameState::Failed as i32
                && f.error.contains("task never finished")
                && f.error.contains("DeliveryLimit")),
        "{frames:?}"
    );
    let dead = psql(
        &farm.database_url,
        "SELECT count(*) FROM task_events WHERE worker_id = 'dead-letter-queue'",
    );
    assert_eq!(dead, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_restarted_mid_job_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("steady");
    let board = write_board(dir.path(), 6, 20, 2);
    let job_id = farm.submit(&board);
    wait_for_log(
        &farm,
        "steady.log",
        "task succeeded",
        Duration::from_secs(120),
    )
    .await;
    let mut coordinator = farm.coordinator.take().unwrap();
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    // The worker keeps going; its events wait in the durable events queue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    farm.start_coordinator();
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.frames_succeeded, 6);
}

fn upload_messages(
    project_id: &str,
    prompt: &str,
    bytes: &[u8],
) -> Vec<pb::UploadReferenceRequest> {
    character_upload(project_id, "", prompt, &[], bytes)
        .into_iter()
        .map(|mut m| {
            if let Some(pb::upload_reference_request::Part::Header(h)) = &mut m.part {
                h.kind = pb::ReferenceKind::Style as i32;
            }
            m
        })
        .collect()
}

/// A character reference upload (an empty `bytes`: no picture).
fn character_upload(
    project_id: &str,
    name: &str,
    description: &str,
    words: &[&str],
    bytes: &[u8],
) -> Vec<pb::UploadReferenceRequest> {
    let mut m = vec![pb::UploadReferenceRequest {
        part: Some(pb::upload_reference_request::Part::Header(
            pb::ReferenceHeader {
                project_id: project_id.into(),
                kind: pb::ReferenceKind::Character as i32,
                prompt: description.into(),
                filename: "style.png".into(),
                name: name.into(),
                subject_words: words.iter().map(|w| w.to_string()).collect(),
            },
        )),
    }];
    m.extend(bytes.chunks(700).map(|c| pb::UploadReferenceRequest {
        part: Some(pb::upload_reference_request::Part::Chunk(c.to_vec())),
    }));
    m
}

fn assert_status(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_by_field_and_leaves_nothing_behind() {
    use storyfarm_proto::v1::project_service_client::ProjectServiceClient;
    use storyfarm_proto::v1::reference_service_client::ReferenceServiceClient;
    use storyfarm_proto::v1::storyboard_service_client::StoryboardServiceClient;
    use tonic::Code;

    let mut farm = Farm::new().await;
    farm.start_coordinator();
    let channel = Channel::from_shared(farm.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut projects = ProjectServiceClient::new(channel.clone());
    let mut references = ReferenceServiceClient::new(channel.clone());
    let mut storyboards = StoryboardServiceClient::new(channel.clone());
    let mut jobs = JobServiceClient::new(channel);
    let nobody = "01a214a0-0000-7000-8000-000000000000";

    // Unknown ids.
    assert_status(
        projects
            .get_project(pb::GetProjectRequest { id: nobody.into() })
            .await,
        Code::NotFound,
        "project",
    );
    assert_status(
        jobs.get_job(pb::GetJobRequest { id: nobody.into() }).await,
        Code::NotFound,
        "job",
    );
    assert_status(
        jobs.submit_job(pb::SubmitJobRequest {
            storyboard_id: nobody.into(),
        })
        .await,
        Code::NotFound,
        "storyboard",
    );
    assert_status(
        jobs.get_job(pb::GetJobRequest {
            id: "not-an-id".into(),
        })
        .await,
        Code::InvalidArgument,
        "id",
    );
    let png = std::fs::read(repo().join("tests/fixtures/sd15/inversion_image.png")).unwrap();
    assert_status(
        references
            .upload_reference(tokio_stream::iter(upload_messages(nobody, "style", &png)))
            .await,
        Code::NotFound,
        "project",
    );

    let project = projects
        .create_project(pb::CreateProjectRequest {
            name: "bad inputs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Malformed image bytes, an empty prompt, an oversized upload.
    assert_status(
        references
            .upload_reference(tokio_stream::iter(upload_messages(
                &project.id,
                "style",
                b"definitely not a png",
            )))
            .await,
        Code::InvalidArgument,
        "style.png is not a readable PNG or JPEG image",
    );
    assert_status(
        references
            .upload_reference(tokio_stream::iter(upload_messages(&project.id, " ", &png)))
            .await,
        Code::InvalidArgument,
        "header.prompt",
    );
    let huge = vec![0u8; 21 * 1024 * 1024];
    assert_status(
        references
            .upload_reference(tokio_stream::iter(upload_messages(
                &project.id,
                "style",
                &huge,
            )))
            .await,
        Code::InvalidArgument,
        "exceeds the limit",
    );

    // Storyboards: sizes, frames, references.
    let settings = |width, height| pb::StoryboardSettings {
        model: repo()
            .join("tests/fixtures/models/tiny-sd15")
            .display()
            .to_string(),
        width,
        height,
        steps: 4,
        guidance_scale: 7.5,
        negative_prompt: String::new(),
        style: None,
        frames_per_task: 2,
        seed: 0,
        characters: Vec::new(),
        consistory: None,
    };
    let frame = |p: &str| pb::FrameSpec {
        prompt: p.into(),
        negative_prompt: None,
        seed: None,
        characters: Vec::new(),
    };
    let board = |settings: pb::StoryboardSettings, frames: Vec<pb::FrameSpec>| {
        pb::CreateStoryboardRequest {
            project_id: project.id.clone(),
            name: "b".into(),
            settings: Some(settings),
            frames,
        }
    };
    for (request, field) in [
        (board(settings(0, 64), vec![frame("a")]), "settings.width"),
        (
            board(settings(4096, 64), vec![frame("a")]),
            "settings.width",
        ),
        (
            board(settings(64, 100), vec![frame("a")]),
            "settings.height: must be divisible by 8",
        ),
        (
            board(settings(64, 64), vec![]),
            "frames: a storyboard needs at least one frame",
        ),
        (
            board(settings(64, 64), vec![frame("a"), frame("")]),
            "frames[1].prompt",
        ),
        (
            pb::CreateStoryboardRequest {
                settings: None,
                ..board(settings(64, 64), vec![frame("a")])
            },
            "settings",
        ),
    ] {
        assert_status(
            storyboards.create_storyboard(request).await,
            Code::InvalidArgument,
            field,
        );
    }
    let mut styled = settings(64, 64);
    styled.style = Some(pb::StyleSettings {
        reference_id: nobody.into(),
        offset: 0,
        inversion_guidance: 2.0,
        options: None,
        seed: None,
    });
    assert_status(
        storyboards
            .create_storyboard(board(styled.clone(), vec![frame("a")]))
            .await,
        Code::NotFound,
        "reference",
    );
    styled.style = Some(pb::StyleSettings {
        reference_id: nobody.into(),
        offset: 9,
        inversion_guidance: 2.0,
        options: None,
        seed: None,
    });
    assert_status(
        storyboards
            .create_storyboard(board(styled, vec![frame("a")]))
            .await,
        Code::InvalidArgument,
        "settings.style.offset",
    );
    assert_status(
        storyboards
            .create_storyboard(pb::CreateStoryboardRequest {
                project_id: nobody.into(),
                ..board(settings(64, 64), vec![frame("a")])
            })
            .await,
        Code::NotFound,
        "project",
    );

    // Characters: a subject word the description lacks, a bad name, an unknown character, a
    // reference that does not exist.
    assert_status(
        references
            .upload_reference(tokio_stream::iter(character_upload(
                &project.id,
                "Rex",
                "a small puppy",
                &["dog"],
                &[],
            )))
            .await,
        Code::InvalidArgument,
        "header.subject_words[0]",
    );
    assert_status(
        references
            .upload_reference(tokio_stream::iter(character_upload(
                &project.id,
                "Rex!",
                "a small dog",
                &["dog"],
                &[],
            )))
            .await,
        Code::InvalidArgument,
        "header.name",
    );
    assert_status(
        references
            .upload_reference(tokio_stream::iter(character_upload(
                &project.id,
                "Rex",
                "a small dog",
                &["dog"],
                b"not a png",
            )))
            .await,
        Code::InvalidArgument,
        "not a readable PNG or JPEG image",
    );
    let mut cast = settings(64, 64);
    cast.characters = vec![pb::CharacterSettings {
        reference_id: nobody.into(),
        anchors: 2,
        seed: None,
    }];
    assert_status(
        storyboards
            .create_storyboard(board(cast, vec![frame("a dog")]))
            .await,
        Code::NotFound,
        "reference",
    );
    let mut stranger = frame("a dog");
    stranger.characters = vec!["Rex".into()];
    assert_status(
        storyboards
            .create_storyboard(board(settings(64, 64), vec![stranger.clone()]))
            .await,
        Code::InvalidArgument,
        "frames[0].characters[0]",
    );

    // Nothing half-made: no reference, storyboard or job rows, no object in the bucket.
    for table in ["style_references", "storyboards", "jobs", "tasks"] {
        assert_eq!(
            psql(&farm.database_url, &format!("SELECT count(*) FROM {table}")),
            "0",
            "{table}"
        );
    }
    assert!(
        farm.blobs.list("").await.unwrap().is_empty(),
        "objects left in the bucket"
    );
    // And a good request still works.
    let sb = storyboards
        .create_storyboard(board(settings(64, 64), vec![frame("a")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sb.frames.len(), 1);
    // A style reference is not a character, and a frame's cast must say its subject word.
    let style = references
        .upload_reference(tokio_stream::iter(upload_messages(
            &project.id,
            "style",
            &png,
        )))
        .await
        .unwrap()
        .into_inner();
    let rex = references
        .upload_reference(tokio_stream::iter(character_upload(
            &project.id,
            "Rex",
            "a small dog",
            &["dog"],
            &[],
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(!rex.has_image);
    assert_eq!(rex.kind, pb::ReferenceKind::Character as i32);
    let mut cast = settings(64, 64);
    cast.characters = vec![pb::CharacterSettings {
        reference_id: style.id.clone(),
        anchors: 2,
        seed: None,
    }];
    assert_status(
        storyboards
            .create_storyboard(board(cast.clone(), vec![stranger.clone()]))
            .await,
        Code::InvalidArgument,
        "settings.characters[0].reference_id",
    );
    cast.characters[0].reference_id = rex.id.clone();
    let mut puppy = frame("a puppy");
    puppy.characters = vec!["Rex".into()];
    assert_status(
        storyboards
            .create_storyboard(board(cast.clone(), vec![puppy]))
            .await,
        Code::InvalidArgument,
        "frames[0]",
    );
    let sb = storyboards
        .create_storyboard(board(cast, vec![stranger]))
        .await
        .unwrap()
        .into_inner();
    let settings = sb.settings.unwrap();
    assert_eq!(settings.characters[0].reference_id, rex.id);
    assert_eq!(sb.frames[0].characters, ["Rex"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_running_task_sigterm_hands_back_and_bad_models_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("first");

    // A model no worker can load fails its frames at once, with the reason.
    let bad = with_model(
        write_board(dir.path(), 2, 5, 2),
        "no-such-org/no-such-model",
    );
    let failed = farm
        .wait_for(&farm.submit(&bad), Duration::from_secs(120))
        .await;
    assert_eq!(failed.state, pb::JobState::Failed as i32, "{failed:?}");
    assert!(
        failed.error.contains("no-such-org/no-such-model"),
        "{}",
        failed.error
    );

    // Cancel while a render runs: the worker stops between steps and the job ends cancelled.
    let long = write_board(dir.path(), 2, 400, 2);
    let job_id = farm.submit(&long);
    wait_for_log(&farm, "first.log", "rendering", Duration::from_secs(120)).await;
    let mut jobs = farm.jobs().await;
    let cancelled = jobs
        .cancel_job(pb::CancelJobRequest { id: job_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    wait_for_log(
        &farm,
        "first.log",
        "task stopped at the coordinator's request",
        Duration::from_secs(60),
    )
    .await;
    let frames = frames_of(&farm, &job_id).await;
    assert!(
        frames
            .iter()
            .all(|f| f.state == pb::FrameState::Cancelled as i32),
        "{frames:?}"
    );

    // SIGTERM mid-task: the worker hands the task back and exits; another finishes it.
    let job_id = farm.submit(&write_board(dir.path(), 2, 300, 2));
    let before = farm.log("first.log").matches("rendering").count();
    let started = Instant::now();
    while farm.log("first.log").matches("rendering").count() == before {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no render started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = farm.workers[0].id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(status) = farm.workers[0].try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the worker exits promptly on SIGTERM");
    assert!(exited.success(), "{exited:?}");
    assert!(
        farm.log("first.log").contains("task handed back"),
        "{}",
        tail(&farm.log("first.log"))
    );
    farm.start_worker("second");
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(
        (job.state, job.frames_succeeded),
        (pb::JobState::Succeeded as i32, 2),
        "{job:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_retried_with_backoff_until_the_attempts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    let mut coordinator = farm.command("serve", "coordinator.log");
    coordinator.args([
        "--listen",
        &format!("127.0.0.1:{}", farm.port),
        "--retry-base-ms",
        "300",
        "--max-attempts",
        "3",
    ]);
    farm.start_coordinator_with(coordinator);
    // A hub that cannot be reached (and an empty cache) is a retryable failure: the network
    // may come back, unlike a repo the hub says does not exist.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hub = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut worker = farm.worker_command("first");
    worker
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", &hub)
        .env("HF_HUB_CACHE", dir.path().join("hub"));
    farm.workers.push(worker.spawn().unwrap());

    let board = with_model(
        write_board(dir.path(), 2, 5, 2),
        "some-org/unreachable-model",
    );
    let submitted = Instant::now();
    let job = farm
        .wait_for(&farm.submit(&board), Duration::from_secs(120))
        .await;
    let elapsed = submitted.elapsed();
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    assert!(
        job.error.contains("could not fetch") && job.error.contains("gave up after 3 attempts"),
        "{}",
        job.error
    );
    // The style reference's inversion is the task that failed; the frames' own tasks waited
    // on it and never ran.
    let frames = frames_of(&farm, &job.id).await;
    assert!(
        frames
            .iter()
            .all(|f| f.state == pb::FrameState::Failed as i32
                && f.attempts == 0
                && f.error.starts_with("style reference inversion failed")),
        "{frames:?}"
    );
    // Three attempts of one task, the second 300 ms and the third 600 ms after the one before
    // failed, and no fourth.
    let log = farm.log("first.log");
    let started: Vec<&str> = log.lines().filter(|l| l.contains("task started")).collect();
    assert_eq!(started.len(), 3, "{}", tail(&log));
    for (line, attempt) in started.iter().zip(1..) {
        assert!(line.contains(&format!("attempt={attempt} ")), "{line}");
    }
    assert!(
        elapsed >= Duration::from_millis(900),
        "retries waited for their backoff: {elapsed:?}"
    );
}

/// `storyfarm render` (one process: SQLite, in-process queue, local artifacts) and the farm
/// (coordinator and worker processes on Postgres, RabbitMQ and S3) render the same storyboard
/// into the same frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_on_one_machine_equals_the_farm() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("worker-a");
    let board = write_board(dir.path(), 5, 4, 2);
    let job_id = farm.submit(&board);
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");

    let (manifest, data, _) = render_locally(dir.path(), &board);
    assert_frames_equal_local(&farm, &job_id, &manifest, &data).await;
}

/// A storyboard with a style and two characters (one from its description, one from a picture):
/// `frames` is a list of (prompt, characters) pairs.
fn write_character_board(dir: &Path, name: &str, frames: &[(&str, &[&str])]) -> PathBuf {
    std::fs::copy(
        repo().join("tests/fixtures/sd15/inversion_image.png"),
        dir.join("style.png"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/sd15/inversion_image.png"),
        dir.join("sailor.png"),
    )
    .unwrap();
    let mut board = format!(
        "model: {}\nwidth: 64\nheight: 64\nsteps: 4\nguidance: 7.5\nseed: 900\nframes_per_task: 2
style:\n  image: style.png\n  prompt: a colorful geometric pattern\n  inversion_guidance: 2.0
characters:
  - name: Rex\n    description: a cute corgi dog\n    subject_words: [dog]
  - name: Ann\n    description: an old sailor\n    subject_words: [sailor]\n    image: sailor.png
frames:\n",
        repo().join("tests/fixtures/models/tiny-sd15").display()
    );
    for (prompt, cast) in frames {
        board.push_str(&format!(
            "  - prompt: {prompt}\n    characters: [{}]\n",
            cast.join(", ")
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, board).unwrap();
    path
}

/// Characters on the farm: the anchors are computed once by anchor tasks, the frames showing them
/// render on two workers equal to `storyfarm render` of the same board, and a second storyboard
/// with the same characters reuses the anchors (no anchor task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn characters_and_a_style_render_on_the_farm_like_render_and_anchors_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.start_coordinator();
    farm.start_worker("worker-a");
    farm.start_worker("worker-b");
    let board = write_character_board(
        dir.path(),
        "story.yaml",
        &[
            ("a dog on the beach", &["Rex"]),
            ("a sailor on a boat", &["Ann"]),
            ("a dog and a sailor on the pier", &["Rex", "Ann"]),
            ("a lighthouse at night", &[]),
            ("a dog in the snow", &["Rex"]),
        ],
    );
    let job_id = farm.submit(&board);
    let job = farm.wait_for(&job_id, Duration::from_secs(600)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    // One style inversion, one anchor task per character; frames grouped by cast, two per task:
    // [0, 4] Rex, [1] Ann, [2] both, [3] nobody.
    assert_eq!(
        (job.inversion_tasks, job.anchor_tasks, job.render_tasks),
        (1, 2, 4),
        "{job:?}"
    );
    let anchors = farm
        .jobs()
        .await
        .list_anchors(pb::ListAnchorsRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .characters;
    let summary: Vec<(String, i32, u32)> = anchors
        .iter()
        .map(|a| (a.name.clone(), a.state, a.anchors))
        .collect();
    assert_eq!(
        summary,
        [
            ("Rex".to_string(), pb::AnchorsState::Ready as i32, 2),
            ("Ann".to_string(), pb::AnchorsState::Ready as i32, 2)
        ]
    );
    let mut png = Vec::new();
    let mut chunks = farm
        .jobs()
        .await
        .download_anchor(pb::DownloadAnchorRequest {
            job_id: job_id.clone(),
            character: "Ann".into(),
            index: 1,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = chunks.message().await.unwrap() {
        png.extend(chunk.data);
    }
    let picture = image::load_from_memory(&png).unwrap();
    assert_eq!((picture.width(), picture.height()), (64, 64));

    // The same board on one machine: the same frames, the same anchors.
    let (manifest, data, out) = render_locally(dir.path(), &board);
    let characters = manifest["characters"].as_array().unwrap();
    assert_eq!(characters.len(), 2);
    for (local, farm_anchors) in characters.iter().zip(&anchors) {
        assert_eq!(local["name"].as_str(), Some(farm_anchors.name.as_str()));
        assert_eq!(
            local["anchors_key"].as_str(),
            Some(farm_anchors.cache_key.as_str())
        );
        let files = local["anchor_files"].as_array().unwrap();
        assert_eq!(files.len(), 2);
        for f in files {
            assert!(out.join(f["file"].as_str().unwrap()).is_file());
        }
    }
    assert!(out.join("contact-sheet.png").is_file());
    assert_frames_equal_local(&farm, &job_id, &manifest, &data).await;

    // Another storyboard with the same characters and style: nothing is computed twice.
    let sequel = write_character_board(
        dir.path(),
        "sequel.yaml",
        &[("a dog and a sailor in a harbour", &["Ann", "Rex"])],
    );
    let sequel_id = farm.submit(&sequel);
    let sequel_job = farm.wait_for(&sequel_id, Duration::from_secs(300)).await;
    assert_eq!(
        sequel_job.state,
        pb::JobState::Succeeded as i32,
        "{sequel_job:?}"
    );
    assert_eq!(
        (
            sequel_job.inversion_tasks,
            sequel_job.anchor_tasks,
            sequel_job.render_tasks
        ),
        (0, 0, 1),
        "{sequel_job:?}"
    );
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The body of `GET /metrics`, parsed by an independent parser of the Prometheus text format.
async fn scrape(port: u16) -> (String, prometheus_parse::Scrape) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("metrics endpoint on {port}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text format: {e}\n{body}"));
    (body.to_string(), parsed)
}

/// The sum of the samples of `name` whose labels include every pair of `labels` (histograms:
/// name their `_count` or `_sum`).
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or_default(),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_metrics_endpoints_move_during_and_after_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    let (coordinator_port, worker_port) = (free_port(), free_port());
    let mut command = farm.command("serve", "coordinator.log");
    command.args([
        "--listen",
        &format!("127.0.0.1:{}", farm.port),
        "--metrics-listen",
        &format!("127.0.0.1:{coordinator_port}"),
    ]);
    farm.start_coordinator_with(command);
    let mut worker = farm.worker_command("worker-m");
    worker.args(["--metrics-listen", &format!("127.0.0.1:{worker_port}")]);
    farm.workers.push(worker.spawn().unwrap());

    // Before any job: both endpoints answer, the farm is idle.
    let (_, c) = scrape(coordinator_port).await;
    assert_eq!(
        value(&c, "storyfarm_build_info", &[("role", "coordinator")]),
        1.0
    );
    assert_eq!(value(&c, "storyfarm_jobs", &[]), 0.0);
    let started = Instant::now();
    let w = loop {
        // The worker binds its endpoint after connecting to the broker.
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", worker_port)).await {
            drop(s);
            break scrape(worker_port).await.1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "worker metrics never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&w, "storyfarm_worker_tasks_in_progress", &[]), 0.0);

    // Six frames, one per task, on one worker: several seconds of work to watch.
    const STEPS: u32 = 25;
    let board = write_board(dir.path(), 6, STEPS, 1);
    let job_id = farm.submit(&board);
    let (mut saw_running_job, mut saw_busy_worker, mut saw_running_frames) = (false, false, false);
    let mut saw_steps_mid_job = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, c) = scrape(coordinator_port).await;
        let (_, w) = scrape(worker_port).await;
        let finished = value(&c, "storyfarm_jobs", &[("state", "succeeded")]) == 1.0;
        if finished {
            break;
        }
        saw_running_job |= value(&c, "storyfarm_jobs", &[("state", "running")]) == 1.0;
        saw_running_frames |= value(&c, "storyfarm_frames", &[("state", "rendering")]) >= 1.0;
        saw_busy_worker |= value(&w, "storyfarm_worker_tasks_in_progress", &[]) == 1.0
            && value(&c, "storyfarm_busy_workers", &[]) == 1.0;
        saw_steps_mid_job |= value(&w, "storyfarm_worker_step_duration_seconds_count", &[]) > 0.0
            && value(&c, "storyfarm_frames_rendered_total", &[]) < 6.0;
        assert!(Instant::now() < deadline, "job {job_id} did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_running_job && saw_running_frames && saw_busy_worker && saw_steps_mid_job,
        "mid-job scrapes: running job {saw_running_job}, rendering frames {saw_running_frames}, \
         busy worker {saw_busy_worker}, steps observed {saw_steps_mid_job}"
    );
    let job = farm.wait_for(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");

    // After: the counters add up to the job, and the live gauges are back to idle.
    let (c_text, c) = scrape(coordinator_port).await;
    let sd = ("family", "sd");
    let render = [("kind", "render"), sd];
    let invert = [("kind", "invert"), sd];
    assert_eq!(
        value(&c, "storyfarm_jobs_submitted_total", &[]),
        1.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_published_total", &render),
        6.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_published_total", &invert),
        1.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_started_total", &render),
        6.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_succeeded_total", &render),
        6.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_succeeded_total", &invert),
        1.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_tasks_failed_total", &[]),
        0.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_frames_rendered_total", &[sd]),
        6.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_task_pickup_seconds_count", &[]),
        7.0,
        "{c_text}"
    );
    assert_eq!(
        value(
            &c,
            "storyfarm_prerequisite_lookups_total",
            &[("kind", "style"), ("result", "miss")]
        ),
        1.0,
        "{c_text}"
    );
    assert_eq!(value(&c, "storyfarm_jobs", &[("state", "succeeded")]), 1.0);
    assert_eq!(value(&c, "storyfarm_frames", &[]), 0.0, "{c_text}");
    assert_eq!(value(&c, "storyfarm_tasks", &[]), 0.0, "{c_text}");
    assert_eq!(value(&c, "storyfarm_busy_workers", &[]), 0.0);
    assert_eq!(
        value(&c, "storyfarm_task_heartbeat_age_max_seconds", &[]),
        0.0
    );
    // The broker's view of the family's task queue: drained, one consumer (the worker).
    let task_queue = [("queue", format!("{}.tasks.sd", farm.name))];
    let task_queue: Vec<(&str, &str)> = task_queue.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        value(&c, "storyfarm_queue_messages", &task_queue),
        0.0,
        "{c_text}"
    );
    assert_eq!(
        value(&c, "storyfarm_queue_consumers", &task_queue),
        1.0,
        "{c_text}"
    );

    let (w_text, w) = scrape(worker_port).await;
    let ok = [("kind", "render"), sd, ("outcome", "succeeded")];
    assert_eq!(
        value(&w, "storyfarm_worker_tasks_total", &ok),
        6.0,
        "{w_text}"
    );
    assert_eq!(
        value(&w, "storyfarm_worker_task_duration_seconds_count", &[]),
        7.0
    );
    // Every frame's steps, plus the inversion's.
    assert!(
        value(&w, "storyfarm_worker_step_duration_seconds_count", &[sd]) >= f64::from(6 * STEPS),
        "{w_text}"
    );
    assert!(value(&w, "storyfarm_worker_step_duration_seconds_sum", &[sd]) > 0.0);
    assert_eq!(
        value(&w, "storyfarm_worker_frames_rendered_total", &[sd]),
        6.0
    );
    assert_eq!(
        value(
            &w,
            "storyfarm_worker_model_lookups_total",
            &[("result", "miss")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &w,
            "storyfarm_worker_model_lookups_total",
            &[("result", "hit")]
        ),
        6.0
    );
    assert_eq!(
        value(&w, "storyfarm_worker_model_load_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        value(
            &w,
            "storyfarm_worker_blob_seconds_count",
            &[("operation", "put")]
        ),
        6.0
    );
    assert!(
        value(
            &w,
            "storyfarm_worker_blob_seconds_count",
            &[("operation", "get")]
        ) >= 1.0
    );
    assert_eq!(value(&w, "storyfarm_worker_tasks_in_progress", &[]), 0.0);
    assert_eq!(
        value(&w, "storyfarm_worker_heartbeat_age_seconds", &[]),
        0.0
    );

    // A second board with the same style finds its trajectory computed: a cache hit.
    let sequel = write_board(dir.path(), 1, STEPS, 1);
    let sequel_id = farm.submit(&sequel);
    farm.wait_for(&sequel_id, Duration::from_secs(120)).await;
    let (c_text, c) = scrape(coordinator_port).await;
    assert_eq!(
        value(
            &c,
            "storyfarm_prerequisite_lookups_total",
            &[("kind", "style"), ("result", "hit")]
        ),
        1.0,
        "{c_text}"
    );
    assert_eq!(value(&c, "storyfarm_jobs", &[("state", "succeeded")]), 2.0);
}

/// An OTLP/gRPC trace receiver in the test process: what the farm's processes export.
#[derive(Clone, Default)]
struct OtlpReceiver {
    /// (service.name, span)
    spans: Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for OtlpReceiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        self.record(request.into_inner());
        Ok(tonic::Response::new(
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse {
                partial_success: None,
            },
        ))
    }
}

impl OtlpReceiver {
    fn record(
        &self,
        request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    /// Serves OTLP/HTTP (protobuf bodies, any path) on a free port.
    async fn serve_http(&self) -> u16 {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let receiver = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let receiver = receiver.clone();
                            async move {
                                let body = request.into_body().collect().await?.to_bytes();
                                let status = match <opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as prost::Message>::decode(body) {
                                    Ok(export) => {
                                        receiver.record(export);
                                        hyper::StatusCode::OK
                                    }
                                    Err(_) => hyper::StatusCode::BAD_REQUEST,
                                };
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *response.status_mut() = status;
                                response.headers_mut().insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static(
                                        "application/x-protobuf",
                                    ),
                                );
                                Ok::<_, hyper::Error>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        port
    }
}

/// OTLP over HTTP/protobuf (the protocol's default): the coordinator's and the worker's spans of
/// one job reach an HTTP receiver in one trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_also_travel_over_otlp_http() {
    let receiver = OtlpReceiver::default();
    let port = receiver.serve_http().await;
    let endpoint: &'static str = Box::leak(format!("http://127.0.0.1:{port}").into_boxed_str());
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.extra_env.extend([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    farm.start_coordinator();
    farm.start_worker("worker-h");
    let job_id = farm.submit(&write_board(dir.path(), 1, 3, 1));
    let job = farm.wait_for(&job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let submit = spans
            .iter()
            .find(|(svc, s)| svc.contains("storyfarm-coordinator") && s.name == "submit_job");
        let tasks: Vec<_> = spans
            .iter()
            .filter(|(svc, s)| svc.contains("storyfarm-worker") && s.name == "task")
            .collect();
        if let Some((_, submit)) = submit {
            if tasks.len() >= 2 {
                for (_, task) in tasks {
                    assert_eq!(
                        task.trace_id, submit.trace_id,
                        "the worker's task is in the job's trace"
                    );
                }
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "spans over HTTP so far: {:?}",
            spans
                .iter()
                .map(|(svc, s)| format!("{svc} {}", s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(|v| format!("{:?}", v.value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_from_the_caller_through_the_worker_steps() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let receiver = OtlpReceiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let endpoint: &'static str =
        Box::leak(format!("http://127.0.0.1:{otlp_port}").into_boxed_str());
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];

    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    farm.extra_env.extend(otel);
    farm.start_coordinator();
    farm.start_worker("worker-t");
    // The caller's own trace: a pipeline step that runs `storyfarm submit`.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let board = write_board(dir.path(), 2, 4, 1);
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let mut env = vec![("TRACEPARENT", traceparent.as_str())];
    env.extend(otel);
    let job_id = farm.submit_with(&board, &env);
    let job = farm.wait_for(&job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");

    // Spans arrive in batches; wait for every task's span and the ingestion of its outcome.
    let named = |spans: &[(String, opentelemetry_proto::tonic::trace::v1::Span)], name: &str| {
        spans.iter().filter(|(_, s)| s.name == name).count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        if named(&spans, "task") >= 3
            && named(&spans, "upload") >= 2
            && named(&spans, "ingest_event") >= 6
        {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans so far: {:?}",
            spans
                .iter()
                .map(|(svc, s)| format!("{svc} {}", s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ours: Vec<&(String, opentelemetry_proto::tonic::trace::v1::Span)> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == caller_trace)
        .collect();
    let services: std::collections::BTreeSet<&str> =
        ours.iter().map(|(svc, _)| svc.as_str()).collect();
    for service in ["storyfarm-cli", "storyfarm-coordinator", "storyfarm-worker"] {
        assert!(
            services.iter().any(|s| s.contains(service)),
            "no {service} span in the caller's trace: {services:?}"
        );
    }
    let by_id: std::collections::HashMap<String, &opentelemetry_proto::tonic::trace::v1::Span> =
        ours.iter().map(|(_, s)| (hex(&s.span_id), s)).collect();
    let ancestors = |span: &opentelemetry_proto::tonic::trace::v1::Span| {
        let mut names = Vec::new();
        let mut parent = hex(&span.parent_span_id);
        while let Some(p) = by_id.get(&parent) {
            names.push(p.name.clone());
            parent = hex(&p.parent_span_id);
        }
        (names, parent)
    };
    let cli = ours
        .iter()
        .find(|(_, s)| s.name == "storyfarm submit")
        .expect("the CLI's span");
    assert_eq!(
        hex(&cli.1.parent_span_id),
        caller_span,
        "the submit continues the caller's span"
    );
    // Every task span (on the worker) descends from the coordinator's submit, which descends from
    // the CLI's span, which is the caller's child: one connected trace.
    let tasks: Vec<_> = ours.iter().filter(|(_, s)| s.name == "task").collect();
    assert_eq!(
        tasks.len(),
        3,
        "an inversion and two render tasks in the caller's trace"
    );
    for (service, task) in &tasks {
        assert!(service.contains("storyfarm-worker"), "{service}");
        let (names, root_parent) = ancestors(task);
        assert!(
            names.contains(&"submit_job".to_string()),
            "task ancestors {names:?}"
        );
        assert!(
            names.contains(&"storyfarm submit".to_string()),
            "task ancestors {names:?}"
        );
        assert_eq!(root_parent, caller_span, "task ancestors {names:?}");
    }
    for name in ["dispatch", "plan"] {
        let span = ours
            .iter()
            .find(|(_, s)| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span"));
        assert!(
            ancestors(&span.1).0.contains(&"submit_job".to_string()),
            "{name}"
        );
    }
    // Denoising steps carry their index and timestep, inside the task that ran them.
    let steps: Vec<_> = ours
        .iter()
        .filter(|(_, s)| s.name.ends_with("_step"))
        .collect();
    assert!(steps.len() >= 2 * 4, "step spans: {}", steps.len());
    for (_, step) in &steps {
        assert!(attribute(step, "step").is_some(), "{step:?}");
        assert!(attribute(step, "timestep").is_some(), "{step:?}");
        assert!(
            ancestors(step).0.contains(&"task".to_string()),
            "{:?}",
            ancestors(step).0
        );
    }
    for name in ["upload", "ingest_event"] {
        for (_, span) in ours.iter().filter(|(_, s)| s.name == name) {
            assert!(
                ancestors(span).0.contains(&"task".to_string()),
                "{name}: {:?}",
                ancestors(span).0
            );
        }
    }
}

/// The coordinator and CPU worker images (deploy/docker/Dockerfile, built by
/// deploy/docker/build-images) render the tiny board as containers against the machine's Postgres,
/// RabbitMQ and S3 server, and their frames equal the binary's (the farm's invariance test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_render_the_tiny_board_as_containers() {
    let coordinator_image = require("STORYFARM_IMAGE_COORDINATOR");
    let worker_image = require("STORYFARM_IMAGE_WORKER");
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::new().await;
    let listen = format!("127.0.0.1:{}", farm.port);
    let coordinator = farm.container(
        &coordinator_image,
        "coordinator",
        &["serve", "--listen", &listen],
    );
    farm.start_coordinator_with(coordinator);
    let mut worker = farm.container(
        &worker_image,
        "worker",
        &[
            "worker",
            "--worker-id",
            "container-worker",
            "--heartbeat-seconds",
            "1",
        ],
    );
    farm.workers.push(worker.spawn().unwrap());
    let board = write_board(dir.path(), 3, 5, 2);
    let job_id = farm.submit(&board);
    std::thread::sleep(Duration::from_secs(1));
    if let Ok(Some(status)) = farm.workers[0].try_wait() {
        panic!(
            "the worker container exited ({status}): {}",
            tail(&farm.log("worker.log"))
        );
    }
    let job = farm.wait_for(&job_id, Duration::from_secs(300)).await;
    assert_eq!(
        job.state,
        pb::JobState::Succeeded as i32,
        "{job:?}\n{}",
        tail(&farm.log("worker.log"))
    );
    assert_eq!(
        (job.frames_succeeded, job.inversion_tasks, job.render_tasks),
        (3, 1, 2)
    );
    assert!(
        farm.log("worker.log").contains("container-worker"),
        "the containerised worker rendered: {}",
        tail(&farm.log("worker.log"))
    );

    // The same board rendered by this build's binary on one machine gives the same latents.
    let (manifest, data, _) = render_locally(dir.path(), &board);
    assert_frames_equal_local(&farm, &job_id, &manifest, &data).await;
}
