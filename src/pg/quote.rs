//! Quoting for SQL and for the replication grammar: the only place that splices names and
//! values into statements.

/// Double-quotes an identifier (doubling embedded quotes), whatever it contains. Also right for
/// the replication grammar, where quoting keeps names like `select` or `user` from being read
/// as keywords.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."name"`, safe to splice into SQL.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A string literal: quotes doubled, backslashes literal. Right for SQL (every connection of
/// the crate runs with `standard_conforming_strings` on, the default since 9.1) and for the
/// replication grammar, whose scanner has no escape syntax at all.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(qualified("app", "select"), r#""app"."select""#);
        assert_eq!(quote_literal(r"it's \n"), r"'it''s \n'");
    }
}
