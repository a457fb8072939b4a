//! PLACEHOLDER until the replay engine lands from the `replay` branch.
use crate::replication::pgoutput::Message;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplayStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("placeholder")]
    Placeholder,
}

pub struct Replayer<'a> {
    _client: &'a tokio_postgres::Client,
}

impl<'a> Replayer<'a> {
    pub fn new(client: &'a tokio_postgres::Client) -> Self {
        Self { _client: client }
    }
    pub async fn apply(&mut self, _message: &Message) -> Result<(), ReplayError> {
        Err(ReplayError::Placeholder)
    }
    pub async fn finish(self) -> Result<ReplayStats, ReplayError> {
        Err(ReplayError::Placeholder)
    }
}
