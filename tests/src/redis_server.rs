//! Real `redis-server` processes for tests that need their own server — a primary with a
//! replica for `WAIT`, say: each on a free loopback port, data in a temp dir, killed on drop.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A `redis-server` child process on a free loopback port.
pub struct Server {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server, a replica of the primary on `replica_of` if given, and waits until it
    /// answers.
    pub async fn start(replica_of: Option<u16>) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir.path());
        if let Some(primary) = replica_of {
            cmd.arg("--replicaof")
                .arg("127.0.0.1")
                .arg(primary.to_string());
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn redis-server");
        let server = Server {
            port,
            child,
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `INFO replication`, or `None` while it does not answer.
    pub async fn info(&self) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut con)
            .await
            .ok()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.info().await.is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} never answered",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until this replica's link to its primary is up and the primary counts `n` replicas.
    pub async fn wait_linked(&self, primary: &Server, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let replica_up = self
                .info()
                .await
                .is_some_and(|i| i.contains("master_link_status:up"));
            let counted = primary
                .info()
                .await
                .is_some_and(|i| i.contains(&format!("connected_slaves:{n}")));
            if replica_up && counted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica never linked to its primary"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills it (SIGKILL) and waits for it.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill redis-server");
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Whether `redis-server` runs here; otherwise the test is skipped by name (or fails under
/// `NORMANDY_REQUIRE_BACKENDS=1`).
pub fn have_redis_server(test: &str) -> bool {
    let ok = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        crate::backends::skip(
            test,
            "redis-server does not run here (`redis-server --version` failed)",
        );
    }
    ok
}

/// A primary and a replica linked to it.
pub async fn pair() -> (Server, Server) {
    let primary = Server::start(None).await;
    let replica = Server::start(Some(primary.port)).await;
    replica.wait_linked(&primary, 1).await;
    (primary, replica)
}
