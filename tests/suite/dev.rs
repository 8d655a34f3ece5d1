//! `runq dev` as a newcomer meets it: a real process on a throwaway cluster
//! it starts itself, stopped by closing the terminal (SIGHUP) or killed
//! outright.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::process::{free_port, Proc};
use crate::support::{poll, skip_or_fail, wait_for};

/// A directory of throwaway-cluster slots for one test; whatever server is
/// left in it is stopped when the value is dropped (after the processes,
/// which are declared later and so dropped first).
struct SlotDir(PathBuf);

impl SlotDir {
    fn new() -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runq-dev-slots-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("create the slot directory");
        SlotDir(dir)
    }

    /// The pid in slot 0's `postmaster.pid`, once the server has written it.
    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.0.join("0/data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for SlotDir {
    fn drop(&mut self) {
        if let Err(err) = runq_devtools::postgres::clean_leftovers(&self.0) {
            eprintln!("could not clean {}: {err}", self.0.display());
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether process `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (at most 10 s) for process `pid` to be gone.
async fn wait_gone(pid: i32, what: &str) {
    wait_for(
        &format!("{what} (pid {pid}) to be gone"),
        Duration::from_secs(10),
        &mut || async move { !running(pid) },
    )
    .await;
}

/// Starts `runq dev` forced onto a throwaway cluster in `slots`, listening
/// on a free port. `DATABASE_URL` points at nothing, and the server on
/// 5432 is ignored, so only the throwaway path can bring it up.
fn spawn_dev(slots: &Path) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let proc = Proc::spawn(
        &["dev"],
        "postgres://postgres@127.0.0.1:1/nothing",
        &[
            ("RUNQ_DEV_THROWAWAY", "1"),
            ("RUNQ_DEV_DIR", slots.to_str().expect("utf-8 path")),
            ("RUNQ_LISTEN", &listen),
        ],
    );
    (proc, port)
}

/// Waits (at most 60 s: initdb and a first start) until `runq dev` answers
/// `/ready`; panics with its log if it exits first.
async fn wait_ready(proc: &mut Proc, port: u16) {
    let client = reqwest::Client::new();
    let ready = poll(Duration::from_secs(60), || {
        assert!(proc.alive(), "runq dev exited: {}", proc.log_text());
        let request = client
            .get(format!("http://127.0.0.1:{port}/ready"))
            .timeout(Duration::from_secs(2))
            .send();
        async move {
            request
                .await
                .is_ok_and(|response| response.status().is_success())
                .then_some(())
        }
    })
    .await;
    assert!(
        ready.is_some(),
        "runq dev not ready within 60 s: {}",
        proc.log_text()
    );
}

/// Why these tests cannot run here, if they cannot.
fn missing_postgres_binaries() -> Option<String> {
    runq_devtools::postgres::find_binaries()
        .is_none()
        .then(|| "runq dev's throwaway cluster needs local Postgres binaries (initdb, pg_ctl, postgres): apt-get install postgresql".to_owned())
}

/// Closing the terminal (SIGHUP) shuts `runq dev` down like Ctrl-C: it
/// exits 0, and the throwaway cluster it started is stopped (its
/// postmaster gone) and its directory removed.
#[tokio::test]
async fn dev_on_sighup_exits_zero_and_stops_its_throwaway_cluster() {
    if let Some(why) = missing_postgres_binaries() {
        return skip_or_fail(&why);
    }
    let slots = SlotDir::new();
    let (mut dev, port) = spawn_dev(&slots.0);
    wait_ready(&mut dev, port).await;
    let postmaster = slots.postmaster_pid().expect("the cluster wrote its pid");
    assert!(running(postmaster), "the throwaway postmaster runs");

    dev.signal(Signal::SIGHUP);
    let status = dev.wait_exit(Duration::from_secs(30)).await;

    assert!(status.success(), "exit status {status}: {}", dev.log_text());
    wait_gone(postmaster, "the throwaway postmaster").await;
    assert!(
        !slots.0.join("0").exists(),
        "the cluster's directory was removed"
    );
}

/// A `runq dev` killed outright (SIGKILL) cannot stop its cluster, which
/// keeps running; the next `runq dev` on the same slot directory finds it,
/// stops it, and comes up on a fresh cluster of its own, which SIGTERM then
/// stops too.
#[tokio::test]
async fn dev_after_a_killed_dev_stops_the_stale_cluster_and_comes_up() {
    if let Some(why) = missing_postgres_binaries() {
        return skip_or_fail(&why);
    }
    let slots = SlotDir::new();
    let (mut first, port) = spawn_dev(&slots.0);
    wait_ready(&mut first, port).await;
    let stale = slots.postmaster_pid().expect("the cluster wrote its pid");
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    assert!(
        running(stale),
        "the killed runq dev left its postmaster running"
    );

    let (mut second, port) = spawn_dev(&slots.0);
    wait_ready(&mut second, port).await;

    wait_gone(stale, "the stale postmaster").await;
    let fresh = slots
        .postmaster_pid()
        .expect("the new cluster wrote its pid");
    assert_ne!(fresh, stale, "a new postmaster serves the second runq dev");
    assert!(running(fresh));
    assert!(
        second
            .log_text()
            .contains("stopped a throwaway cluster left running"),
        "the second runq dev says what it stopped: {}",
        second.log_text()
    );
    let status = second.stop().await;
    assert!(status.success(), "exit status {status}");
    wait_gone(fresh, "the second runq dev's postmaster").await;
}

/// The `sh` blocks of the README's "Submit a run" section, in order.
fn readme_first_example() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("## Submit a run")
        .expect("the README has a 'Submit a run' section");
    let section = &readme[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + "```sh\n".len()..];
        let close = body.find("```").expect("a closed code block");
        blocks.push(&body[..close]);
        rest = &body[close + 3..];
    }
    assert!(!blocks.is_empty(), "the section has sh blocks");
    blocks.concat()
}

/// The lines `runq dev` prints for a newcomer to paste: everything after
/// "paste into another shell" up to the blank line, once printed.
fn printed_commands(stdout: &str) -> Option<String> {
    let (_, after) = stdout.split_once("paste into another shell, in this repository:\n")?;
    let (block, _) = after.split_once("\n\n")?;
    Some(format!("{block}\n"))
}

/// The README's first example succeeds as printed against a fresh
/// `runq dev`: bash runs the commands `runq dev` prints (its `export` lines
/// and its example), then every `sh` block of "Submit a run", in order,
/// with `cargo run -q --` standing for the built binary. Every command
/// exits 0 and every run they submit succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_first_example_succeeds_as_printed_on_a_fresh_dev() {
    for tool in ["bash", "curl", "python3"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            return skip_or_fail(&format!("the README's example needs {tool}"));
        }
    }
    let db = crate::support::TestDb::new().await;
    let port = free_port();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runq-dev-{}.out", uuid::Uuid::now_v7().simple()));
    let log = out.with_extension("log");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_runq"));
    command
        .arg("dev")
        .env("DATABASE_URL", &db.url)
        .env("RUNQ_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut dev = Proc {
        child: command.spawn().expect("spawn runq dev"),
        log,
    };
    let printed = poll(Duration::from_secs(30), || {
        let printed = printed_commands(&std::fs::read_to_string(&out).unwrap_or_default());
        if printed.is_none() {
            assert!(dev.alive(), "runq dev exited: {}", dev.log_text());
        }
        async move { printed }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "runq dev printed no commands: {}",
            std::fs::read_to_string(&out).unwrap_or_default()
        )
    });
    assert!(
        printed.starts_with("export RUNQ_URL=") && printed.contains("\nexport RUNQ_TOKEN="),
        "runq dev prints the variables the client reads: {printed}"
    );

    let script = format!("{printed}{}", readme_first_example());
    assert!(
        script.contains("cargo run -q -- enqueue") && script.contains("cargo run -q -- tail"),
        "the example runs the CLI through cargo: {script}"
    );
    let script = script.replace(
        "cargo run -q --",
        &format!("'{}'", env!("CARGO_BIN_EXE_runq")),
    );
    let ran = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the example finishes within 60 s")
    .expect("run bash");
    let stdout = String::from_utf8_lossy(&ran.stdout);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(
        ran.status.success(),
        "the example failed ({}):\n{script}\nstdout: {stdout}\nstderr: {stderr}\nrunq dev: {}",
        ran.status,
        dev.log_text()
    );

    db.wait_all_terminal(Duration::from_secs(20)).await;
    let runs: i64 = db.scalar("SELECT count(*) FROM runs").await;
    assert!(runs >= 3, "the example submitted its runs ({runs})");
    assert_eq!(
        db.count_status("succeeded").await,
        runs,
        "every run of the example succeeded"
    );
    let status = dev.stop().await;
    assert!(status.success(), "runq dev exit status {status}");
}
