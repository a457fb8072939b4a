//! Pipelining: executes sent without waiting for the answers of the ones before, and the
//! bounds that keep the unanswered ones from holding unbounded memory.
//!
//! Stream order survives because it is fixed when a request is first polled; why, and the one
//! rule the rest of the replayer keeps for it, is in the replay module's documentation.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use futures::StreamExt;

use super::binding::TextParam;
use super::catalog::Table;
use super::statements::StatementKey;
use super::{ReplayError, Replayer};

/// Most pipelined executes awaiting their answer.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most bytes of values held by pipelined executes awaiting their answer.
pub const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// A pipelined execute: resolves to the value bytes it held.
pub(super) type Pending<'a> = Pin<Box<dyn Future<Output = Result<usize, ReplayError>> + Send + 'a>>;

impl<'a> Replayer<'a> {
    /// Queues one execute of the statement for `key`, preparing it first if needed.
    pub(super) async fn execute(
        &mut self,
        table: &Table,
        key: StatementKey,
        params: Vec<TextParam>,
    ) -> Result<(), ReplayError> {
        let prepared = self.prepared(table, key).await?;
        let bytes: usize = params
            .iter()
            .map(|p| p.0.as_ref().map_or(0, Bytes::len) + 16)
            .sum();
        let client = self.client;
        let mut pending: Pending<'a> = Box::pin(async move {
            let count = client
                .execute_raw(&prepared.statement, params.iter())
                .await
                .map_err(|e| ReplayError::database(&prepared.table, prepared.op, &e))?;
            prepared.check(&params, count)?;
            Ok(bytes)
        });
        // The first poll writes the request to the connection's queue: order is fixed now.
        if let Poll::Ready(result) = futures::poll!(pending.as_mut()) {
            return result.map(|_| ());
        }
        self.in_flight.push_back(pending);
        self.in_flight_bytes += bytes;
        while self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight_bytes > MAX_IN_FLIGHT_BYTES {
            self.complete_one().await?;
        }
        Ok(())
    }

    async fn complete_one(&mut self) -> Result<bool, ReplayError> {
        match self.in_flight.next().await {
            Some(result) => {
                self.in_flight_bytes = self.in_flight_bytes.saturating_sub(result?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Waits for every pipelined execute, in order; the first failure is the error.
    pub(super) async fn drain(&mut self) -> Result<(), ReplayError> {
        while self.complete_one().await? {}
        Ok(())
    }

    pub(super) async fn flush_all(&mut self) -> Result<(), ReplayError> {
        self.flush_run().await?;
        self.drain().await
    }
}
