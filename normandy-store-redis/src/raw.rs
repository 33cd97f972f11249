//! Raw access below the [`SessionStore`](normandy_core::SessionStore) contract: every stored
//! byte (for canary scans), overwriting stored blobs (for corruption tests), and deleting a
//! whole prefix (teardown of a test namespace or a deployment).

use normandy_core::{Result, Seq, SessionId};
use redis::Value;

use crate::error::{self, Ctx};
use crate::store::RedisStore;

impl RedisStore {
    /// Every key under this store's prefix (`SCAN`, so the server is never blocked; on a
    /// cluster, every primary).
    async fn scan_keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut con = self.shared.clone();
        let escaped = escape_glob(&self.keys.prefix);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for pattern in [format!("{{{escaped}:*"), format!("{escaped}:*")] {
            keys.extend(
                con.scan_match(&pattern)
                    .await
                    .map_err(|e| error::map(e, Ctx::default()))?,
            );
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Test support: every byte this store holds under its prefix, keys included (for canary
    /// scans).
    pub async fn raw_bytes(&self) -> Result<Vec<u8>> {
        let mut con = self.shared.clone();
        let ctx = Ctx::default();
        let mut out = Vec::new();
        for key in self.scan_keys().await? {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut con)
                .await
                .map_err(|e| error::map(e, ctx))?;
            let value: Value = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut con).await,
                "stream" => {
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg("-")
                        .arg("+")
                        .query_async(&mut con)
                        .await
                }
                "zset" => {
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut con)
                        .await
                }
                "string" => redis::cmd("GET").arg(&key).query_async(&mut con).await,
                _ => Ok(Value::Nil),
            }
            .map_err(|e| error::map(e, ctx))?;
            out.extend_from_slice(&key);
            flatten(&value, &mut out);
        }
        Ok(out)
    }

    /// Deletes every key under this store's prefix (teardown of a test namespace, or of a
    /// deployment). Returns how many keys were deleted.
    pub async fn purge(&self) -> Result<usize> {
        let mut con = self.shared.clone();
        let keys = self.scan_keys().await?;
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            // UNLINK per key: keys of different sessions live in different slots.
            let cmds = chunk
                .iter()
                .map(|key| {
                    let mut cmd = redis::cmd("UNLINK");
                    cmd.arg(key);
                    cmd
                })
                .collect();
            for reply in con
                .query_each(cmds)
                .await
                .map_err(|e| error::map(e, Ctx::default()))?
            {
                if let Value::Int(n) = reply.map_err(|e| error::map(e, Ctx::default()))? {
                    deleted += usize::try_from(n).unwrap_or(0);
                }
            }
        }
        self.unacked.clear();
        Ok(deleted)
    }

    /// Test support: overwrites a session's stored turn-state bytes; `false` if it does not exist.
    pub async fn overwrite_state_bytes(&self, id: &SessionId, bytes: &[u8]) -> Result<bool> {
        let mut con = self.shared.clone();
        // HSETEX-like "only if the hash exists": HSET would create a half record.
        let written: i64 = redis::cmd("EVAL")
            .arg(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                  redis.call('HSET', KEYS[1], 'ts', ARGV[1]) return 1",
            )
            .arg(1)
            .arg(self.keys.state(id))
            .arg(bytes)
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, Ctx::session(id)))?;
        Ok(written == 1)
    }

    /// Test support: overwrites the stored bytes of entry `seq` (the stream is rewritten, since
    /// stream entries cannot be edited in place); `false` if there is no such entry.
    pub async fn overwrite_entry_bytes(
        &self,
        id: &SessionId,
        seq: Seq,
        bytes: &[u8],
    ) -> Result<bool> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.overwrite_entry.get_hash())
            .arg(1)
            .arg(self.keys.stream(id))
            .arg(format!("0-{seq}"))
            .arg(bytes);
        let found = self
            .eval(&self.scripts.overwrite_entry, &cmd, Ctx::session(id))
            .await?;
        Ok(matches!(found, Value::Int(1)))
    }
}

/// Escapes `SCAN MATCH` glob metacharacters.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn flatten(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::BulkString(b) => out.extend_from_slice(b),
        Value::SimpleString(s) => out.extend_from_slice(s.as_bytes()),
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| flatten(v, out)),
        Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        Value::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
        _ => {}
    }
}
