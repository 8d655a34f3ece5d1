//! The OpenAPI document as served and committed: poem-openapi's output plus
//! the payloads that leave the process outside HTTP, rewritten into the
//! OpenAPI 3.0 that validators and client generators read as written.
//!
//! It also reads the document back to describe what a field or parameter
//! expects, so error messages say what the spec says (see [`expected`]).

use poem_openapi::registry::Registry;
use poem_openapi::types::Type;
use serde_json::{Map, Value};

/// `raw` (poem-openapi's document) with the extra payload schemas, rewritten
/// to portable OpenAPI 3.0 by [`portable`]. `raw` is returned unchanged if it
/// is not JSON, which poem-openapi's own output always is.
pub(crate) fn finish(raw: &str) -> String {
    let Ok(mut document) = serde_json::from_str::<Value>(raw) else {
        return raw.to_owned();
    };
    add_extra_schemas(&mut document);
    portable(&mut document);
    serde_json::to_string_pretty(&document).unwrap_or_else(|_| raw.to_owned())
}

/// Adds the payloads that cross a process boundary outside the HTTP API to
/// the document's components, so the spec describes every contract: the step
/// envelope an `http` step POSTs, the outbox event, and the `RunEvent`
/// webhooks and streams deliver (OpenAPI 3.0 has no `webhooks` section).
fn add_extra_schemas(document: &mut Value) {
    let mut registry = Registry::new();
    runq_shared::StepInput::register(&mut registry);
    runq_shared::OutboxEvent::register(&mut registry);
    runq_shared::RunEvent::register(&mut registry);
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in registry.schemas {
            if let Ok(schema) = serde_json::to_value(schema) {
                schemas.entry(name).or_insert(schema);
            }
        }
    }
}

/// Rewrites poem-openapi's output into OpenAPI 3.0 as generators read it.
///
/// - A field typed by a named schema is written `allOf: [{$ref}, {description}]`
///   so it can carry its own description. Generators take that `allOf` for a
///   composition, fail on it when the target is an enum or an object
///   (openapi-python-client then drops the whole model and every operation
///   returning it), so such a field becomes a plain `$ref`.
/// - An optional field without a default is an `Option` that serde writes as
///   `null` when empty, which OpenAPI 3.0 allows only with `nullable: true`.
///   Without it generated clients refuse the API's own answers. A `$ref`
///   cannot carry siblings in 3.0, so a nullable one is wrapped in a
///   one-element `allOf`, the form both generators read as "this or null".
/// - Request bodies refuse unknown fields (`deny_unknown_fields` on every
///   body type), which the schemas of bodies and of the objects inside them
///   state as `additionalProperties: false`.
/// - `webhooks` is a 3.1 keyword, so the document carries none: the outbox
///   event is a component schema instead (see [`add_extra_schemas`]).
/// - The answers that create runs carry OpenAPI `links` to the operations
///   that take a run id (see [`link_created_runs`]), so clients and
///   stateful testers know where an id comes from.
/// - `metadata` of a new run is stated to be an object, as the server requires,
///   and the production override's confirmations as required `true`s.
/// - The item of an event stream that is one of several types is written in
///   place (see [`inline_stream_unions`]).
pub(crate) fn portable(document: &mut Value) {
    if let Some(top) = document.as_object_mut() {
        top.remove("webhooks");
    }
    inline_stream_unions(document);
    link_created_runs(document);
    object_metadata(document);
    confirmations_required(document);
    close_request_bodies(document);
    // Before the `$ref`s lose their wrappers, which carry the defaults.
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for schema in schemas.values_mut() {
            nullable_optionals(schema);
        }
    }
    plain_refs(document);
}

/// `metadata` is a `serde_json::Value` to the code, which poem-openapi
/// describes as any JSON; the server takes only an object (or null), which
/// the schema states.
fn object_metadata(document: &mut Value) {
    if let Some(metadata) = document
        .pointer_mut("/components/schemas/CreateRun/properties/metadata")
        .and_then(Value::as_object_mut)
    {
        metadata.insert("type".to_owned(), Value::String("object".to_owned()));
    }
}

/// The items of an event stream (`text/event-stream`, an array of
/// `format: event-stream`) that may be one of several types are a
/// poem-openapi union, a component of `anyOf` alone. Generators make no
/// model of such a component (openapi-python-client writes the union where
/// it is used), so the union is written into the stream's schema and the
/// component dropped once nothing else refers to it; its members stay
/// components.
fn inline_stream_unions(document: &mut Value) {
    let mut inlined = std::collections::BTreeSet::new();
    let unions: Map<String, Value> = document
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .map(|schemas| {
            schemas
                .iter()
                .filter(|(_, schema)| {
                    schema.get("anyOf").is_some() || schema.get("oneOf").is_some()
                })
                .map(|(name, schema)| (name.clone(), schema.clone()))
                .collect()
        })
        .unwrap_or_default();
    if unions.is_empty() {
        return;
    }
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let responses = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|methods| methods.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(items) = response.pointer_mut("/content/text~1event-stream/schema/items") else {
            continue;
        };
        let Some(name) = schema_name(items) else {
            continue;
        };
        if let Some(union) = unions.get(&name) {
            *items = union.clone();
            inlined.insert(name);
        }
    }
    for name in inlined {
        let reference = Value::String(format!("#/components/schemas/{name}"));
        if !refers_to(document, &reference) {
            if let Some(schemas) = document
                .pointer_mut("/components/schemas")
                .and_then(Value::as_object_mut)
            {
                schemas.remove(&name);
            }
        }
    }
}

/// Whether any `$ref` in `value` is `reference`.
fn refers_to(value: &Value, reference: &Value) -> bool {
    match value {
        Value::Object(map) => {
            map.get("$ref") == Some(reference) || map.values().any(|v| refers_to(v, reference))
        }
        Value::Array(items) => items.iter().any(|v| refers_to(v, reference)),
        _ => false,
    }
}

/// The production override takes each of its three confirmations only as an
/// explicit `true`; the schema says so (required, `enum: [true]`), so a
/// request with fewer is invalid by the document as well as refused (422
/// naming the missing ones) by the server.
fn confirmations_required(document: &mut Value) {
    const CONFIRMATIONS: [&str; 3] = [
        "not_customer_facing",
        "no_real_secrets",
        "accept_unsafe_agent_behavior",
    ];
    let Some(schema) = document
        .pointer_mut("/components/schemas/EnableProductionOverride")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for name in CONFIRMATIONS {
            if let Some(field) = properties.get_mut(name).and_then(Value::as_object_mut) {
                field.remove("nullable");
                field.insert("enum".to_owned(), serde_json::json!([true]));
            }
        }
    }
    schema.insert("required".to_owned(), serde_json::json!(CONFIRMATIONS));
}

/// Operations that take a run's id in their path, by operation id.
const RUN_OPERATIONS: [&str; 5] = [
    "get_run",
    "list_run_events",
    "stream_run_events",
    "cancel_run",
    "retry_run",
];

/// Adds `links` from the answers of `POST /v1/runs` (the run) and
/// `POST /v1/runs/batch` (its first run) to every operation on one run.
fn link_created_runs(document: &mut Value) {
    for (path, pointer) in [
        ("/v1/runs", "$response.body#/id"),
        ("/v1/runs/batch", "$response.body#/runs/0/id"),
    ] {
        let Some(responses) = document
            .get_mut("paths")
            .and_then(|paths| paths.get_mut(path))
            .and_then(|item| item.get_mut("post"))
            .and_then(|post| post.get_mut("responses"))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for (status, response) in responses.iter_mut() {
            if !status.starts_with('2') {
                continue;
            }
            let links: Map<String, Value> = RUN_OPERATIONS
                .iter()
                .map(|operation| {
                    (
                        (*operation).to_owned(),
                        serde_json::json!({
                            "operationId": operation,
                            "parameters": { "id": pointer },
                        }),
                    )
                })
                .collect();
            if let Some(response) = response.as_object_mut() {
                response.insert("links".to_owned(), Value::Object(links));
            }
        }
    }
}

/// The document as a deployment serves it: a step's `kind` is one of the
/// kinds this API accepts (the built-in ones and `RUNQ_STEP_KINDS`). The
/// committed document leaves `kind` open, since deployments differ.
pub(crate) fn for_deployment(document: &str, extra_kinds: &[String]) -> String {
    let Ok(mut document) = serde_json::from_str::<Value>(document) else {
        return document.to_owned();
    };
    if let Some(kind) = document.pointer_mut("/components/schemas/NewStep/properties/kind") {
        let kinds: Vec<Value> = runq_shared::BUILTIN_STEP_KINDS
            .iter()
            .map(|k| (*k).to_owned())
            .chain(extra_kinds.iter().cloned())
            .map(Value::String)
            .collect();
        if let Some(kind) = kind.as_object_mut() {
            kind.insert("enum".to_owned(), Value::Array(kinds));
        }
    }
    serde_json::to_string_pretty(&document).unwrap_or_default()
}

/// Marks the schemas request bodies use, and those they contain,
/// `additionalProperties: false`.
fn close_request_bodies(document: &mut Value) {
    let mut pending: Vec<String> = Vec::new();
    if let Some(paths) = document.get("paths").and_then(Value::as_object) {
        for operation in paths
            .values()
            .filter_map(Value::as_object)
            .flat_map(|m| m.values())
        {
            if let Some(content) = operation
                .pointer("/requestBody/content")
                .and_then(Value::as_object)
            {
                pending.extend(
                    content
                        .values()
                        .filter_map(|media| schema_name(&media["schema"])),
                );
            }
        }
    }
    let mut closed = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !closed.insert(name.clone()) {
            continue;
        }
        let Some(schema) = document.pointer_mut(&format!("/components/schemas/{name}")) else {
            continue;
        };
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            continue;
        }
        let inner: Vec<String> = schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|properties| properties.values())
            .filter_map(|property| {
                schema_name(property).or_else(|| schema_name(property.get("items")?))
            })
            .collect();
        pending.extend(inner);
        if let Some(schema) = schema.as_object_mut() {
            schema.insert("additionalProperties".to_owned(), Value::Bool(false));
        }
    }
}

/// The component a schema refers to (`$ref`, or an `allOf` of one).
fn schema_name(schema: &Value) -> Option<String> {
    let reference = schema
        .get("$ref")
        .or_else(|| schema.get("allOf")?.get(0)?.get("$ref"))?;
    Some(
        reference
            .as_str()?
            .strip_prefix("#/components/schemas/")?
            .to_owned(),
    )
}

/// Replaces every `allOf` whose first member is a `$ref` by that `$ref`, or
/// by a one-element `allOf` when the field is nullable.
fn plain_refs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(reference) = described_ref(map) {
                *value = reference;
                return;
            }
            map.values_mut().for_each(plain_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(plain_refs),
        _ => {}
    }
}

fn described_ref(map: &Map<String, Value>) -> Option<Value> {
    let first = map.get("allOf")?.as_array()?.first()?;
    let reference = serde_json::json!({ "$ref": first.get("$ref")? });
    Some(match map.get("nullable") {
        Some(Value::Bool(true)) => serde_json::json!({ "allOf": [reference], "nullable": true }),
        _ => reference,
    })
}

/// Marks the optional properties of `schema` that have no default nullable.
fn nullable_optionals(schema: &mut Value) {
    let required: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        if required.contains(name) || property.get("default").is_some() {
            continue;
        }
        if property.get("$ref").is_some() {
            *property = serde_json::json!({ "allOf": [property.take()], "nullable": true });
        } else if let Some(property) = property.as_object_mut() {
            // On a described `$ref` too: `plain_refs` keeps it as `allOf`.
            property.insert("nullable".to_owned(), Value::Bool(true));
        }
    }
}

/// The schemas `T`'s payload refers to, as a document whose `$ref`s resolve
/// (`{"components": {"schemas": ...}}`), and `T`'s own schema in it.
pub(crate) fn schema_of<T: Type>() -> (Value, Value) {
    let mut registry = Registry::new();
    T::register(&mut registry);
    let schemas: Map<String, Value> = registry
        .schemas
        .into_iter()
        .filter_map(|(name, schema)| Some((name, serde_json::to_value(schema).ok()?)))
        .collect();
    let mut document = serde_json::json!({ "components": { "schemas": schemas } });
    portable(&mut document);
    let root = serde_json::to_value(T::schema_ref()).unwrap_or(Value::Null);
    (document, root)
}

/// `schema` with `$ref`s (plain or in a one-element `allOf`) followed.
pub(crate) fn resolve<'a>(document: &'a Value, mut schema: &'a Value) -> &'a Value {
    // A bound on hops, so a cycle of references cannot loop forever.
    for _ in 0..16 {
        let target = schema.get("$ref").or_else(|| {
            let all_of = schema.get("allOf")?.as_array()?;
            match all_of.as_slice() {
                [only] => only.get("$ref"),
                _ => None,
            }
        });
        let Some(pointer) = target
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
        else {
            return schema;
        };
        match document.pointer(pointer) {
            Some(next) => schema = next,
            None => return schema,
        }
    }
    schema
}

/// What a value of `schema` must be, in words: `an integer from 1 to 100`,
/// `a UUID`, `one of 'failed', 'cancelled'`.
pub(crate) fn expected(document: &Value, schema: &Value) -> String {
    let schema = resolve(document, schema);
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        let choices: Vec<String> = choices
            .iter()
            .map(|c| match c.as_str() {
                Some(s) => format!("'{s}'"),
                None => c.to_string(),
            })
            .collect();
        return format!("one of {}", choices.join(", "));
    }
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    let count = |key: &str| schema.get(key).and_then(Value::as_u64);
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") => {
            let (low, high) = integer_bounds(schema.get("format").and_then(Value::as_str));
            let low = number("minimum").or(low);
            let high = number("maximum").or(high);
            match (low, high) {
                (Some(low), Some(high)) => format!("an integer from {low} to {high}"),
                (Some(low), None) => format!("an integer of at least {low}"),
                (None, Some(high)) => format!("an integer of at most {high}"),
                (None, None) => "an integer".to_owned(),
            }
        }
        Some("number") => "a number".to_owned(),
        Some("boolean") => "true or false".to_owned(),
        Some("string") => match schema.get("format").and_then(Value::as_str) {
            Some("uuid") => "a UUID".to_owned(),
            Some("date-time") => "an RFC 3339 date-time".to_owned(),
            _ => match (count("minLength"), count("maxLength")) {
                (Some(low), Some(high)) => format!("a string of {low} to {high} characters"),
                (None, Some(high)) => format!("a string of at most {high} characters"),
                (Some(low), None) => format!("a string of at least {low} characters"),
                // A pattern that is the whole constraint (an id's shape) is
                // said; beside a length it only refuses control characters.
                (None, None) => match schema.get("pattern").and_then(Value::as_str) {
                    Some(pattern) => format!("a string matching {pattern}"),
                    None => "a string".to_owned(),
                },
            },
        },
        Some("array") => match (count("minItems"), count("maxItems")) {
            (Some(low), Some(high)) => format!("an array of {low} to {high} items"),
            (None, Some(high)) => format!("an array of at most {high} items"),
            (Some(low), None) => format!("an array of at least {low} items"),
            (None, None) => "an array".to_owned(),
        },
        Some("object") => "an object".to_owned(),
        _ => "a JSON value".to_owned(),
    }
}

/// The range a format implies when the schema states none. Rust's integer
/// types show up as poem-openapi formats (`int16`, `uint32`).
fn integer_bounds(format: Option<&str>) -> (Option<f64>, Option<f64>) {
    match format {
        Some("int16") => (Some(f64::from(i16::MIN)), Some(f64::from(i16::MAX))),
        Some("int32") => (Some(f64::from(i32::MIN)), Some(f64::from(i32::MAX))),
        Some("uint16") => (Some(0.0), Some(f64::from(u16::MAX))),
        Some("uint32") => (Some(0.0), Some(f64::from(u32::MAX))),
        Some("uint64") => (Some(0.0), None),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn described_refs_become_plain_and_optionals_nullable() {
        let mut document = json!({
            "openapi": "3.0.0",
            "webhooks": { "x": {} },
            "components": { "schemas": {
                "S": {
                    "type": "object",
                    "required": ["a"],
                    "properties": {
                        "a": { "allOf": [{ "$ref": "#/components/schemas/E" }, { "description": "d" }], "description": "d" },
                        "b": { "allOf": [{ "$ref": "#/components/schemas/E" }, { "description": "d" }] },
                        "c": { "type": "integer" },
                        "d": { "type": "integer", "default": 3 },
                        "e": { "allOf": [{ "$ref": "#/components/schemas/E" }, { "default": "x" }], "default": "x" }
                    }
                },
                "E": { "type": "string", "enum": ["x"] }
            }}
        });
        portable(&mut document);
        assert!(document.get("webhooks").is_none());
        let properties = &document["components"]["schemas"]["S"]["properties"];
        assert_eq!(properties["a"], json!({ "$ref": "#/components/schemas/E" }));
        assert_eq!(
            properties["b"],
            json!({ "allOf": [{ "$ref": "#/components/schemas/E" }], "nullable": true })
        );
        assert_eq!(properties["c"]["nullable"], json!(true));
        assert!(properties["d"].get("nullable").is_none());
        assert_eq!(properties["e"], json!({ "$ref": "#/components/schemas/E" }));
    }

    #[test]
    fn expected_reads_bounds_formats_and_enums() {
        let document = json!({ "components": { "schemas": { "E": { "type": "string", "enum": ["a", "b"] } } } });
        let cases = [
            (
                json!({ "type": "integer", "format": "int16" }),
                "an integer from -32768 to 32767",
            ),
            (
                json!({ "type": "integer", "format": "int32", "minimum": 1.0, "maximum": 100.0 }),
                "an integer from 1 to 100",
            ),
            (json!({ "type": "string", "format": "uuid" }), "a UUID"),
            (
                json!({ "type": "string", "pattern": "^[0-9]+-[0-9]+$" }),
                "a string matching ^[0-9]+-[0-9]+$",
            ),
            (
                json!({ "type": "string", "maxLength": 64, "pattern": "^[a-z]*$" }),
                "a string of at most 64 characters",
            ),
            (
                json!({ "type": "array", "minItems": 1, "maxItems": 64 }),
                "an array of 1 to 64 items",
            ),
            (
                json!({ "allOf": [{ "$ref": "#/components/schemas/E" }], "nullable": true }),
                "one of 'a', 'b'",
            ),
            (json!({}), "a JSON value"),
        ];
        for (schema, words) in cases {
            assert_eq!(expected(&document, &schema), words, "{schema}");
        }
    }
}
