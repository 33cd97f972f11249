//! Finding the servers a backend's suite runs against, and skipping by name when there are none.
//!
//! Discovery order (DESIGN.md, "Tests"):
//! 1. an environment URL: `NORMANDY_TEST_DATABASE_URL` (Postgres) or `NORMANDY_TEST_REDIS_URL`;
//! 2. with this crate's `containers` feature, a testcontainers container — only if a Docker
//!    engine answers a quick ping;
//! 3. otherwise `None`, and the suite reports itself skipped by name through [`skip`].
//!
//! With `NORMANDY_REQUIRE_BACKENDS=1` (CI) a skip is a failure instead.
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

/// A Postgres URL for tests: `NORMANDY_TEST_DATABASE_URL`, else a shared container (feature
/// `containers`, Docker reachable), else `None` (the reason is kept for [`skip_reason`]).
pub async fn postgres_url() -> Option<String> {
    if let Some(url) = env_url(DATABASE_URL_VAR) {
        return Some(url);
    }
    discover("postgres", DATABASE_URL_VAR).await
}

/// A Redis URL for tests: `NORMANDY_TEST_REDIS_URL`, else a shared container (feature
/// `containers`, Docker reachable), else `None` (the reason is kept for [`skip_reason`]).
pub async fn redis_url() -> Option<String> {
    if let Some(url) = env_url(REDIS_URL_VAR) {
        return Some(url);
    }
    discover("redis", REDIS_URL_VAR).await
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

/// Reports `name` skipped: prints `SKIPPED <name>: <reason>` to stderr and returns, or panics
/// with that message when [`require_backends`] is set.
pub fn skip(name: &str, reason: &str) {
    let msg = format!("SKIPPED {name}: {reason}");
    if require_backends() {
        panic!("{msg} ({REQUIRE_BACKENDS_VAR}=1 makes a skipped suite a failure)");
    }
    eprintln!("{msg}");
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
}
