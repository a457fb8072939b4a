//! Downloads that survive a dropped connection: an interrupted body is resumed with a ranged
//! `GetObject` pinned to the object's ETag (`If-Match`), so two versions are never mixed.

use std::io;

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use bytes::Bytes;

use super::*;

/// A `GetObject` body being streamed to the caller, resumed after interruptions.
pub(super) struct Download {
    pub(super) store: S3Store,
    pub(super) key: String,
    /// Pins resumed requests to the object version we started reading.
    pub(super) etag: Option<String>,
    pub(super) body: Option<SdkByteStream>,
    /// Absolute offset of the next byte to yield.
    pub(super) pos: u64,
    /// Absolute offset just past the last byte to yield.
    pub(super) end: u64,
    pub(super) resumes_left: u32,
    pub(super) backoff: crate::retry::Backoff,
    /// Set after yielding an error: the stream then ends.
    pub(super) failed: bool,
}

impl Download {
    pub(super) async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.failed {
                return None;
            }
            let interrupted = match self.body.as_mut()?.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    let len = chunk.len() as u64;
                    if len > self.end - self.pos {
                        return self.fail(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("S3 sent more than the {} bytes of {}", self.end, self.key),
                        ));
                    }
                    self.pos += len;
                    return Some(Ok(chunk));
                }
                None if self.pos == self.end => return None,
                None => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "S3 body of {} ended at byte {} of {}",
                        self.key, self.pos, self.end
                    ),
                ),
                Some(Err(err)) => {
                    // The error's Display alone says only "streaming error": keep its causes.
                    let message = format!(
                        "S3 body of {} interrupted at byte {} of {}: {}",
                        self.key,
                        self.pos,
                        self.end,
                        DisplayErrorContext(&err)
                    );
                    io::Error::new(io::Error::from(err).kind(), message)
                }
            };
            // An error after the last byte (e.g. a failed checksum check) cannot be fixed by
            // reading again, and neither can one after the resumes are spent.
            if self.pos == self.end || self.resumes_left == 0 {
                let message = format!(
                    "{interrupted} (after {} resumed requests)",
                    MAX_RESUMES - self.resumes_left
                );
                return self.fail(io::Error::new(interrupted.kind(), message));
            }
            self.resumes_left -= 1;
            tracing::warn!(key = %self.key, pos = self.pos, end = self.end, error = %interrupted, "S3 download interrupted; resuming");
            tokio::time::sleep(self.backoff.next_delay()).await;
            let range = self.pos..self.end;
            match self
                .store
                .get_object(&self.key, Some(&range), self.etag.as_deref())
                .await
            {
                Ok(output)
                    if output.content_length() == i64::try_from(range.end - range.start).ok() =>
                {
                    self.body = Some(output.body);
                }
                Ok(output) => {
                    let message = format!(
                        "resumed download of {} asked for bytes {}..{}, got {:?} bytes",
                        self.key,
                        range.start,
                        range.end,
                        output.content_length()
                    );
                    return self.fail(io::Error::new(io::ErrorKind::InvalidData, message));
                }
                Err(err) => return self.fail(io::Error::other(err)),
            }
        }
    }

    pub(super) fn fail(&mut self, err: io::Error) -> Option<io::Result<Bytes>> {
        self.failed = true;
        self.body = None;
        Some(Err(err))
    }
}

/// The total size in a `Content-Range: bytes 0-99/1234` header, if known.
pub(super) fn total_size(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}
