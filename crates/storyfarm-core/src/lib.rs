//! storyfarm's domain: ids, the storyboard (file format, validation, defaults) and the content
//! keys that make inversions and artifacts reusable. Shared by the farm and the local mode.

pub mod ids;
pub mod keys;
pub mod storyboard;
pub mod trace;

pub use ids::{JobId, ProjectId, ReferenceId, StoryboardId, TaskId};
pub use storyboard::{
    CharacterSpec, ConsistoryOptions, FrameSpec, StoryboardSpec, StyleOptions, StyleSpec,
    ValidationError,
};
