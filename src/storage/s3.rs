//! An [`ObjectStore`] on S3 or any S3-compatible server (`s3://bucket/prefix`).
//!
//! Owns the mapping of keys to `<prefix>/<key>` in one bucket and every S3 request the program
//! makes. Uploads stream: a body that ends within the first part is one `PutObject`, a larger one
//! is a multipart upload with at most two parts in memory (one uploading while the next is read),
//! completed only after every part is stored, and aborted on any error. S3 makes an object visible
//! only when `PutObject` or `CompleteMultipartUpload` succeeds, which gives the contract's atomic
//! visibility; [`PutMode::CreateNew`] sends `If-None-Match: *` on that final request, so two
//! writers racing for one key cannot both win.
//!
//! Requests are retried by the SDK (standard mode, [`MAX_ATTEMPTS`] attempts, exponential backoff
//! with jitter). A download interrupted mid-body is resumed from where it stopped with a ranged
//! `GetObject` pinned to the object's ETag (`If-Match`), so a long restore survives a dropped
//! connection without ever mixing two versions of an object.
//!
//! It must never hold a whole object in memory, never put credentials in an error message or a
//! log line (messages carry the operation, key, S3 error code, HTTP status and request id), and
//! never read or write outside its prefix. Aborted uploads whose abort request itself failed
//! (or whose process died) leave invisible parts behind: give the bucket a lifecycle rule that
//! aborts incomplete multipart uploads after a day.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use bytes::Bytes;

use download::{Download, total_size};

use crate::retry::Backoff;
use upload::{AbortOnDrop, PartReader, Upload, abort_upload, part_size};

use super::{
    ByteStream, ListPage, ObjectMeta, ObjectStore, PutMode, Result, StorageError, check_range,
    validate_key, validate_prefix,
};

/// Size of the first 1000 parts of a multipart upload (and the threshold for using one). Later
/// parts grow, see [`part_size`].
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Attempts per request (the first try included), by the SDK's standard retry strategy.
pub const MAX_ATTEMPTS: u32 = 5;
/// S3's limit on the number of parts of one upload.
const MAX_PARTS: i32 = 10_000;
/// Times one download may be resumed after its body was interrupted.
const MAX_RESUMES: u32 = 5;
/// Attempts of a conditional write that S3 answered with 409 ConditionalRequestConflict (another
/// conditional write to the key was in flight; S3 asks the client to retry).
const CONFLICT_ATTEMPTS: u32 = 3;
/// Waits between our own retries (resumed downloads, conditional-write conflicts).
const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// ListObjectsV2 returns at most this many keys a page.
const MAX_LIST_KEYS: usize = 1000;

/// Where the repository lives in S3 (from the `[storage]` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Prepended to every key with a `/`; may be empty. Leading and trailing `/` are ignored.
    pub prefix: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:8433`); `None` for AWS itself.
    pub endpoint: Option<String>,
    /// Signing region; empty means `us-east-1`.
    pub region: String,
    /// Path-style URLs (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub force_path_style: bool,
}

/// See the module documentation. Cloning is cheap and shares the HTTP connection pool.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Normalised: empty, or without leading or trailing `/`.
    prefix: String,
    endpoint: Option<String>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's own Debug output is large and says nothing useful here.
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A store whose credentials come from the standard AWS chain (environment variables such as
    /// `AWS_ACCESS_KEY_ID`, shared profile files, web identity, instance metadata).
    pub async fn new(settings: S3Settings) -> Result<S3Store> {
        let prefix = normalise_prefix(&settings.prefix)?;
        check_bucket(&settings.bucket)?;
        let sdk_config = aws_config::defaults(BehaviorVersion::latest())
            .region(region(&settings))
            .load()
            .await;
        let config = tune(aws_sdk_s3::config::Builder::from(&sdk_config), &settings).build();
        Ok(S3Store {
            client: Client::from_conf(config),
            bucket: settings.bucket,
            prefix,
            endpoint: settings.endpoint,
        })
    }

    /// A store with explicit credentials, reading nothing from the environment (tests use this so
    /// that no process-global variable is shared between them).
    pub fn with_static_credentials(
        settings: S3Settings,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<S3Store> {
        let prefix = normalise_prefix(&settings.prefix)?;
        check_bucket(&settings.bucket)?;
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "updog-backup-static",
        );
        let builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region(&settings))
            .credentials_provider(credentials);
        let config = tune(builder, &settings).build();
        Ok(S3Store {
            client: Client::from_conf(config),
            bucket: settings.bucket,
            prefix,
            endpoint: settings.endpoint,
        })
    }

    /// A store on a client configured by the caller (retries and timeouts are then the caller's).
    pub fn with_client(client: Client, bucket: impl Into<String>, prefix: &str) -> Result<S3Store> {
        let bucket = bucket.into();
        check_bucket(&bucket)?;
        Ok(S3Store {
            client,
            bucket,
            prefix: normalise_prefix(prefix)?,
            endpoint: None,
        })
    }

    /// The underlying client (for tests and administrative tasks such as creating the bucket).
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The normalised key prefix (empty, or without leading and trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The S3 key of a store key.
    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The store key of an S3 key listed under our prefix.
    fn store_key<'a>(&self, object_key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(object_key)
        } else {
            object_key
                .strip_prefix(self.prefix.as_str())?
                .strip_prefix('/')
        }
    }

    async fn put_single(
        &self,
        key: &str,
        object_key: &str,
        data: Bytes,
        mode: PutMode,
    ) -> Result<()> {
        conditional_write(mode, key, "PutObject", || {
            // `Bytes` bodies are replayable, which is what lets the SDK retry this request.
            let request = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(object_key)
                .content_length(length_header(data.len()))
                .body(SdkByteStream::from(data.clone()));
            match mode {
                PutMode::CreateNew => request.if_none_match("*").send(),
                PutMode::Overwrite => request.send(),
            }
        })
        .await
    }

    async fn put_multipart(
        &self,
        key: &str,
        object_key: &str,
        first: Bytes,
        parts: PartReader,
        mode: PutMode,
    ) -> Result<u64> {
        if mode == PutMode::CreateNew && self.head(key).await?.is_some() {
            // Fail before uploading a large body that could never complete; the conditional
            // CompleteMultipartUpload remains the atomic check.
            return Err(StorageError::AlreadyExists {
                key: key.to_string(),
            });
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object_key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|err| s3_error("CreateMultipartUpload", key, &err))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(StorageError::S3 {
                operation: "CreateMultipartUpload",
                key: key.to_string(),
                status: None,
                message: "response has no upload id".to_string(),
            });
        };
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object_key: object_key.to_string(),
            upload_id: Some(upload_id.to_string()),
        };
        let upload = Upload {
            store: self,
            key,
            object_key,
            upload_id,
        };
        match upload.run(first, parts, mode).await {
            Ok(size) => {
                guard.upload_id = None;
                Ok(size)
            }
            Err(err) => {
                // Abort here rather than in the guard so that, when `put` returns, no part of the
                // failed upload is left (the guard only covers cancellation).
                if let Some(upload_id) = guard.upload_id.take() {
                    abort_upload(&self.client, &self.bucket, object_key, &upload_id).await;
                }
                Err(err)
            }
        }
    }

    /// `GetObject`, optionally of `range` and pinned to `etag`; maps the errors of the contract.
    async fn get_object(
        &self,
        key: &str,
        range: Option<&Range<u64>>,
        etag: Option<&str>,
    ) -> Result<GetObjectOutput> {
        let mut request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key));
        if let Some(range) = range {
            // HTTP ranges are inclusive; the caller guarantees `start < end`.
            request = request.range(format!("bytes={}-{}", range.start, range.end - 1));
        }
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        match request.send().await {
            Ok(output) => Ok(output),
            // A missing bucket also answers 404: that is a configuration error, not an
            // absent object (which would read as "repository not initialised").
            Err(err)
                if (status(&err) == Some(404) && !is_missing_bucket(&err))
                    || err.as_service_error().is_some_and(|e| e.is_no_such_key()) =>
            {
                Err(StorageError::NotFound {
                    key: key.to_string(),
                })
            }
            Err(err) if status(&err) == Some(416) => {
                // The range starts at or after the end: report it with the object's size.
                let size = self
                    .head(key)
                    .await?
                    .ok_or_else(|| StorageError::NotFound {
                        key: key.to_string(),
                    })?
                    .size;
                let range = range.cloned().unwrap_or(0..0);
                Err(StorageError::InvalidRange {
                    key: key.to_string(),
                    start: range.start,
                    end: range.end,
                    size,
                })
            }
            Err(err) => Err(s3_error("GetObject", key, &err)),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: ByteStream, mode: PutMode) -> Result<u64> {
        validate_key(key)?;
        let object_key = self.object_key(key);
        let mut parts = PartReader {
            body,
            leftover: None,
            ended: false,
        };
        let first = parts
            .next_part(part_size(1))
            .await
            .map_err(|e| StorageError::io(key, e))?;
        if parts.finished() {
            let size = first.len() as u64;
            self.put_single(key, &object_key, first, mode).await?;
            return Ok(size);
        }
        self.put_multipart(key, &object_key, first, parts, mode)
            .await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        validate_key(key)?;
        if let Some(range) = range.as_ref().filter(|range| range.start >= range.end) {
            // An empty (or inverted) range has no HTTP form; answer it from the object's size.
            let size = self
                .head(key)
                .await?
                .ok_or_else(|| StorageError::NotFound {
                    key: key.to_string(),
                })?
                .size;
            check_range(key, range, size)?;
            return Ok(Box::pin(futures::stream::empty()));
        }
        let output = self.get_object(key, range.as_ref(), None).await?;
        let length = output.content_length().and_then(|n| u64::try_from(n).ok());
        let (start, end) = match &range {
            Some(range) => {
                // S3 clamps a range that runs past the end; the contract refuses it instead.
                if let Some(size) = output
                    .content_range()
                    .and_then(total_size)
                    .filter(|size| *size < range.end)
                {
                    return Err(StorageError::InvalidRange {
                        key: key.to_string(),
                        start: range.start,
                        end: range.end,
                        size,
                    });
                }
                if length != Some(range.end - range.start) {
                    return Err(StorageError::S3 {
                        operation: "GetObject",
                        key: key.to_string(),
                        status: None,
                        message: format!(
                            "asked for bytes {}..{}, got a body of {length:?} bytes (Content-Range {:?})",
                            range.start,
                            range.end,
                            output.content_range()
                        ),
                    });
                }
                (range.start, range.end)
            }
            None => {
                let Some(length) = length else {
                    return Err(StorageError::S3 {
                        operation: "GetObject",
                        key: key.to_string(),
                        status: None,
                        message: "response has no Content-Length".to_string(),
                    });
                };
                (0, length)
            }
        };
        let download = Download {
            store: self.clone(),
            key: key.to_string(),
            etag: output.e_tag().map(str::to_string),
            body: Some(output.body),
            pos: start,
            end,
            resumes_left: MAX_RESUMES,
            backoff: RETRY_BACKOFF.clone(),
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            download,
            |mut download| async move {
                let item = download.next_chunk().await?;
                Some((item, download))
            },
        )))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(output) => {
                let size = output
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| StorageError::S3 {
                        operation: "HeadObject",
                        key: key.to_string(),
                        status: None,
                        message: "response has no valid Content-Length".to_string(),
                    })?;
                Ok(Some(ObjectMeta {
                    key: key.to_string(),
                    size,
                }))
            }
            Err(err)
                if status(&err) == Some(404)
                    || err.as_service_error().is_some_and(|e| e.is_not_found()) =>
            {
                Ok(None)
            }
            Err(err) => Err(s3_error("HeadObject", key, &err)),
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage> {
        validate_prefix(prefix)?;
        // Store prefix `p` and list prefix `` must list `p/…`, never `p2/…`.
        let object_prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let max_keys = i32::try_from(limit.clamp(1, MAX_LIST_KEYS)).unwrap_or(1000);
        let mut token = continuation;
        loop {
            let output = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&object_prefix)
                .max_keys(max_keys)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|err| s3_error("ListObjectsV2", prefix, &err))?;
            let objects: Vec<ObjectMeta> = output
                .contents()
                .iter()
                .filter_map(|object| {
                    let key = self.store_key(object.key()?)?;
                    // Objects no backend could have written (e.g. `dir/` markers made by other
                    // tools) are not part of the repository.
                    validate_key(key).ok()?;
                    Some(ObjectMeta {
                        key: key.to_string(),
                        size: object
                            .size()
                            .and_then(|n| u64::try_from(n).ok())
                            .unwrap_or(0),
                    })
                })
                .collect();
            let next = if output.is_truncated() == Some(true) {
                match output.next_continuation_token() {
                    Some(next) if token.as_deref() != Some(next) => Some(next.to_string()),
                    _ => {
                        return Err(StorageError::S3 {
                            operation: "ListObjectsV2",
                            key: prefix.to_string(),
                            status: None,
                            message: "truncated listing without a new continuation token"
                                .to_string(),
                        });
                    }
                }
            } else {
                None
            };
            if objects.is_empty() && next.is_some() {
                // Every key of this page was filtered out: fetch the next one rather than hand
                // back an empty page.
                token = next;
                continue;
            }
            return Ok(ListPage { objects, next });
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 answers 204 for a missing key; some compatible servers answer 404.
            Err(err) if status(&err) == Some(404) => Ok(()),
            Err(err) => Err(s3_error("DeleteObject", key, &err)),
        }
    }

    fn describe(&self) -> String {
        let mut location = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            location.push('/');
            location.push_str(&self.prefix);
        }
        if let Some(endpoint) = &self.endpoint {
            location.push_str(&format!(" (endpoint {endpoint})"));
        }
        location
    }
}

/// Retries, timeouts and addressing shared by every way of building the client.
fn tune(
    builder: aws_sdk_s3::config::Builder,
    settings: &S3Settings,
) -> aws_sdk_s3::config::Builder {
    let retry = RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(20));
    // The attempt timeout covers sending one part (8–64 MiB) and reading the response headers;
    // a stalled body on either side is cut earlier by the SDK's stalled-stream protection.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(300))
        .build();
    let mut builder = builder
        .retry_config(retry)
        .timeout_config(timeouts)
        .force_path_style(settings.force_path_style);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    builder
}

fn region(settings: &S3Settings) -> Region {
    let region = if settings.region.is_empty() {
        "us-east-1"
    } else {
        settings.region.as_str()
    };
    Region::new(region.to_string())
}

fn check_bucket(bucket: &str) -> Result<()> {
    if bucket.is_empty() || bucket.contains('/') {
        return Err(StorageError::Config(format!(
            "invalid S3 bucket name {bucket:?}"
        )));
    }
    Ok(())
}

fn normalise_prefix(prefix: &str) -> Result<String> {
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        validate_key(prefix).map_err(|err| StorageError::Config(format!("S3 prefix: {err}")))?;
    }
    Ok(prefix.to_string())
}

/// Sends the request that makes an object visible (`PutObject`, `CompleteMultipartUpload`),
/// mapping the answers of a create-new write: 412 means the key exists; 409 means another
/// conditional write to the key was in flight, which S3 asks clients to retry (after the retries,
/// the other writer has most likely won, so it is reported as `AlreadyExists` too).
async fn conditional_write<T, E, F, Fut>(
    mode: PutMode,
    key: &str,
    operation: &'static str,
    mut send: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut attempt = 1;
    let mut backoff = RETRY_BACKOFF.clone();
    loop {
        let err = match send().await {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if mode == PutMode::Overwrite {
            return Err(s3_error(operation, key, &err));
        }
        let (status, code) = (
            status(&err),
            err.as_service_error().and_then(ProvideErrorMetadata::code),
        );
        let exists = status == Some(412) || code == Some("PreconditionFailed");
        let conflict = status == Some(409) || code == Some("ConditionalRequestConflict");
        if conflict && attempt < CONFLICT_ATTEMPTS {
            let jitter = Duration::from_millis(fastrand::u64(0..100));
            tokio::time::sleep(backoff.next_delay() + jitter).await;
            attempt += 1;
            continue;
        }
        if exists || conflict {
            return Err(StorageError::AlreadyExists {
                key: key.to_string(),
            });
        }
        return Err(s3_error(operation, key, &err));
    }
}

/// The `Content-Length` of an in-memory body (parts are at most 64 MiB, far below `i64::MAX`).
fn length_header(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

fn is_missing_bucket<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.as_service_error().and_then(ProvideErrorMetadata::code) == Some("NoSuchBucket")
}

fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response()
        .map(|response| response.status().as_u16())
}

fn s3_error<E>(operation: &'static str, key: &str, err: &SdkError<E>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    StorageError::S3 {
        operation,
        key: key.to_string(),
        status: status(err),
        message: describe_sdk_error(err),
    }
}

/// A one-line description of a failed request: the S3 error code and message, the HTTP status and
/// the request id for a service error, otherwise the cause chain (connection refused, timeout…).
/// The SDK never puts credentials in either.
fn describe_sdk_error<E>(err: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut message = match err.as_service_error() {
        Some(service) => {
            let mut message = service.code().unwrap_or("unknown error code").to_string();
            if let Some(text) = service.message() {
                message.push_str(": ");
                message.push_str(text);
            }
            message
        }
        None => DisplayErrorContext(err).to_string(),
    };
    if let Some(status) = status(err) {
        message.push_str(&format!(" (HTTP {status}"));
        if let Some(request_id) = err.request_id() {
            message.push_str(&format!(", request id {request_id}"));
        }
        message.push(')');
    }
    message
}

mod download;
mod upload;

#[cfg(test)]
mod tests;
