//! [`ApiJson`]: the JSON request body of every endpoint, and the one place a
//! body's mistakes are sorted into classes.
//!
//! A body that is not JSON at all is a 400; JSON that does not fit the
//! schema (a missing, unknown or mistyped field, a number out of range) is a
//! 422, like the value checks handlers make after parsing. Every message
//! names the field by its path as the client wrote it (`steps[0].kind`), and
//! says what the spec expects there.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use poem::{FromRequest, Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;
use crate::spec;

/// A JSON request body of type `T`, parsed by serde, described in the spec by
/// `T`'s poem-openapi schema.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

/// What the spec lists as the body's media type.
const CONTENT_TYPE: &str = "application/json";

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

impl<T: Type + DeserializeOwned + Send + 'static> ApiJson<T> {
    /// Parses `data`; see the module doc for how mistakes are sorted.
    ///
    /// # Errors
    ///
    /// [`ApiError::BadRequest`] when `data` is not JSON,
    /// [`ApiError::Unprocessable`] when it does not fit `T`.
    pub fn parse(data: &[u8]) -> Result<T, ApiError> {
        if data.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest(
                "the body is empty; send a JSON object".to_owned(),
            ));
        }
        let value: Value = serde_json::from_slice(data).map_err(not_json)?;
        if let Some(unstorable) = runq_shared::storable::find_nul(&value) {
            return Err(ApiError::Unprocessable(unstorable.to_string()));
        }
        let schema = schema_of::<T>();
        let mut path = Vec::new();
        check_shape(&schema.document, &schema.root, &value, &mut path).map_err(|got| {
            let expected = schema_at(&schema.document, &schema.root, &path)
                .map(|at| spec::expected(&schema.document, at))
                .unwrap_or_else(|| "something else".to_owned());
            ApiError::Unprocessable(format!("{} must be {expected}, got {got}", subject(&path)))
        })?;
        serde_path_to_error::deserialize(value).map_err(|err| {
            let path = location(err.path());
            let message = message(err.inner());
            ApiError::Unprocessable(describe(path, &message, &schema.document, &schema.root))
        })
    }
}

/// The schemas of a body type, built once per type.
struct BodySchema {
    /// `{"components": {"schemas": ...}}`, so `$ref`s resolve.
    document: Value,
    /// The body's own schema (a `$ref` into `document`).
    root: Value,
}

fn schema_of<T: Type + 'static>() -> Arc<BodySchema> {
    static BUILT: OnceLock<RwLock<HashMap<TypeId, Arc<BodySchema>>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let key = TypeId::of::<T>();
    if let Some(schema) = built.read().ok().and_then(|b| b.get(&key).cloned()) {
        return schema;
    }
    let (document, root) = spec::schema_of::<T>();
    let schema = Arc::new(BodySchema { document, root });
    if let Ok(mut built) = built.write() {
        built.insert(key, schema.clone());
    }
    schema
}

/// serde reads a struct from a JSON array (by position) and an enum from a
/// one-key object; the schema allows neither. Nor does it allow a string
/// outside its `minLength`/`maxLength`. `Err` names what was found where
/// the schema wants something else, with `path` left there.
fn check_shape(
    document: &Value,
    schema: &Value,
    value: &Value,
    path: &mut Vec<Step>,
) -> Result<(), String> {
    let schema = spec::resolve(document, schema);
    let wants = schema.get("type").and_then(Value::as_str);
    match value {
        Value::Object(fields) => {
            if wants == Some("string") || schema.get("enum").is_some() {
                return Err("an object".to_owned());
            }
            let Some(properties) = schema.get("properties") else {
                return Ok(());
            };
            for (key, field) in fields {
                if let Some(property) = properties.get(key) {
                    path.push(Step::Key(key.clone()));
                    check_shape(document, property, field, path)?;
                    path.pop();
                }
            }
            Ok(())
        }
        Value::Array(items) => {
            if matches!(wants, Some("object" | "string")) || schema.get("enum").is_some() {
                return Err("an array".to_owned());
            }
            let Some(item) = schema.get("items") else {
                return Ok(());
            };
            for (index, element) in items.iter().enumerate() {
                path.push(Step::Index(index));
                check_shape(document, item, element, path)?;
                path.pop();
            }
            Ok(())
        }
        Value::String(text) => {
            // The lengths the schema states hold for every body, whatever
            // the type checks after parsing (counted in characters, as JSON
            // Schema counts them).
            let count = |key: &str| schema.get(key).and_then(Value::as_u64);
            let length = text.chars().count() as u64;
            if count("maxLength").is_some_and(|max| length > max)
                || count("minLength").is_some_and(|min| length < min)
            {
                return Err(if length == 1 {
                    "a string of 1 character".to_owned()
                } else {
                    format!("a string of {length} characters")
                });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn not_json(err: serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("the body is not JSON: {err}"))
}

/// serde_json's message without its ` at line L column C` suffix.
fn message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
}

/// Where in the body: `steps[0].kind`, empty for the body itself.
fn location(path: &serde_path_to_error::Path) -> Vec<Step> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {
                None
            }
        })
        .collect()
}

enum Step {
    Key(String),
    Index(usize),
}

fn written(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(key) if out.is_empty() => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// The schema at `steps` below `root`, if the spec describes one there.
fn schema_at<'a>(document: &'a Value, root: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let mut schema = spec::resolve(document, root);
    for step in steps {
        let next = match step {
            Step::Key(key) => schema.get("properties")?.get(key)?,
            Step::Index(_) => schema.get("items")?,
        };
        schema = spec::resolve(document, next);
    }
    Some(schema)
}

/// The 422 message for serde's `message` at `path`.
fn describe(mut steps: Vec<Step>, message: &str, document: &Value, root: &Value) -> String {
    if let Some(field) = between_backticks(message, "missing field `") {
        steps.push(Step::Key(field.to_owned()));
        return format!("{} is required", written(&steps));
    }
    if let Some(field) = between_backticks(message, "unknown field `") {
        // The path already ends at the unknown key, or at its object.
        if !matches!(steps.last(), Some(Step::Key(key)) if key == field) {
            steps.push(Step::Key(field.to_owned()));
        }
        let known = message
            .split_once(", expected ")
            .map(|(_, known)| format!("; expected {}", known.replace('`', "'")))
            .unwrap_or_default();
        return format!("{} is not a known field{known}", written(&steps));
    }
    let subject = subject(&steps);
    let message = message.replace('`', "'");
    let expected = schema_at(document, root, &steps).map(|schema| spec::expected(document, schema));
    let got = message
        .as_str()
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.split_once(", expected "))
        .map(|(got, _)| got_words(got));
    let variant = between_quotes(&message, "unknown variant '");
    match (expected, got, variant) {
        (Some(expected), Some(got), _) => format!("{subject} must be {expected}, got {got}"),
        (Some(expected), None, Some(variant)) => {
            format!("{subject} must be {expected}, got '{variant}'")
        }
        (Some(expected), None, None) => format!("{subject} must be {expected}: {message}"),
        (None, _, _) => format!("{subject}: {message}"),
    }
}

/// The text between `prefix` and the next backtick.
fn between_backticks<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

/// The text between `prefix` and the next single quote.
fn between_quotes<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('\'').next()
}

/// The field at `steps` as the client wrote it, or "the body".
fn subject(steps: &[Step]) -> String {
    match written(steps) {
        path if path.is_empty() => "the body".to_owned(),
        path => path,
    }
}

/// serde's name for what it found, in JSON's words.
fn got_words(got: &str) -> String {
    match got {
        "sequence" => "an array".to_owned(),
        "map" => "an object".to_owned(),
        "null" | "unit value" => "null".to_owned(),
        // serde quotes numbers and booleans: `integer '5'`.
        other if other.starts_with("string") => other.to_owned(),
        other => other.replace('\'', ""),
    }
}

impl<'a, T: Type + DeserializeOwned + Send + 'static> ApiExtractor<'a> for ApiJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: CONTENT_TYPE,
                schema: T::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if is_json(content_type) => {}
            Some(content_type) => {
                return Err(ApiError::BadRequest(format!(
                    "Content-Type '{content_type}' is not JSON; send '{CONTENT_TYPE}'"
                ))
                .into())
            }
            None => {
                return Err(ApiError::BadRequest(format!(
                    "the request has no Content-Type; send '{CONTENT_TYPE}'"
                ))
                .into())
            }
        }
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        Ok(ApiJson(Self::parse(&data)?))
    }
}
