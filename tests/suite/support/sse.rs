//! A Server-Sent Events client for the stream tests: a real HTTP request
//! (reqwest), its body read as bytes and cut into messages as the SSE spec
//! says (blocks separated by a blank line; `id:`, `event:`, `data:` fields;
//! lines starting with `:` are comments).

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;

/// The longest a test waits for the next message of a stream.
pub const NEXT_WITHIN: Duration = Duration::from_secs(30);

/// One message as a client receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `id:`, the position to resume from.
    pub id: String,
    /// `event:`, the message's name.
    pub event: String,
    /// `data:`, parsed as JSON.
    pub data: Value,
}

/// An open stream.
pub struct Stream {
    response: Response,
    buffer: Vec<u8>,
    /// Comment lines seen so far (keep-alives).
    pub comments: usize,
}

/// `GET url` under `token` with `Last-Event-ID: last_event_id` when given.
pub async fn open(
    client: &Client,
    url: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> Response {
    let mut request = client
        .get(url)
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.expect("send")
}

impl Stream {
    /// Opens `url` and expects a stream (200, `text/event-stream`).
    pub async fn connect(
        client: &Client,
        url: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let response = open(client, url, token, last_event_id).await;
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        Self::of(response)
    }

    /// Reads `response` (a 200 stream) as messages.
    pub fn of(response: Response) -> Self {
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "text/event-stream");
        Stream {
            response,
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// The next message, or `None` once the server closed the stream.
    /// Panics if none comes within [`NEXT_WITHIN`].
    pub async fn next(&mut self) -> Option<Message> {
        // One deadline for the message: keep-alive comments do not extend it.
        let deadline = tokio::time::Instant::now() + NEXT_WITHIN;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("a message is UTF-8");
                match self.parse(&block) {
                    Some(message) => return Some(message),
                    None => continue,
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no message within {NEXT_WITHIN:?}"));
            match chunk {
                Ok(Some(bytes)) => self.buffer.extend_from_slice(&bytes),
                // A connection the server closed mid-body ends the stream too.
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next `n` messages; panics if the stream ends first.
    pub async fn take(&mut self, n: usize) -> Vec<Message> {
        let mut messages = Vec::with_capacity(n);
        while messages.len() < n {
            match self.next().await {
                Some(message) => messages.push(message),
                None => panic!("the stream ended after {} of {n} messages", messages.len()),
            }
        }
        messages
    }

    /// Every message until the server closes the stream.
    pub async fn rest(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(message) = self.next().await {
            messages.push(message);
        }
        messages
    }

    fn parse(&mut self, block: &str) -> Option<Message> {
        let (mut id, mut event, mut data) = (None, None, Vec::new());
        for line in block.lines().filter(|line| !line.is_empty()) {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                other => panic!("unexpected SSE field {other:?} in {block:?}"),
            }
        }
        if data.is_empty() {
            return None;
        }
        let data = data.join("\n");
        Some(Message {
            id: id.expect("every message has an id"),
            event: event.unwrap_or_else(|| "message".to_owned()),
            data: serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("data {data:?} is not JSON: {e}")),
        })
    }
}
