//! What a server can create of the extensions a snapshot needs. `pg_available_extension_versions`
//! lists the control and script files installed on it, so it answers without creating
//! anything: `restore` asks its target before CREATE DATABASE, `check` asks
//! `restore.target_url` on day one, so that a missing package is found before the incident.

use std::fmt;

use tokio_postgres::Client;

use crate::repository::manifest::ExtensionDependency;

/// One installable version of an extension on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub name: String,
    pub version: String,
    /// Only a superuser may create it…
    pub superuser: bool,
    /// …unless it is trusted (PostgreSQL 13+), when CREATE on the database is enough.
    pub trusted: bool,
}

/// What a server offers the role connected to it.
#[derive(Debug, Clone)]
pub struct ServerSupport {
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    pub role: String,
    pub role_is_superuser: bool,
    /// The versions of the extensions asked about.
    pub available: Vec<Available>,
}

impl ServerSupport {
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }
}

/// Asks the server behind `client` about the extensions named `names`.
pub async fn server_support(
    client: &Client,
    names: &[String],
) -> Result<ServerSupport, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_user::text,
                    (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let version_num: i32 = row.get(0);
    let available = client
        .query(
            "SELECT name::text, version, superuser, trusted FROM pg_catalog.pg_available_extension_versions
              WHERE name = ANY($1) ORDER BY 1, 2",
            &[&names],
        )
        .await?
        .into_iter()
        .map(|r| Available {
            name: r.get(0),
            version: r.get(1),
            superuser: r.get(2),
            trusted: r.get(3),
        })
        .collect();
    Ok(ServerSupport {
        version_num: u32::try_from(version_num).unwrap_or_default(),
        role: row.get(1),
        role_is_superuser: row.get::<_, Option<bool>>(2).unwrap_or(false),
        available,
    })
}

/// Why a server cannot create an extension a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionProblem {
    /// No version of it is installed on the server.
    NotInstalled {
        name: String,
        version: String,
        package: String,
    },
    /// Other versions are, not the snapshot's (creating another one could change what the
    /// schema means, so a restore does not).
    VersionMissing {
        name: String,
        version: String,
        available: Vec<String>,
        package: String,
    },
    /// Untrusted: only a superuser may create it.
    NeedsSuperuser {
        name: String,
        version: String,
        role: String,
    },
}

impl ExtensionProblem {
    pub fn extension(&self) -> &str {
        match self {
            Self::NotInstalled { name, .. }
            | Self::VersionMissing { name, .. }
            | Self::NeedsSuperuser { name, .. } => name,
        }
    }
}

impl fmt::Display for ExtensionProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInstalled {
                name,
                version,
                package,
            } => write!(
                f,
                "extension {name} ({version}) is not installed on the server: {package}"
            ),
            Self::VersionMissing {
                name,
                version,
                available,
                package,
            } => write!(
                f,
                "extension {name} is installed on the server in version(s) {} but not in {version}, the source's: {package} in that version, or update the source's (ALTER EXTENSION {name} UPDATE) and take a new snapshot",
                available.join(", ")
            ),
            Self::NeedsSuperuser {
                name,
                version,
                role,
            } => write!(
                f,
                "extension {name} ({version}) is not trusted, so only a superuser may create it and role {role} is not one: restore with a superuser role for this restore (--target-url)"
            ),
        }
    }
}

/// What stands between `server` and creating every extension of `needed`.
pub fn problems(needed: &[ExtensionDependency], server: &ServerSupport) -> Vec<ExtensionProblem> {
    let mut out = Vec::new();
    for extension in needed {
        let versions: Vec<&Available> = server
            .available
            .iter()
            .filter(|a| a.name == extension.name)
            .collect();
        let package = || package(&extension.name, server.major());
        let problem = match versions.iter().find(|a| a.version == extension.version) {
            None if versions.is_empty() => ExtensionProblem::NotInstalled {
                name: extension.name.clone(),
                version: extension.version.clone(),
                package: package(),
            },
            None => ExtensionProblem::VersionMissing {
                name: extension.name.clone(),
                version: extension.version.clone(),
                available: versions.iter().map(|a| a.version.clone()).collect(),
                package: package(),
            },
            Some(a) if a.superuser && !a.trusted && !server.role_is_superuser => {
                ExtensionProblem::NeedsSuperuser {
                    name: extension.name.clone(),
                    version: extension.version.clone(),
                    role: server.role.clone(),
                }
            }
            Some(_) => continue,
        };
        out.push(problem);
    }
    out
}

/// The extensions PostgreSQL ships in its contrib directory (plpgsql, created with every
/// database, aside).
const CONTRIB: &[&str] = &[
    "adminpack",
    "amcheck",
    "autoinc",
    "bloom",
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "dblink",
    "dict_int",
    "dict_xsyn",
    "earthdistance",
    "file_fdw",
    "fuzzystrmatch",
    "hstore",
    "insert_username",
    "intagg",
    "intarray",
    "isn",
    "lo",
    "ltree",
    "moddatetime",
    "old_snapshot",
    "pageinspect",
    "pg_buffercache",
    "pg_freespacemap",
    "pg_prewarm",
    "pg_stat_statements",
    "pg_surgery",
    "pg_trgm",
    "pg_visibility",
    "pg_walinspect",
    "pgcrypto",
    "pgrowlocks",
    "pgstattuple",
    "postgres_fdw",
    "refint",
    "seg",
    "sslinfo",
    "tablefunc",
    "tcn",
    "tsm_system_rows",
    "tsm_system_time",
    "unaccent",
    "uuid-ossp",
    "xml2",
];

/// Well-known extensions outside contrib and their Debian/Ubuntu (PGDG) package, `{}` for
/// the major version.
const PACKAGES: &[(&str, &str)] = &[
    ("postgis", "postgresql-{}-postgis-3"),
    ("postgis_raster", "postgresql-{}-postgis-3"),
    ("postgis_topology", "postgresql-{}-postgis-3"),
    ("postgis_tiger_geocoder", "postgresql-{}-postgis-3"),
    ("postgis_sfcgal", "postgresql-{}-postgis-3"),
    ("address_standardizer", "postgresql-{}-postgis-3"),
    ("pgrouting", "postgresql-{}-pgrouting"),
    ("vector", "postgresql-{}-pgvector"),
    ("timescaledb", "timescaledb-2-postgresql-{}"),
    ("pg_partman", "postgresql-{}-partman"),
    ("pg_cron", "postgresql-{}-cron"),
    ("pgaudit", "postgresql-{}-pgaudit"),
    ("pg_repack", "postgresql-{}-repack"),
    ("hypopg", "postgresql-{}-hypopg"),
    ("orafce", "postgresql-{}-orafce"),
    ("pg_hint_plan", "postgresql-{}-pg-hint-plan"),
    ("pgtap", "postgresql-{}-pgtap"),
    ("ip4r", "postgresql-{}-ip4r"),
    ("semver", "postgresql-{}-semver"),
    ("rum", "postgresql-{}-rum"),
    ("h3", "postgresql-{}-h3"),
    ("plpython3u", "postgresql-plpython3-{}"),
    ("plperl", "postgresql-plperl-{}"),
    ("plperlu", "postgresql-plperl-{}"),
    ("pltcl", "postgresql-pltcl-{}"),
    ("pltclu", "postgresql-pltcl-{}"),
];

/// What to install on a PostgreSQL `major` server so that it has extension `name`.
pub fn package(name: &str, major: u32) -> String {
    if CONTRIB.contains(&name) {
        return format!(
            "it is a contrib module: install PostgreSQL {major}'s contrib package (Debian/Ubuntu: postgresql-{major}, which includes it; RHEL: postgresql{major}-contrib)"
        );
    }
    if let Some((_, package)) = PACKAGES.iter().find(|(n, _)| *n == name) {
        return format!(
            "install {} (Debian/Ubuntu, PGDG)",
            package.replace("{}", &major.to_string())
        );
    }
    format!(
        "install the package that provides {name}.control for PostgreSQL {major} (it goes in `pg_config --sharedir`/extension)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needed(name: &str, version: &str) -> ExtensionDependency {
        ExtensionDependency {
            name: name.into(),
            version: version.into(),
            schema: "public".into(),
        }
    }

    fn available(name: &str, version: &str, trusted: bool) -> Available {
        Available {
            name: name.into(),
            version: version.into(),
            superuser: true,
            trusted,
        }
    }

    fn server(superuser: bool) -> ServerSupport {
        ServerSupport {
            version_num: 150_018,
            role: "updog_restore".into(),
            role_is_superuser: superuser,
            available: vec![
                available("citext", "1.5", true),
                available("citext", "1.6", true),
                available("dblink", "1.2", false),
            ],
        }
    }

    #[test]
    fn each_missing_extension_is_named_with_its_package() {
        let found = problems(
            &[
                needed("citext", "1.6"),
                needed("hstore", "1.8"),
                needed("citext", "9.9"),
                needed("postgis", "3.4.2"),
                needed("dblink", "1.2"),
            ],
            &server(false),
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 4, "{text:#?}");
        assert!(
            text[0].contains("hstore (1.8) is not installed")
                && text[0].contains("contrib")
                && text[0].contains("postgresql-15"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("in version(s) 1.5, 1.6 but not in 9.9"),
            "{}",
            text[1]
        );
        assert!(text[2].contains("postgresql-15-postgis-3"), "{}", text[2]);
        assert!(
            text[3].contains("not trusted") && text[3].contains("updog_restore"),
            "{}",
            text[3]
        );
        assert_eq!(found[3].extension(), "dblink");
    }

    #[test]
    fn a_superuser_may_create_untrusted_extensions() {
        assert!(problems(&[needed("dblink", "1.2")], &server(true)).is_empty());
    }

    #[test]
    fn unknown_extensions_say_which_file_is_missing() {
        let hint = package("acme_money", 16);
        assert!(
            hint.contains("acme_money.control for PostgreSQL 16"),
            "{hint}"
        );
    }
}
