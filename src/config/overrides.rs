//! `UPDOG_BACKUP__SECTION__KEY=value` overrides, applied to the parsed TOML before typing so
//! that an override is validated (and an unknown key rejected) exactly like the file.

use super::{ConfigError, OVERRIDE_PREFIX};

pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[OVERRIDE_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let [section, key] = path.as_slice() else {
            return Err(ConfigError::Override {
                var,
                message: "expected UPDOG_BACKUP__SECTION__KEY".into(),
            });
        };
        let section = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::Override {
                var: var.clone(),
                message: format!("[{section}] is not a table"),
            })?;
        section.insert(key.clone(), parse_value(&raw));
    }
    Ok(())
}

/// A value is read as TOML when it is one (`7`, `true`, `["a", "b"]`), else as a plain string,
/// so URLs and paths need no quoting in the environment.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}
