//! The Lua scripts: each store write is one script, so Redis runs its checks and its writes as
//! one atomic step (no other command interleaves with a running script).
//!
//! Keys of one session share the hash tag `{<prefix>:<id>}` and are passed in `KEYS`. On one
//! server the resumable index sets (`<prefix>:resumable:any`, `<prefix>:resumable:node:<node>`)
//! are named inside the scripts from a prefix in `ARGV`, because the owner is only known once
//! the state has been read (the layout of release 0.1). On a cluster that prefix is empty and
//! the scripts take the index from two more `KEYS`: the `any` and `own` buckets of the
//! session's slot (`schema.rs`), so every script touches only keys of one slot, all declared.
//!
//! Errors are `redis.error_reply` with our own codes (`NMNOTFOUND`, `NMCLOSED`, `NMFENCED <cur>`,
//! `NMCONFLICT <actual>`, `NMEXISTS`, `NMWRONGTYPE <held> <wanted> <key>`), mapped in
//! `error::map`. Every script checks the type of each key it writes before its first write
//! (Redis does not roll a script back when a command fails midway), so it writes all or
//! nothing. Numbers that the client compares
//! (epoch, seq) are kept as their decimal strings, so Lua's doubles never round a u64.
//!
//! Also here: the scripts hashed once for `EVALSHA` ([`Scripts`]) and the reading of a commit
//! script's reply ([`Reply`]).

use normandy_core::{InputId, Result, Seq};
use redis::{Script, Value};

use crate::error::{self, Ctx};

/// Type checks, run before a script's first write: Redis scripts are not transactional, so a
/// command that fails midway (WRONGTYPE on a key something else wrote under our prefix) would
/// keep the writes before it. `wrong_type(kt)` takes key, type pairs and returns the first key
/// holding another type (nothing is fine) as `NMWRONGTYPE <held> <wanted> <key>`, or nil.
/// `index_keys` adds the index sets that `reindex` with the same arguments will write.
const CHECK: &str = r"
local function wrong_type(kt)
  for i = 1, #kt, 2 do
    local held = redis.call('TYPE', kt[i])['ok']
    if held ~= 'none' and held ~= kt[i + 1] then
      return 'NMWRONGTYPE ' .. held .. ' ' .. kt[i + 1] .. ' ' .. kt[i]
    end
  end
  return nil
end
-- The resumable index (see schema.rs). One server: ARGV's prefix p names the sets 'any' and
-- 'node:<owner>'. Cluster (p == ''): the slot's buckets, declared in KEYS: 'any' holds ids,
-- 'own' holds '<owner>\0<id>'.
local function ix_of(p, any, own)
  if p ~= '' then return {p = p} end
  return {any = any, own = own}
end
local function ix_any(ix) return ix.any or (ix.p .. 'any') end
local function ix_node(ix, o, id)
  if ix.own then return ix.own, o .. '\0' .. id end
  return ix.p .. 'node:' .. o, id
end
local function index_keys(kt, ix, old_rs, old_own, new_rs, new_own)
  if old_rs == new_rs and old_own == new_own then return kt end
  local function add(k) kt[#kt + 1] = k; kt[#kt + 1] = 'zset' end
  if old_rs == '1' then
    add(ix_any(ix))
    if old_own then add((ix_node(ix, old_own, ''))) end
  end
  if new_rs == '1' then
    add(ix_any(ix))
    if new_own then add((ix_node(ix, new_own, ''))) end
  end
  return kt
end
";

/// Moves a session between the resumable index sets when its flag or owner changed (the keys
/// it writes are `index_keys`' with the same arguments, checked first).
const REINDEX: &str = r"
local function reindex(ix, id, old_rs, old_own, new_rs, new_own)
  if old_rs == new_rs and old_own == new_own then return end
  if old_rs == '1' then
    redis.call('ZREM', ix_any(ix), id)
    if old_own then redis.call('ZREM', ix_node(ix, old_own, id)) end
  end
  if new_rs == '1' then
    redis.call('ZADD', ix_any(ix), 0, id)
    if new_own then
      local k, m = ix_node(ix, new_own, id)
      redis.call('ZADD', k, 0, m)
    end
  end
end
";

/// KEYS: state, stream, inputs. ARGV: policy, template blob ('' = none), state blob, now.
///
/// A state key of another type is `NMWRONGTYPE` (not `NMEXISTS`: no session is there).
pub(crate) fn create() -> String {
    format!(
        "{CHECK}{}",
        r"
local bad = wrong_type({KEYS[1], 'hash'})
if bad then return redis.error_reply(bad) end
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('NMEXISTS session') end
-- Leftovers cannot exist (delete removes all three keys in one script), but a stray stream
-- would hand a new session someone else's entries: clear them.
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'ep', '0', 'seq', '0', 'st', 'active', 'pol', ARGV[1],
  'ts', ARGV[3], 'ca', ARGV[4], 'ua', ARGV[4], 'rs', '0')
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'tpl', ARGV[2]) end
return 'ok'
"
    )
}

/// KEYS: state (then, on a cluster, the slot's `any` and `own` index buckets). ARGV: id, index
/// prefix ('' on a cluster), node, seq read by the client, state blob read by the
/// client, now.
///
/// Returns `{'ok', epoch}`, or `{'stale'}` when a commit changed the record since the client
/// read and decoded it (so a corrupt record is never bumped, and the record returned is exactly
/// the one the new epoch starts from). Comparing the state blob costs activation its size in
/// bandwidth, but spares every commit a version counter.
pub(crate) fn activate() -> String {
    format!(
        "{CHECK}{REINDEX}{}",
        r"
local bad = wrong_type({KEYS[1], 'hash'})
if bad then return redis.error_reply(bad) end
local f = redis.call('HMGET', KEYS[1], 'ep', 'st', 'own', 'rs', 'seq', 'ts')
if not f[1] then return redis.error_reply('NMNOTFOUND session') end
if f[2] == 'terminal' then return redis.error_reply('NMCLOSED session') end
if f[5] ~= ARGV[4] or f[6] ~= ARGV[5] then return {'stale'} end
local ix = ix_of(ARGV[2], KEYS[2], KEYS[3])
bad = wrong_type(index_keys({}, ix, f[4], f[3], f[4], ARGV[3]))
if bad then return redis.error_reply(bad) end
local ep = redis.call('HINCRBY', KEYS[1], 'ep', 1)
redis.call('HSET', KEYS[1], 'own', ARGV[3], 'ua', ARGV[6])
reindex(ix, ARGV[1], f[4], f[3], f[4], ARGV[3])
return {'ok', tostring(ep)}
"
    )
}

/// Group commit: KEYS are (state, stream, inputs) per commit — on a cluster (index prefix '')
/// (state, stream, inputs, `any` bucket, `own` bucket), and one commit per call, since the
/// sessions of a batch live in different slots; ARGV: index prefix, now, then per
/// commit: id, epoch, expected seq, new seq, state blob, has_work ('1'/'0'), entry count, then
/// per entry: seq, blob, input id ('' = none).
///
/// Each commit checks, in `InMemoryStore::commit`'s order, NotFound, SessionClosed, Fenced,
/// DuplicateInput, Conflict, and only then writes its entries, input ids, state and index
/// together. The reply has one item per commit — the new seq when applied, `{'dup', input,
/// seq}` or `{'err', '<code> <detail>'}` — so commits of different sessions sharing one script
/// never affect each other's outcome; Redis runs the whole script atomically, so each commit is.
///
/// All or nothing: before a commit's first write that cannot fail, it has checked the type of
/// every key it will write — the state hash by reading it first, the index sets its reindex
/// touches with `TYPE`; the writes that may still fail on a foreign key (the input's `HSETNX`,
/// the first `XADD`) go first, and an `HSETNX` is taken back if the `XADD` after it fails. A
/// key that something else wrote under our prefix fails that commit alone with
/// `NMWRONGTYPE`, having written nothing, and the same commit applies once the key is gone.
/// (Reads and first writes as type checks keep `TYPE` calls off the common path: three per
/// commit cost about a sixth of the throughput.) Any other command error inside one commit is
/// its `NMSCRIPT` error, caught by `pcall` so the batch's other commits keep their outcomes.
///
/// Server time, the common commit (one input entry on the expected seq): four commands —
/// `HMGET` of the state, `HSETNX` of the input id (its duplicate check and its record in one),
/// `XADD`, `HSET` of the state. Measured with `INFO commandstats` on batches of 22 commits:
/// 6.7 µs of script time per commit, where reading the inputs with `HMGET` and writing them
/// with `HSET` (release 0.1) took 8.6.
pub(crate) fn commit_many() -> String {
    format!(
        "{CHECK}{REINDEX}{}",
        r"
-- A duplicate input: reported with the seq it was stored at, after a write (to `wa`, a field
-- no reader decodes), so that a WAIT after this script covers the stored input too: a
-- duplicate is reported only once the original is as durable as a fresh commit would be.
local function dup(ks, input, at)
  redis.call('HINCRBY', ks, 'wa', 1)
  return {'dup', input, at}
end
local function commit(ks, ke, ki, ix, now, id, ep, exp, new, ts, work, n, e0)
  -- All or nothing without a TYPE per key on the common path: the reads come first and each
  -- doubles as its key's type check (a read of a key of another type fails, nothing written
  -- yet); the one write that can still fail on a foreign key (the first XADD, or the input's
  -- HSETNX) comes first, and anything written before a failure is undone; the index sets are
  -- type-checked only when reindex will touch them. Keys of another type are named by
  -- `wrong_type`.
  local f = redis.pcall('HMGET', ks, 'ep', 'seq', 'st', 'pol', 'own', 'rs')
  if f.err then return {'err', wrong_type({ks, 'hash'}) or ('NMSCRIPT ' .. f.err)} end
  if not f[1] then return {'err', 'NMNOTFOUND session'} end
  if f[3] == 'terminal' then return {'err', 'NMCLOSED session'} end
  if f[1] ~= ep then return {'err', 'NMFENCED ' .. f[1]} end
  local rs = '0'
  if work == '1' and f[4] == 'eager' then rs = '1' end
  -- Input ids (distinct within a batch: the caller validates that).
  local inputs = {}
  for i = 0, n - 1 do
    local b = e0 + i * 3
    if ARGV[b + 2] ~= '' then
      inputs[#inputs + 1] = ARGV[b + 2]
      inputs[#inputs + 1] = ARGV[b]
    end
  end
  -- A duplicate is reported before a conflict. The common case, one input on the expected seq,
  -- checks and records it in one HSETNX below; otherwise the inputs are read here.
  local one = #inputs == 2 and f[2] == exp
  if #inputs > 0 and not one then
    local names = {}
    for i = 1, #inputs, 2 do names[#names + 1] = inputs[i] end
    local seen = redis.pcall('HMGET', ki, unpack(names))
    if seen.err then return {'err', wrong_type({ki, 'hash'}) or ('NMSCRIPT ' .. seen.err)} end
    for i, at in ipairs(seen) do
      if at then return dup(ks, names[i], at) end
    end
  end
  if f[2] ~= exp then return {'err', 'NMCONFLICT ' .. f[2]} end
  if rs ~= f[6] then
    local bad = wrong_type(index_keys({}, ix, f[6], f[5], rs, f[5]))
    if bad then return {'err', bad} end
  end
  if one then
    local added = redis.pcall('HSETNX', ki, inputs[1], inputs[2])
    if type(added) == 'table' then
      return {'err', wrong_type({ki, 'hash'}) or ('NMSCRIPT ' .. tostring(added.err))}
    end
    if added == 0 then return dup(ks, inputs[1], redis.call('HGET', ki, inputs[1])) end
  end
  for i = 0, n - 1 do
    local b = e0 + i * 3
    local added = redis.pcall('XADD', ke, '0-' .. ARGV[b], 'e', ARGV[b + 1])
    if type(added) == 'table' and added.err then
      -- Only the first XADD can fail this way, before any write of this commit but the
      -- input's HSETNX, which is taken back.
      if one then redis.call('HDEL', ki, inputs[1]) end
      return {'err', wrong_type({ke, 'stream'}) or ('NMSCRIPT ' .. added.err)}
    end
  end
  if #inputs > 0 and not one then redis.call('HSET', ki, unpack(inputs)) end
  if rs == f[6] then
    redis.call('HSET', ks, 'seq', new, 'ts', ts, 'ua', now)
  else
    redis.call('HSET', ks, 'seq', new, 'ts', ts, 'ua', now, 'rs', rs)
    reindex(ix, id, f[6], f[5], rs, f[5])
  end
  return new
end

local p, now = ARGV[1], ARGV[2]
local a = 3
local out = {}
local stride = 3
if p == '' then stride = 5 end
for c = 1, #KEYS / stride do
  local k = (c - 1) * stride
  local n = tonumber(ARGV[a + 6])
  -- pcall: a command error in one commit (which its type checks should leave impossible)
  -- must not abort the script and take the other sessions' outcomes with it.
  local ix = ix_of(p, KEYS[k + 4], KEYS[k + 5])
  local ok, r = pcall(commit, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ix, now, ARGV[a],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], n, a + 7)
  if ok then
    out[c] = r
  else
    if type(r) == 'table' and r.err then r = r.err end
    out[c] = {'err', 'NMSCRIPT ' .. tostring(r)}
  end
  a = a + 7 + n * 3
end
return out
"
    )
}

/// KEYS: state. ARGV: epoch, new seq, state blob.
///
/// Re-acknowledges a commit this process applied but whose `WAIT` fell short: if the session
/// still has that epoch, seq and state, the commit stands; the script writes `wa` so that the
/// `WAIT` pipelined after it covers a write that is at or after the original one. `{'miss'}`
/// when the record moved on (the caller then runs the ordinary commit, which reports why).
pub(crate) fn confirm() -> String {
    format!(
        "{CHECK}{}",
        r"
local bad = wrong_type({KEYS[1], 'hash'})
if bad then return redis.error_reply(bad) end
local f = redis.call('HMGET', KEYS[1], 'ep', 'seq', 'ts')
if not f[1] then return redis.error_reply('NMNOTFOUND session') end
if f[1] ~= ARGV[1] then return redis.error_reply('NMFENCED ' .. f[1]) end
if f[2] == ARGV[2] and f[3] == ARGV[3] then
  redis.call('HINCRBY', KEYS[1], 'wa', 1)
  return {'applied', ARGV[2]}
end
return {'miss'}
"
    )
}

/// KEYS: state (then, on a cluster, the slot's `any` and `own` index buckets). ARGV: id, index
/// prefix ('' on a cluster), epoch, now.
pub(crate) fn mark_terminal() -> String {
    format!(
        "{CHECK}{REINDEX}{}",
        r"
local bad = wrong_type({KEYS[1], 'hash'})
if bad then return redis.error_reply(bad) end
local f = redis.call('HMGET', KEYS[1], 'ep', 'st', 'own', 'rs')
if not f[1] then return redis.error_reply('NMNOTFOUND session') end
if f[2] == 'terminal' then
  -- Already closed (maybe by a write not yet replicated): write the WAIT anchor `wa`, so a
  -- WAIT after this script covers the close.
  redis.call('HINCRBY', KEYS[1], 'wa', 1)
  return 'ok'
end
if f[1] ~= ARGV[3] then return redis.error_reply('NMFENCED ' .. f[1]) end
local ix = ix_of(ARGV[2], KEYS[2], KEYS[3])
bad = wrong_type(index_keys({}, ix, f[4], f[3], '0', f[3]))
if bad then return redis.error_reply(bad) end
redis.call('HSET', KEYS[1], 'st', 'terminal', 'rs', '0', 'ua', ARGV[4])
reindex(ix, ARGV[1], f[4], f[3], '0', f[3])
return 'ok'
"
    )
}

/// KEYS: state, stream, inputs (then, on a cluster, the slot's `any` and `own` index buckets).
/// ARGV: id, index prefix ('' on a cluster). Returns 1 if the session existed.
///
/// `DEL` takes a key of any type, so only the state (which is read) and the index sets (which
/// are edited) are type-checked.
pub(crate) fn delete() -> String {
    format!(
        "{CHECK}{REINDEX}{}",
        r"
local bad = wrong_type({KEYS[1], 'hash'})
if bad then return redis.error_reply(bad) end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 0
end
local f = redis.call('HMGET', KEYS[1], 'own', 'rs')
local ix = ix_of(ARGV[2], KEYS[4], KEYS[5])
bad = wrong_type(index_keys({}, ix, f[2], f[1], '0', f[1]))
if bad then return redis.error_reply(bad) end
reindex(ix, ARGV[1], f[2], f[1], '0', f[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"
    )
}

/// Test support script. KEYS: stream. ARGV: stream id, new bytes.
const OVERWRITE_ENTRY: &str = r"
local all = redis.call('XRANGE', KEYS[1], '-', '+')
local found = 0
for _, e in ipairs(all) do if e[1] == ARGV[1] then found = 1 end end
if found == 0 then return 0 end
redis.call('DEL', KEYS[1])
for _, e in ipairs(all) do
  local v = e[2][2]
  if e[1] == ARGV[1] then v = ARGV[2] end
  redis.call('XADD', KEYS[1], e[1], 'e', v)
end
return 1
";

/// The scripts, hashed once (`EVALSHA` sends the hash; the body is loaded on `NOSCRIPT`).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) create: Script,
    pub(crate) activate: Script,
    pub(crate) confirm: Script,
    pub(crate) mark_terminal: Script,
    pub(crate) delete: Script,
    pub(crate) overwrite_entry: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            create: Script::new(&create()),
            activate: Script::new(&activate()),
            confirm: Script::new(&confirm()),
            mark_terminal: Script::new(&mark_terminal()),
            delete: Script::new(&delete()),
            overwrite_entry: Script::new(OVERWRITE_ENTRY),
        }
    }
}

/// What a commit script answered.
pub(crate) enum Reply {
    Applied(Seq),
    Duplicate(InputId, Seq),
    /// `CONFIRM` only: the record moved on; run the ordinary commit.
    Miss,
}

/// Reads a commit or confirm script's reply.
pub(crate) fn parse_commit_reply(value: &Value, ctx: Ctx<'_>) -> Result<Reply> {
    let items = as_items(value);
    let bad = || error::unexpected(ctx, "commit", value);
    match items.as_slice() {
        [Some(b"applied"), Some(seq)] => Ok(Reply::Applied(parse_u64(seq).ok_or_else(bad)?)),
        [Some(b"dup"), Some(input), Some(seq)] => {
            let input = std::str::from_utf8(input)
                .ok()
                .and_then(|s| InputId::new(s).ok())
                .ok_or_else(bad)?;
            Ok(Reply::Duplicate(input, parse_u64(seq).ok_or_else(bad)?))
        }
        [Some(b"miss")] => Ok(Reply::Miss),
        _ => Err(bad()),
    }
}

/// The items of a script's array reply as byte strings (`None` for other shapes).
pub(crate) fn as_items(value: &Value) -> Vec<Option<&[u8]>> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => Some(b.as_slice()),
                Value::SimpleString(s) => Some(s.as_bytes()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}
