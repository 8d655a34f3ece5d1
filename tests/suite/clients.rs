//! Generated clients: the served spec validates as the OpenAPI version it
//! declares, and the Python clients that openapi-python-client and
//! openapi-generator make from it keep every schema, field and operation, and
//! drive runs end to end against a real API and worker.
//!
//! The tools are Python packages (`.ci/run` installs them, with Java for
//! openapi-generator). Where one is missing a test prints why it skipped and
//! passes, unless `RUNQ_TEST_STRICT=1`, which makes a skip a failure.
//!
//! Generated clients are cached under `target/tmp/runq-clients`, keyed by the
//! spec and the generators' versions: generation takes seconds, and only a
//! changed spec or tool needs it again.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use runq_worker::Worker;
use serde_json::{json, Value};

use crate::support::handlers::{Count, Executions};
use crate::support::{token, worker_config, RunningWorker, TestApi, TestDb};

/// Set to `1` to fail, not skip, when a tool is missing.
const STRICT: &str = "RUNQ_TEST_STRICT";

/// What the Python side must have: the three tools and what the generated
/// clients import.
const PYTHON_PROBE: &str = r#"
import importlib.metadata as metadata, json
import openapi_spec_validator, openapi_python_client, openapi_generator_cli
import httpx, attrs, dateutil, pydantic, urllib3, typing_extensions
print(json.dumps({name: metadata.version(name) for name in
    ["openapi-spec-validator", "openapi-python-client", "openapi-generator-cli"]}))
"#;

/// The python interpreter, and the tools' versions, if every tool is there.
fn tools() -> Result<String, String> {
    static TOOLS: OnceLock<Result<String, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let probe = Command::new("python3")
                .args(["-c", PYTHON_PROBE])
                .output()
                .map_err(|err| format!("python3 cannot be run: {err}"))?;
            if !probe.status.success() {
                let stderr = String::from_utf8_lossy(&probe.stderr);
                return Err(format!(
                    "the Python tools are missing (`.ci/run` installs them): {}",
                    stderr.trim().lines().last().unwrap_or_default()
                ));
            }
            let java = Command::new("java").arg("-version").output();
            if !java.is_ok_and(|out| out.status.success()) {
                return Err("java (for openapi-generator) cannot be run".to_owned());
            }
            Ok(String::from_utf8_lossy(&probe.stdout).trim().to_owned())
        })
        .clone()
}

/// `Some(versions)` when the tools are there; otherwise reports the skip, or
/// fails under `RUNQ_TEST_STRICT=1`.
fn tools_or_skip(test: &str) -> Option<String> {
    match tools() {
        Ok(versions) => Some(versions),
        Err(why) if std::env::var(STRICT).is_ok_and(|v| v == "1") => {
            panic!("{test}: {why} ({STRICT}=1 makes a skip a failure)")
        }
        Err(why) => {
            eprintln!("skipped {test}: {why}");
            None
        }
    }
}

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{shown}: {err}"));
    assert!(
        output.status.success(),
        "{shown} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The served spec validates as the version it declares, 3.0.
#[tokio::test]
async fn served_spec_validates_as_openapi_3_0() {
    let Some(_) = tools_or_skip("served_spec_validates_as_openapi_3_0") else {
        return;
    };
    let db = TestDb::new().await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let served = reqwest::get(format!("{}/openapi.json", api.base))
        .await
        .expect("GET /openapi.json")
        .text()
        .await
        .expect("spec body");
    let spec: Value = serde_json::from_str(&served).expect("the served spec is JSON");
    assert_eq!(spec["openapi"], "3.0.0");
    let dir = scratch("validate");
    let file = dir.join("openapi.json");
    std::fs::write(&file, &served).expect("write the spec");
    let started = Instant::now();
    let output = run(Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.0"])
        .arg(&file));
    eprintln!("openapi-spec-validator took {:?}", started.elapsed());
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("OK"), "validator said: {said}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A fresh directory under `target/tmp` for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("runq-clients")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("target/tmp is writable");
    dir
}

/// Where the clients generated from the current spec are: `runq_opc/`
/// (openapi-python-client) and `ogc/runq_ogc/` (openapi-generator).
fn generated(versions: &str) -> PathBuf {
    static GENERATED: OnceLock<PathBuf> = OnceLock::new();
    GENERATED
        .get_or_init(|| {
            let spec = runq_api::spec();
            let mut hasher = DefaultHasher::new();
            spec.hash(&mut hasher);
            versions.hash(&mut hasher);
            let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runq-clients");
            let dir = root.join(format!("{:016x}", hasher.finish()));
            if dir.join("done").exists() {
                eprintln!("generated clients: cached in {}", dir.display());
                return dir;
            }
            let building = scratch("building");
            let spec_file = building.join("openapi.json");
            std::fs::write(&spec_file, &spec).expect("write the spec");
            let started = Instant::now();
            // The two generators run at once: Java's start-up dominates.
            std::thread::scope(|scope| {
                let python_client = scope.spawn(|| {
                    let output = run(Command::new("python3")
                        .args(["-m", "openapi_python_client", "generate", "--meta", "none"])
                        .arg("--path")
                        .arg(&spec_file)
                        .arg("--output-path")
                        .arg(building.join("runq_opc")));
                    // It drops what it cannot read with a warning and exits 0.
                    let said = String::from_utf8_lossy(&output.stdout).into_owned()
                        + &String::from_utf8_lossy(&output.stderr);
                    assert!(
                        !said.contains("Warning") && !said.contains("Unable to"),
                        "openapi-python-client warned:\n{said}"
                    );
                });
                let generator = scope.spawn(|| {
                    // Spec validation is on (the default): a refused spec fails here.
                    run(Command::new("python3")
                        .args(["-c", "import openapi_generator_cli as g; g.cli()"])
                        .args(["generate", "-g", "python", "--package-name", "runq_ogc"])
                        .args([
                            "--global-property",
                            "apiTests=false,modelTests=false,apiDocs=false,modelDocs=false",
                        ])
                        .arg("-i")
                        .arg(&spec_file)
                        .arg("-o")
                        .arg(building.join("ogc")));
                });
                python_client.join().expect("openapi-python-client");
                generator.join().expect("openapi-generator");
            });
            eprintln!("generated both clients in {:?}", started.elapsed());
            std::fs::write(building.join("done"), versions).expect("mark the clients done");
            // Clients of an older spec are of no further use.
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            // Another test process may have won the race; either copy is whole.
            if std::fs::rename(&building, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&building);
            }
            dir
        })
        .clone()
}

/// `RunDetail` -> `run_detail`: the module name both generators use.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Every Python file under `dir`, concatenated.
fn read_all(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text += &read_all(&path);
        } else if path.extension().is_some_and(|e| e == "py") {
            text += &read(&path).unwrap_or_default();
        }
    }
    text
}

fn quoted(text: &str, word: &str) -> bool {
    text.contains(&format!("\"{word}\"")) || text.contains(&format!("'{word}'"))
}

/// What the clients in `dir` lack of `spec`: schemas, their properties and
/// enum values, operations, and the parsing of each 2xx answer.
fn dropped(spec: &Value, dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let clients = [
        ("openapi-python-client", dir.join("runq_opc")),
        ("openapi-generator", dir.join("ogc").join("runq_ogc")),
    ];
    let schemas = spec["components"]["schemas"].as_object().expect("schemas");
    for (client, package) in &clients {
        for (name, schema) in schemas {
            let file = package.join("models").join(format!("{}.py", snake(name)));
            let Some(model) = read(&file) else {
                missing.push(format!("{client}: schema {name} ({})", file.display()));
                continue;
            };
            let properties = schema["properties"].as_object().into_iter().flatten();
            for (property, _) in properties {
                if !quoted(&model, property) {
                    missing.push(format!("{client}: {name}.{property}"));
                }
            }
            for value in schema["enum"].as_array().into_iter().flatten() {
                let value = value.as_str().unwrap_or_default();
                if !quoted(&model, value) {
                    missing.push(format!("{client}: {name} value {value}"));
                }
            }
        }
    }
    let python_client_api = dir.join("runq_opc").join("api");
    let generator_api = read_all(&dir.join("ogc").join("runq_ogc").join("api"));
    let operations = spec["paths"]
        .as_object()
        .expect("paths")
        .values()
        .filter_map(Value::as_object)
        .flat_map(|methods| methods.values());
    let mut count = 0;
    for operation in operations {
        let id = operation["operationId"].as_str().expect("operationId");
        count += 1;
        let module = std::fs::read_dir(&python_client_api)
            .into_iter()
            .flatten()
            .flatten()
            .map(|tag| tag.path().join(format!("{id}.py")))
            .find_map(|path| read(&path));
        if module.is_none() {
            missing.push(format!("openapi-python-client: operation {id}"));
        }
        if !generator_api.contains(&format!("def {id}(")) {
            missing.push(format!("openapi-generator: operation {id}"));
        }
        let responses = operation["responses"].as_object().expect("responses");
        for (status, response) in responses.iter().filter(|(s, _)| s.starts_with('2')) {
            let Some(reference) = response
                .pointer("/content/application~1json; charset=utf-8/schema/$ref")
                .and_then(Value::as_str)
            else {
                continue;
            };
            let model = reference.trim_start_matches("#/components/schemas/");
            if !module
                .as_deref()
                .is_some_and(|m| m.contains(&format!("response_{status} = {model}.from_dict")))
            {
                missing.push(format!(
                    "openapi-python-client: {id} does not parse {status} as {model}"
                ));
            }
            if !generator_api.contains(&format!("'{status}': \"{model}\"")) {
                missing.push(format!(
                    "openapi-generator: {id} does not parse {status} as {model}"
                ));
            }
        }
    }
    assert!(count >= 9, "the spec lists {count} operations");
    missing
}

/// Both generators take the spec as it is (openapi-generator validates it
/// first) and keep every schema with each of its fields and values, every
/// operation, and the parsing of every successful answer: nothing is dropped.
#[test]
fn generated_clients_keep_every_schema_field_and_operation() {
    let Some(versions) = tools_or_skip("generated_clients_keep_every_schema_field_and_operation")
    else {
        return;
    };
    let dir = generated(&versions);
    let spec: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    let missing = dropped(&spec, &dir);
    assert!(missing.is_empty(), "dropped by a generator: {missing:#?}");
}

/// Each generated client drives runs against a real API and worker: creates
/// one (201, then 200 for its idempotency key), reads it until it succeeds,
/// lists it, reads its events, creates a failing one in a batch, revives it
/// with the bulk retry, and parses the problem documents of a 404 and a 422.
#[tokio::test]
async fn generated_clients_drive_runs_end_to_end() {
    let Some(versions) = tools_or_skip("generated_clients_drive_runs_end_to_end") else {
        return;
    };
    let dir = tokio::task::spawn_blocking(move || generated(&versions))
        .await
        .expect("generation");
    let db = TestDb::new().await;
    let mut config = TestApi::config();
    config.step_kinds.push("count".to_owned());
    let api = TestApi::start(db.pool.clone(), config);
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(4)).register(
        Count {
            executions: Executions::default(),
            worker: "clients".to_owned(),
        },
    ));
    let scripts = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    let drives = [
        (
            "openapi-python-client",
            "drive_openapi_python_client.py",
            dir.clone(),
        ),
        (
            "openapi-generator",
            "drive_openapi_generator.py",
            dir.join("ogc"),
        ),
    ];
    // One tenant per client, so each one's bulk retry sees only its runs.
    let mut running = Vec::new();
    for (client, script, package_dir) in drives {
        let tenant = db.tenant(client).await;
        let token = token(&db, tenant).await;
        let mut command = tokio::process::Command::new("python3");
        command
            .arg(format!("{scripts}/{script}"))
            .arg(package_dir)
            .arg(&api.base)
            .arg(token);
        running.push((
            client,
            tokio::spawn(async move {
                let started = Instant::now();
                let output = command.output().await;
                (started.elapsed(), output)
            }),
        ));
    }
    for (client, drive) in running {
        let (took, output) = drive.await.expect("drive task");
        let output = output.expect("python3 runs");
        eprintln!("{client} drove its runs in {took:?}");
        assert!(
            output.status.success(),
            "{client} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let saw: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("{client} printed no JSON ({err})"));
        let invalid = saw["invalid"][1].as_str().unwrap_or_default();
        assert_eq!(
            saw,
            json!({
                "created": 201,
                "repeated": 200,
                "same_run": true,
                "status": "succeeded",
                "steps": [["greet", "succeeded"], ["count", "succeeded"]],
                "greeting": "héllo 🚀",
                "listed": true,
                "next_cursor": null,
                "events": ["log"],
                "batch": 201,
                "failed": "failed",
                "retried": true,
                "not_found": [404, "urn:runq:problem:not-found"],
                "invalid": [422, invalid],
            }),
            "{client}"
        );
        assert!(
            invalid.starts_with("steps[0].kind 'teleport' is not a known step kind"),
            "{client}: {invalid}"
        );
    }
    worker.stop().await;
}
