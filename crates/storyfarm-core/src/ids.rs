//! Typed ids: one newtype per domain word, so a job id can never be passed as a project id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::storyboard::ValidationError;

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The id of a ", $what, ".")]
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Parses an id given as `field` of a request, naming the field on error.
            pub fn parse_field(field: &str, value: &str) -> Result<Self, ValidationError> {
                value.parse().map_err(|_| {
                    ValidationError::new(field, format!("not a valid {} id: {value:?}", $what))
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(Self(Uuid::parse_str(s)?))
            }
        }
    };
}

id_type!(ProjectId, "project");
id_type!(ReferenceId, "reference");
id_type!(StoryboardId, "storyboard");
id_type!(JobId, "job");
id_type!(TaskId, "task");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_name_the_field() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        let e = ProjectId::parse_field("project_id", "nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "project_id: not a valid project id: \"nope\""
        );
    }
}
