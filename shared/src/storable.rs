//! Whether a JSON value can be stored in a `jsonb` column and read back.
//!
//! serde_json accepts values Postgres refuses: `\u0000` in a string or a key
//! (`jsonb` and `text` cannot hold NUL) fails the whole statement the value is
//! part of, and with it every other run batched into that statement. Nesting
//! deeper than serde_json's own parser allows would be stored but could never
//! be read back. Every value is checked here before it reaches a shared
//! batch (DESIGN.md, invariant 7): the API refuses it with a 422 naming the
//! field, a worker fails the step that produced it.

use serde_json::Value;

/// Deepest nesting accepted. serde_json refuses to parse deeper than 128
/// levels, so a value nested deeper could be written but never read back.
pub const MAX_DEPTH: usize = 100;

/// Why a value cannot be stored, naming where in it the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} {problem}")]
pub struct Unstorable {
    /// Where, as a client would write it (`metadata.customer`, `steps[0].input[2]`).
    pub path: String,
    /// What is wrong there.
    pub problem: &'static str,
}

/// Checks `value`, whose own path is `path` (for messages).
///
/// # Errors
///
/// The first place that cannot be stored.
pub fn check(path: &str, value: &Value) -> Result<(), Unstorable> {
    walk(&mut path.to_owned(), value, 0)
}

/// Checks a text field (Postgres `text` cannot hold NUL either).
///
/// # Errors
///
/// The text holds `\u0000`.
pub fn check_text(path: &str, text: &str) -> Result<(), Unstorable> {
    if text.contains('\0') {
        return Err(Unstorable {
            path: path.to_owned(),
            problem: NUL,
        });
    }
    Ok(())
}

const NUL: &str = "contains \\u0000, which Postgres cannot store";

/// The first `\u0000` anywhere in `value`, in a string or a key, named by
/// its path from the root (`runs[3].metadata.note`): the API checks every
/// request body with it, since every body ends up in `text` or `jsonb`.
/// Unlike [`check`], it does not limit depth (the types that hold free-form
/// JSON do that, relative to their own field).
pub fn find_nul(value: &Value) -> Option<Unstorable> {
    fn walk(path: &mut String, value: &Value) -> Option<Unstorable> {
        match value {
            Value::String(text) if text.contains('\0') => Some(Unstorable {
                path: path.trim_start_matches('.').to_owned(),
                problem: NUL,
            }),
            Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
                let len = path.len();
                path.push_str(&format!("[{index}]"));
                let found = walk(path, item);
                path.truncate(len);
                found
            }),
            Value::Object(fields) => fields.iter().find_map(|(key, item)| {
                let len = path.len();
                path.push('.');
                path.push_str(&key.replace('\0', "\\u0000"));
                let found = if key.contains('\0') {
                    Some(Unstorable {
                        path: path.trim_start_matches('.').to_owned(),
                        problem: "is a key containing \\u0000, which Postgres cannot store",
                    })
                } else {
                    walk(path, item)
                };
                path.truncate(len);
                found
            }),
            _ => None,
        }
    }
    walk(&mut String::new(), value)
}

fn walk(path: &mut String, value: &Value, depth: usize) -> Result<(), Unstorable> {
    if depth > MAX_DEPTH {
        return Err(Unstorable {
            path: path.clone(),
            problem: "is nested more than 100 levels deep",
        });
    }
    match value {
        Value::String(text) => check_text(path, text),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{index}]"));
                walk(path, item, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                let len = path.len();
                if key.contains('\0') {
                    path.push_str(&format!(".{}", key.replace('\0', "\\u0000")));
                    return Err(Unstorable {
                        path: path.clone(),
                        problem: "is a key containing \\u0000, which Postgres cannot store",
                    });
                }
                path.push('.');
                path.push_str(key);
                walk(path, item, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_first_nul_in_a_string_or_a_key() {
        let value = json!({"a": [1, {"b": "x\u{0}y"}]});
        assert_eq!(
            check("metadata", &value).map_err(|e| e.to_string()),
            Err("metadata.a[1].b contains \\u0000, which Postgres cannot store".to_owned())
        );
        let key = json!({"ok": 1, "k\u{0}": 2});
        assert_eq!(
            check("out", &key).map_err(|e| e.path),
            Err("out.k\\u0000".to_owned())
        );
    }

    #[test]
    fn accepts_ordinary_unicode_and_refuses_deep_nesting() {
        assert!(check("x", &json!({"emoji": "😀", "ctl": "\u{1}", "n": 1.5})).is_ok());
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!([deep]);
        }
        assert!(check("x", &deep).is_err());
    }
}
