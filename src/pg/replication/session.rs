//! A walsender session in logical (`replication=database`) mode: startup, the replication
//! commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `DROP_REPLICATION_SLOT`) and simple
//! queries.
//!
//! Owns [`ReplicationConnection`] and the rule that one exchange runs at a time: a call that fails
//! or is cancelled halfway leaves the connection unusable rather than out of step with the server.
//! It must never choose slots, positions or tables (the caller's decisions) and never interprets
//! WAL payloads; the byte stream is `super::transport`'s, the framing `super::wire`'s, the
//! password exchange `super::auth`'s.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, Config};

use super::error::ReplicationError;
use super::transport::Socket;
use super::wire::{
    BackendMessage, MessageReader, Row, ServerFields, message_name, parse_columns, parse_row,
};
use crate::pg::Lsn;
use crate::pg::quote_ident;

/// `application_name` sent when the config does not set one, so that the walsender is
/// recognisable in `pg_stat_replication` and `pg_stat_activity`.
pub const DEFAULT_APPLICATION_NAME: &str = "updog-backup";

/// Slot names PostgreSQL accepts: `ReplicationSlotValidateName`, NAMEDATALEN - 1.
const MAX_SLOT_NAME_LEN: usize = 63;

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (`pg_control_system().system_identifier`), as text because
    /// it is an unsigned 64-bit number that only ever gets compared.
    pub system_id: String,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database this walsender is connected to.
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with the slot's initial snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSnapshot {
    /// Export it under a name that other sessions can adopt with `SET TRANSACTION SNAPSHOT`.
    Export,
    /// Do not export it.
    NoExport,
    /// Make it the snapshot of the transaction open on this (walsender) connection.
    Use,
}

impl SlotSnapshot {
    fn option_value(self) -> &'static str {
        match self {
            SlotSnapshot::Export => "export",
            SlotSnapshot::NoExport => "nothing",
            SlotSnapshot::Use => "use",
        }
    }
}

/// `CREATE_REPLICATION_SLOT`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The LSN from which the slot streams: every transaction committing after it comes through
    /// the slot, every transaction committed before it is in the snapshot.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, with [`SlotSnapshot::Export`] only.
    pub snapshot_name: Option<String>,
}

/// The cancel key the server hands out at startup.
#[derive(Clone, Copy)]
struct BackendKey {
    process_id: i32,
    // Kept for a future CancelRequest; never printed.
    #[allow(dead_code)]
    secret_key: i32,
}

/// A walsender session in logical (`replication=database`) mode.
///
/// One command at a time: every method takes `&mut self`. If a call fails halfway through an
/// exchange or its future is dropped before it finishes, the connection no longer knows where the
/// server is in the protocol and every later call returns [`ReplicationError::Closed`]; open a new
/// connection.
pub struct ReplicationConnection<S = Socket> {
    // The framing (`super::wire`) reads and writes these, and the CopyBoth stream
    // (`super::stream`) takes the connection over and speaks on them.
    pub(super) stream: S,
    pub(super) reader: MessageReader,
    pub(super) write_buf: BytesMut,
    /// ParameterStatus values, which `super::wire` records as they arrive.
    pub(super) parameters: HashMap<String, String>,
    backend_key: Option<BackendKey>,
    /// False from the start of each exchange until it completes cleanly.
    pub(super) in_sync: bool,
}

impl<S> fmt::Debug for ReplicationConnection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("backend_pid", &self.backend_key.map(|k| k.process_id))
            .field("server_version", &self.parameters.get("server_version"))
            .field("in_sync", &self.in_sync)
            .finish_non_exhaustive()
    }
}

impl<S> ReplicationConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Runs startup and authentication over an already open stream — the way in for a TLS stream
    /// negotiated by the caller. Reads the same config fields as [`ReplicationConnection::connect`]
    /// except the address ones.
    ///
    /// # Errors
    /// As [`ReplicationConnection::connect`].
    pub async fn connect_stream(stream: S, config: &Config) -> Result<Self, ReplicationError> {
        let user = config.get_user().ok_or_else(|| {
            ReplicationError::Config("no user given; set one in the source URL".into())
        })?;
        if config.get_channel_binding() == ChannelBinding::Require {
            return Err(ReplicationError::Config(
                "channel_binding=require is not supported by the replication connection (it \
                 authenticates with SCRAM-SHA-256, over TLS too); use channel_binding=prefer"
                    .into(),
            ));
        }
        let mut connection = ReplicationConnection {
            stream,
            reader: MessageReader::default(),
            write_buf: BytesMut::new(),
            parameters: HashMap::new(),
            backend_key: None,
            in_sync: false,
        };

        let application_name = config
            .get_application_name()
            .unwrap_or(DEFAULT_APPLICATION_NAME);
        let mut parameters = vec![("user", user)];
        if let Some(dbname) = config.get_dbname() {
            parameters.push(("database", dbname));
        }
        parameters.extend([
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
        ]);
        if let Some(options) = config.get_options() {
            parameters.push(("options", options));
        }
        frontend::startup_message(parameters, &mut connection.write_buf).map_err(|e| {
            ReplicationError::Config(format!("cannot encode startup parameters: {e}"))
        })?;
        connection.send().await?;

        connection.authenticate(user, config.get_password()).await?;
        connection.wait_until_ready().await?;
        connection.in_sync = true;
        Ok(connection)
    }

    /// The server's process id for this session (`pg_stat_replication.pid`).
    #[must_use]
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|k| k.process_id)
    }

    /// A parameter the server reported (ParameterStatus), e.g. `server_version`.
    #[must_use]
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Runs `sql` with the simple-query protocol and returns every row of every result, values in
    /// text format.
    ///
    /// On a walsender this accepts the replication commands and, with `replication=database`,
    /// plain SQL. Rows are collected in memory, which suits the one-row answers of replication
    /// commands and small catalog queries, nothing bigger. COPY is not supported here.
    ///
    /// # Errors
    /// [`ReplicationError::Server`] if the server rejects the command (the connection stays usable
    /// unless the error was FATAL), [`ReplicationError::Closed`] if an earlier call left the
    /// connection unusable, I/O and protocol errors otherwise.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        self.begin_exchange()?;
        frontend::query(sql, &mut self.write_buf).map_err(|e| {
            self.write_buf.clear();
            self.in_sync = true;
            ReplicationError::Protocol(format!("cannot encode query: {e}"))
        })?;
        self.send().await?;

        let mut rows = Vec::new();
        let mut columns: Option<Arc<[String]>> = None;
        let mut error: Option<ReplicationError> = None;
        loop {
            let message = match self.read_message().await {
                Ok(message) => message,
                // A server that reported an error and then hung up: its error says more.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            let message = match message {
                BackendMessage::Message(message) => message,
                BackendMessage::CopyBothResponse(response) => {
                    // The server now expects CopyData from us; there is no way back to idle.
                    return Err(ReplicationError::Protocol(format!(
                        "simple_query got CopyBothResponse (format {}, {} columns); \
                         START_REPLICATION needs the streaming API",
                        response.format,
                        response.column_formats.len()
                    )));
                }
            };
            match message {
                Message::RowDescription(body) => columns = Some(parse_columns(&body)?),
                Message::DataRow(body) => {
                    let columns = columns.clone().ok_or_else(|| {
                        ReplicationError::Protocol("DataRow before RowDescription".into())
                    })?;
                    rows.push(parse_row(columns, &body)?);
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => columns = None,
                Message::ErrorResponse(body) => {
                    let fields = ServerFields::parse(body.fields())?;
                    if fields.is_fatal() {
                        return Err(fields.into_error());
                    }
                    // Keep the first error; the server skips the rest of the query string.
                    error.get_or_insert_with(|| fields.into_error());
                }
                Message::ReadyForQuery(_) => {
                    self.in_sync = true;
                    return match error {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    };
                }
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(ReplicationError::Protocol(
                        "simple_query does not support COPY".into(),
                    ));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} during a simple query",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: which cluster, timeline and WAL position this is.
    ///
    /// # Errors
    /// As [`ReplicationConnection::simple_query`], and [`ReplicationError::Protocol`] if the
    /// answer does not have the documented shape.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const COMMAND: &str = "IDENTIFY_SYSTEM";
        let rows = self.simple_query(COMMAND).await?;
        let row = single_row(COMMAND, &rows)?;
        let timeline = required(row, COMMAND, "timeline")?;
        let xlogpos = required(row, COMMAND, "xlogpos")?;
        Ok(SystemIdentity {
            system_id: required(row, COMMAND, "systemid")?.to_owned(),
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::Protocol(format!("{COMMAND}: invalid timeline {timeline:?}"))
            })?,
            xlogpos: xlogpos
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("{COMMAND}: {e}")))?,
            dbname: row.get("dbname").map(str::to_owned),
        })
    }

    /// Creates a logical slot for `pgoutput`:
    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL pgoutput (SNAPSHOT '…')`
    /// (PostgreSQL 15 syntax).
    ///
    /// A temporary slot disappears when this connection ends. With [`SlotSnapshot::Export`] the
    /// exported snapshot stays valid only until the next command on this connection (or its end):
    /// import it elsewhere (`SET TRANSACTION SNAPSHOT`) before calling anything else here. The
    /// command may wait for transactions running at the time to finish.
    ///
    /// # Errors
    /// [`ReplicationError::InvalidSlotName`] before anything is sent; `42710` if the slot exists;
    /// otherwise as [`ReplicationConnection::simple_query`].
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SlotSnapshot,
    ) -> Result<CreatedSlot, ReplicationError> {
        const COMMAND: &str = "CREATE_REPLICATION_SLOT";
        validate_slot_name(name)?;
        let sql = format!(
            "{COMMAND} {} {}LOGICAL pgoutput (SNAPSHOT '{}')",
            quote_ident(name),
            if temporary { "TEMPORARY " } else { "" },
            snapshot.option_value()
        );
        let rows = self.simple_query(&sql).await?;
        let row = single_row(COMMAND, &rows)?;
        let consistent_point = required(row, COMMAND, "consistent_point")?;
        let created = CreatedSlot {
            slot_name: required(row, COMMAND, "slot_name")?.to_owned(),
            consistent_point: consistent_point
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("{COMMAND}: {e}")))?,
            snapshot_name: row.get("snapshot_name").map(str::to_owned),
        };
        if snapshot == SlotSnapshot::Export && created.snapshot_name.is_none() {
            return Err(ReplicationError::Protocol(format!(
                "{COMMAND}: the server exported no snapshot"
            )));
        }
        Ok(created)
    }

    /// `DROP_REPLICATION_SLOT "name" [WAIT]`. Without `wait`, a slot in use by another
    /// connection is an error (`55006`); with it, the command waits until the slot is free.
    ///
    /// # Errors
    /// [`ReplicationError::InvalidSlotName`] before anything is sent; `42704` if there is no such
    /// slot; otherwise as [`ReplicationConnection::simple_query`].
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        validate_slot_name(name)?;
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(drop)
    }

    /// Ends the session politely: Terminate, then shut the stream down. The server drops the
    /// session's temporary slots and exported snapshots when it sees either.
    ///
    /// # Errors
    /// [`ReplicationError::Io`] if the stream was already broken; the session ends either way,
    /// so callers usually only log it.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        self.write_buf.clear();
        frontend::terminate(&mut self.write_buf);
        let sent = self.send().await;
        let shut = self
            .stream
            .shutdown()
            .await
            .map_err(|e| ReplicationError::io("shutting down the replication stream", e));
        sent.and(shut)
    }

    /// Marks the start of a request/response exchange; refuses if the previous one did not end.
    pub(super) fn begin_exchange(&mut self) -> Result<(), ReplicationError> {
        if !self.in_sync {
            return Err(ReplicationError::Closed);
        }
        self.in_sync = false;
        self.write_buf.clear();
        Ok(())
    }

    /// After AuthenticationOk: ParameterStatus, BackendKeyData, then ReadyForQuery.
    async fn wait_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            match self.read_message().await? {
                BackendMessage::Message(Message::BackendKeyData(body)) => {
                    self.backend_key = Some(BackendKey {
                        process_id: body.process_id(),
                        secret_key: body.secret_key(),
                    });
                }
                BackendMessage::Message(Message::ReadyForQuery(_)) => return Ok(()),
                BackendMessage::Message(Message::ErrorResponse(body)) => {
                    return Err(ServerFields::parse(body.fields())?.into_error());
                }
                BackendMessage::Message(other) => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} during startup",
                        message_name(&other)
                    )));
                }
                BackendMessage::CopyBothResponse(_) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected CopyBothResponse during startup".into(),
                    ));
                }
            }
        }
    }
}

fn single_row<'r>(command: &str, rows: &'r [Row]) -> Result<&'r Row, ReplicationError> {
    match rows {
        [row] => Ok(row),
        _ => Err(ReplicationError::Protocol(format!(
            "{command} returned {} rows, expected 1",
            rows.len()
        ))),
    }
}

fn required<'r>(row: &'r Row, command: &str, column: &str) -> Result<&'r str, ReplicationError> {
    row.get(column).ok_or_else(|| {
        ReplicationError::Protocol(format!("{command} returned no value for {column}"))
    })
}

/// Refuses what PostgreSQL's `ReplicationSlotValidateName` refuses, before anything is sent.
pub(super) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_SLOT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ReplicationError::InvalidSlotName {
            // Bounded, so that a garbage name cannot flood a log line.
            name: name.chars().take(80).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, duplex};

    use super::super::mock::{
        MockServer, authentication, backend_key_data, command_complete, config, copy_both_response,
        cstrs, data_row, error_response, parameter_status, ready, row_description, server_fields,
        with_server,
    };
    use super::*;
    use crate::retry::Classify as _;

    #[tokio::test]
    async fn startup_and_query_survive_one_byte_reads() {
        let (connection, server) = with_server(1, &config(), |mut server| async move {
            let params = server.read_startup().await;
            assert_eq!(params.get("user").map(String::as_str), Some("alice"));
            assert_eq!(params.get("database").map(String::as_str), Some("updog"));
            assert_eq!(
                params.get("replication").map(String::as_str),
                Some("database")
            );
            assert_eq!(
                params.get("application_name").map(String::as_str),
                Some("updog-backup")
            );
            assert_eq!(
                params.get("client_encoding").map(String::as_str),
                Some("UTF8")
            );
            server
                .send(&[
                    authentication(0, b""),
                    parameter_status("server_version", "15.18"),
                    backend_key_data(4242, 99),
                    server_fields(b'N', "WARNING", "01000", "just saying", None),
                    ready(),
                ])
                .await;
            let (tag, body) = server.read_message().await;
            assert_eq!(
                (tag, body.as_slice()),
                (b'Q', b"IDENTIFY_SYSTEM\0".as_slice())
            );
            server
                .send(&[
                    row_description(&["systemid", "timeline", "xlogpos", "dbname"]),
                    data_row(&[
                        Some("7312345678901234567"),
                        Some("1"),
                        Some("16/B374D848"),
                        Some("updog"),
                    ]),
                    command_complete("IDENTIFY_SYSTEM"),
                    ready(),
                ])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        assert_eq!(connection.backend_pid(), Some(4242));
        assert_eq!(connection.parameter("server_version"), Some("15.18"));
        let identity = connection.identify_system().await.expect("identify");
        assert_eq!(
            identity,
            SystemIdentity {
                system_id: "7312345678901234567".into(),
                timeline: 1,
                xlogpos: Lsn(0x16_B374_D848),
                dbname: Some("updog".into()),
            }
        );
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn application_name_and_options_come_from_the_config() {
        let mut config = config();
        config
            .application_name("custom")
            .options("-c wal_sender_timeout=0");
        let (connection, server) = with_server(4096, &config, |mut server| async move {
            let params = server.read_startup().await;
            assert_eq!(
                params.get("application_name").map(String::as_str),
                Some("custom")
            );
            assert_eq!(
                params.get("options").map(String::as_str),
                Some("-c wal_sender_timeout=0")
            );
            server.send(&[authentication(0, b""), ready()]).await;
            server
        })
        .await;
        connection.expect("connects");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_query_error_drains_to_ready_and_keeps_the_connection() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server
                .send(&[
                    error_response(
                        "ERROR",
                        "42601",
                        "syntax error",
                        Some("check the replication grammar"),
                    ),
                    ready(),
                ])
                .await;
            let (_, body) = server.read_message().await;
            assert_eq!(body, cstrs(&["SELECT 1"]));
            server
                .send(&[
                    row_description(&["?column?", "nothing"]),
                    data_row(&[Some("1"), None]),
                    command_complete("SELECT 1"),
                    ready(),
                ])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection.simple_query("BOGUS").await.expect_err("syntax");
        assert_eq!(err.code(), Some("42601"));
        assert!(!err.class().is_transient());
        assert!(
            err.to_string()
                .contains("hint: check the replication grammar"),
            "{err}"
        );
        let rows = connection
            .simple_query("SELECT 1")
            .await
            .expect("usable after error");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].columns(), ["?column?", "nothing"]);
        assert_eq!(rows[0].values(), [Some("1".to_owned()), None]);
        assert_eq!(rows[0].get("?column?"), Some("1"));
        assert_eq!(rows[0].get("nothing"), None);
        assert_eq!(rows[0].get("absent"), None);
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_fatal_error_is_reported_even_though_the_server_hangs_up() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server
                .send(&[error_response(
                    "FATAL",
                    "57P01",
                    "terminating connection due to administrator command",
                    None,
                )])
                .await;
            drop(server.stream);
            MockServer {
                stream: duplex(1).0,
            }
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection.identify_system().await.expect_err("fatal");
        assert_eq!(err.code(), Some("57P01"));
        assert!(err.class().is_transient());
        let err = connection.identify_system().await.expect_err("unusable");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_cancelled_call_leaves_the_connection_unusable() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            // Never answers; keeps the stream open until the client gives up.
            let _ = server.stream.read_u8().await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let call = tokio::time::timeout(Duration::from_millis(50), connection.identify_system());
        assert!(call.await.is_err(), "the server never answers");
        let err = connection.identify_system().await.expect_err("out of sync");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
        assert!(err.class().is_transient());
        connection.close().await.expect("terminate");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn close_sends_terminate() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            assert_eq!(server.read_message().await, (b'X', Vec::new()));
            server
        })
        .await;
        connection.expect("connects").close().await.expect("close");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn create_slot_sends_the_pg15_command_and_reads_the_answer() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            let (_, body) = server.read_message().await;
            assert_eq!(
                body,
                cstrs(&[
                    "CREATE_REPLICATION_SLOT \"updog_backup\" TEMPORARY LOGICAL pgoutput \
                     (SNAPSHOT 'export')"
                ])
            );
            server
                .send(&[
                    row_description(&[
                        "slot_name",
                        "consistent_point",
                        "snapshot_name",
                        "output_plugin",
                    ]),
                    data_row(&[
                        Some("updog_backup"),
                        Some("0/1A2B3C4"),
                        Some("00000003-00000002-1"),
                        Some("pgoutput"),
                    ]),
                    command_complete("CREATE_REPLICATION_SLOT"),
                    ready(),
                ])
                .await;
            let (_, body) = server.read_message().await;
            assert_eq!(
                body,
                cstrs(&["DROP_REPLICATION_SLOT \"updog_backup\" WAIT"])
            );
            server
                .send(&[command_complete("DROP_REPLICATION_SLOT"), ready()])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let slot = connection
            .create_logical_slot("updog_backup", true, SlotSnapshot::Export)
            .await
            .expect("slot");
        assert_eq!(
            slot,
            CreatedSlot {
                slot_name: "updog_backup".into(),
                consistent_point: Lsn(0x1A2_B3C4),
                snapshot_name: Some("00000003-00000002-1".into()),
            }
        );
        connection
            .drop_slot("updog_backup", true)
            .await
            .expect("drop");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn copy_both_in_a_simple_query_is_refused() {
        let (connection, _server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server.send(&[copy_both_response(0)]).await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection
            .simple_query("START_REPLICATION SLOT \"s\" LOGICAL 0/0")
            .await
            .expect_err("not here");
        assert!(err.to_string().contains("CopyBothResponse"), "{err}");
        let err = connection
            .simple_query("SELECT 1")
            .await
            .expect_err("copy mode");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
    }

    #[tokio::test]
    async fn invalid_slot_names_are_refused_before_sending() {
        // No server script: any byte sent would be an error on its side, and it never answers.
        let (connection, _server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            let _ = server.stream.read_u8().await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection
            .create_logical_slot("Bad-Name", false, SlotSnapshot::NoExport)
            .await
            .expect_err("invalid");
        assert!(
            matches!(err, ReplicationError::InvalidSlotName { .. }),
            "{err:?}"
        );
        let err = connection
            .drop_slot("x\"; DROP", false)
            .await
            .expect_err("invalid");
        assert!(
            matches!(err, ReplicationError::InvalidSlotName { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        for good in ["a", "updog_backup", "slot_123", "_", &"a".repeat(63)] {
            assert!(validate_slot_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "A",
            "a-b",
            "a b",
            "a\"b",
            "é",
            "slot.1",
            &"a".repeat(64),
        ] {
            assert!(validate_slot_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[tokio::test]
    async fn a_user_is_required() {
        let (client, _server) = duplex(64);
        let err = ReplicationConnection::connect_stream(client, &Config::new())
            .await
            .expect_err("no user");
        assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");
    }
}
