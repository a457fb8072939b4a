use super::*;

#[test]
fn part_sizes_grow_to_fit_large_objects_within_the_part_limit() {
    assert_eq!(part_size(1), PART_SIZE);
    assert_eq!(part_size(1000), PART_SIZE);
    assert_eq!(part_size(1001), 2 * PART_SIZE);
    assert_eq!(part_size(3001), 8 * PART_SIZE);
    assert_eq!(part_size(MAX_PARTS), 8 * PART_SIZE);
    let total: u64 = (1..=MAX_PARTS).map(|n| part_size(n) as u64).sum();
    assert!(total > 400 * (1 << 30), "{total}");
}

#[test]
fn content_range_total() {
    assert_eq!(total_size("bytes 0-99/1234"), Some(1234));
    assert_eq!(total_size("bytes 0-99/*"), None);
}

#[test]
fn prefixes_are_normalised_and_keys_mapped() {
    let settings = S3Settings {
        bucket: "b".into(),
        prefix: "/tenants/repo/".into(),
        endpoint: Some("http://127.0.0.1:1".into()),
        region: String::new(),
        force_path_style: true,
    };
    let store = S3Store::with_static_credentials(settings, "id", "secret").expect("valid settings");
    assert_eq!(store.object_key("a/b"), "tenants/repo/a/b");
    assert_eq!(store.store_key("tenants/repo/a/b"), Some("a/b"));
    assert_eq!(store.store_key("tenants/repo2/a"), None);
    assert_eq!(
        store.describe(),
        "s3://b/tenants/repo (endpoint http://127.0.0.1:1)"
    );
    assert!(!format!("{store:?}").contains("secret"));
}
