//! The metrics of the coordinator and of a worker: names, labels, buckets, and the calls that move
//! them. Labels take values from small fixed sets (task kind, model family, state, outcome, reason,
//! queue, device); job, task and worker ids never become labels, so cardinality stays bounded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Every metric family either process exports, as it appears in the exposition (counters with
/// their `_total`). Dashboards and alert rules may only name these (checked by
/// `scripts/check-deploy`); a test keeps the list equal to what the registries encode.
pub const METRIC_NAMES: &[&str] = &[
    // Both processes.
    "storyfarm_build_info",
    // Coordinator.
    "storyfarm_jobs_submitted_total",
    "storyfarm_jobs",
    "storyfarm_frames",
    "storyfarm_tasks",
    "storyfarm_tasks_published_total",
    "storyfarm_tasks_started_total",
    "storyfarm_tasks_succeeded_total",
    "storyfarm_tasks_failed_total",
    "storyfarm_task_retries_total",
    "storyfarm_dead_letters_total",
    "storyfarm_frames_rendered_total",
    "storyfarm_prerequisite_lookups_total",
    "storyfarm_task_pickup_seconds",
    "storyfarm_queue_messages",
    "storyfarm_queue_consumers",
    "storyfarm_task_heartbeat_age_max_seconds",
    "storyfarm_busy_workers",
    "storyfarm_metrics_refresh_errors_total",
    // Worker.
    "storyfarm_worker_tasks_total",
    "storyfarm_worker_task_duration_seconds",
    "storyfarm_worker_step_duration_seconds",
    "storyfarm_worker_frames_rendered_total",
    "storyfarm_worker_model_lookups_total",
    "storyfarm_worker_model_load_seconds",
    "storyfarm_worker_blob_seconds",
    "storyfarm_worker_tasks_in_progress",
    "storyfarm_worker_heartbeat_age_seconds",
    "storyfarm_worker_gpu_memory_used_bytes",
    "storyfarm_worker_gpu_memory_total_bytes",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    kind: String,
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: String,
    family: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: String,
    family: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskStateLabels {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// Ready to held: from milliseconds on an idle farm to hours behind a long queue.
fn pickup_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 22))
}

/// A task: seconds (tiny models) to hours (many SDXL frames on a CPU).
fn task_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 20))
}

/// A denoising step: milliseconds on a GPU to minutes for SDXL on a CPU.
fn step_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// One artifact download or upload.
fn blob_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.002, 2.0, 16))
}

/// Registers `metric` and hands it back (a metric is a shared handle: the registry and the
/// caller see the same series).
fn registered<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

fn build_info(registry: &mut Registry, role: &str) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels {
        version: env!("CARGO_PKG_VERSION").to_string(),
        role: role.to_string(),
    })
    .set(1);
    registry.register(
        "storyfarm_build_info",
        "Build of this process (value 1), labelled with its version and role",
        info,
    );
}

/// Jobs, frames and tasks as the store holds them now, read when the coordinator is scraped.
/// Every state of every list is present (zero counts included), so a series that empties drops
/// to zero instead of keeping its last value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FarmSnapshot {
    /// (state, count)
    pub jobs: Vec<(String, i64)>,
    /// (state, count)
    pub frames: Vec<(String, i64)>,
    /// (task kind, state, count)
    pub tasks: Vec<(String, String, i64)>,
    /// Distinct workers holding a running task.
    pub busy_workers: i64,
    /// Seconds since the stalest running task's last heartbeat (or start); 0 when none runs.
    pub oldest_heartbeat_age_seconds: f64,
}

/// One broker queue as the broker reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSnapshot {
    pub queue: String,
    /// Messages ready for delivery (not those held by consumers).
    pub messages: u64,
    pub consumers: u64,
}

/// The coordinator's metrics. Cheap to clone: every handle shares the same series.
#[derive(Clone)]
pub struct CoordinatorMetrics {
    registry: Arc<Registry>,
    jobs_submitted: Counter,
    jobs: Family<StateLabels, Gauge>,
    frames: Family<StateLabels, Gauge>,
    tasks: Family<TaskStateLabels, Gauge>,
    tasks_published: Family<TaskLabels, Counter>,
    tasks_started: Family<TaskLabels, Counter>,
    tasks_succeeded: Family<TaskLabels, Counter>,
    tasks_failed: Family<FailureLabels, Counter>,
    task_retries: Counter,
    dead_letters: Family<TaskLabels, Counter>,
    frames_rendered: Family<FamilyLabels, Counter>,
    prerequisite_lookups: Family<LookupLabels, Counter>,
    pickup: Histograms<TaskLabels>,
    queue_messages: Family<QueueLabels, Gauge>,
    queue_consumers: Family<QueueLabels, Gauge>,
    heartbeat_age: Gauge<f64, AtomicU64>,
    busy_workers: Gauge,
    refresh_errors: Family<SourceLabels, Counter>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        build_info(&mut r, "coordinator");
        let jobs_submitted = registered(
            &mut r,
            "storyfarm_jobs_submitted",
            "Jobs accepted by SubmitJob",
            Counter::default(),
        );
        let jobs = registered(
            &mut r,
            "storyfarm_jobs",
            "Jobs by state (from the store)",
            Family::<StateLabels, Gauge>::default(),
        );
        let frames = registered(
            &mut r,
            "storyfarm_frames",
            "Frames by state (from the store)",
            Family::<StateLabels, Gauge>::default(),
        );
        let tasks = registered(
            &mut r,
            "storyfarm_tasks",
            "Tasks by kind and state (from the store)",
            Family::<TaskStateLabels, Gauge>::default(),
        );
        let tasks_published = registered(
            &mut r,
            "storyfarm_tasks_published",
            "Task attempts published to the broker",
            Family::<TaskLabels, Counter>::default(),
        );
        let tasks_started = registered(
            &mut r,
            "storyfarm_tasks_started",
            "Task attempts a worker reported started",
            Family::<TaskLabels, Counter>::default(),
        );
        let tasks_succeeded = registered(
            &mut r,
            "storyfarm_tasks_succeeded",
            "Task attempts that succeeded",
            Family::<TaskLabels, Counter>::default(),
        );
        let tasks_failed = registered(
            &mut r,
            "storyfarm_tasks_failed",
            "Task attempts that failed, by the worker's failure reason",
            Family::<FailureLabels, Counter>::default(),
        );
        let task_retries = registered(
            &mut r,
            "storyfarm_task_retries",
            "New attempts released after a retryable failure",
            Counter::default(),
        );
        let dead_letters = registered(
            &mut r,
            "storyfarm_dead_letters",
            "Tasks the broker dead-lettered (delivered too often without an outcome)",
            Family::<TaskLabels, Counter>::default(),
        );
        let frames_rendered = registered(
            &mut r,
            "storyfarm_frames_rendered",
            "Frames whose artifacts were recorded",
            Family::<FamilyLabels, Counter>::default(),
        );
        let prerequisite_lookups = registered(
            &mut r,
            "storyfarm_prerequisite_lookups",
            "A submitted job's content-addressed prerequisites (style trajectory, character \
             anchors): hit when already computed, miss otherwise",
            Family::<LookupLabels, Counter>::default(),
        );
        let pickup = registered(
            &mut r,
            "storyfarm_task_pickup_seconds",
            "From a task attempt's publication to a worker starting it",
            Histograms::<TaskLabels>::new_with_constructor(pickup_buckets as fn() -> _),
        );
        let queue_messages = registered(
            &mut r,
            "storyfarm_queue_messages",
            "Messages ready in each broker queue (from the broker)",
            Family::<QueueLabels, Gauge>::default(),
        );
        let queue_consumers = registered(
            &mut r,
            "storyfarm_queue_consumers",
            "Consumers of each broker queue (from the broker)",
            Family::<QueueLabels, Gauge>::default(),
        );
        let heartbeat_age = registered(
            &mut r,
            "storyfarm_task_heartbeat_age_max_seconds",
            "Seconds since the stalest running task's last heartbeat (0 when none runs)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let busy_workers = registered(
            &mut r,
            "storyfarm_busy_workers",
            "Distinct workers holding a running task",
            Gauge::default(),
        );
        let refresh_errors = registered(
            &mut r,
            "storyfarm_metrics_refresh_errors",
            "Scrapes whose store or broker figures could not be read (they keep their last values)",
            Family::<SourceLabels, Counter>::default(),
        );
        Self {
            registry: Arc::new(r),
            jobs_submitted,
            jobs,
            frames,
            tasks,
            tasks_published,
            tasks_started,
            tasks_succeeded,
            tasks_failed,
            task_retries,
            dead_letters,
            frames_rendered,
            prerequisite_lookups,
            pickup,
            queue_messages,
            queue_consumers,
            heartbeat_age,
            busy_workers,
            refresh_errors,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn job_submitted(&self) {
        self.jobs_submitted.inc();
    }

    pub fn task_published(&self, kind: &str, family: &str) {
        self.tasks_published
            .get_or_create(&task(kind, family))
            .inc();
    }

    /// `pickup_seconds`: from publication to start, when the task carried its publication time.
    pub fn task_started(&self, kind: &str, family: &str, pickup_seconds: Option<f64>) {
        let labels = task(kind, family);
        self.tasks_started.get_or_create(&labels).inc();
        if let Some(s) = pickup_seconds {
            self.pickup.get_or_create(&labels).observe(s.max(0.0));
        }
    }

    pub fn task_succeeded(&self, kind: &str, family: &str, frames: usize) {
        self.tasks_succeeded
            .get_or_create(&task(kind, family))
            .inc();
        if frames > 0 {
            self.frames_rendered
                .get_or_create(&FamilyLabels {
                    family: family.to_string(),
                })
                .inc_by(frames as u64);
        }
    }

    /// `reason`: one of a small fixed set (the worker's failure cause, `dead_letter`, ...).
    pub fn task_failed(&self, kind: &str, family: &str, reason: &str) {
        self.tasks_failed
            .get_or_create(&FailureLabels {
                kind: kind.to_string(),
                family: family.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn retries_released(&self, attempts: u64) {
        self.task_retries.inc_by(attempts);
    }

    pub fn dead_lettered(&self, kind: &str, family: &str) {
        self.dead_letters.get_or_create(&task(kind, family)).inc();
        self.task_failed(kind, family, "dead_letter");
    }

    /// A submitted job's prerequisites of `kind` (`style` or `anchors`): `hits` found computed
    /// or being computed, `misses` the job computes.
    pub fn prerequisite_lookups(&self, kind: &str, hits: u64, misses: u64) {
        for (result, n) in [("hit", hits), ("miss", misses)] {
            if n > 0 {
                self.prerequisite_lookups
                    .get_or_create(&LookupLabels {
                        kind: kind.to_string(),
                        result: result.to_string(),
                    })
                    .inc_by(n);
            }
        }
    }

    pub fn set_farm(&self, farm: &FarmSnapshot) {
        self.jobs.clear();
        for (state, n) in &farm.jobs {
            self.jobs.get_or_create(&state_labels(state)).set(*n);
        }
        self.frames.clear();
        for (state, n) in &farm.frames {
            self.frames.get_or_create(&state_labels(state)).set(*n);
        }
        self.tasks.clear();
        for (kind, state, n) in &farm.tasks {
            self.tasks
                .get_or_create(&TaskStateLabels {
                    kind: kind.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        self.busy_workers.set(farm.busy_workers);
        self.heartbeat_age
            .set(farm.oldest_heartbeat_age_seconds.max(0.0));
    }

    pub fn set_queues(&self, queues: &[QueueSnapshot]) {
        for q in queues {
            let labels = QueueLabels {
                queue: q.queue.clone(),
            };
            self.queue_messages
                .get_or_create(&labels)
                .set(q.messages as i64);
            self.queue_consumers
                .get_or_create(&labels)
                .set(q.consumers as i64);
        }
    }

    /// `source`: `store` or `broker`.
    pub fn refresh_failed(&self, source: &str) {
        self.refresh_errors
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }
}

fn task(kind: &str, family: &str) -> TaskLabels {
    TaskLabels {
        kind: kind.to_string(),
        family: family.to_string(),
    }
}

fn state_labels(state: &str) -> StateLabels {
    StateLabels {
        state: state.to_string(),
    }
}

/// A worker's metrics. Cheap to clone: every handle shares the same series.
#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Arc<Registry>,
    tasks: Family<OutcomeLabels, Counter>,
    task_duration: Histograms<TaskLabels>,
    step_duration: Histograms<FamilyLabels>,
    frames_rendered: Family<FamilyLabels, Counter>,
    model_lookups: Family<ResultLabels, Counter>,
    model_load: Histogram,
    blob: Histograms<OperationLabels>,
    in_progress: Gauge,
    heartbeat_age: Gauge<f64, AtomicU64>,
    gpu_used: Family<DeviceLabels, Gauge>,
    gpu_total: Family<DeviceLabels, Gauge>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last sign of life of the task in progress (its start or
    /// its last heartbeat); `u64::MAX` when idle.
    last_beat_ms: Arc<AtomicU64>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        build_info(&mut r, "worker");
        let tasks = registered(
            &mut r,
            "storyfarm_worker_tasks",
            "Tasks this worker finished, by outcome (succeeded, failed, stopped, handed_back)",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let task_duration = registered(
            &mut r,
            "storyfarm_worker_task_duration_seconds",
            "Wall time of a task on this worker, from receipt to its final event",
            Histograms::<TaskLabels>::new_with_constructor(task_buckets as fn() -> _),
        );
        let step_duration = registered(
            &mut r,
            "storyfarm_worker_step_duration_seconds",
            "Wall time of one denoising or inversion step",
            Histograms::<FamilyLabels>::new_with_constructor(step_buckets as fn() -> _),
        );
        let frames_rendered = registered(
            &mut r,
            "storyfarm_worker_frames_rendered",
            "Frames this worker rendered and uploaded",
            Family::<FamilyLabels, Counter>::default(),
        );
        let model_lookups = registered(
            &mut r,
            "storyfarm_worker_model_lookups",
            "Model cache lookups: hit when the model was loaded already",
            Family::<ResultLabels, Counter>::default(),
        );
        let model_load = registered(
            &mut r,
            "storyfarm_worker_model_load_seconds",
            "Time to load a model into memory (cache misses)",
            Histogram::new(exponential_buckets(0.05, 2.0, 14)),
        );
        let blob = registered(
            &mut r,
            "storyfarm_worker_blob_seconds",
            "Artifact store calls (get, put) of this worker",
            Histograms::<OperationLabels>::new_with_constructor(blob_buckets as fn() -> _),
        );
        let in_progress = registered(
            &mut r,
            "storyfarm_worker_tasks_in_progress",
            "Tasks this worker holds now",
            Gauge::default(),
        );
        let heartbeat_age = registered(
            &mut r,
            "storyfarm_worker_heartbeat_age_seconds",
            "Seconds since the task in progress last sent a heartbeat (or started); 0 when idle",
            Gauge::<f64, AtomicU64>::default(),
        );
        let gpu_used = registered(
            &mut r,
            "storyfarm_worker_gpu_memory_used_bytes",
            "GPU memory in use on this worker's device (CUDA only)",
            Family::<DeviceLabels, Gauge>::default(),
        );
        let gpu_total = registered(
            &mut r,
            "storyfarm_worker_gpu_memory_total_bytes",
            "GPU memory of this worker's device (CUDA only)",
            Family::<DeviceLabels, Gauge>::default(),
        );
        Self {
            registry: Arc::new(r),
            tasks,
            task_duration,
            step_duration,
            frames_rendered,
            model_lookups,
            model_load,
            blob,
            in_progress,
            heartbeat_age,
            gpu_used,
            gpu_total,
            epoch: Instant::now(),
            last_beat_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn task_began(&self) {
        self.in_progress.inc();
        self.last_beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn heartbeat_sent(&self) {
        if self.last_beat_ms.load(Ordering::Relaxed) != u64::MAX {
            self.last_beat_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// `outcome`: succeeded, failed, stopped or handed_back.
    pub fn task_ended(&self, kind: &str, family: &str, outcome: &str, seconds: f64) {
        self.in_progress.dec();
        if self.in_progress.get() <= 0 {
            self.last_beat_ms.store(u64::MAX, Ordering::Relaxed);
        }
        self.tasks
            .get_or_create(&OutcomeLabels {
                kind: kind.to_string(),
                family: family.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.task_duration
            .get_or_create(&task(kind, family))
            .observe(seconds);
    }

    pub fn step(&self, family: &str, seconds: f64) {
        self.step_duration
            .get_or_create(&FamilyLabels {
                family: family.to_string(),
            })
            .observe(seconds);
    }

    pub fn frames_rendered(&self, family: &str, frames: usize) {
        self.frames_rendered
            .get_or_create(&FamilyLabels {
                family: family.to_string(),
            })
            .inc_by(frames as u64);
    }

    pub fn model_lookup(&self, hit: bool) {
        self.model_lookups
            .get_or_create(&ResultLabels {
                result: if hit { "hit" } else { "miss" }.to_string(),
            })
            .inc();
    }

    pub fn model_loaded(&self, seconds: f64) {
        self.model_load.observe(seconds);
    }

    /// `operation`: get or put.
    pub fn blob_call(&self, operation: &str, seconds: f64) {
        self.blob
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .observe(seconds);
    }

    pub fn set_gpu_memory(&self, device: &str, used: u64, total: u64) {
        let labels = DeviceLabels {
            device: device.to_string(),
        };
        self.gpu_used.get_or_create(&labels).set(used as i64);
        self.gpu_total.get_or_create(&labels).set(total as i64);
    }

    /// Brings the heartbeat age up to now (called when scraped).
    pub fn refresh_heartbeat_age(&self) {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        let age = if last == u64::MAX {
            0.0
        } else {
            self.now_ms().saturating_sub(last) as f64 / 1000.0
        };
        self.heartbeat_age.set(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(text: &str) -> std::collections::BTreeSet<String> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("exposition parses");
        scrape
            .docs
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn the_name_list_is_what_the_registries_export() {
        let c = CoordinatorMetrics::new();
        let w = WorkerMetrics::new();
        // Families with labels appear once a series exists; make one of each.
        c.task_published("render", "sd");
        c.task_started("render", "sd", Some(0.5));
        c.task_succeeded("render", "sd", 2);
        c.task_failed("render", "sd", "render");
        c.dead_lettered("render", "sd");
        c.prerequisite_lookups("style", 1, 0);
        c.set_farm(&FarmSnapshot {
            jobs: vec![("running".into(), 1)],
            frames: vec![("pending".into(), 3)],
            tasks: vec![("render".into(), "queued".into(), 2)],
            busy_workers: 1,
            oldest_heartbeat_age_seconds: 2.5,
        });
        c.set_queues(&[QueueSnapshot {
            queue: "storyfarm.tasks.sd".into(),
            messages: 4,
            consumers: 2,
        }]);
        c.refresh_failed("broker");
        w.task_began();
        w.task_ended("render", "sd", "succeeded", 3.0);
        w.step("sd", 0.2);
        w.frames_rendered("sd", 2);
        w.model_lookup(false);
        w.model_loaded(1.5);
        w.blob_call("put", 0.01);
        w.set_gpu_memory("cuda:0", 1, 2);
        let mut exported = families(&encode(c.registry()));
        exported.extend(families(&encode(w.registry())));
        let listed: std::collections::BTreeSet<String> =
            METRIC_NAMES.iter().map(|n| n.to_string()).collect();
        assert_eq!(exported, listed);
    }

    #[test]
    fn counters_histograms_and_snapshot_gauges_encode_with_their_labels() {
        let c = CoordinatorMetrics::new();
        c.task_started("anchor", "sdxl", Some(0.3));
        c.task_started("anchor", "sdxl", Some(40.0));
        c.set_farm(&FarmSnapshot {
            jobs: vec![("running".into(), 2), ("succeeded".into(), 0)],
            ..FarmSnapshot::default()
        });
        let text = encode(c.registry());
        assert!(
            text.contains("storyfarm_tasks_started_total{kind=\"anchor\",family=\"sdxl\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("storyfarm_task_pickup_seconds_count{kind=\"anchor\",family=\"sdxl\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("storyfarm_jobs{state=\"succeeded\"} 0"),
            "{text}"
        );
        // A later snapshot without the running jobs drops them to the states it names.
        c.set_farm(&FarmSnapshot {
            jobs: vec![("running".into(), 0)],
            ..FarmSnapshot::default()
        });
        let text = encode(c.registry());
        assert!(
            text.contains("storyfarm_jobs{state=\"running\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn heartbeat_age_grows_while_a_task_runs_and_is_zero_when_idle() {
        let w = WorkerMetrics::new();
        w.refresh_heartbeat_age();
        assert_eq!(w.heartbeat_age.get(), 0.0);
        w.task_began();
        std::thread::sleep(std::time::Duration::from_millis(30));
        w.refresh_heartbeat_age();
        assert!(w.heartbeat_age.get() >= 0.02, "{}", w.heartbeat_age.get());
        w.heartbeat_sent();
        w.refresh_heartbeat_age();
        assert!(w.heartbeat_age.get() < 0.02);
        w.task_ended("render", "sd", "succeeded", 0.05);
        w.refresh_heartbeat_age();
        assert_eq!(w.heartbeat_age.get(), 0.0);
        assert_eq!(w.in_progress.get(), 0);
    }
}
