//! Reports over the stored event stream. `census`: which jobs used which credentials,
//! where they connected afterwards, and least-privilege intents to replace them.
pub mod census;
pub mod render;
pub mod source;

#[cfg(test)]
mod tests;

use std::path::Path;

use anyhow::Result;
use chrono::{DateTime, Utc};

/// Reads `<state_dir>/events.jsonl` (with rotated backups) and builds the census of events
/// at or after `since`.
pub fn census_from_store(state_dir: &Path, since: Option<DateTime<Utc>>) -> Result<census::Census> {
    let mut records = Vec::new();
    crate::store::read_all(state_dir, |line, e| {
        if let Some(r) = census::Record::from_line(line, e)
            && since.is_none_or(|s| r.time >= s)
        {
            records.push(r);
        }
        Ok(())
    })?;
    Ok(census::build(records, since, Utc::now()))
}
