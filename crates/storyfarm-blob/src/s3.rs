//! A blob store in an S3-compatible bucket (AWS S3, s3s-fs, garage, MinIO) through aws-sdk-s3.
//!
//! A key `k` is the object `<prefix>/k` of the configured bucket (just `k` with an empty prefix).
//! Objects larger than [`MULTIPART_THRESHOLD`] are uploaded in parts of [`MULTIPART_PART_SIZE`]; a
//! failed multipart upload is aborted. The SDK's own retries (standard mode) apply to every request;
//! what still fails is translated once, in [`translate_s3_failure`].

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, ByteStreamError};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::error::{BlobError, Result};
use crate::key::{validate_prefix, BlobKey};
use crate::local::sync_directory;
use crate::BlobStore;

/// Objects larger than this are uploaded with a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;
/// The size of every part but the last (S3 requires at least 5 MiB).
pub const MULTIPART_PART_SIZE: usize = 8 * 1024 * 1024;

/// Where an [`S3Store`] keeps its objects and how it authenticates.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// A custom endpoint such as `http://127.0.0.1:9014`; `None` for AWS itself.
    /// Env: `STORYFARM_S3_ENDPOINT`.
    pub endpoint: Option<String>,
    /// Env: `STORYFARM_S3_REGION`, default `us-east-1`.
    pub region: String,
    /// Env: `STORYFARM_S3_BUCKET` (required by `from_env`).
    pub bucket: String,
    /// The namespace inside the bucket, without leading or trailing `/`; empty for the bucket root.
    /// Env: `STORYFARM_S3_PREFIX`, default empty.
    pub prefix: String,
    /// Static credentials; when either is `None` the default AWS provider chain is used (env,
    /// profile files, web identity, ECS/IMDS). Env: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`) instead of virtual-hosted (`bucket.endpoint/key`);
    /// needed by most self-hosted servers. Env: `STORYFARM_S3_PATH_STYLE` (`true`/`false`/`1`/`0`),
    /// default `true` when an endpoint is set, else `false`.
    pub force_path_style: bool,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("force_path_style", &self.force_path_style)
            .finish()
    }
}

impl S3Config {
    /// Reads the configuration from the environment variables named on each field.
    pub fn from_env() -> Result<S3Config> {
        S3Config::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`S3Config::from_env`], with variables looked up by `lookup` (tests, URL overrides).
    /// Empty values count as unset.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<S3Config> {
        let variable = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let Some(bucket) = variable("STORYFARM_S3_BUCKET") else {
            return Err(BlobError::Config {
                message: "STORYFARM_S3_BUCKET is not set".to_owned(),
            });
        };
        let endpoint = variable("STORYFARM_S3_ENDPOINT");
        let force_path_style = match variable("STORYFARM_S3_PATH_STYLE").as_deref() {
            None => endpoint.is_some(),
            Some("true" | "1") => true,
            Some("false" | "0") => false,
            Some(other) => {
                return Err(BlobError::Config {
                    message: format!(
                        "STORYFARM_S3_PATH_STYLE must be true or false, got {other:?}"
                    ),
                })
            }
        };
        let prefix = variable("STORYFARM_S3_PREFIX").unwrap_or_default();
        Ok(S3Config {
            endpoint,
            region: variable("STORYFARM_S3_REGION").unwrap_or_else(|| "us-east-1".to_owned()),
            bucket,
            prefix: prefix.trim_matches('/').to_owned(),
            access_key_id: variable("AWS_ACCESS_KEY_ID"),
            secret_access_key: variable("AWS_SECRET_ACCESS_KEY"),
            force_path_style,
        })
    }
}

/// A [`BlobStore`] in one bucket, under one prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or the prefix followed by `/`.
    object_prefix: String,
}

impl S3Store {
    pub async fn new(config: S3Config) -> Result<S3Store> {
        let prefix = config.prefix.trim_matches('/');
        if !prefix.is_empty() {
            BlobKey::new(prefix).map_err(|error| BlobError::Config {
                message: format!("S3 prefix: {error}"),
            })?;
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()));
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(access_key_id), Some(secret_access_key)) =
            (&config.access_key_id, &config.secret_access_key)
        {
            loader = loader.credentials_provider(Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "storyfarm-config",
            ));
        }
        let sdk_config = loader.load().await;
        let mut s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .force_path_style(config.force_path_style);
        if config.endpoint.is_some() {
            // Self-hosted servers differ in their support of the newer flexible checksums.
            s3_config =
                s3_config.request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        }
        Ok(S3Store {
            client: Client::from_conf(s3_config.build()),
            bucket: config.bucket,
            object_prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    /// Creates the bucket unless it exists already (for tests and development setups).
    pub async fn ensure_bucket(&self) -> Result<()> {
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => {
                debug!(bucket = %self.bucket, "bucket created");
                Ok(())
            }
            Err(error) => {
                let code = error
                    .as_service_error()
                    .and_then(|service_error| service_error.code());
                if matches!(
                    code,
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) {
                    return Ok(());
                }
                Err(translate_s3_failure(
                    &format!("bucket {}", self.bucket),
                    error.into(),
                ))
            }
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn object_key(&self, key: &BlobKey) -> String {
        format!("{}{}", self.object_prefix, key)
    }

    async fn put_multipart(&self, key: &BlobKey, bytes: Bytes) -> Result<()> {
        let object_key = self.object_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
        let Some(upload_id) = created.upload_id else {
            return Err(translate_s3_failure(
                key.as_str(),
                S3Failure::Protocol("CreateMultipartUpload returned no upload id".to_owned()),
            ));
        };
        match self.upload_parts(key, &object_key, &upload_id, bytes).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let aborted = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&object_key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                if let Err(abort_error) = aborted {
                    warn!(key = %key, upload_id, error = %DisplayErrorContext(&abort_error), "could not abort multipart upload");
                }
                Err(error)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &BlobKey,
        object_key: &str,
        upload_id: &str,
        bytes: Bytes,
    ) -> Result<()> {
        let mut completed_parts = Vec::new();
        for (index, start) in (0..bytes.len()).step_by(MULTIPART_PART_SIZE).enumerate() {
            let part_number = i32::try_from(index + 1).map_err(|_| BlobError::Backend {
                key: key.to_string(),
                message: "object has too many parts".to_owned(),
                retryable: false,
            })?;
            let end = (start + MULTIPART_PART_SIZE).min(bytes.len());
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .part_number(part_number)
                .body(ByteStream::from(bytes.slice(start..end)))
                .send()
                .await
                .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
            completed_parts.push(
                CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(uploaded.e_tag)
                    .build(),
            );
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed_parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
        Ok(())
    }
}

/// What can fail in this backend, before translation into a [`BlobError`] kind.
enum S3Failure {
    /// A request failed: service error, timeout, connection or construction problem.
    Request {
        status: Option<u16>,
        code: Option<String>,
        is_transient: bool,
        message: String,
    },
    /// Reading a response body failed midway.
    Body(ByteStreamError),
    /// Writing a downloaded object to a local file failed.
    LocalFile(std::io::Error),
    /// The server answered something S3 does not.
    Protocol(String),
}

impl<E> From<SdkError<E, HttpResponse>> for S3Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn from(error: SdkError<E, HttpResponse>) -> S3Failure {
        let is_transient = match &error {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
            SdkError::DispatchFailure(failure) => failure.is_io() || failure.is_timeout(),
            _ => false,
        };
        S3Failure::Request {
            status: error
                .raw_response()
                .map(|response| response.status().as_u16()),
            code: error
                .as_service_error()
                .and_then(|service_error| service_error.code())
                .map(str::to_owned),
            is_transient,
            message: DisplayErrorContext(&error).to_string(),
        }
    }
}

impl From<ByteStreamError> for S3Failure {
    fn from(error: ByteStreamError) -> S3Failure {
        S3Failure::Body(error)
    }
}

impl From<std::io::Error> for S3Failure {
    fn from(error: std::io::Error) -> S3Failure {
        S3Failure::LocalFile(error)
    }
}

/// Translates a failure on `key` into a blob error kind: the one place this backend does so.
fn translate_s3_failure(key: &str, failure: S3Failure) -> BlobError {
    let backend = |message: String, retryable: bool| BlobError::Backend {
        key: key.to_owned(),
        message,
        retryable,
    };
    match failure {
        S3Failure::Request {
            status,
            code,
            is_transient,
            message,
        } => {
            let is_missing_object = matches!(code.as_deref(), Some("NoSuchKey" | "NotFound"))
                || (status == Some(404) && code.is_none());
            if is_missing_object {
                return BlobError::NotFound {
                    key: key.to_owned(),
                };
            }
            let retryable = is_transient
                || matches!(status, Some(408 | 429 | 500..=599))
                || matches!(
                    code.as_deref(),
                    Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                );
            let status_text = status
                .map(|status| format!(" (http {status})"))
                .unwrap_or_default();
            backend(
                format!("s3 request failed{status_text}: {message}"),
                retryable,
            )
        }
        S3Failure::Body(error) => backend(
            format!("s3 response body failed: {}", DisplayErrorContext(&error)),
            true,
        ),
        S3Failure::LocalFile(error) => {
            let retryable = matches!(
                error.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            );
            backend(
                format!("writing the downloaded object failed: {error}"),
                retryable,
            )
        }
        S3Failure::Protocol(message) => backend(format!("unexpected s3 answer: {message}"), false),
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn put(&self, key: &BlobKey, bytes: Bytes) -> Result<()> {
        let byte_count = bytes.len();
        if byte_count > MULTIPART_THRESHOLD {
            self.put_multipart(key, bytes).await?;
        } else {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.object_key(key))
                .body(ByteStream::from(bytes))
                .send()
                .await
                .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
        }
        debug!(key = %key, bytes = byte_count, backend = "s3", bucket = %self.bucket, "blob put");
        Ok(())
    }

    async fn get(&self, key: &BlobKey) -> Result<Bytes> {
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
            .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
        let bytes = response
            .body
            .collect()
            .await
            .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?
            .into_bytes();
        debug!(key = %key, bytes = bytes.len(), backend = "s3", bucket = %self.bucket, "blob get");
        Ok(bytes)
    }

    async fn get_to_file(&self, key: &BlobKey, path: &Path) -> Result<()> {
        let translate = |failure: S3Failure| translate_s3_failure(key.as_str(), failure);
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
            .map_err(|error| translate(error.into()))?;
        let directory = path.parent().unwrap_or(Path::new(".")).to_owned();
        let temp_file = tempfile::Builder::new()
            .prefix(".tmp")
            .tempfile_in(&directory)
            .map_err(|error| translate(error.into()))?;
        // The temp path deletes its file when dropped unless persisted, so failures leave nothing.
        let (file, temp_path) = temp_file.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut body = response.body;
        let mut byte_count = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| translate(error.into()))?;
            file.write_all(&chunk)
                .await
                .map_err(|error| translate(error.into()))?;
            byte_count += chunk.len();
        }
        file.flush()
            .await
            .map_err(|error| translate(error.into()))?;
        file.sync_all()
            .await
            .map_err(|error| translate(error.into()))?;
        drop(file);
        let destination = path.to_owned();
        tokio::task::spawn_blocking(move || {
            temp_path
                .persist(&destination)
                .map_err(|error| error.error)?;
            sync_directory(&directory)
        })
        .await
        .map_err(|error| translate(std::io::Error::other(error).into()))?
        .map_err(|error| translate(error.into()))?;
        debug!(key = %key, bytes = byte_count, path = %path.display(), backend = "s3", "blob get to file");
        Ok(())
    }

    /// HeadObject. S3 answers a bodiless 404 to HEAD for a missing key and for a missing bucket
    /// alike, so a missing bucket reads as `false` here; `put`, `get` and `list` report it.
    async fn exists(&self, key: &BlobKey) -> Result<bool> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await;
        match head.map_err(|error| translate_s3_failure(key.as_str(), error.into())) {
            Ok(_) => Ok(true),
            Err(BlobError::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
            .map_err(|error| translate_s3_failure(key.as_str(), error.into()))?;
        debug!(key = %key, backend = "s3", bucket = %self.bucket, "blob deleted");
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobKey>> {
        validate_prefix(prefix)?;
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.object_prefix))
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| translate_s3_failure(prefix, error.into()))?;
            for object in page.contents() {
                let Some(object_key) = object.key() else {
                    continue;
                };
                let Some(relative) = object_key.strip_prefix(&self.object_prefix) else {
                    continue;
                };
                match BlobKey::new(relative) {
                    Ok(key) => keys.push(key),
                    Err(error) => {
                        warn!(object_key, %error, "skipping an object whose name is no blob key")
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_from(variables: &[(&str, &str)]) -> Result<S3Config> {
        S3Config::from_vars(|name| {
            variables
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn config_from_env_names_defaults() {
        let config = config_from(&[("STORYFARM_S3_BUCKET", "frames")]).unwrap();
        assert_eq!(config.bucket, "frames");
        assert_eq!(config.region, "us-east-1");
        assert_eq!(config.endpoint, None);
        assert_eq!(config.prefix, "");
        assert!(!config.force_path_style);
        assert_eq!(config.access_key_id, None);
    }

    #[test]
    fn config_from_env_reads_every_variable() {
        let config = config_from(&[
            ("STORYFARM_S3_BUCKET", "frames"),
            ("STORYFARM_S3_ENDPOINT", "http://127.0.0.1:9014"),
            ("STORYFARM_S3_REGION", "eu-west-1"),
            ("STORYFARM_S3_PREFIX", "/studio/a/"),
            ("AWS_ACCESS_KEY_ID", "key"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ])
        .unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:9014"));
        assert_eq!(config.region, "eu-west-1");
        assert_eq!(config.prefix, "studio/a");
        assert!(
            config.force_path_style,
            "path style defaults on with a custom endpoint"
        );
        assert_eq!(config.access_key_id.as_deref(), Some("key"));
        assert!(
            !format!("{config:?}").contains("secret\""),
            "secret must not be printed"
        );
        let virtual_hosted = config_from(&[
            ("STORYFARM_S3_BUCKET", "frames"),
            ("STORYFARM_S3_ENDPOINT", "http://s3.local"),
            ("STORYFARM_S3_PATH_STYLE", "false"),
        ])
        .unwrap();
        assert!(!virtual_hosted.force_path_style);
    }

    #[test]
    fn config_errors_name_the_variable() {
        let missing = config_from(&[]).unwrap_err().to_string();
        assert!(missing.contains("STORYFARM_S3_BUCKET"), "{missing}");
        let bad = config_from(&[
            ("STORYFARM_S3_BUCKET", "b"),
            ("STORYFARM_S3_PATH_STYLE", "yes"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("STORYFARM_S3_PATH_STYLE") && bad.contains("yes"),
            "{bad}"
        );
    }

    #[test]
    fn failures_translate_to_kinds() {
        let request = |status, code: Option<&str>| S3Failure::Request {
            status,
            code: code.map(str::to_owned),
            is_transient: false,
            message: "m".to_owned(),
        };
        assert!(translate_s3_failure("k", request(Some(404), Some("NoSuchKey"))).is_not_found());
        assert!(translate_s3_failure("k", request(Some(404), None)).is_not_found());
        let no_bucket = translate_s3_failure("k", request(Some(404), Some("NoSuchBucket")));
        assert!(
            !no_bucket.is_not_found() && !no_bucket.is_retryable(),
            "{no_bucket:?}"
        );
        assert!(translate_s3_failure("k", request(Some(503), Some("SlowDown"))).is_retryable());
        assert!(translate_s3_failure("k", request(Some(500), None)).is_retryable());
        let denied = translate_s3_failure("k", request(Some(403), Some("AccessDenied")));
        assert!(!denied.is_retryable());
        assert!(denied.to_string().starts_with("blob k: "), "{denied}");
    }
}
