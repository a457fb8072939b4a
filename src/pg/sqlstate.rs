//! What a PostgreSQL error means for a retry: the one mapping from SQLSTATE to
//! [`ErrorClass`], used by every connection of the crate (SQL and replication).

use crate::retry::ErrorClass;

/// The class of a server error by its SQLSTATE. Transient are the classes that describe the
/// server's state rather than the request: connection exceptions (08), rollbacks such as
/// serialization failures (40), exhausted resources such as `max_wal_senders` (53), operator
/// intervention such as a shutdown (57), system errors (58), and `55006 object_in_use`, which is
/// what a slot still held by a dying previous connection reports. Everything else (syntax and
/// privileges 42, authentication 28, a missing object) meets the same answer next time.
pub fn class_of_code(code: &str) -> ErrorClass {
    if matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58")) || code == "55006" {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// The class of a tokio-postgres error: a server error by its SQLSTATE; anything else (the
/// connection closed, the network failed, a timeout) is transient.
pub fn class_of(e: &tokio_postgres::Error) -> ErrorClass {
    match e.as_db_error() {
        Some(db) => class_of_code(db.code().code()),
        None => ErrorClass::Transient,
    }
}

/// The message of a database error including its detail and hint, which `Display` of
/// tokio-postgres leaves out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_state_is_transient_the_request_is_not() {
        for code in ["08006", "40001", "53300", "57P01", "58030", "55006"] {
            assert_eq!(class_of_code(code), ErrorClass::Transient, "{code}");
        }
        for code in ["42501", "28P01", "42704", "55000", "3D000"] {
            assert_eq!(class_of_code(code), ErrorClass::Permanent, "{code}");
        }
    }
}
