//! Finding the servers a backend's suite runs against, and skipping by name when there are none.
//!
//! Discovery order, the same for every suite (DESIGN.md, "Tests"):
//! 1. an environment URL: `NORMANDY_TEST_DATABASE_URL` (Postgres) or `NORMANDY_TEST_REDIS_URL`;
//! 2. the default local server, when it answers a real handshake within a couple of seconds
//!    ([`LOCAL_POSTGRES_URL`], [`LOCAL_REDIS_URL`]);
//! 3. with this crate's `containers` feature, a testcontainers container — only if a Docker
//!    engine answers a quick ping;
//! 4. otherwise `None`, and the test reports itself skipped by name through [`skip`], with every
//!    step's reason.
//!
//! With `NORMANDY_REQUIRE_BACKENDS=1` (CI) a skip is a failure instead.
//!
//! # Skips are never passes
//! A skipped test returns early, so the test runner counts it as passed. [`skip`] therefore also
//! appends `<test>\t<reason>` to the file named by `NORMANDY_SKIP_LOG` when it is set;
//! `cargo xtask test` (the README's test command) sets it and prints the skipped tests, grouped by
//! reason, under the runner's summary.
//!
//! # Containers
//! One container per image is shared by every test of the process: it is started once and kept
//! in a static. Because `cargo nextest` runs each test in its own process, the container is also
//! *named* (`normandy-tests-postgres-17-alpine`, `normandy-tests-redis-7.4-alpine`) and started
//! with testcontainers' reuse directive, so the test processes of one run (and of later runs)
//! share it instead of each starting (and leaking) its own. It keeps running after the tests;
//! remove it with `docker rm -f <name>`. Every harness works in its own namespace
//! ([`unique_name`]), so sharing one server is safe.

use std::sync::Mutex;

/// The env var naming a Postgres server for tests.
pub const DATABASE_URL_VAR: &str = "NORMANDY_TEST_DATABASE_URL";
/// The env var naming a Redis server for tests.
pub const REDIS_URL_VAR: &str = "NORMANDY_TEST_REDIS_URL";
/// The env var that turns a skipped suite into a failure.
pub const REQUIRE_BACKENDS_VAR: &str = "NORMANDY_REQUIRE_BACKENDS";
/// The env var naming a file that [`skip`] appends `<test>\t<reason>` lines to.
pub const SKIP_LOG_VAR: &str = "NORMANDY_SKIP_LOG";

/// The local Postgres tried when no env URL is set: a default install's superuser and database.
pub const LOCAL_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The local Redis tried when no env URL is set.
pub const LOCAL_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Postgres image tag used when a container is started.
pub const POSTGRES_TAG: &str = "17-alpine";
/// Redis image tag used when a container is started.
pub const REDIS_TAG: &str = "7.4-alpine";

/// Why discovery found nothing, per backend, for [`skip_reason`]. Process-wide because the
/// macros learn only that a factory returned `None`, not why.
static UNAVAILABLE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note_unavailable(reason: String) {
    let mut notes = UNAVAILABLE.lock().unwrap_or_else(|p| p.into_inner());
    if !notes.contains(&reason) {
        notes.push(reason);
    }
}

fn env_url(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// A Postgres URL for tests: `NORMANDY_TEST_DATABASE_URL`, else [`LOCAL_POSTGRES_URL`] when a
/// server there accepts a connection, else a shared container (feature `containers`, Docker
/// reachable), else `None` (the reasons are kept for [`skip_reason`]).
pub async fn postgres_url() -> Option<String> {
    if let Some(url) = env_url(DATABASE_URL_VAR) {
        return Some(url);
    }
    static LOCAL: tokio::sync::OnceCell<Result<(), String>> = tokio::sync::OnceCell::const_new();
    match LOCAL
        .get_or_init(|| probe_postgres(LOCAL_POSTGRES_URL))
        .await
    {
        Ok(()) => Some(LOCAL_POSTGRES_URL.to_string()),
        Err(why) => {
            note_unavailable(format!("{DATABASE_URL_VAR} is not set; {why}"));
            discover("postgres", DATABASE_URL_VAR).await
        }
    }
}

/// A Redis URL for tests: `NORMANDY_TEST_REDIS_URL`, else [`LOCAL_REDIS_URL`] when a server
/// there answers `PING`, else a shared container (feature `containers`, Docker reachable), else
/// `None` (the reasons are kept for [`skip_reason`]).
pub async fn redis_url() -> Option<String> {
    if let Some(url) = env_url(REDIS_URL_VAR) {
        return Some(url);
    }
    static LOCAL: tokio::sync::OnceCell<Result<(), String>> = tokio::sync::OnceCell::const_new();
    match LOCAL.get_or_init(|| probe_redis(LOCAL_REDIS_URL)).await {
        Ok(()) => Some(LOCAL_REDIS_URL.to_string()),
        Err(why) => {
            note_unavailable(format!("{REDIS_URL_VAR} is not set; {why}"));
            discover("redis", REDIS_URL_VAR).await
        }
    }
}

/// How long a local server gets to answer before discovery moves on.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether a Postgres at `url` completes a login and answers `SELECT 1`.
async fn probe_postgres(url: &str) -> Result<(), String> {
    use sqlx::Connection;
    let attempt = async {
        let mut con = sqlx::PgConnection::connect(url).await?;
        sqlx::query("SELECT 1").execute(&mut con).await?;
        con.close().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("no usable local Postgres at {url}: {e}")),
        Err(_) => Err(format!(
            "no usable local Postgres at {url}: no answer in {PROBE_TIMEOUT:?}"
        )),
    }
}

/// Whether a Redis at `url` answers `PING`.
async fn probe_redis(url: &str) -> Result<(), String> {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("no usable local Redis at {url}: {e}")),
        Err(_) => Err(format!(
            "no usable local Redis at {url}: no answer in {PROBE_TIMEOUT:?}"
        )),
    }
}

#[cfg(feature = "containers")]
async fn discover(which: &'static str, var: &str) -> Option<String> {
    let found = match which {
        "postgres" => containers::postgres().await,
        _ => containers::redis().await,
    };
    match found {
        Ok(url) => Some(url),
        Err(why) => {
            note_unavailable(format!("{var} is not set and no {which} container: {why}"));
            None
        }
    }
}

#[cfg(not(feature = "containers"))]
async fn discover(which: &'static str, var: &str) -> Option<String> {
    note_unavailable(format!(
        "{var} is not set and normandy-tests was built without the `containers` feature \
         (no {which} container tried)"
    ));
    None
}

/// Whether `NORMANDY_REQUIRE_BACKENDS=1`: every suite must run, a skip fails.
pub fn require_backends() -> bool {
    std::env::var(REQUIRE_BACKENDS_VAR).is_ok_and(|v| {
        let v = v.trim();
        v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes")
    })
}

/// Reports `name` skipped: prints `SKIPPED <name>: <reason>` to stderr, appends it to the
/// `NORMANDY_SKIP_LOG` file when that is set, and returns — or panics with that message when
/// [`require_backends`] is set.
pub fn skip(name: &str, reason: &str) {
    let msg = format!("SKIPPED {name}: {reason}");
    if require_backends() {
        panic!("{msg} ({REQUIRE_BACKENDS_VAR}=1 makes a skipped suite a failure)");
    }
    eprintln!("{msg}");
    if let Some(path) = env_url(SKIP_LOG_VAR) {
        record_skip(&path, name, reason);
    }
}

/// Like [`skip`], naming the running test itself (nextest's `NEXTEST_TEST_NAME`, else the test
/// thread's name, which libtest sets to the test's path).
pub fn skip_this_test(reason: &str) {
    skip(&current_test_name(), reason);
}

/// The running test's name, as well as it can be told.
pub fn current_test_name() -> String {
    if let Some(name) = env_url("NEXTEST_TEST_NAME") {
        return name;
    }
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => "<unnamed test>".to_string(),
    }
}

/// Appends one `<test>\t<reason>` line in a single `write` (O_APPEND keeps the lines of parallel
/// test processes whole). Failing to record is reported, never fatal: the skip itself stands.
fn record_skip(path: &str, name: &str, reason: &str) {
    use std::io::Write;
    let line = format!(
        "{}\t{}\n",
        name.replace(['\t', '\n'], " "),
        reason.replace(['\t', '\n'], " ")
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("could not record the skip in {path}: {e}");
    }
}

/// Why the backends discovered in this process were unavailable, or a generic reason when
/// discovery was not asked (a factory may return `None` for its own reasons).
pub fn skip_reason() -> String {
    let notes = UNAVAILABLE.lock().unwrap_or_else(|p| p.into_inner());
    if notes.is_empty() {
        "the factory returned None (backend not available)".to_string()
    } else {
        notes.join("; ")
    }
}

/// A fresh namespace name for one harness: `prefix` lowercased (ASCII letters, digits and `_`
/// kept, anything else turned into `_`, cut to 30 bytes), then `_` and a UUIDv7 in hex.
///
/// The result starts with a letter, is at most 63 bytes (a Postgres identifier) and is safe as
/// a schema name, a Redis key prefix or a directory name.
pub fn unique_name(prefix: &str) -> String {
    let mut out: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert(0, 'n');
        out.truncate(30);
    }
    out.push('_');
    out.push_str(&uuid::Uuid::now_v7().simple().to_string());
    out
}

/// The env var naming the seed nodes of a Redis Cluster for tests: comma-separated
/// `redis://host:port` URLs (`.ci/redis-cluster.sh` starts one on ports 7000-7005 and sets it).
pub const REDIS_CLUSTER_URLS_VAR: &str = "NORMANDY_TEST_REDIS_CLUSTER_URLS";

/// The seed node URLs of a Redis Cluster for tests, from `NORMANDY_TEST_REDIS_CLUSTER_URLS`, or
/// `None` with the reason kept for [`skip_reason`] (no container is tried: a cluster takes six
/// servers; run `.ci/redis-cluster.sh`).
pub async fn redis_cluster_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = env_url(REDIS_CLUSTER_URLS_VAR)
        .unwrap_or_default()
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        note_unavailable(format!(
            "{REDIS_CLUSTER_URLS_VAR} is not set (start a cluster with .ci/redis-cluster.sh)"
        ));
        return None;
    }
    Some(urls)
}

/// The test cluster as one `redis+cluster://host1:port1,host2:port2` URL (the form the Redis
/// backends' configs take), or `None` as [`redis_cluster_urls`].
pub async fn redis_cluster_url() -> Option<String> {
    let urls = redis_cluster_urls().await?;
    let hosts: Vec<&str> = urls
        .iter()
        .map(|u| u.trim_start_matches("redis://").trim_end_matches('/'))
        .collect();
    Some(format!("redis+cluster://{}", hosts.join(",")))
}

/// The env var naming a PgBouncer in transaction-pooling mode in front of the test Postgres.
pub const PGBOUNCER_URL_VAR: &str = "NORMANDY_TEST_PGBOUNCER_URL";

/// A URL of a transaction-pooling PgBouncer in front of the server of [`postgres_url`]:
/// `NORMANDY_TEST_PGBOUNCER_URL` (`.ci/pgbouncer.sh` starts one and sets it), else `None` with
/// the reason kept for [`skip_reason`], so the pooler suites skip by name (or fail under
/// `NORMANDY_REQUIRE_BACKENDS=1`). No container is tried.
pub async fn pgbouncer_url() -> Option<String> {
    if let Some(url) = env_url(PGBOUNCER_URL_VAR) {
        return Some(url);
    }
    note_unavailable(format!(
        "{PGBOUNCER_URL_VAR} is not set (`.ci/pgbouncer.sh` starts a PgBouncer in transaction \
         mode on 127.0.0.1:6432 and sets it)"
    ));
    None
}

#[cfg(feature = "containers")]
mod containers {
    //! One shared container per image, started on a runtime of its own.
    //!
    //! testcontainers keeps a process-wide Docker client whose connections belong to the runtime
    //! that first used it; each test has its own runtime, which ends with the test. So every
    //! Docker call runs on one background runtime that lives as long as the process.

    use std::sync::OnceLock;
    use std::time::Duration;

    use testcontainers::core::IntoContainerPort;
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, ImageExt, ReuseDirective};
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::redis::Redis;
    use tokio::sync::OnceCell;

    use super::{POSTGRES_TAG, REDIS_TAG};

    /// A started container and its URL; the container handle is kept so it lives as long as the
    /// process (statics are never dropped).
    struct Shared<I: testcontainers::Image> {
        url: String,
        _container: ContainerAsync<I>,
    }

    static DOCKER: OnceCell<Result<(), String>> = OnceCell::const_new();
    static POSTGRES: OnceCell<Result<Shared<Postgres>, String>> = OnceCell::const_new();
    static REDIS: OnceCell<Result<Shared<Redis>, String>> = OnceCell::const_new();

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("normandy-tests-docker")
                .enable_all()
                .build()
                .expect("building the container runtime")
        })
    }

    /// Runs `fut` on the background runtime and waits for it from any runtime.
    async fn on_docker_runtime<T: Send + 'static>(
        fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        runtime()
            .spawn(fut)
            .await
            .map_err(|e| format!("container task failed: {e}"))?
    }

    pub(super) async fn postgres() -> Result<String, String> {
        docker_answers().await?;
        let shared = POSTGRES
            .get_or_init(|| {
                on_docker_runtime(async {
                    let container = start_shared(|| {
                        Postgres::default()
                            .with_host_auth()
                            .with_tag(POSTGRES_TAG)
                            .with_container_name(format!("normandy-tests-postgres-{POSTGRES_TAG}"))
                    })
                    .await?;
                    let (host, port) = endpoint(&container, 5432).await?;
                    Ok(Shared {
                        url: format!("postgres://postgres:postgres@{host}:{port}/postgres"),
                        _container: container,
                    })
                })
            })
            .await;
        shared.as_ref().map(|s| s.url.clone()).map_err(Clone::clone)
    }

    pub(super) async fn redis() -> Result<String, String> {
        docker_answers().await?;
        let shared = REDIS
            .get_or_init(|| {
                on_docker_runtime(async {
                    let container = start_shared(|| {
                        Redis::default()
                            .with_tag(REDIS_TAG)
                            .with_container_name(format!("normandy-tests-redis-{REDIS_TAG}"))
                    })
                    .await?;
                    let (host, port) = endpoint(&container, 6379).await?;
                    Ok(Shared {
                        url: format!("redis://{host}:{port}"),
                        _container: container,
                    })
                })
            })
            .await;
        shared.as_ref().map(|s| s.url.clone()).map_err(Clone::clone)
    }

    /// Starts (or finds, when another test process started it first) the named container.
    async fn start_shared<I: testcontainers::Image>(
        request: impl Fn() -> testcontainers::ContainerRequest<I>,
    ) -> Result<ContainerAsync<I>, String> {
        let mut last = String::new();
        // Two processes may create the same name at once; the loser's create fails with a name
        // conflict, and its next attempt finds the winner's container.
        for attempt in 0..5u64 {
            let req = request()
                .with_reuse(ReuseDirective::Always)
                .with_startup_timeout(Duration::from_secs(120));
            match req.start().await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
        }
        Err(format!("starting container failed: {last}"))
    }

    /// The host and mapped port of `port`, once it accepts connections (a container found by
    /// reuse may still be starting: testcontainers only waits for the ones it creates).
    async fn endpoint<I: testcontainers::Image>(
        container: &ContainerAsync<I>,
        port: u16,
    ) -> Result<(String, u16), String> {
        let host = container
            .get_host()
            .await
            .map_err(|e| format!("container host: {e}"))?
            .to_string();
        let mapped = container
            .get_host_port_ipv4(port.tcp())
            .await
            .map_err(|e| format!("container port {port}: {e}"))?;
        let addr = format!("{host}:{mapped}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let a = addr.clone();
            let ok = tokio::task::spawn_blocking(move || {
                use std::net::ToSocketAddrs;
                a.to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
                    .is_some_and(|sa| {
                        std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_ok()
                    })
            })
            .await
            .unwrap_or(false);
            if ok {
                return Ok((host, mapped));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("container port {addr} never accepted a connection"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether a Docker engine answers, checked once per process with short timeouts, so a host
    /// without Docker fails soft within about a second instead of waiting on testcontainers.
    async fn docker_answers() -> Result<(), String> {
        DOCKER
            .get_or_init(|| async {
                tokio::task::spawn_blocking(ping_docker)
                    .await
                    .unwrap_or_else(|e| Err(format!("docker probe failed: {e}")))
            })
            .await
            .clone()
    }

    fn ping_docker() -> Result<(), String> {
        use std::io::{Read, Write};

        let timeout = Duration::from_millis(1500);
        let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
        let host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        if let Some(tcp) = host.as_deref().and_then(|h| h.strip_prefix("tcp://")) {
            // TLS endpoints cannot be pinged in plain HTTP: a connection is answer enough.
            use std::net::ToSocketAddrs;
            let addr = tcp
                .to_socket_addrs()
                .map_err(|e| format!("DOCKER_HOST {tcp}: {e}"))?
                .next()
                .ok_or_else(|| format!("DOCKER_HOST {tcp} resolves to nothing"))?;
            std::net::TcpStream::connect_timeout(&addr, timeout)
                .map(|_| ())
                .map_err(|e| format!("Docker at {tcp} does not answer: {e}"))
        } else {
            let mut candidates = Vec::new();
            match host.as_deref() {
                Some(h) => candidates.push(h.strip_prefix("unix://").unwrap_or(h).to_string()),
                None => {
                    candidates.push("/var/run/docker.sock".to_string());
                    if let Ok(dir) = std::env::var("XDG_RUNTIME_DIR") {
                        candidates.push(format!("{dir}/docker.sock"));
                    }
                    if let Ok(home) = std::env::var("HOME") {
                        candidates.push(format!("{home}/.docker/run/docker.sock"));
                    }
                }
            }
            let mut why = Vec::new();
            for path in &candidates {
                let attempt = (|| -> std::io::Result<bool> {
                    let mut s = std::os::unix::net::UnixStream::connect(path)?;
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                    s.write_all(request)?;
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf)?;
                    let head = String::from_utf8_lossy(&buf[..n]);
                    Ok(head.starts_with("HTTP/1.") && head.contains(" 200"))
                })();
                match attempt {
                    Ok(true) => return Ok(()),
                    Ok(false) => why.push(format!("{path}: ping not answered with 200")),
                    Err(e) => why.push(format!("{path}: {e}")),
                }
            }
            Err(format!("Docker does not answer ({})", why.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_safe_and_distinct() {
        let a = unique_name("Normandy Test-PG");
        let b = unique_name("Normandy Test-PG");
        assert_ne!(a, b);
        assert!(a.starts_with("normandy_test_pg_"), "{a}");
        assert!(a.len() <= 63, "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
        let c = unique_name("9-lives");
        assert!(c.starts_with('n'), "{c}");
        let long = unique_name(&"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert!(unique_name("").starts_with("n_"));
    }

    /// Nothing listens on port 1: discovery moves on with a reason naming the address, quickly.
    #[tokio::test]
    async fn a_local_server_that_does_not_answer_is_a_reason_naming_it() {
        let t = std::time::Instant::now();
        let pg = probe_postgres("postgres://postgres@127.0.0.1:1/postgres")
            .await
            .unwrap_err();
        assert!(pg.contains("127.0.0.1:1"), "{pg}");
        let redis = probe_redis("redis://127.0.0.1:1").await.unwrap_err();
        assert!(redis.contains("127.0.0.1:1"), "{redis}");
        assert!(t.elapsed() < 2 * PROBE_TIMEOUT + std::time::Duration::from_secs(5));
    }

    #[test]
    fn skips_are_recorded_one_whole_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skips.log");
        let path = path.to_str().unwrap();
        record_skip(path, "suite_a", "no server\tat all");
        record_skip(path, "suite_b", "line\nbreak");
        let log = std::fs::read_to_string(path).unwrap();
        assert_eq!(log, "suite_a\tno server at all\nsuite_b\tline break\n");
    }
}
