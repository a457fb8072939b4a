//! An [`ObjectStore`] in a local directory: the embedded default repository (`file://…`).
//!
//! Owns the directory tree under its root: key `a/b/c` is the file `<root>/a/b/c`, so a
//! repository can be inspected, copied or synced to S3 with ordinary tools. Uploads in progress
//! live under `<root>/.tmp/` (a name no valid key can have, see [`super::validate_key`]) and are
//! published with one atomic `rename` (overwrite) or `link` (create-new, which fails if the
//! name exists), after `fsync` of the data, and followed by `fsync` of the directory, so that a
//! crash leaves either the whole object or none. Files are created 0600 and directories 0700:
//! the repository holds only ciphertext, but its names and sizes still say who the tenants are.
//!
//! It must never hold an object in memory (reads and writes stream in bounded chunks), never
//! follow a key outside the root (keys are validated, listing does not follow symlinks), and never
//! block the async runtime (every file system call runs on the blocking pool).
//!
//! Limits, inherent to a file system: keys `a` and `a/b` cannot both exist (the second put fails
//! with an I/O error); `.tmp/` and the objects must be on the same file system (a mount point
//! inside the root makes publishing fail with `EXDEV`); the file system must support hard links.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{
    ByteStream, ListPage, ObjectMeta, ObjectStore, PutMode, Result, StorageError, check_range,
    validate_key, validate_prefix,
};

/// Directory (relative to the root) holding uploads in progress.
const TMP_DIR: &str = ".tmp";
/// Size of the chunks `get` reads and yields.
const READ_CHUNK: usize = 256 * 1024;
/// A temporary file untouched for this long belongs to an upload that died with its process
/// (every write updates the modification time, so a live upload never looks this old).
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 3600);
/// How often publishing retries after a concurrent `delete` removed the (then empty) parent
/// directory between our creating it and renaming into it.
const PUBLISH_ATTEMPTS: usize = 3;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
    /// Stale temporary files are swept once per store, on the first `put`.
    swept_tmp: Arc<AtomicBool>,
}

impl LocalStore {
    /// A store rooted at `root`. Nothing is touched until the first operation; the root (and its
    /// missing parents) is created by the first `put`.
    pub fn new(root: PathBuf) -> Self {
        LocalStore {
            root: Arc::new(root),
            swept_tmp: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of a validated key.
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

/// Runs blocking file system work off the async runtime.
async fn blocking<T: Send + 'static>(
    key: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        // Our closures do not panic by design; if one did, report it rather than unwinding here.
        Err(join) => Err(StorageError::io(
            key,
            io::Error::other(format!("file system task failed: {join}")),
        )),
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, mut body: ByteStream, mode: PutMode) -> Result<u64> {
        validate_key(key)?;
        let final_path = self.path(key);
        if mode == PutMode::CreateNew {
            // Fail before streaming a large body into a file that could never be published;
            // the `link` below remains the atomic check.
            let path = final_path.clone();
            let exists = blocking(key, move || Ok(is_file(&path))).await?;
            if exists {
                return Err(StorageError::AlreadyExists {
                    key: key.to_string(),
                });
            }
        }

        let root = Arc::clone(&self.root);
        let sweep = !self.swept_tmp.swap(true, Ordering::Relaxed);
        let owned_key = key.to_string();
        let (file, tmp) = blocking(key, move || {
            let tmp_dir = root.join(TMP_DIR);
            ensure_dirs(&root, &tmp_dir).map_err(|e| StorageError::io(&owned_key, e))?;
            if sweep {
                sweep_stale_tmp(&tmp_dir);
            }
            TempFile::create(&tmp_dir).map_err(|e| StorageError::io(&owned_key, e))
        })
        .await?;

        // From here on `tmp` removes the temporary file whenever we return early or are
        // cancelled, so a failed upload leaves nothing behind.
        let mut file = tokio::fs::File::from_std(file);
        let mut size = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StorageError::io(key, e))?
        {
            file.write_all(&chunk)
                .await
                .map_err(|e| StorageError::io(key, e))?;
            size += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| StorageError::io(key, e))?;
        file.sync_all()
            .await
            .map_err(|e| StorageError::io(key, e))?;
        drop(file);

        let root = Arc::clone(&self.root);
        let owned_key = key.to_string();
        blocking(key, move || {
            publish(&root, &owned_key, tmp, &final_path, mode)
        })
        .await?;
        Ok(size)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        validate_key(key)?;
        let path = self.path(key);
        let owned_key = key.to_string();
        let (file, range) = blocking(key, move || {
            let key = owned_key.as_str();
            let (mut file, size) = open_object(&path)
                .map_err(|e| StorageError::io(key, e))?
                .ok_or_else(|| StorageError::NotFound {
                    key: key.to_string(),
                })?;
            let range = range.unwrap_or(0..size);
            check_range(key, &range, size)?;
            file.seek(SeekFrom::Start(range.start))
                .map_err(|e| StorageError::io(key, e))?;
            Ok((file, range))
        })
        .await?;
        let length = range.end - range.start;
        let reader = tokio::fs::File::from_std(file).take(length);
        let stream = ReaderStream::with_capacity(reader, READ_CHUNK);
        Ok(Box::pin(exact_length(stream, length)))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        let path = self.path(key);
        let owned_key = key.to_string();
        blocking(key, move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key: owned_key,
                size: meta.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(StorageError::io(&owned_key, e)),
        })
        .await
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage> {
        validate_prefix(prefix)?;
        let root = Arc::clone(&self.root);
        let owned_prefix = prefix.to_string();
        let limit = limit.max(1);
        blocking(prefix, move || {
            let mut walk = Walk {
                prefix: &owned_prefix,
                after: continuation.as_deref(),
                want: limit + 1,
                out: Vec::new(),
            };
            walk.dir(&root, "")
                .map_err(|e| StorageError::io(&owned_prefix, e))?;
            let mut objects = walk.out;
            let next = if objects.len() > limit {
                objects.truncate(limit);
                objects.last().map(|meta| meta.key.clone())
            } else {
                None
            };
            Ok(ListPage { objects, next })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let root = Arc::clone(&self.root);
        let path = self.path(key);
        let owned_key = key.to_string();
        blocking(key, move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Absent, or a directory (which is not an object): nothing to delete.
                Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => return Ok(()),
                Err(e) => return Err(StorageError::io(&owned_key, e)),
            }
            let parent = path.parent().unwrap_or(&root);
            sync_dir(parent).map_err(|e| StorageError::io(&owned_key, e))?;
            remove_empty_parents(&root, parent);
            Ok(())
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// An uploaded file in `.tmp/`, removed on drop unless it was published.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(tmp_dir: &Path) -> io::Result<(File, TempFile)> {
        loop {
            let name: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(20)
                .collect();
            let path = tmp_dir.join(format!("{name}.part"));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((file, TempFile { path, keep: false })),
                // 20 random alphanumerics collide only by astronomical chance; just draw again.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a leftover is swept later by `sweep_stale_tmp`.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Makes the fsynced temporary file visible under its key, atomically.
fn publish(
    root: &Path,
    key: &str,
    mut tmp: TempFile,
    final_path: &Path,
    mode: PutMode,
) -> Result<()> {
    let parent = final_path.parent().unwrap_or(root);
    let mut attempt = 1;
    loop {
        ensure_dirs(root, parent).map_err(|e| StorageError::io(key, e))?;
        let published = match mode {
            PutMode::Overwrite => fs::rename(&tmp.path, final_path),
            // `link` fails if the name exists, which makes create-new atomic without
            // `renameat2(RENAME_NOREPLACE)` (not in std, and unsafe code is forbidden here).
            PutMode::CreateNew => fs::hard_link(&tmp.path, final_path),
        };
        match published {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::NotFound && attempt < PUBLISH_ATTEMPTS => attempt += 1,
            Err(e) if e.kind() == ErrorKind::AlreadyExists && is_file(final_path) => {
                return Err(StorageError::AlreadyExists {
                    key: key.to_string(),
                });
            }
            Err(e) => return Err(StorageError::io(key, e)),
        }
    }
    match mode {
        // The rename consumed the temporary name.
        PutMode::Overwrite => tmp.keep = true,
        // The link left it; dropping `tmp` removes it.
        PutMode::CreateNew => drop(tmp),
    }
    sync_dir(parent).map_err(|e| StorageError::io(key, e))
}

/// Creates `dir` (which must be `root` or inside it) and its missing ancestors with mode 0700,
/// making each new directory entry durable.
fn ensure_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    if !root.is_dir() {
        DirBuilder::new().recursive(true).mode(0o700).create(root)?;
    }
    let Ok(relative) = dir.strip_prefix(root) else {
        return Err(io::Error::other(format!(
            "{} is outside {}",
            dir.display(),
            root.display()
        )));
    };
    let mut current = root.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match DirBuilder::new().mode(0o700).create(&current) {
            Ok(()) => sync_dir(current.parent().unwrap_or(root))?,
            // Exists already (a file in the way shows up as ENOTDIR when we publish).
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the entries of `dir` durable (new, renamed or removed names).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the directories between `dir` and `root` (exclusive) that became empty, so retention
/// does not leave a skeleton of empty snapshot directories behind. `remove_dir` only removes an
/// empty directory, so a concurrent `put` into it either keeps it or retries (see `publish`).
fn remove_empty_parents(root: &Path, dir: &Path) {
    let mut current = dir;
    while current != root && current.starts_with(root) {
        if fs::remove_dir(current).is_err() {
            return;
        }
        let Some(parent) = current.parent() else {
            return;
        };
        // Best effort: a lost empty directory after a crash is harmless.
        let _ = sync_dir(parent);
        current = parent;
    }
}

/// Deletes temporary files left by uploads whose process died (best effort).
fn sweep_stale_tmp(tmp_dir: &Path) {
    let Ok(entries) = fs::read_dir(tmp_dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| {
                now.duration_since(modified)
                    .is_ok_and(|age| age > STALE_TMP_AGE)
            });
        if stale {
            tracing::debug!(path = %entry.path().display(), "removing stale temporary upload");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Opens the regular file of an object, with its size; `None` if there is none.
fn open_object(path: &Path) -> io::Result<Option<(File, u64)>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some((file, meta.len())))
}

fn is_absent(e: &io::Error) -> bool {
    // ENOTDIR: a prefix of the key is a file, so the key cannot exist.
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

fn is_file(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file())
}

/// Ends `stream` with an error if it yields fewer than `length` bytes: an object file truncated
/// behind our back must not read as a shorter, valid-looking object.
fn exact_length(
    stream: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    length: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    // State: the inner stream, bytes seen so far, and whether we already ended with an error.
    futures::stream::unfold(
        (Box::pin(stream), 0u64, false),
        move |(mut body, got, done)| async move {
            if done {
                return None;
            }
            match body.next().await {
                Some(Ok(chunk)) => {
                    let got = got + chunk.len() as u64;
                    Some((Ok(chunk), (body, got, false)))
                }
                Some(Err(e)) => Some((Err(e), (body, got, true))),
                None if got < length => {
                    let message = format!("object ended after {got} of {length} bytes");
                    Some((
                        Err(io::Error::new(ErrorKind::UnexpectedEof, message)),
                        (body, got, true),
                    ))
                }
                None => None,
            }
        },
    )
}

/// A sorted, pruned walk of the tree collecting keys under `prefix` strictly after `after`.
struct Walk<'a> {
    prefix: &'a str,
    after: Option<&'a str>,
    want: usize,
    out: Vec<ObjectMeta>,
}

impl Walk<'_> {
    /// Walks `dir`, whose keys all start with `rel` (`""` or ending in `/`). Returns `true` once
    /// `want` keys are collected.
    fn dir(&mut self, dir: &Path, rel: &str) -> io::Result<bool> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // No root yet, or a directory removed by a concurrent delete: nothing in it.
            Err(e) if is_absent(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Sort by the key each entry stands for, a directory as `name/`: then a whole subtree
        // sorts exactly where its keys do among its siblings (`a-c` < `a/…` < `a0`).
        let mut items = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue; // `.tmp/` and anything else no valid key can name
            }
            let file_type = entry.file_type()?; // does not follow symlinks
            if file_type.is_dir() {
                items.push((format!("{rel}{name}/"), Some(name), entry));
            } else if file_type.is_file() {
                items.push((format!("{rel}{name}"), None, entry));
            }
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));

        for (key, subdir, entry) in items {
            if let Some(name) = subdir {
                let related = key.starts_with(self.prefix) || self.prefix.starts_with(&key);
                // Every key below `key` sorts before `after` unless `after` is itself below it.
                let passed = self
                    .after
                    .is_some_and(|after| key.as_str() < after && !after.starts_with(&key));
                if related && !passed && self.dir(&dir.join(name), &key)? {
                    return Ok(true);
                }
                continue;
            }
            if !key.starts_with(self.prefix)
                || self.after.is_some_and(|after| key.as_str() <= after)
            {
                continue;
            }
            if validate_key(&key).is_err() {
                continue; // not a name this store could have written (e.g. a control character)
            }
            let size = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if is_absent(&e) => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            self.out.push(ObjectMeta { key, size });
            if self.out.len() >= self.want {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
