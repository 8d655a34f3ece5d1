//! Custom step kinds the tests register, through the same `Handler` trait a
//! library user implements.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runq_shared::StepInput;
use runq_worker::{Events, Handler, StepError};
use serde_json::{json, Value};
use uuid::Uuid;

/// Executions seen, by (run id, position), shared across workers of a test.
#[derive(Clone, Default)]
pub struct Executions(Arc<Mutex<HashMap<(Uuid, i32), u32>>>);

impl Executions {
    fn record(&self, step: &StepInput) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry((step.id, step.position))
            .or_default() += 1;
    }

    /// How many times step `position` of run `id` was executed.
    pub fn count(&self, id: Uuid, position: i32) -> u32 {
        self.0
            .lock()
            .expect("not poisoned")
            .get(&(id, position))
            .copied()
            .unwrap_or(0)
    }

    /// Every (run, position) executed more than once.
    pub fn repeated(&self) -> Vec<(Uuid, i32)> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(key, _)| *key)
            .collect()
    }

    /// How many distinct steps were executed.
    pub fn distinct(&self) -> usize {
        self.0.lock().expect("not poisoned").len()
    }
}

/// `count`: records the execution, then outputs `{worker, input, metadata}`
/// after sleeping `input.ms` (if given).
pub struct Count {
    pub executions: Executions,
    pub worker: String,
}

#[async_trait::async_trait]
impl Handler for Count {
    fn kind(&self) -> &str {
        "count"
    }

    async fn execute(&self, step: &StepInput, events: &mut Events) -> Result<Value, StepError> {
        self.executions.record(step);
        if let Some(ms) = step.input.get("ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        events.record("log", json!({ "worker": self.worker }));
        Ok(json!({
            "worker": self.worker,
            "input": step.input,
            "metadata": step.metadata,
            "prev": step.prev,
            "results": step.results,
        }))
    }
}

/// `double`: outputs `{"value": 2 * prev.value}` (or `2 * input.value` for a first step).
pub struct Double;

#[async_trait::async_trait]
impl Handler for Double {
    fn kind(&self) -> &str {
        "double"
    }

    async fn execute(&self, step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        let source = if step.prev.is_null() {
            &step.input
        } else {
            &step.prev
        };
        let value = source
            .get("value")
            .and_then(Value::as_i64)
            .ok_or_else(|| StepError::new("no integer 'value' to double"))?;
        Ok(json!({ "value": value * 2 }))
    }
}

/// `fail_once`: fails on the run's first attempt, succeeds after.
pub struct FailOnce {
    pub executions: Executions,
}

#[async_trait::async_trait]
impl Handler for FailOnce {
    fn kind(&self) -> &str {
        "fail_once"
    }

    async fn execute(&self, step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        self.executions.record(step);
        if step.attempt == 1 {
            Err(StepError::new("first attempt fails"))
        } else {
            Ok(json!({ "recovered_on_attempt": step.attempt }))
        }
    }
}

/// `panic_on_drop`: waits forever holding a guard that panics when dropped,
/// as a handler with a buggy `Drop` would. Given a step `timeout_seconds`,
/// the timeout drops it inside the executor, outside the handler's own
/// panic catching: the executor itself panics.
pub struct PanicOnDrop;

struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("a handler's guard panicked while being dropped");
    }
}

#[async_trait::async_trait]
impl Handler for PanicOnDrop {
    fn kind(&self) -> &str {
        "panic_on_drop"
    }

    async fn execute(&self, _step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        let _bomb = Bomb;
        std::future::pending::<()>().await;
        Ok(Value::Null)
    }
}

/// `big`: outputs a JSON string of `input.bytes` bytes, or records it as an
/// event when `input.as_event` is true.
pub struct Big;

#[async_trait::async_trait]
impl Handler for Big {
    fn kind(&self) -> &str {
        "big"
    }

    async fn execute(&self, step: &StepInput, events: &mut Events) -> Result<Value, StepError> {
        let bytes = step.input.get("bytes").and_then(Value::as_u64).unwrap_or(0) as usize;
        let text = Value::String("x".repeat(bytes));
        if step.input.get("as_event").and_then(Value::as_bool) == Some(true) {
            events.record("blob", text);
            Ok(json!({ "recorded": bytes }))
        } else {
            Ok(text)
        }
    }
}

/// `events`: records `input.count` events (`{"n": i}`) in one go, then
/// outputs `{"recorded": count}`.
pub struct ManyEvents;

#[async_trait::async_trait]
impl Handler for ManyEvents {
    fn kind(&self) -> &str {
        "events"
    }

    async fn execute(&self, step: &StepInput, events: &mut Events) -> Result<Value, StepError> {
        let count = step.input.get("count").and_then(Value::as_u64).unwrap_or(0);
        for n in 0..count {
            events.record("tick", json!({ "n": n }));
        }
        Ok(json!({ "recorded": count }))
    }
}
