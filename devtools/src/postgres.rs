//! Finding a Postgres server without configuration, and starting a throwaway
//! one from local binaries when there is none.
//!
//! Used by `runq dev`, `runq bench` and the test harness. Order: the URL the
//! caller was given (`DATABASE_URL`), else a server on 127.0.0.1:5432, else a
//! cluster started here from `initdb`/`postgres` found on PATH or under
//! `/usr/lib/postgresql/*/bin` (`--throwaway-postgres` goes straight there).
//! Postgres refuses to run as root, so when this process is root the cluster
//! runs as the `postgres` user.
//!
//! A throwaway cluster is stopped and deleted when its [`PickedDatabase`] is
//! dropped (`runq dev` exits on SIGINT, SIGTERM or SIGHUP). `pg_ctl` detaches
//! the server from our process group, so a `runq dev` killed outright leaves
//! it running; each cluster therefore lives in a slot guarded by a file lock,
//! and the next `runq dev` stops whatever server it finds in a slot nobody
//! holds (see [`ThrowawayArgs`]).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Errors finding or starting Postgres.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// Neither `initdb` nor `postgres` could be found.
    #[error("no Postgres binaries found on PATH or under /usr/lib/postgresql/*/bin; install PostgreSQL or set DATABASE_URL")]
    NoBinaries,
    /// Running as root and there is no `postgres` user to run the server as.
    #[error("running as root and no 'postgres' user exists to run the server as")]
    NoPostgresUser,
    /// A command failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// What was run.
        command: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PostgresError + '_ {
    move |source| PostgresError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: PATH first, then
/// the newest `/usr/lib/postgresql/*/bin`.
pub fn find_binaries() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // Debian links initdb onto PATH; follow it to the real bin directory.
            if let Ok(real) = fs::canonicalize(dir.join("initdb")) {
                if let Some(parent) = real.parent() {
                    if has_all(parent) {
                        return Some(parent.to_path_buf());
                    }
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// How a local cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Postgres defaults (fsync on): for `runq dev` and benchmarks.
    Full,
    /// fsync and synchronous commit off: for tests, which a crash may lose.
    Fast,
}

/// A Postgres cluster in a directory of ours, started with `pg_ctl`.
#[derive(Debug)]
pub struct LocalCluster {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
}

impl LocalCluster {
    /// Starts the cluster in `dir` (creating it with `initdb` the first time),
    /// or adopts it if it is already running. The server listens on 127.0.0.1
    /// only, on a free port chosen at creation and kept in `dir/port`.
    ///
    /// # Errors
    ///
    /// Binaries missing, or `initdb`/`pg_ctl` failing.
    pub fn start(dir: &Path, durability: Durability) -> Result<Self, PostgresError> {
        let bin_dir = find_binaries().ok_or(PostgresError::NoBinaries)?;
        let run_as = postgres_user()?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let data_dir = dir.join("data");
        let port_file = dir.join("port");
        let cluster = |port| LocalCluster {
            data_dir: data_dir.clone(),
            bin_dir: bin_dir.clone(),
            port,
            run_as,
        };
        if data_dir.join("PG_VERSION").is_file() {
            let port: u16 = fs::read_to_string(&port_file)
                .map_err(io_err(&port_file))?
                .trim()
                .parse()
                .map_err(|_| PostgresError::Command {
                    command: format!("reading {}", port_file.display()),
                    detail: "not a port number".to_owned(),
                })?;
            let cluster = cluster(port);
            if !cluster.is_running() {
                cluster.pg_ctl_start(durability)?;
            }
            return Ok(cluster);
        }
        let port = free_port().map_err(io_err(dir))?;
        fs::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
        let cluster = cluster(port);
        cluster.hand_over(dir)?;
        cluster.hand_over(&data_dir)?;
        cluster.run(
            Command::new(bin_dir.join("initdb"))
                .arg("-D")
                .arg(&data_dir)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        )?;
        fs::write(&port_file, port.to_string()).map_err(io_err(&port_file))?;
        cluster.pg_ctl_start(durability)?;
        Ok(cluster)
    }

    fn pg_ctl_start(&self, durability: Durability) -> Result<(), PostgresError> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=400",
            self.port
        );
        if durability == Durability::Fast {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.data_dir.join("server.log");
        self.run(
            Command::new(self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o", &options, "start"]),
        )
    }

    /// Whether the server answers on its port.
    pub fn is_running(&self) -> bool {
        port_open(self.port)
    }

    /// Whether the postmaster recorded in the data directory's
    /// `postmaster.pid` is alive (`pg_ctl status`), whatever answers on the
    /// port.
    pub fn postmaster_running(&self) -> bool {
        self.run(
            Command::new(self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .arg("status"),
        )
        .is_ok()
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    ///
    /// # Errors
    ///
    /// `pg_ctl stop` failing.
    pub fn stop(&self) -> Result<(), PostgresError> {
        self.run(
            Command::new(self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-m", "fast", "stop"]),
        )
    }

    /// Starts a stopped server again (same data, same port).
    ///
    /// # Errors
    ///
    /// `pg_ctl start` failing.
    pub fn restart(&self, durability: Durability) -> Result<(), PostgresError> {
        if !self.is_running() {
            self.pg_ctl_start(durability)?;
        }
        Ok(())
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn hand_over(&self, path: &Path) -> Result<(), PostgresError> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))?;
        }
        Ok(())
    }

    fn run(&self, command: &mut Command) -> Result<(), PostgresError> {
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        // Detach the server from our stdout so callers reading it are not held open.
        let output = command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| PostgresError::Io {
                path: format!("{:?}", command.get_program()),
                source,
            })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(PostgresError::Command {
                command: format!("{:?}", command.get_program()),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
        }
    }
}

/// `(uid, gid)` of the `postgres` user when this process is root, else `None`.
fn postgres_user() -> Result<Option<(u32, u32)>, PostgresError> {
    let id = |flag: &str, user: Option<&str>| -> Option<u32> {
        let mut command = Command::new("id");
        command.arg(flag);
        if let Some(user) = user {
            command.arg(user);
        }
        let output = command.output().ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    };
    if id("-u", None) != Some(0) {
        return Ok(None);
    }
    match (id("-u", Some("postgres")), id("-g", Some("postgres"))) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(PostgresError::NoPostgresUser),
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings of the throwaway cluster (`runq dev`'s options; `runq bench` and
/// the benches use the defaults).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ThrowawayArgs {
    /// Start a throwaway cluster from local Postgres binaries even when
    /// DATABASE_URL is set or a server answers on 127.0.0.1:5432.
    #[arg(
        long = "throwaway-postgres",
        env = "RUNQ_DEV_THROWAWAY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub force: bool,
    /// Where throwaway clusters live, one numbered slot each [default:
    /// $TMPDIR/runq-dev-<uid>]. A slot left by a process that was killed is
    /// found here, and its server stopped, by the next one.
    #[arg(long = "throwaway-dir", env = "RUNQ_DEV_DIR")]
    pub dir: Option<PathBuf>,
}

impl ThrowawayArgs {
    /// The directory holding the slots.
    fn base_dir(&self) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let user = current_uid().map_or_else(|| "unknown".to_owned(), |u| u.to_string());
                std::env::temp_dir().join(format!("runq-dev-{user}"))
            }
        }
    }
}

fn current_uid() -> Option<u32> {
    let output = Command::new("id").arg("-u").output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// A throwaway cluster and the slot it occupies.
///
/// The slot is `base/<n>` with the lock file `base/<n>.lock` beside it. The
/// owning process holds an exclusive `flock` on the lock file for as long as
/// it uses the cluster. The kernel releases the lock when the process dies,
/// however it dies, while the server (detached by `pg_ctl`) keeps running:
/// so a slot whose lock can be taken but whose server runs was left by a
/// killed process, and nobody else can be using that server.
#[derive(Debug)]
struct Throwaway {
    cluster: LocalCluster,
    dir: PathBuf,
    /// Held (locked) until dropped, after the cluster is stopped.
    _lock: fs::File,
}

/// A database picked without configuration, and the cluster started for it
/// (if one was), which lives as long as this value.
#[derive(Debug)]
pub struct PickedDatabase {
    /// Connection URL.
    pub url: String,
    /// Where it came from, for people: `DATABASE_URL`, `local`, `throwaway`.
    pub source: &'static str,
    throwaway: Option<Throwaway>,
}

impl PickedDatabase {
    /// The throwaway cluster's data directory, when one was started.
    pub fn throwaway_data_dir(&self) -> Option<&Path> {
        self.throwaway
            .as_ref()
            .map(|throwaway| throwaway.cluster.data_dir.as_path())
    }
}

impl Drop for PickedDatabase {
    fn drop(&mut self) {
        if let Some(throwaway) = self.throwaway.take() {
            match throwaway.cluster.stop() {
                Ok(()) => {
                    let _ = fs::remove_dir_all(&throwaway.dir);
                    tracing::info!(dir = %throwaway.dir.display(), "throwaway cluster stopped and removed");
                }
                // Left in place: the next run finds the slot and stops it.
                Err(err) => tracing::warn!(error = %err, "could not stop the throwaway cluster"),
            }
        }
    }
}

/// Picks a database the way `runq dev` does: `url` if given, else database
/// `name` on a Postgres at 127.0.0.1:5432 (created if missing), else database
/// `name` on a throwaway cluster started from local binaries (stopped and
/// deleted when the returned value is dropped). `throwaway.force` skips the
/// first two.
///
/// # Errors
///
/// No server at 5432 and no local binaries, or creating the database failed.
pub async fn pick_database(
    url: Option<&str>,
    name: &str,
    throwaway: &ThrowawayArgs,
) -> Result<PickedDatabase, PostgresError> {
    if !throwaway.force {
        if let Some(url) = url {
            return Ok(PickedDatabase {
                url: url.to_owned(),
                source: "DATABASE_URL",
                throwaway: None,
            });
        }
        if port_open(5432) {
            let users = [
                "postgres".to_owned(),
                std::env::var("USER").unwrap_or_default(),
            ];
            for user in users.iter().filter(|u| !u.is_empty()) {
                let server = format!("postgres://{user}@127.0.0.1:5432");
                if create_database(&format!("{server}/postgres"), name)
                    .await
                    .is_ok()
                {
                    return Ok(PickedDatabase {
                        url: format!("{server}/{name}"),
                        source: "local",
                        throwaway: None,
                    });
                }
            }
        }
    }
    let (dir, lock) = claim_slot(&throwaway.base_dir())?;
    let cluster = LocalCluster::start(&dir, Durability::Full)?;
    let picked = PickedDatabase {
        url: cluster.url(name),
        source: "throwaway",
        throwaway: Some(Throwaway {
            cluster,
            dir,
            _lock: lock,
        }),
    };
    if let Some(throwaway) = &picked.throwaway {
        create_database(&throwaway.cluster.url("postgres"), name).await?;
    }
    Ok(picked)
}

/// Takes the first free slot under `base`, returning its (empty) directory
/// and its held lock. On the way, every slot no live process holds is
/// cleaned: a server left running there by a killed process is stopped and
/// its directory removed.
fn claim_slot(base: &Path) -> Result<(PathBuf, fs::File), PostgresError> {
    fs::create_dir_all(base).map_err(io_err(base))?;
    let mut slots: Vec<u32> = fs::read_dir(base)
        .map_err(io_err(base))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".lock").unwrap_or(name).parse().ok()
        })
        .collect();
    slots.sort_unstable();
    slots.dedup();
    let mut chosen = None;
    let next = slots.last().map_or(0, |last| last + 1);
    // Existing slots first, then new ones until one is ours (another process
    // may create the same new slot at the same moment).
    for slot in slots.into_iter().chain(next..) {
        if chosen.is_some() && slot >= next {
            break;
        }
        let lock_path = base.join(format!("{slot}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => continue,
            Err(fs::TryLockError::Error(source)) => {
                return Err(PostgresError::Io {
                    path: lock_path.display().to_string(),
                    source,
                })
            }
        }
        let dir = base.join(slot.to_string());
        clean_leftover(&dir)?;
        if chosen.is_none() {
            chosen = Some((dir, lock));
        }
    }
    chosen.ok_or_else(|| PostgresError::Command {
        command: format!("claiming a slot under {}", base.display()),
        detail: "no slot could be locked".to_owned(),
    })
}

/// Cleans every slot under `base` that no live process holds (see
/// [`ThrowawayArgs`]): stops the server a killed process left running there
/// and removes its directory. Returns how many slots were cleaned.
///
/// # Errors
///
/// A lock file cannot be opened, `pg_ctl stop` fails, or a directory cannot
/// be removed.
pub fn clean_leftovers(base: &Path) -> Result<usize, PostgresError> {
    let Ok(entries) = fs::read_dir(base) else {
        return Ok(0);
    };
    let mut cleaned = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let lock_path = path.with_extension("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_ok() {
            clean_leftover(&path)?;
            cleaned += 1;
        }
    }
    Ok(cleaned)
}

/// Stops the server a killed process left running in slot directory `dir`
/// (the caller holds the slot's lock, so no live process uses it) and
/// removes the directory.
fn clean_leftover(dir: &Path) -> Result<(), PostgresError> {
    if !dir.exists() {
        return Ok(());
    }
    let data_dir = dir.join("data");
    if data_dir.join("postmaster.pid").is_file() {
        let cluster = LocalCluster {
            bin_dir: find_binaries().ok_or(PostgresError::NoBinaries)?,
            run_as: postgres_user()?,
            port: 0,
            data_dir,
        };
        if cluster.postmaster_running() {
            cluster.stop()?;
            tracing::info!(
                dir = %dir.display(),
                "stopped a throwaway cluster left running by a runq process that was killed"
            );
        }
    }
    fs::remove_dir_all(dir).map_err(io_err(dir))
}

/// Creates database `name` through the server at `admin_url` unless it exists.
///
/// # Errors
///
/// The server is unreachable or refuses.
pub async fn create_database(admin_url: &str, name: &str) -> Result<(), PostgresError> {
    use sqlx::Connection;
    let failed = |err: sqlx::Error| PostgresError::Command {
        command: format!("creating database {name}"),
        detail: err.to_string(),
    };
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(failed)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .map_err(failed)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut conn)
            .await
        {
            Ok(_) => {}
            // Created by someone else meanwhile.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(err) => return Err(failed(err)),
        }
    }
    Ok(())
}
