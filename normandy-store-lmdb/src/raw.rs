//! Raw access below the [`SessionStore`](normandy_core::SessionStore) contract, for tests:
//! every stored byte (for canary scans) and overwriting stored blobs (for corruption tests).

use normandy_core::{Result, Seq, SessionId};

use crate::error::from_heed;
use crate::group::{Op, RawDb};
use crate::schema::keys;
use crate::store::LmdbStore;

impl LmdbStore {
    /// Test support: every key and value of every database, concatenated (for canary scans).
    pub async fn raw_bytes(&self) -> Result<Vec<u8>> {
        self.read(None, |txn, dbs, path| {
            let mut out = Vec::new();
            for db in dbs.all() {
                for item in db.iter(txn).map_err(|e| from_heed(e, path, None))? {
                    let (k, v) = item.map_err(|e| from_heed(e, path, None))?;
                    out.extend_from_slice(k);
                    out.extend_from_slice(v);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Test support: overwrites the stored turn-state bytes of `id`; `false` if it has none.
    pub async fn overwrite_state_bytes(&self, id: &SessionId, bytes: &[u8]) -> Result<bool> {
        let key = keys::session(id).to_vec();
        let value = bytes.to_vec();
        self.write(|reply| Op::Overwrite {
            db: RawDb::States,
            key,
            value,
            reply,
        })
        .await
    }

    /// Test support: overwrites the stored bytes of entry `seq` of `id`; `false` if absent.
    pub async fn overwrite_entry_bytes(
        &self,
        id: &SessionId,
        seq: Seq,
        bytes: &[u8],
    ) -> Result<bool> {
        let key = keys::entry(id, seq);
        let value = bytes.to_vec();
        self.write(|reply| Op::Overwrite {
            db: RawDb::Entries,
            key,
            value,
            reply,
        })
        .await
    }
}
