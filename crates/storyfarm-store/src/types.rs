//! What the store keeps and returns: rows as domain types, and the inputs of its transactions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use storyfarm_core::storyboard::ResolvedFrame;
use storyfarm_core::{JobId, ProjectId, ReferenceId, StoryboardId, StoryboardSpec, TaskId};

#[derive(Clone, Debug, PartialEq)]
pub struct Project {
    pub id: ProjectId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// What a reference is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceKind {
    /// A style: frames are StyleAligned toward it.
    Style,
    /// A character: frames that name it share attention with its anchors (ConsiStory).
    Character,
}

impl ReferenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Style => "style",
            Self::Character => "character",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "style" => Self::Style,
            "character" => Self::Character,
            _ => return None,
        })
    }
}

/// An uploaded picture, stored content-addressed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceImage {
    pub sha256: String,
    pub key: String,
    pub width: u32,
    pub height: u32,
    pub size_bytes: u64,
}

/// A style or character reference. Without an image it is made from its prompt: a style is
/// generated, a character's anchors are all generated.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub id: ReferenceId,
    pub project_id: ProjectId,
    pub kind: ReferenceKind,
    /// Style: what the image shows (its inversion's prompt) or what to generate. Character: its
    /// description, the prompt its anchors render from.
    pub prompt: String,
    /// A character's name (empty for a style).
    pub name: String,
    /// A character's subject words (empty for a style).
    pub subject_words: Vec<String>,
    pub image: Option<ReferenceImage>,
    pub created_at: DateTime<Utc>,
}

/// A storyboard as stored: the validated spec and the references it uses (the spec's image
/// paths are not used once the images are stored references).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredStoryboard {
    pub spec: StoryboardSpec,
    pub reference_id: Option<ReferenceId>,
    /// The reference of each of `spec.characters`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub character_references: Vec<ReferenceId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Storyboard {
    pub id: StoryboardId,
    pub project_id: ProjectId,
    pub name: String,
    pub stored: StoredStoryboard,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub storyboard_id: StoryboardId,
    pub state: JobState,
    pub frames_total: u32,
    pub frames_succeeded: u32,
    pub frames_failed: u32,
    pub inversion_tasks: u32,
    pub anchor_tasks: u32,
    pub render_tasks: u32,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameState {
    Pending,
    Rendering,
    Succeeded,
    Failed,
    Cancelled,
}

impl FrameState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Rendering => "rendering",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "rendering" => Self::Rendering,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub job_id: JobId,
    pub index: u32,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub state: FrameState,
    pub task_id: Option<TaskId>,
    pub png_key: Option<String>,
    pub latents_key: Option<String>,
    pub error: Option<String>,
    pub attempts: u32,
    /// When the frame reached succeeded, failed or cancelled; a resumed run that did not render it
    /// again leaves it unchanged.
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Computes a style reference's trajectory (DDIM inversion of its image, or generation from
    /// its prompt).
    Invert,
    /// Renders a character's anchors.
    Anchor,
    Render,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invert => "invert",
            Self::Anchor => "anchor",
            Self::Render => "render",
        }
    }
}

/// A task the planner made, before the store decides whether it can run yet.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTask {
    pub id: TaskId,
    pub kind: TaskKind,
    /// Queue family (`sd`, `sdxl`): which workers can run it.
    pub family: String,
    pub max_attempts: u32,
    /// Frame indices a render task renders (empty for an inversion).
    pub frames: Vec<u32>,
    /// Encoded task message without its attempt.
    pub payload: Vec<u8>,
    /// Cache keys of prerequisites that must be ready before it runs (a render needs the style
    /// trajectory and its characters' anchors; a styled character's anchors need the style).
    pub needs: Vec<String>,
}

/// What a prerequisite is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrerequisiteKind {
    /// The style reference's trajectory.
    Style,
    /// A character's anchors.
    Anchors,
}

impl PrerequisiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Style => "style",
            Self::Anchors => "anchors",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "style" => Self::Style,
            "anchors" => Self::Anchors,
            _ => return None,
        })
    }
}

/// A content-addressed artifact a job needs before (some of) its frames render, keyed by
/// everything that determines it, and the task that would compute it if nobody has (or is).
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedPrerequisite {
    pub cache_key: String,
    pub kind: PrerequisiteKind,
    /// The character's name (anchors); empty for the style.
    pub name: String,
    /// Kind `Invert` (style) or `Anchor`; its `needs` name prerequisites planned before it.
    pub task: PlannedTask,
}

/// The state of a cached prerequisite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    Pending,
    Ready,
    Failed,
}

impl CacheState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "ready" => Self::Ready,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// A prerequisite of a job as it stands now.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPrerequisite {
    pub kind: PrerequisiteKind,
    pub name: String,
    pub cache_key: String,
    pub state: CacheState,
    /// The artifact (trajectory or anchors file) once ready.
    pub artifact_key: Option<String>,
    pub error: Option<String>,
}

/// Everything `submit_job` writes in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub id: JobId,
    pub storyboard_id: StoryboardId,
    pub frames: Vec<ResolvedFrame>,
    /// In dependency order: the style first, then the characters' anchors.
    pub prerequisites: Vec<PlannedPrerequisite>,
    pub render_tasks: Vec<PlannedTask>,
}

/// A message the dispatcher must publish: the task's payload at this attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxMessage {
    pub id: i64,
    pub task_id: TaskId,
    pub attempt: u32,
    pub family: String,
    pub payload: Vec<u8>,
}

/// Artifacts of one rendered frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameArtifacts {
    pub index: u32,
    pub png_key: String,
    pub latents_key: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskEventKind {
    Started,
    Heartbeat,
    Progress,
    Succeeded {
        frames: Vec<FrameArtifacts>,
        /// What a prerequisite task made: the trajectory or the anchors file.
        trajectory_key: Option<String>,
    },
    Failed {
        reason: String,
        retryable: bool,
    },
}

impl TaskEventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Heartbeat => "heartbeat",
            Self::Progress => "progress",
            Self::Succeeded { .. } => "succeeded",
            Self::Failed { .. } => "failed",
        }
    }
}

/// A task event from a worker (or the dead-letter queue), identified by task, attempt, worker and
/// the worker's sequence number.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEventRecord {
    pub task_id: TaskId,
    pub attempt: u32,
    pub seq: u64,
    pub worker_id: String,
    pub kind: TaskEventKind,
}

/// What ingesting an event did.
#[derive(Clone, Debug, PartialEq)]
pub enum EventOutcome {
    /// Seen before (same task, attempt, worker and seq): nothing changed.
    Duplicate,
    /// For an attempt that is no longer current, or a task already finished or cancelled
    /// (`cancelled`: the worker should stop).
    Stale { job_id: JobId, cancelled: bool },
    /// Applied; `affected_jobs` are the jobs whose frames or state may have changed.
    Applied {
        job_id: JobId,
        affected_jobs: Vec<JobId>,
    },
}

/// Retry policy of failed attempts: `base * 2^(attempt-1)`, capped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub base: std::time::Duration,
    pub max: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: std::time::Duration::from_secs(2),
            max: std::time::Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RetryPolicy;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
        };
        assert_eq!(p.delay(1), Duration::from_secs(2));
        assert_eq!(p.delay(3), Duration::from_secs(8));
        assert_eq!(p.delay(10), Duration::from_secs(60));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(60));
    }
}

/// Task states of work not yet finished, in the order the metrics list them.
pub const LIVE_TASK_STATES: [&str; 4] = ["waiting", "queued", "running", "retry_wait"];

/// What the farm holds now, for the coordinator's metrics. Every state is listed (zero counts
/// included) so a gauge that empties drops to zero.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FarmCounts {
    /// Every job by state.
    pub jobs: Vec<(JobState, i64)>,
    /// Frames of unfinished (queued or running) jobs by state; finished jobs' frames are history,
    /// counted by the coordinator's counters instead of a scan on every scrape.
    pub frames: Vec<(FrameState, i64)>,
    /// Tasks in a live state ([`LIVE_TASK_STATES`]) by kind and state.
    pub tasks: Vec<(TaskKind, &'static str, i64)>,
    /// Distinct workers holding a running task.
    pub busy_workers: i64,
    /// Since the stalest running task's last heartbeat (or its start); `None` when none runs.
    pub oldest_heartbeat_age: Option<std::time::Duration>,
}

impl FarmCounts {
    /// Zero-filled lists, then the counts a query returned by their stored names (unknown names
    /// are ignored: a newer schema's states do not break an older coordinator's metrics).
    pub fn from_rows(
        jobs: &[(String, i64)],
        frames: &[(String, i64)],
        tasks: &[(String, String, i64)],
        busy_workers: i64,
        oldest_heartbeat_age: Option<std::time::Duration>,
    ) -> Self {
        const JOB_STATES: [JobState; 5] = [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ];
        const FRAME_STATES: [FrameState; 5] = [
            FrameState::Pending,
            FrameState::Rendering,
            FrameState::Succeeded,
            FrameState::Failed,
            FrameState::Cancelled,
        ];
        const KINDS: [TaskKind; 3] = [TaskKind::Invert, TaskKind::Anchor, TaskKind::Render];
        let count = |rows: &[(String, i64)], name: &str| {
            rows.iter()
                .filter(|(s, _)| s == name)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        Self {
            jobs: JOB_STATES
                .iter()
                .map(|&s| (s, count(jobs, s.as_str())))
                .collect(),
            frames: FRAME_STATES
                .iter()
                .map(|&s| (s, count(frames, s.as_str())))
                .collect(),
            tasks: KINDS
                .iter()
                .flat_map(|&k| {
                    LIVE_TASK_STATES.iter().map(move |&state| {
                        let n = tasks
                            .iter()
                            .filter(|(kind, st, _)| kind == k.as_str() && st == state)
                            .map(|(_, _, n)| *n)
                            .sum::<i64>();
                        (k, state, n)
                    })
                })
                .collect(),
            busy_workers,
            oldest_heartbeat_age,
        }
    }
}
