//! The object store conformance suite: every backend must pass [`conformance`] unchanged.
//!
//! It checks the contract written in `src/storage/mod.rs`, on an empty store (a fresh directory,
//! memory, or a unique S3 prefix), and only through the [`ObjectStore`] trait. Backend-specific
//! checks (file modes, leftover multipart uploads) follow it in each backend's test.
//!
//! One file of ~970 lines on purpose: the suite is one contract, and a backend runs all of it.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use updog_backup::storage::{
    ByteStream, LocalStore, MemoryStore, ObjectStore, PutMode, StorageError,
};

use crate::support::seaweed;

const MIB: usize = 1024 * 1024;
/// Large enough that S3 uses a multipart upload (parts are 8 MiB) with a short last part.
const LARGE: usize = 20 * MIB;

/// Runs every contract check against `store`, which must be empty.
pub async fn conformance(store: Arc<dyn ObjectStore>) {
    let store = store.as_ref();
    assert!(
        store.list("").await.expect("list").is_empty(),
        "{} is not empty",
        store.describe()
    );
    small_roundtrip(store).await;
    empty_object(store).await;
    large_roundtrip(store).await;
    ranged_get(store).await;
    missing_objects(store).await;
    create_new_refuses_existing(store).await;
    overwrite_replaces(store).await;
    failed_body_leaves_nothing(store).await;
    concurrent_create_new(store, 1000).await;
    concurrent_create_new(store, 12 * MIB).await;
    list_pagination(store).await;
    nested_prefixes(store).await;
    delete(store).await;
    invalid_keys(store).await;
}

async fn small_roundtrip(store: &dyn ObjectStore) {
    let size = store
        .put_bytes("small/a", Bytes::from_static(b"hello"), PutMode::CreateNew)
        .await
        .expect("put");
    assert_eq!(size, 5);
    assert_eq!(
        store.get_bytes("small/a", None).await.expect("get"),
        Bytes::from_static(b"hello")
    );
    let meta = store
        .head("small/a")
        .await
        .expect("head")
        .expect("object exists");
    assert_eq!((meta.key.as_str(), meta.size), ("small/a", 5));
}

async fn empty_object(store: &dyn ObjectStore) {
    let size = store
        .put(
            "empty",
            Box::pin(futures::stream::empty()),
            PutMode::CreateNew,
        )
        .await
        .expect("put");
    assert_eq!(size, 0);
    assert!(
        store
            .get_bytes("empty", None)
            .await
            .expect("get")
            .is_empty()
    );
    assert!(
        store
            .get_bytes("empty", Some(0..0))
            .await
            .expect("empty range")
            .is_empty()
    );
    assert_eq!(
        store.head("empty").await.expect("head").map(|m| m.size),
        Some(0)
    );
    assert!(matches!(
        store.get("empty", Some(0..1)).await.err(),
        Some(StorageError::InvalidRange { size: 0, .. })
    ));
}

async fn large_roundtrip(store: &dyn ObjectStore) {
    let size = store
        .put("large", patterned(1, LARGE, MIB), PutMode::CreateNew)
        .await
        .expect("put large");
    assert_eq!(size, LARGE as u64);
    assert_eq!(
        store.head("large").await.expect("head").map(|m| m.size),
        Some(LARGE as u64)
    );
    let (digest, len, largest_chunk) =
        digest_stream(store.get("large", None).await.expect("get large")).await;
    assert_eq!(len, LARGE as u64);
    assert_eq!(
        digest,
        patterned_digest(1, LARGE),
        "large object read back differs"
    );
    // Streaming, not one buffer: no chunk anywhere near the object's size.
    assert!(
        largest_chunk <= 8 * MIB,
        "get yielded a {largest_chunk}-byte chunk"
    );

    // A body whose chunks do not line up with parts, including one larger than a part.
    let chunks = [3 * MIB + 7, 11 * MIB, 1, 0, 5 * MIB];
    let total: usize = chunks.iter().sum();
    let data = pattern_bytes(2, total);
    let body = {
        let mut offset = 0;
        let pieces: Vec<std::io::Result<Bytes>> = chunks
            .iter()
            .map(|len| {
                let piece = data.slice(offset..offset + len);
                offset += len;
                Ok(piece)
            })
            .collect();
        Box::pin(futures::stream::iter(pieces)) as ByteStream
    };
    assert_eq!(
        store
            .put("odd-chunks", body, PutMode::CreateNew)
            .await
            .expect("put"),
        total as u64
    );
    assert_eq!(
        store.get_bytes("odd-chunks", None).await.expect("get"),
        data
    );

    // Exactly one part's worth (the boundary between single and multipart uploads on S3).
    let exact = pattern_bytes(3, 8 * MIB);
    store
        .put_bytes("exact-part", exact.clone(), PutMode::CreateNew)
        .await
        .expect("put exact part");
    assert_eq!(
        store.get_bytes("exact-part", None).await.expect("get"),
        exact
    );
}

async fn ranged_get(store: &dyn ObjectStore) {
    let whole = pattern_bytes(1, LARGE);
    let size = LARGE as u64;
    let part = 8 * MIB as u64;
    let ranges: [Range<u64>; 6] = [
        0..100,
        0..1,
        part - 10..part + 10,
        12_345..3 * MIB as u64,
        size - 100..size,
        0..size,
    ];
    for range in ranges {
        let got = store
            .get_bytes("large", Some(range.clone()))
            .await
            .expect("ranged get");
        assert_eq!(
            got.len() as u64,
            range.end - range.start,
            "length of range {range:?}"
        );
        assert!(
            got == whole.slice(range.start as usize..range.end as usize),
            "bytes of range {range:?}"
        );
    }
    assert!(
        store
            .get_bytes("large", Some(77..77))
            .await
            .expect("empty range")
            .is_empty()
    );
    for bad in [
        size - 10..size + 1,
        size..size + 1,
        size + 5..size + 6,
        // Inverted (written as a struct so that it does not read as a mistake).
        Range { start: 10, end: 5 },
    ] {
        match store.get("large", Some(bad.clone())).await.err() {
            Some(StorageError::InvalidRange {
                start,
                end,
                size: reported,
                ..
            }) => {
                assert_eq!(
                    (start, end, reported),
                    (bad.start, bad.end, size),
                    "range {bad:?}"
                );
            }
            other => panic!("range {bad:?}: expected InvalidRange, got {other:?}"),
        }
    }
    assert!(matches!(
        store.get("missing", Some(0..10)).await.err(),
        Some(StorageError::NotFound { .. })
    ));
}

async fn missing_objects(store: &dyn ObjectStore) {
    match store.get("no/such/key", None).await.err() {
        Some(StorageError::NotFound { key }) => assert_eq!(key, "no/such/key"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(store.head("no/such/key").await.expect("head"), None);
    // A key below an existing object's name is absent, not an error.
    assert_eq!(
        store.head("small/a/b").await.expect("head below an object"),
        None
    );
    assert!(matches!(
        store.get("small/a/b", None).await.err(),
        Some(StorageError::NotFound { .. })
    ));
    // A "directory" (a prefix of keys) is not an object.
    assert_eq!(store.head("small").await.expect("head of a prefix"), None);
    assert!(matches!(
        store.get("small", None).await.err(),
        Some(StorageError::NotFound { .. })
    ));
}

async fn create_new_refuses_existing(store: &dyn ObjectStore) {
    store
        .put_bytes("cn/x", Bytes::from_static(b"first"), PutMode::CreateNew)
        .await
        .expect("first put");
    match store
        .put_bytes("cn/x", Bytes::from_static(b"second!"), PutMode::CreateNew)
        .await
    {
        Err(StorageError::AlreadyExists { key }) => assert_eq!(key, "cn/x"),
        other => panic!("second CreateNew: expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        store.get_bytes("cn/x", None).await.expect("get"),
        Bytes::from_static(b"first")
    );

    // Large: the refusal must not depend on the upload path.
    match store
        .put("large", patterned(9, LARGE, MIB), PutMode::CreateNew)
        .await
    {
        Err(StorageError::AlreadyExists { .. }) => {}
        other => {
            panic!("large CreateNew over an existing key: expected AlreadyExists, got {other:?}")
        }
    }
    let (digest, _, _) = digest_stream(store.get("large", None).await.expect("get")).await;
    assert_eq!(digest, patterned_digest(1, LARGE), "first object changed");
}

async fn overwrite_replaces(store: &dyn ObjectStore) {
    store
        .put_bytes("ow/x", Bytes::from_static(b"one"), PutMode::Overwrite)
        .await
        .expect("overwrite creates");
    store
        .put_bytes(
            "ow/x",
            Bytes::from_static(b"second value"),
            PutMode::Overwrite,
        )
        .await
        .expect("overwrite");
    assert_eq!(
        store.get_bytes("ow/x", None).await.expect("get"),
        Bytes::from_static(b"second value")
    );
    assert_eq!(
        store.head("ow/x").await.expect("head").map(|m| m.size),
        Some(12)
    );
    // Small → large → small, across the single/multipart boundary.
    store
        .put("ow/x", patterned(4, 10 * MIB, MIB), PutMode::Overwrite)
        .await
        .expect("overwrite large");
    let (digest, len, _) = digest_stream(store.get("ow/x", None).await.expect("get")).await;
    assert_eq!(
        (digest, len),
        (patterned_digest(4, 10 * MIB), 10 * MIB as u64)
    );
    store
        .put_bytes("ow/x", Bytes::from_static(b"tiny"), PutMode::Overwrite)
        .await
        .expect("overwrite small");
    assert_eq!(
        store.get_bytes("ow/x", None).await.expect("get"),
        Bytes::from_static(b"tiny")
    );
    assert_eq!(keys(store, "ow/").await, ["ow/x"]);
}

async fn failed_body_leaves_nothing(store: &dyn ObjectStore) {
    // Fails within the first part, and after more than a part (a multipart upload on S3).
    for (mode, ok_bytes) in [
        (PutMode::CreateNew, 3 * MIB),
        (PutMode::CreateNew, 12 * MIB),
        (PutMode::Overwrite, 12 * MIB),
    ] {
        match store.put("fail/x", failing(ok_bytes), mode).await {
            Err(StorageError::Io { key, source }) => {
                assert_eq!(key, "fail/x");
                assert!(source.to_string().contains("injected"), "{source}");
            }
            other => panic!(
                "put with a failing body ({ok_bytes} bytes, {mode:?}): expected Io, got {other:?}"
            ),
        }
        assert_eq!(store.head("fail/x").await.expect("head"), None);
        assert!(matches!(
            store.get("fail/x", None).await.err(),
            Some(StorageError::NotFound { .. })
        ));
        assert!(store.list("fail").await.expect("list").is_empty());
    }
    // A failed overwrite leaves the previous object whole.
    store
        .put_bytes(
            "fail/kept",
            Bytes::from_static(b"previous"),
            PutMode::CreateNew,
        )
        .await
        .expect("put");
    assert!(
        store
            .put("fail/kept", failing(12 * MIB), PutMode::Overwrite)
            .await
            .is_err()
    );
    assert_eq!(
        store.get_bytes("fail/kept", None).await.expect("get"),
        Bytes::from_static(b"previous")
    );
    store.delete("fail/kept").await.expect("delete");
}

/// Two writers race to create one key: exactly one wins and the object is entirely its.
async fn concurrent_create_new(store: &dyn ObjectStore, size: usize) {
    let key = format!("race/{size}");
    // Both bodies wait for each other just before their end, so both uploads are in flight
    // (past any early existence check) when either tries to publish.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let body = |seed: u64| {
        let barrier = Arc::clone(&barrier);
        let tail = futures::stream::once(async move {
            barrier.wait().await;
            Ok(Bytes::new())
        });
        Box::pin(patterned(seed, size, MIB).chain(tail)) as ByteStream
    };
    let (a, b) = tokio::join!(
        store.put(&key, body(21), PutMode::CreateNew),
        store.put(&key, body(22), PutMode::CreateNew)
    );
    let winner = match (&a, &b) {
        (Ok(_), Err(StorageError::AlreadyExists { .. })) => 21,
        (Err(StorageError::AlreadyExists { .. }), Ok(_)) => 22,
        _ => panic!(
            "racing CreateNew of {size} bytes: expected one success and one AlreadyExists, got {a:?} and {b:?}"
        ),
    };
    let (digest, len, _) = digest_stream(store.get(&key, None).await.expect("get")).await;
    assert_eq!(len, size as u64);
    assert_eq!(
        digest,
        patterned_digest(winner, size),
        "object is not the winner's"
    );
}

async fn list_pagination(store: &dyn ObjectStore) {
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("list/p/k{i:02}");
        store
            .put_bytes(&key, Bytes::from(vec![b'x'; i]), PutMode::CreateNew)
            .await
            .expect("put");
        expected.push((key, i as u64));
    }
    store
        .put_bytes("list/q", Bytes::from_static(b"outside"), PutMode::CreateNew)
        .await
        .expect("put");

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let page = store
            .list_page("list/p/", token, 7)
            .await
            .expect("list_page");
        pages += 1;
        assert!(page.objects.len() <= 7, "page of {}", page.objects.len());
        seen.extend(page.objects.into_iter().map(|m| (m.key, m.size)));
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
        assert!(pages < 100, "pagination does not end");
    }
    assert!(pages > 3, "25 keys in pages of 7 took {pages} pages");
    assert_eq!(seen, expected, "pages in order, each key once, with sizes");
    let listed: Vec<(String, u64)> = store
        .list("list/p/")
        .await
        .expect("list")
        .into_iter()
        .map(|m| (m.key, m.size))
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(keys(store, "list/").await.len(), 26);
}

async fn nested_prefixes(store: &dyn ObjectStore) {
    // '-' < '/' < '0' < 'b': a directory-backed store must still list in key order.
    for key in ["n/ab", "n/a0", "n/a/bc", "n/a-c", "n/a/b/c"] {
        store
            .put_bytes(
                key,
                Bytes::copy_from_slice(key.as_bytes()),
                PutMode::CreateNew,
            )
            .await
            .expect("put");
    }
    let all = ["n/a-c", "n/a/b/c", "n/a/bc", "n/a0", "n/ab"];
    assert_eq!(keys(store, "n/").await, all);
    assert_eq!(keys(store, "n/a").await, all);
    assert_eq!(keys(store, "n/a/b").await, ["n/a/b/c", "n/a/bc"]);
    assert_eq!(keys(store, "n/a/b/").await, ["n/a/b/c"]);
    assert_eq!(keys(store, "n/a/b/c").await, ["n/a/b/c"]);
    assert_eq!(keys(store, "n/ab").await, ["n/ab"]);
    assert!(keys(store, "n/x").await.is_empty());
    assert!(keys(store, "zzz/").await.is_empty());

    // One key a page visits every key once. (The order of pages may differ from byte order on
    // servers that list in directory order, see the contract; `list` sorts.)
    let mut paged = Vec::new();
    let mut token = None;
    loop {
        let page = store.list_page("n/", token, 1).await.expect("list_page");
        paged.extend(page.objects.into_iter().map(|m| m.key));
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    paged.sort();
    assert_eq!(paged, all);

    // The whole store is in order too.
    let everything = keys(store, "").await;
    let mut sorted = everything.clone();
    sorted.sort();
    assert_eq!(everything, sorted);
    assert!(everything.iter().any(|k| k == "n/a/b/c") && everything.iter().any(|k| k == "small/a"));
}

async fn delete(store: &dyn ObjectStore) {
    store.delete("n/a/b/c").await.expect("delete");
    assert_eq!(store.head("n/a/b/c").await.expect("head"), None);
    assert!(matches!(
        store.get("n/a/b/c", None).await.err(),
        Some(StorageError::NotFound { .. })
    ));
    assert_eq!(keys(store, "n/a/b").await, ["n/a/bc"]);
    store
        .delete("n/a/b/c")
        .await
        .expect("delete of a missing key succeeds");
    store
        .delete("never/existed")
        .await
        .expect("delete of a missing key succeeds");
    // The key can be created again.
    store
        .put_bytes("n/a/b/c", Bytes::from_static(b"again"), PutMode::CreateNew)
        .await
        .expect("put after delete");
    assert_eq!(
        store.get_bytes("n/a/b/c", None).await.expect("get"),
        Bytes::from_static(b"again")
    );
    for key in keys(store, "n/").await {
        store.delete(&key).await.expect("delete");
    }
    assert!(keys(store, "n/").await.is_empty());
}

async fn invalid_keys(store: &dyn ObjectStore) {
    let bad = [
        "", "/a", "a/", "a//b", ".", "..", "./a", "a/../b", "a/./b", ".tmp/x", ".hidden", "a\\b",
        "a\nb", "a\0b",
    ];
    for key in bad {
        let invalid = |result: Result<(), StorageError>| match result {
            Err(StorageError::InvalidKey { .. }) => {}
            other => panic!("key {key:?}: expected InvalidKey, got {other:?}"),
        };
        invalid(
            store
                .put_bytes(key, Bytes::from_static(b"x"), PutMode::Overwrite)
                .await
                .map(drop),
        );
        invalid(store.get(key, None).await.map(drop));
        invalid(store.head(key).await.map(drop));
        invalid(store.delete(key).await);
    }
    for prefix in ["/", "../", "a//", ".tmp/", "a/../", "a\\"] {
        assert!(
            matches!(
                store.list_page(prefix, None, 10).await,
                Err(StorageError::InvalidKey { .. })
            ),
            "prefix {prefix:?} accepted"
        );
    }
    // Nothing of the above, nor any upload in progress, shows up in a listing.
    let everything = keys(store, "").await;
    assert!(
        everything.iter().all(|k| !k.starts_with('.')),
        "{everything:?}"
    );
}

/// For backends that list in byte order page by page (all but S3 servers listing in directory
/// order): pages of every size follow byte order across a directory tree.
async fn pages_in_byte_order(store: &dyn ObjectStore) {
    let mut all = vec![
        "o/ab",
        "o/a0",
        "o/a/bc",
        "o/a-c",
        "o/a.d/e",
        "o/a/b/c",
        "o/a/b-",
        "o/a/b/d/e",
    ];
    for key in &all {
        store
            .put_bytes(key, Bytes::from_static(b"x"), PutMode::CreateNew)
            .await
            .expect("put");
    }
    all.sort();
    for limit in [1, 2, 3, 100] {
        let mut paged = Vec::new();
        let mut token = None;
        loop {
            let page = store
                .list_page("o/", token, limit)
                .await
                .expect("list_page");
            paged.extend(page.objects.into_iter().map(|m| m.key));
            match page.next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        assert_eq!(paged, all, "pages of {limit}");
    }
}

/// The keys under `prefix`, in listing order.
async fn keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key)
        .collect()
}

/// `size` pseudo-random bytes determined by `seed`, streamed in `chunk`-sized pieces and
/// generated as they are pulled (the body is never whole in memory).
fn patterned(seed: u64, size: usize, chunk: usize) -> ByteStream {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut left = size;
    Box::pin(futures::stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let len = left.min(chunk);
        left -= len;
        let mut piece = vec![0u8; len];
        rng.fill(&mut piece);
        Some(Ok(Bytes::from(piece)))
    })))
}

/// The bytes of [`patterned`] in one buffer, for comparing ranges.
fn pattern_bytes(seed: u64, size: usize) -> Bytes {
    // Generated in the same pieces as `patterned`, since the generator's output depends on them.
    let mut out = Vec::with_capacity(size);
    let mut rng = fastrand::Rng::with_seed(seed);
    while out.len() < size {
        let len = (size - out.len()).min(MIB);
        let mut piece = vec![0u8; len];
        rng.fill(&mut piece);
        out.extend_from_slice(&piece);
    }
    Bytes::from(out)
}

fn patterned_digest(seed: u64, size: usize) -> [u8; 32] {
    Sha256::digest(pattern_bytes(seed, size)).into()
}

/// SHA-256, length and largest chunk of a stream.
async fn digest_stream(mut stream: ByteStream) -> ([u8; 32], u64, usize) {
    let mut hasher = Sha256::new();
    let (mut len, mut largest) = (0u64, 0usize);
    while let Some(chunk) = stream.try_next().await.expect("read stream") {
        hasher.update(&chunk);
        len += chunk.len() as u64;
        largest = largest.max(chunk.len());
    }
    (hasher.finalize().into(), len, largest)
}

/// A body that yields `ok_bytes` bytes, then an error.
fn failing(ok_bytes: usize) -> ByteStream {
    let error =
        futures::stream::once(async { Err(std::io::Error::other("injected body failure")) });
    Box::pin(patterned(5, ok_bytes, MIB).chain(error))
}

#[tokio::test]
async fn storage_conformance_memory() {
    let store = Arc::new(MemoryStore::new());
    conformance(store.clone()).await;
    pages_in_byte_order(store.as_ref()).await;
}

#[tokio::test]
async fn storage_conformance_local() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repo");
    let store = Arc::new(LocalStore::new(root.clone()));
    conformance(store.clone()).await;
    pages_in_byte_order(store.as_ref()).await;

    // Files 0600, directories 0700, no upload left in progress.
    let mut pending = vec![root.clone()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            pending.extend(
                std::fs::read_dir(&path)
                    .expect("read_dir")
                    .map(|e| e.expect("entry").path()),
            );
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(root.join(".tmp"))
        .expect("tmp dir")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // Deleting the last objects under a directory removes the emptied directories.
    assert!(
        !root.join("n").exists(),
        "empty directories left after delete"
    );
}

#[tokio::test]
async fn storage_conformance_s3() {
    let server = seaweed::s3().await;
    let store = server.store("conformance").await;
    let description = store.describe();
    assert!(
        description.starts_with(&format!("s3://{}/conformance-", server.bucket())),
        "{description}"
    );
    assert!(
        description.ends_with(&format!(" (endpoint {})", server.endpoint())),
        "{description}"
    );
    assert!(
        !description.contains(server.secret_access_key())
            && !format!("{store:?}").contains(server.secret_access_key())
    );

    // The leftover check below must be able to see an upload in progress.
    let probe_key = format!("{}/probe", store.prefix());
    let probe = store
        .client()
        .create_multipart_upload()
        .bucket(server.bucket())
        .key(&probe_key)
        .send()
        .await
        .expect("CreateMultipartUpload");
    assert_eq!(
        pending_uploads(&store).await.len(),
        1,
        "the probe upload is not listed"
    );
    store
        .client()
        .abort_multipart_upload()
        .bucket(server.bucket())
        .key(&probe_key)
        .upload_id(probe.upload_id().expect("upload id"))
        .send()
        .await
        .expect("AbortMultipartUpload");

    conformance(Arc::new(store.clone())).await;

    // The large object really went up in parts (8 + 8 + 4 MiB): S3 marks such ETags `-<parts>`.
    let large = store
        .client()
        .head_object()
        .bucket(server.bucket())
        .key(format!("{}/large", store.prefix()))
        .send()
        .await
        .expect("HeadObject");
    let etag = large.e_tag().unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");

    // Failed and lost races' multipart uploads were aborted, not left behind.
    let pending = pending_uploads(&store).await;
    assert!(pending.is_empty(), "multipart uploads left: {pending:?}");
}

/// Keys of the multipart uploads in progress under the store's prefix.
async fn pending_uploads(store: &updog_backup::storage::S3Store) -> Vec<String> {
    let uploads = store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .prefix(format!("{}/", store.prefix()))
        .send()
        .await
        .expect("ListMultipartUploads");
    uploads
        .uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn storage_s3_rejects_wrong_credentials_with_a_readable_error() {
    let server = seaweed::s3().await;
    let store = updog_backup::storage::S3Store::with_static_credentials(
        server.settings("wrong-credentials"),
        server.access_key_id(),
        "not-the-secret",
    )
    .expect("settings");
    let err = store
        .head("x")
        .await
        .expect_err("a wrongly signed request must fail");
    let message = err.to_string();
    assert!(
        matches!(
            err,
            StorageError::S3 {
                operation: "HeadObject",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(message.contains("HTTP 403"), "{message}");
    assert!(!message.contains("not-the-secret"), "{message}");
    let err = store
        .put_bytes("x", Bytes::from_static(b"x"), PutMode::CreateNew)
        .await
        .expect_err("put must fail");
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    eprintln!("wrong credentials: {err}");
}

/// Downloads cut mid-body are resumed where they stopped, pinned to the same object version.
#[tokio::test]
async fn storage_s3_resumes_interrupted_downloads() {
    let server = seaweed::s3().await;
    let store = server.store("resume").await;
    store
        .put("big", patterned(7, LARGE, MIB), PutMode::CreateNew)
        .await
        .expect("put");
    let upstream: std::net::SocketAddr = server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("endpoint");
    let through = |proxy: &CuttingProxy| {
        let settings = updog_backup::storage::S3Settings {
            prefix: store.prefix().to_string(),
            endpoint: Some(format!("http://{}", proxy.addr)),
            ..server.settings("unused")
        };
        server.store_with(settings)
    };

    // Two cuts: the whole object and a range still read back exactly.
    let proxy = CuttingProxy::start(upstream, 3 * MIB, 2).await;
    let (digest, len, _) =
        digest_stream(through(&proxy).get("big", None).await.expect("get")).await;
    assert_eq!((digest, len), (patterned_digest(7, LARGE), LARGE as u64));
    assert_eq!(proxy.cuts_left(), 0, "the proxy did not cut the download");
    let proxy = CuttingProxy::start(upstream, 2 * MIB, 1).await;
    let got = through(&proxy)
        .get_bytes("big", Some(MIB as u64..15 * MIB as u64))
        .await
        .expect("ranged get");
    assert!(
        got == pattern_bytes(7, LARGE).slice(MIB..15 * MIB),
        "resumed range differs"
    );
    assert_eq!(proxy.cuts_left(), 0, "the proxy did not cut the download");

    // Every connection cut: the stream ends with an error once the resumes are spent.
    let proxy = CuttingProxy::start(upstream, MIB, usize::MAX).await;
    let mut stream = through(&proxy).get("big", None).await.expect("get");
    let mut received = 0;
    let error = loop {
        match stream.next().await {
            Some(Ok(chunk)) => received += chunk.len(),
            Some(Err(error)) => break error,
            None => panic!("a download cut every MiB completed ({received} bytes)"),
        }
    };
    assert!(received < LARGE, "{received}");
    assert!(
        stream.next().await.is_none(),
        "the stream goes on after its error"
    );
    eprintln!("download given up after {received} bytes: {error}");

    // The object replaced between the cut and the resume: an error, never a mix of versions.
    let proxy = CuttingProxy::start(upstream, 3 * MIB, 1).await;
    let mut stream = through(&proxy).get("big", None).await.expect("get");
    let first = stream
        .next()
        .await
        .expect("a first chunk")
        .expect("first chunk");
    store
        .put("big", patterned(8, LARGE, MIB), PutMode::Overwrite)
        .await
        .expect("overwrite");
    let mut received = first.len();
    let error = loop {
        match stream.next().await {
            Some(Ok(chunk)) => received += chunk.len(),
            Some(Err(error)) => break error,
            None => panic!("a download resumed on a replaced object completed ({received} bytes)"),
        }
    };
    assert!(error.to_string().contains("412"), "{error}");
}

/// A TCP proxy that cuts each connection once it has forwarded `cut_after` bytes from the server,
/// while it has cuts left.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    async fn start(upstream: std::net::SocketAddr, cut_after: usize, cuts: usize) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(cuts));
        let proxy_cuts = Arc::clone(&cuts);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::forward(
                    client,
                    upstream,
                    cut_after,
                    Arc::clone(&proxy_cuts),
                ));
            }
        });
        CuttingProxy { addr, cuts }
    }

    fn cuts_left(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn forward(
        client: tokio::net::TcpStream,
        upstream: std::net::SocketAddr,
        cut_after: usize,
        cuts: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let requests =
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
        let mut buf = vec![0u8; 64 * 1024];
        let mut forwarded = 0;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let cut = forwarded + n > cut_after
                && cuts
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok();
            if cut {
                let _ = client_write.write_all(&buf[..cut_after - forwarded]).await;
                break; // dropping both halves closes the connection mid-response
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            forwarded += n;
        }
        requests.abort();
    }
}
