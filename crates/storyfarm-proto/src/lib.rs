//! Generated types and gRPC stubs of `storyfarm.v1` (public API and internal task messages).

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("storyfarm.v1");

    /// Encoded `FileDescriptorSet` of every storyfarm proto file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/storyfarm_descriptor.bin"));

    impl Task {
        /// The task's kind as the store and the metrics name it.
        pub fn kind_name(&self) -> &'static str {
            match &self.work {
                Some(task::Work::Invert(_)) => "invert",
                Some(task::Work::Anchor(_)) => "anchor",
                Some(task::Work::Render(_)) => "render",
                None => "unknown",
            }
        }
    }
}

mod convert {
    //! Conversions between the wire messages and storyfarm-core's domain types.

    use storyfarm_core::{ConsistoryOptions, StyleOptions};

    use crate::v1::{ConsistorySettings, ConsistoryWork, StyleAlignedOptions};

    /// ConsiStory options travel as two messages of the same fields (public API and task).
    macro_rules! consistory_message {
        ($message:ty) => {
            impl From<&ConsistoryOptions> for $message {
                fn from(o: &ConsistoryOptions) -> Self {
                    Self {
                        mask_dropout: o.mask_dropout,
                        injection_alpha: o.injection_alpha,
                        freeu: o.freeu,
                        query_blend: o.query_blend,
                        feature_injection: o.feature_injection,
                    }
                }
            }

            impl From<$message> for ConsistoryOptions {
                fn from(o: $message) -> Self {
                    Self {
                        mask_dropout: o.mask_dropout,
                        injection_alpha: o.injection_alpha,
                        freeu: o.freeu,
                        query_blend: o.query_blend,
                        feature_injection: o.feature_injection,
                    }
                }
            }
        };
    }

    consistory_message!(ConsistorySettings);
    consistory_message!(ConsistoryWork);

    impl From<&StyleOptions> for StyleAlignedOptions {
        fn from(o: &StyleOptions) -> Self {
            Self {
                share_group_norm: o.share_group_norm,
                share_attention: o.share_attention,
                adain_queries: o.adain_queries,
                adain_keys: o.adain_keys,
                adain_values: o.adain_values,
                shared_score_scale: o.shared_score_scale,
                shared_score_shift: o.shared_score_shift,
                only_self_level: o.only_self_level,
            }
        }
    }

    impl From<StyleAlignedOptions> for StyleOptions {
        fn from(o: StyleAlignedOptions) -> Self {
            Self {
                share_group_norm: o.share_group_norm,
                share_attention: o.share_attention,
                adain_queries: o.adain_queries,
                adain_keys: o.adain_keys,
                adain_values: o.adain_values,
                shared_score_scale: o.shared_score_scale,
                shared_score_shift: o.shared_score_shift,
                only_self_level: o.only_self_level,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn style_options_round_trip() {
            let o = StyleOptions {
                shared_score_shift: 0.69,
                share_group_norm: false,
                ..StyleOptions::default()
            };
            assert_eq!(StyleOptions::from(StyleAlignedOptions::from(&o)), o);
        }

        #[test]
        fn consistory_options_round_trip() {
            let o = ConsistoryOptions {
                mask_dropout: 0.3,
                injection_alpha: 0.7,
                freeu: false,
                query_blend: true,
                feature_injection: false,
            };
            assert_eq!(ConsistoryOptions::from(ConsistorySettings::from(&o)), o);
            assert_eq!(ConsistoryOptions::from(ConsistoryWork::from(&o)), o);
        }
    }
}
