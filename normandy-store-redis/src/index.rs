//! Reading the resumable index: the single-server sets, or on a cluster the bucket of every
//! slot (see `schema.rs`), merged in id order.

use normandy_core::{OwnerFilter, Result, SessionId};
use redis::Value;

use crate::error::{self, Ctx};
use crate::store::RedisStore;

impl RedisStore {
    /// Up to `count` ids of resumable sessions matching `owner`, after `cursor`, in id order.
    pub(crate) async fn resumable_ids(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        count: usize,
    ) -> Result<Vec<String>> {
        // Redis takes a signed 64-bit count.
        let count_arg = count.min(i64::MAX as usize);
        if !self.keys.cluster {
            let key = match owner {
                OwnerFilter::Node(node) => self.keys.node_index(node),
                OwnerFilter::Any => self.keys.any_index(),
            };
            let min = cursor.map_or_else(|| "-".to_string(), |c| format!("({c}"));
            let mut con = self.shared.clone();
            return match redis::cmd("ZRANGEBYLEX")
                .arg(&key)
                .arg(min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(count_arg)
                .query_async(&mut con)
                .await
            {
                Ok(ids) => Ok(ids),
                Err(e) if error::is_wrong_type(&e) => {
                    Err(self.wrong_type_read(None, &key, "zset").await)
                }
                Err(e) => Err(error::map(e, Ctx::default())),
            };
        }
        // The `own` buckets hold `<owner>\0<id>`: the owner's members are the range
        // [`<owner>\0`, `<owner>\x01`), ordered by id.
        let (kind, owner_prefix) = match owner {
            OwnerFilter::Node(node) => ("own", Some(format!("{node}\0"))),
            OwnerFilter::Any => ("any", None),
        };
        let (min, max) = match (&owner_prefix, cursor) {
            (None, None) => ("-".to_string(), "+".to_string()),
            (None, Some(c)) => (format!("({c}"), "+".to_string()),
            (Some(p), None) => (format!("[{p}"), format!("({}\u{1}", &p[..p.len() - 1])),
            (Some(p), Some(c)) => (format!("({p}{c}"), format!("({}\u{1}", &p[..p.len() - 1])),
        };
        let keys: Vec<String> = (0..normandy_redis::slot::SLOTS)
            .map(|slot| self.keys.bucket(slot, kind))
            .collect();
        let cmds = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd("ZRANGEBYLEX");
                cmd.arg(key)
                    .arg(&min)
                    .arg(&max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count_arg);
                cmd
            })
            .collect();
        let mut con = self.shared.clone();
        let replies = con
            .query_each(cmds)
            .await
            .map_err(|e| error::map(e, Ctx::default()))?;
        let mut ids = Vec::new();
        for (key, reply) in keys.iter().zip(replies) {
            let members: Vec<Vec<u8>> = match reply {
                Ok(v @ (Value::Array(_) | Value::Set(_) | Value::Nil)) => {
                    redis::from_redis_value(v).map_err(|e| error::map(e.into(), Ctx::default()))?
                }
                Ok(other) => return Err(error::unexpected(Ctx::default(), "ZRANGEBYLEX", &other)),
                Err(e) if error::is_wrong_type(&e) => {
                    return Err(self.wrong_type_read(None, key, "zset").await);
                }
                Err(e) => return Err(error::map(e, Ctx::default())),
            };
            for member in members {
                let id = match &owner_prefix {
                    Some(p) => member.strip_prefix(p.as_bytes()).map(<[u8]>::to_vec),
                    None => Some(member),
                };
                if let Some(id) = id {
                    ids.push(String::from_utf8_lossy(&id).into_owned());
                }
            }
        }
        ids.sort();
        ids.dedup();
        ids.truncate(count);
        Ok(ids)
    }
}
