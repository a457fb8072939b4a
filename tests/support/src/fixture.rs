//! Facts about the reference fixture written by hand, independent of the code under test:
//! shared by the end-to-end tests, the fault suite and the benches.

/// Every table of the reference schema with the rows of tenant `$ORG` (written by hand, not
/// by the catalog under test). `None`: global, every row.
pub const TENANT_FILTERS: &[(&str, Option<&str>)] = &[
    ("app.currencies", None),
    ("app.organizations", Some("id = '$ORG'")),
    ("app.users", Some("organization_id = '$ORG'")),
    ("app.funds", Some("organization_id = '$ORG'")),
    ("app.fund_permissions", Some("organization_id = '$ORG'")),
    ("audit.events", Some("organization_id = '$ORG'")),
    (
        "app.fundconfigs",
        Some("fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')"),
    ),
    (
        "app.portfoliocompanies",
        Some("fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')"),
    ),
    (
        "app.investments",
        Some("fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')"),
    ),
    (
        "app.forecast_snapshots",
        Some("fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')"),
    ),
    (
        "app.reserve_allocations",
        Some("fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')"),
    ),
    (
        "app.investment_lots",
        Some(
            "investment_id IN (SELECT i.id FROM app.investments i JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = '$ORG')",
        ),
    ),
];

/// The tenant tables of [`TENANT_FILTERS`] (every one but the global `app.currencies`), in its
/// order, with their filters.
pub fn tenant_tables() -> impl Iterator<Item = (&'static str, &'static str)> {
    TENANT_FILTERS
        .iter()
        .filter_map(|&(table, filter)| Some((table, filter?)))
}

/// What `check` tells the DBA to run so that every DELETE can be routed.
pub const REPLICA_IDENTITY_FIXES: &str = "
    ALTER TABLE app.users REPLICA IDENTITY FULL;
    ALTER TABLE app.fund_permissions REPLICA IDENTITY FULL;
    ALTER TABLE app.portfoliocompanies REPLICA IDENTITY FULL;
    ALTER TABLE app.investment_lots REPLICA IDENTITY FULL;
    ALTER TABLE app.reserve_allocations REPLICA IDENTITY FULL;
    ALTER TABLE app.forecast_snapshots REPLICA IDENTITY FULL;";

impl super::postgres::Cluster {
    /// A fixture database (see [`Cluster::fixture_db`]) after the replica identity fixes that
    /// `check` asks for: every change of it can be captured and routed.
    pub async fn capture_fixture_db(&self, name_hint: &str, tenants: u32, scale: &str) -> String {
        let db = self.fixture_db(name_hint, tenants, scale).await;
        self.client(&db)
            .await
            .batch_execute(REPLICA_IDENTITY_FIXES)
            .await
            .unwrap();
        db
    }
}

/// A configuration for the fixture database at `source_url`: its schemas and global table,
/// `source_extra` lines in `[source]`, the `[storage]` lines, the recipient and identity file,
/// then `rest` (more sections, e.g. `[restore]`).
pub fn config_toml(
    source_url: &str,
    source_extra: &str,
    storage: &str,
    recipient: &str,
    identity: &std::path::Path,
    rest: &str,
) -> String {
    format!(
        r#"[source]
url = "{source_url}"
schemas = ["app", "audit"]
global_tables = ["app.currencies"]
{source_extra}
[storage]
{storage}

[encryption]
recipients = ["{recipient}"]
identity_file = "{identity}"
{rest}"#,
        identity = identity.display(),
    )
}
