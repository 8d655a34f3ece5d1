//! Sidecar ingest: the body of `POST /v1/ingest/events`, its answer, and how
//! oversized event data is cut.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// Most events one `POST /v1/ingest/events` may carry.
pub const MAX_INGEST_EVENTS: usize = 100;
/// Largest ingested event `data`, as compact JSON text, in bytes (64 KB);
/// larger data is stored truncated (see [`truncate_event_data`]).
pub const MAX_EVENT_DATA_BYTES: usize = 64 * 1024;
/// Seconds after a run's attempt ends (it finishes, or fails and waits for
/// its retry) during which ingest still accepts its events: a sidecar's last
/// reports may arrive after the worker has written the outcome.
pub const INGEST_GRACE_SECONDS: i64 = 60;
/// Room left in [`MAX_EVENT_DATA_BYTES`] for the wrapper of truncated data
/// (its keys, `original_bytes`, and the spaces Postgres prints).
const TRUNCATION_ENVELOPE_BYTES: usize = 128;

/// The body of `POST /v1/ingest/events`: events a sidecar reports for a run.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct IngestEvents {
    /// The run the events belong to; it must be running, or its latest
    /// attempt must have ended less than 60 s ago.
    pub run_id: RunId,
    /// 1 to 100 events, stored in order.
    #[oai(validator(min_items = 1, max_items = 100))]
    pub events: Vec<IngestEvent>,
}

/// One event of an ingest batch.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct IngestEvent {
    /// What kind of event (`log`, `metric`, ...), 1 to 255 bytes.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub kind: String,
    /// Event data, any JSON. Over 64 KB (as compact JSON text) it is stored
    /// truncated and flagged.
    pub data: Value,
    /// When it happened, by the sender's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub occurred_at: Option<DateTime<Utc>>,
}

impl IngestEvents {
    /// Checks what the schema cannot: sizes in bytes, and values Postgres
    /// cannot store (`\u0000`, nesting deeper than 100 levels).
    ///
    /// # Errors
    ///
    /// The first problem found, naming the field by its path in the body
    /// (`events[3].data.x`).
    pub fn validate(&self) -> Result<(), InvalidRun> {
        if self.events.is_empty() || self.events.len() > MAX_INGEST_EVENTS {
            return Err(InvalidRun(format!(
                "events must hold 1 to {MAX_INGEST_EVENTS} events, got {}",
                self.events.len()
            )));
        }
        for (index, event) in self.events.iter().enumerate() {
            if event.kind.is_empty() || event.kind.len() > MAX_NAME_LEN {
                return Err(InvalidRun(format!(
                    "events[{index}].kind must be 1 to {MAX_NAME_LEN} bytes, got {}",
                    event.kind.len()
                )));
            }
            crate::storable::check_text(&format!("events[{index}].kind"), &event.kind)?;
            crate::storable::check(&format!("events[{index}].data"), &event.data)?;
        }
        Ok(())
    }
}

/// The answer of `POST /v1/ingest/events` when at least one event was taken.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct IngestedEvents {
    /// Events stored: the first `accepted` of the batch, in order.
    pub accepted: u32,
    /// Events refused by the rate limit: the last `rejected` of the batch.
    /// Send them again after `Retry-After` seconds.
    pub rejected: u32,
    /// How many of the accepted events were stored truncated.
    pub truncated: u32,
}

/// `data` as ingest stores it when its compact JSON text exceeds
/// [`MAX_EVENT_DATA_BYTES`]: `{"truncated": true, "original_bytes": n,
/// "data": "<prefix>"}`, where the prefix is the start of that JSON text, cut
/// on a character boundary so that the whole stored value, printed as JSON,
/// stays within 64 KB. `None` when `data` fits and is stored as sent.
pub fn truncate_event_data(data: &Value) -> Option<Value> {
    let text = data.to_string();
    if text.len() <= MAX_EVENT_DATA_BYTES {
        return None;
    }
    // The prefix is stored as a JSON string, where `"` and `\` take two
    // bytes; the compact text holds no raw control characters.
    let budget = MAX_EVENT_DATA_BYTES - TRUNCATION_ENVELOPE_BYTES;
    let mut used = 0;
    let mut end = 0;
    for (index, c) in text.char_indices() {
        let escaped = match c {
            '"' | '\\' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used + escaped > budget {
            break;
        }
        used += escaped;
        end = index + c.len_utf8();
    }
    Some(serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "data": &text[..end],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn small_event_data_is_kept_and_large_data_is_cut_within_64_kb() {
        assert_eq!(truncate_event_data(&json!({"x": "small"})), None);
        let exact = json!("a".repeat(MAX_EVENT_DATA_BYTES - 2));
        assert_eq!(truncate_event_data(&exact), None);
        // Quotes double when escaped, and 'é' takes two bytes: the cut stays
        // on a character boundary and the stored text within 64 KB.
        for filler in ["\"", "é", "x"] {
            let data = json!({ "blob": filler.repeat(100 * 1024) });
            let text = data.to_string();
            let stored = truncate_event_data(&data).expect("over 64 KB");
            assert_eq!(stored["truncated"], json!(true));
            assert_eq!(stored["original_bytes"], json!(text.len()));
            let prefix = stored["data"].as_str().expect("a string");
            assert!(text.starts_with(prefix));
            let printed = stored.to_string().len();
            assert!(printed <= MAX_EVENT_DATA_BYTES, "{filler}: {printed}");
            assert!(printed > MAX_EVENT_DATA_BYTES - 200, "{filler}: {printed}");
        }
    }

    #[test]
    fn ingest_batches_name_the_bad_field() {
        let event = |kind: &str, data: Value| IngestEvent {
            kind: kind.to_owned(),
            data,
            occurred_at: None,
        };
        let mut batch = IngestEvents {
            run_id: Uuid::nil(),
            events: vec![event("log", json!(1)); 3],
        };
        assert_eq!(batch.validate(), Ok(()));
        batch.events[2] = event("log", json!({"x": "a\u{0}b"}));
        assert_eq!(
            batch.validate().map_err(|e| e.0),
            Err("events[2].data.x contains \\u0000, which Postgres cannot store".to_owned())
        );
        batch.events[2] = event(&"k".repeat(256), json!(1));
        assert!(batch.validate().is_err());
        batch.events = vec![event("log", json!(1)); 101];
        assert!(batch.validate().is_err());
    }
}
