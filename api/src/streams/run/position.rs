//! A client's place in a run's stream, and its text form: the SSE id of
//! every item and what `Last-Event-ID` resumes from.

use std::fmt;
use std::str::FromStr;

/// Where a client is in a run's stream: the last state change (outbox id),
/// event (event id) and step progress it was sent. Its text form,
/// `<state change>.<event>.<epoch>.<step>`, is the SSE id of every item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RunPosition {
    /// The outbox id of the last state change sent (0: none).
    pub(crate) state_change: i64,
    /// The id of the last event sent (0: none).
    pub(crate) event: i64,
    /// The key of the last step progress sent.
    pub(crate) step: StepKey,
}

/// The place of a step progress item in a run's life: the outbox id of the
/// `run.started` of its attempt, then `2 * position + 1` for a start and
/// `2 * position + 2` for a finish. `(0, 0)` is before every item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub(crate) struct StepKey {
    /// The outbox id of the attempt's `run.started`.
    pub(crate) epoch: i64,
    /// `2 * position + 1` (started) or `+ 2` (finished).
    pub(crate) seq: i32,
}

impl fmt::Display for RunPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.state_change, self.event, self.step.epoch, self.step.seq
        )
    }
}

/// A `Last-Event-ID` that is no position of a run's stream.
#[derive(Debug, thiserror::Error)]
#[error(
    "header Last-Event-ID must be an id this stream sent ('<n>.<n>.<n>.<n>', four numbers), got '{0}'"
)]
pub(crate) struct BadPosition(String);

impl FromStr for RunPosition {
    type Err = BadPosition;

    /// Accepts exactly what the spec's pattern for `Last-Event-ID` does
    /// (`^[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,18}\.[0-9]{1,3}$`): digits
    /// only, so each part fits its integer.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPosition(text.chars().take(80).collect());
        let parts: Vec<&str> = text.split('.').collect();
        let [state_change, event, epoch, seq] = parts.as_slice() else {
            return Err(bad());
        };
        let number = |part: &str, digits: usize| -> Result<i64, BadPosition> {
            if part.is_empty() || part.len() > digits || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        Ok(RunPosition {
            state_change: number(state_change, 18)?,
            event: number(event, 18)?,
            step: StepKey {
                epoch: number(epoch, 18)?,
                seq: i32::try_from(number(seq, 3)?).map_err(|_| bad())?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_only_as_the_pattern_says() {
        for good in ["0.0.0.0", "12.340.12.7", "999999999999999999.1.1.999"] {
            let position: RunPosition = good.parse().expect(good);
            assert_eq!(position.to_string(), good);
        }
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "a.b.c.d",
            "-1.0.0.0",
            "1.0.0.1000",
            "1234567890123456789.0.0.0",
            "1-2",
            " 1.2.3.4",
        ] {
            assert!(bad.parse::<RunPosition>().is_err(), "{bad:?} parses");
        }
    }
}
