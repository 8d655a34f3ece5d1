//! Errors of path, query and header parameters, in the client's words.
//!
//! poem-openapi reports a bad parameter with its internal type names
//! (`integer(uint32)`, `optional_string_uuid`) and a path parameter under its
//! internal name (`param0`). [`Parameters`] reads the served document once,
//! and turns such an error into a 400 that names the parameter as in the URL
//! and says what the spec expects there.

use poem::http::Method;
use poem_openapi::error::{ParseParamError, ParsePathError};
use serde_json::Value;

use crate::error::ApiError;
use crate::spec;

/// The operations of the served document, with what each parameter expects.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parameters {
    operations: Vec<Operation>,
}

#[derive(Debug, Clone)]
struct Operation {
    method: String,
    segments: Vec<Segment>,
    parameters: Vec<Parameter>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Variable(String),
}

#[derive(Debug, Clone)]
struct Parameter {
    name: String,
    location: String,
    expected: String,
}

/// The request line an error happened on.
pub(crate) struct Asked {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
}

impl Parameters {
    /// Reads the operations of `document` (an OpenAPI document as JSON).
    pub(crate) fn new(document: &str) -> Self {
        let Ok(document) = serde_json::from_str::<Value>(document) else {
            return Self::default();
        };
        let mut operations = Vec::new();
        let Some(paths) = document.get("paths").and_then(Value::as_object) else {
            return Self::default();
        };
        for (template, methods) in paths {
            let segments: Vec<Segment> = template
                .split('/')
                .filter(|s| !s.is_empty())
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(name) => Segment::Variable(name.to_owned()),
                        None => Segment::Literal(s.to_owned()),
                    },
                )
                .collect();
            let Some(methods) = methods.as_object() else {
                continue;
            };
            for (method, operation) in methods {
                let parameters = operation
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        Some(Parameter {
                            name: p.get("name")?.as_str()?.to_owned(),
                            location: p.get("in")?.as_str()?.to_owned(),
                            expected: spec::expected(&document, p.get("schema")?),
                        })
                    })
                    .collect();
                operations.push(Operation {
                    method: method.to_ascii_uppercase(),
                    segments: segments.clone(),
                    parameters,
                });
            }
        }
        Parameters { operations }
    }

    /// The operations whose template `parts` (a path split on `/`) fits,
    /// keeping only those with the most literal segments, as the router
    /// picks a template.
    fn reached<'a>(&'a self, parts: &[&str]) -> Vec<&'a Operation> {
        let fits = |op: &&Operation| {
            op.segments.len() == parts.len()
                && op
                    .segments
                    .iter()
                    .zip(parts)
                    .all(|(segment, part)| match segment {
                        Segment::Literal(literal) => literal == part,
                        Segment::Variable(_) => true,
                    })
        };
        let literals = |op: &Operation| {
            op.segments
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count()
        };
        let matching: Vec<&Operation> = self.operations.iter().filter(fits).collect();
        let best = matching.iter().map(|op| literals(op)).max();
        matching
            .into_iter()
            .filter(|op| Some(literals(op)) == best)
            .collect()
    }

    /// The methods of the path template `path` reaches, for the `Allow`
    /// header.
    pub(crate) fn allowed(&self, path: &str) -> Vec<String> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut methods: Vec<String> = self
            .reached(&parts)
            .into_iter()
            .map(|op| op.method.clone())
            .collect();
        methods.sort();
        methods.dedup();
        methods
    }

    /// The operation `asked` reached.
    fn operation<'a>(&self, asked: &'a Asked) -> Option<(&Operation, Vec<&'a str>)> {
        let parts: Vec<&str> = asked.path.split('/').filter(|s| !s.is_empty()).collect();
        let operation = self
            .reached(&parts)
            .into_iter()
            .find(|op| op.method == asked.method.as_str())?;
        Some((operation, parts))
    }

    /// The 400 for a parameter error of poem-openapi, or `None` for any
    /// other error.
    pub(crate) fn explain(&self, err: &poem::Error, asked: &Asked) -> Option<ApiError> {
        if err.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
            let allow = self.allowed(&asked.path).join(", ");
            return Some(ApiError::MethodNotAllowed {
                detail: format!(
                    "{} is not allowed on {}; allowed: {allow}",
                    asked.method,
                    shorten(&asked.path)
                ),
                allow,
            });
        }
        if let Some(path_err) = err.downcast_ref::<ParsePathError>() {
            // poem-openapi names the n-th path variable `param{n}`.
            let index: usize = path_err.name.strip_prefix("param")?.parse().ok()?;
            let (operation, parts) = self.operation(asked)?;
            let (name, got) = operation
                .segments
                .iter()
                .zip(parts)
                .filter_map(|(segment, part)| match segment {
                    Segment::Variable(name) => Some((name, part)),
                    Segment::Literal(_) => None,
                })
                .nth(index)?;
            let expected = operation
                .parameters
                .iter()
                .find(|p| p.location == "path" && &p.name == name)
                .map_or("valid", |p| p.expected.as_str());
            return Some(ApiError::BadRequest(format!(
                "path parameter {name} must be {expected}, got '{}'",
                shorten(&decode(got))
            )));
        }
        let param_err = err.downcast_ref::<ParseParamError>()?;
        let (operation, _) = self.operation(asked)?;
        let parameter = operation
            .parameters
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(param_err.name))?;
        let got = match parameter.location.as_str() {
            "query" => query_value(asked.query.as_deref(), &parameter.name),
            _ => None,
        };
        let kind = match parameter.location.as_str() {
            "query" => "query parameter",
            "header" => "header",
            "cookie" => "cookie",
            _ => "parameter",
        };
        let got = got
            .map(|v| format!(", got '{}'", shorten(&v)))
            .unwrap_or_default();
        Some(ApiError::BadRequest(format!(
            "{kind} {} must be {}{got}",
            parameter.name, parameter.expected
        )))
    }
}

/// The (first) value of `name` in `query`, decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| decode(key) == name)
        .map(|(_, value)| decode(value))
}

/// Percent- and plus-decoding, lossy on bad UTF-8: the result is only ever
/// shown back to the client.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// At most 80 characters of a value echoed back.
fn shorten(value: &str) -> &str {
    match value.char_indices().nth(80) {
        Some((end, _)) => &value[..end],
        None => value,
    }
}
