//! Progress of one job for people: an overall bar in denoising steps (frames done, ETA), one bar
//! per frame in flight, one for the style inversion and one per character's anchors; plain lines when stderr is not a terminal
//! (logs and CI see when each frame finished).

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use storyfarm_proto::v1 as pb;

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// The name of a job state without the enum prefix (`running`).
pub fn job_state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("JOB_STATE_UNKNOWN")
        .trim_start_matches("JOB_STATE_")
        .to_lowercase()
}

fn frame_is_final(frame: &pb::Frame) -> bool {
    matches!(
        pb::FrameState::try_from(frame.state),
        Ok(pb::FrameState::Succeeded | pb::FrameState::Failed | pb::FrameState::Cancelled)
    )
}

pub struct JobProgress {
    bars: MultiProgress,
    overall: ProgressBar,
    inversion: Option<ProgressBar>,
    anchor_bars: HashMap<String, ProgressBar>,
    frame_bars: HashMap<u32, ProgressBar>,
    /// Step reached by each frame in flight, for the overall bar.
    in_flight: HashMap<u32, u64>,
    finished: HashSet<u32>,
    steps: u64,
    terminal: bool,
    seen_job: bool,
    last: Option<pb::Job>,
}

impl JobProgress {
    /// `steps`: denoising steps per frame (the storyboard's).
    pub fn new(steps: u32) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bars = MultiProgress::new();
        // Length 1 until the job's size is known: an empty bar of length 0 draws as full.
        let overall = bars.add(ProgressBar::new(1));
        overall.set_style(style(
            "{prefix:>9} [{bar:40}] {msg}  {elapsed_precise} (eta {eta})",
        ));
        overall.set_prefix("job");
        Self {
            bars,
            overall,
            inversion: None,
            anchor_bars: HashMap::new(),
            frame_bars: HashMap::new(),
            in_flight: HashMap::new(),
            finished: HashSet::new(),
            steps: steps.max(1) as u64,
            terminal,
            seen_job: false,
            last: None,
        }
    }

    /// The job as last reported.
    pub fn job(&self) -> Option<&pb::Job> {
        self.last.as_ref()
    }

    /// A line above the bars (or on stderr when there are no bars).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.terminal {
            let _ = self.bars.println(line.as_ref());
        } else {
            eprintln!("{}", line.as_ref());
        }
    }

    fn redraw_overall(&self) {
        let Some(job) = &self.last else { return };
        let done = self.finished.len() as u64 * self.steps;
        let partial: u64 = self.in_flight.values().sum();
        self.overall
            .set_length(job.frames_total as u64 * self.steps);
        self.overall.set_position(done + partial);
        self.overall.set_message(format!(
            "{}/{} frames {}",
            job.frames_succeeded + job.frames_failed,
            job.frames_total,
            job_state_name(job.state)
        ));
    }

    /// Applies one event; returns the frame when it has just reached a final state.
    pub fn apply(&mut self, event: pb::JobEvent) -> Option<pb::Frame> {
        match event.event? {
            pb::job_event::Event::Job(job) => {
                self.last = Some(job);
                self.redraw_overall();
                if !self.seen_job {
                    // Frames finished by an earlier run arrive first: they must not make the
                    // ETA think this run is fast.
                    self.seen_job = true;
                    self.overall.reset_eta();
                }
                None
            }
            pb::job_event::Event::Inversion(p) => {
                let bar = self.inversion.get_or_insert_with(|| {
                    let b = self.bars.insert(0, ProgressBar::new(p.steps as u64));
                    b.set_style(style("{prefix:>9} [{bar:40}] {pos}/{len} steps"));
                    b.set_prefix("inversion");
                    b
                });
                bar.set_length(p.steps as u64);
                bar.set_position(p.step as u64);
                if p.step >= p.steps {
                    bar.finish_and_clear();
                    self.println("style reference inverted");
                }
                None
            }
            pb::job_event::Event::Anchor(p) => {
                let bar = self
                    .anchor_bars
                    .entry(p.character.clone())
                    .or_insert_with(|| {
                        let b = self.bars.insert(0, ProgressBar::new(p.steps as u64));
                        b.set_style(style("{prefix:>9} [{bar:40}] {pos}/{len} steps {msg}"));
                        b.set_prefix("anchors");
                        b.set_message(p.character.clone());
                        b
                    });
                bar.set_length(p.steps as u64);
                bar.set_position(p.step as u64);
                None
            }
            pb::job_event::Event::Anchors(a) => {
                let state = pb::AnchorsState::try_from(a.state).unwrap_or_default();
                if matches!(state, pb::AnchorsState::Ready | pb::AnchorsState::Failed) {
                    if let Some(bar) = self.anchor_bars.remove(&a.name) {
                        bar.finish_and_clear();
                    }
                }
                match state {
                    pb::AnchorsState::Ready => {
                        self.println(format!("anchors of {} ready ({})", a.name, a.anchors))
                    }
                    pb::AnchorsState::Failed => {
                        self.println(format!("anchors of {} failed: {}", a.name, a.error))
                    }
                    _ => {}
                }
                None
            }
            pb::job_event::Event::Progress(p) => {
                if let Some(bar) = self.inversion.take() {
                    bar.finish_and_clear();
                }
                if self.finished.contains(&p.index) {
                    return None;
                }
                let bar = self.frame_bars.entry(p.index).or_insert_with(|| {
                    let b = self.bars.add(ProgressBar::new(p.steps as u64));
                    b.set_style(style("{prefix:>9} [{bar:40}] {pos}/{len} steps"));
                    b.set_prefix(format!("frame {}", p.index + 1));
                    b
                });
                bar.set_length(p.steps as u64);
                bar.set_position(p.step as u64);
                // A frame with characters runs two passes: its steps count for half a step each.
                let done = p.step as u64 * self.steps / (p.steps as u64).max(1);
                self.in_flight.insert(p.index, done.min(self.steps));
                self.redraw_overall();
                None
            }
            pb::job_event::Event::Frame(f) => {
                if !frame_is_final(&f) || !self.finished.insert(f.index) {
                    return None;
                }
                self.in_flight.remove(&f.index);
                if let Some(bar) = self.frame_bars.remove(&f.index) {
                    bar.finish_and_clear();
                }
                if !f.error.is_empty() {
                    self.println(format!("frame {} failed: {}", f.index + 1, f.error));
                }
                self.redraw_overall();
                Some(f)
            }
        }
    }

    pub fn finish(&self) {
        for bar in self.anchor_bars.values() {
            bar.finish_and_clear();
        }
        for bar in self.frame_bars.values() {
            bar.finish_and_clear();
        }
        self.overall.finish();
    }

    /// Leaves the bars where they are (interrupted).
    pub fn abandon(&self) {
        for bar in self.frame_bars.values() {
            bar.abandon();
        }
        self.overall.abandon();
    }
}
