//! Streamed uploads: one `PutObject` for a body that ends within the first part, otherwise a
//! multipart upload with at most two parts in memory, completed only after every part is
//! stored and aborted on any error (also when the future is dropped).

use std::io;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::super::{ByteStream, PutMode, Result, StorageError};

use super::*;

/// Part `number` (1-based) is [`PART_SIZE`] for the first 1000 parts, then doubles every 1000
/// parts up to 64 MiB: objects up to ~490 GiB fit in S3's 10 000 parts while memory stays bounded
/// (two parts) and small objects still upload in small parts.
pub(super) fn part_size(number: i32) -> usize {
    let doublings = ((number.max(1) - 1) / 1000).min(3);
    PART_SIZE << doublings
}

/// Cuts a body stream into parts, knowing when the stream has ended.
pub(super) struct PartReader {
    pub(super) body: ByteStream,
    /// What was read past the end of the previous part.
    pub(super) leftover: Option<Bytes>,
    pub(super) ended: bool,
}

impl PartReader {
    /// The next non-empty chunk, or `None` at the end of the body.
    pub(super) async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(chunk) = self.leftover.take() {
            return Ok(Some(chunk));
        }
        while !self.ended {
            match self.body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => return Ok(Some(chunk)),
                Some(Err(err)) => return Err(err),
                None => self.ended = true,
            }
        }
        Ok(None)
    }

    /// Reads up to `size` bytes, then looks one chunk ahead so that [`Self::finished`] knows
    /// whether this was the last part.
    pub(super) async fn next_part(&mut self, size: usize) -> io::Result<Bytes> {
        let mut part = BytesMut::new();
        while part.len() < size {
            let Some(mut chunk) = self.next_chunk().await? else {
                break;
            };
            let room = size - part.len();
            if chunk.len() > room {
                self.leftover = Some(chunk.split_off(room));
            }
            if part.is_empty() && chunk.len() == size {
                // A chunk that is exactly one part needs no copy.
                return self.look_ahead(chunk).await;
            }
            part.extend_from_slice(&chunk);
        }
        self.look_ahead(part.freeze()).await
    }

    pub(super) async fn look_ahead(&mut self, part: Bytes) -> io::Result<Bytes> {
        if self.leftover.is_none() {
            self.leftover = self.next_chunk().await?;
        }
        Ok(part)
    }

    pub(super) fn finished(&self) -> bool {
        self.ended && self.leftover.is_none()
    }
}

/// One multipart upload in progress.
pub(super) struct Upload<'a> {
    pub(super) store: &'a S3Store,
    pub(super) key: &'a str,
    pub(super) object_key: &'a str,
    pub(super) upload_id: &'a str,
}

impl Upload<'_> {
    pub(super) async fn run(
        &self,
        first: Bytes,
        mut reader: PartReader,
        mode: PutMode,
    ) -> Result<u64> {
        let mut completed = Vec::new();
        let mut size = 0u64;
        let mut number = 1;
        let mut part = first;
        loop {
            if number > MAX_PARTS {
                return Err(self.error(
                    "UploadPart",
                    format!("object needs more than {MAX_PARTS} parts"),
                ));
            }
            size += part.len() as u64;
            if reader.finished() {
                completed.push(self.upload_part(number, part).await?);
                break;
            }
            // Upload this part while reading the next one: two parts in memory at most.
            let read_next = async {
                reader
                    .next_part(part_size(number + 1))
                    .await
                    .map_err(|e| StorageError::io(self.key, e))
            };
            let (done, next) = futures::try_join!(self.upload_part(number, part), read_next)?;
            completed.push(done);
            part = next;
            number += 1;
        }
        self.complete(completed, mode).await?;
        Ok(size)
    }

    pub(super) async fn upload_part(&self, number: i32, data: Bytes) -> Result<CompletedPart> {
        let output = self
            .store
            .client
            .upload_part()
            .bucket(&self.store.bucket)
            .key(self.object_key)
            .upload_id(self.upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .content_length(length_header(data.len()))
            .body(SdkByteStream::from(data))
            .send()
            .await
            .map_err(|err| s3_error("UploadPart", self.key, &err))?;
        let Some(etag) = output.e_tag() else {
            return Err(self.error(
                "UploadPart",
                format!("response for part {number} has no ETag"),
            ));
        };
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(etag)
            .set_checksum_crc32(output.checksum_crc32().map(str::to_string))
            .build())
    }

    pub(super) async fn complete(&self, parts: Vec<CompletedPart>, mode: PutMode) -> Result<()> {
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        conditional_write(mode, self.key, "CompleteMultipartUpload", || {
            let request = self
                .store
                .client
                .complete_multipart_upload()
                .bucket(&self.store.bucket)
                .key(self.object_key)
                .upload_id(self.upload_id)
                .multipart_upload(upload.clone());
            match mode {
                PutMode::CreateNew => request.if_none_match("*").send(),
                PutMode::Overwrite => request.send(),
            }
        })
        .await
    }

    pub(super) fn error(&self, operation: &'static str, message: String) -> StorageError {
        StorageError::S3 {
            operation,
            key: self.key.to_string(),
            status: None,
            message,
        }
    }
}

/// Aborts a multipart upload if the `put` that started it is dropped before finishing.
pub(super) struct AbortOnDrop {
    pub(super) client: Client,
    pub(super) bucket: String,
    pub(super) object_key: String,
    /// `None` once the upload completed or was aborted.
    pub(super) upload_id: Option<String>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        // Without a runtime (process shutting down) the lifecycle rule cleans up instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, bucket, object_key) = (
                self.client.clone(),
                self.bucket.clone(),
                self.object_key.clone(),
            );
            runtime.spawn(
                async move { abort_upload(&client, &bucket, &object_key, &upload_id).await },
            );
        }
    }
}

pub(super) async fn abort_upload(client: &Client, bucket: &str, object_key: &str, upload_id: &str) {
    let result = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(object_key)
        .upload_id(upload_id)
        .send()
        .await;
    if let Err(err) = result {
        // Nothing of it is visible; the parts only cost space until the lifecycle rule runs.
        tracing::warn!(bucket, key = object_key, error = %describe_sdk_error(&err), "could not abort a failed multipart upload");
    }
}
