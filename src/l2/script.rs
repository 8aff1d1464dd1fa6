//! The server-side scripts of the L2 tier. Each but [`PUBLISH`] touches keys of one hash slot
//! only, so they run unchanged on a Redis Cluster.
//!
//! - [`CAS`]: installs a record only if it is at least as new as the one there — the same rule
//!   as `Entry::supersedes`, on the header `l2::record` writes (a value that is not a record,
//!   written by some other program, is replaced). A slow fill, a late change or a
//!   retried write never replaces newer state.
//! - [`DELETE_IF`]: removes a record only if it is still exactly the given bytes (a fill whose
//!   epoch turned out to be gone takes back what it wrote).
//! - [`PUBLISH`] (one server only): both of the above for a batch, in one round trip.
//! - [`ANNOUNCE`]: appends a batch of change notices to a keyspace's stream with the stream's
//!   epoch and the next gap-free sequence number (both in the keyspace's meta hash, created on
//!   first use with the epoch the caller proposes), and raises the keyspace's floor for a clear.

use std::sync::LazyLock;

const DECODE: &str = r#"
local function valid(s)
  if string.len(s) < 20 then return false end
  local kind = string.byte(s, 1)
  if kind ~= 86 and kind ~= 78 and kind ~= 85 then return false end
  local n = struct.unpack('>H', s, 19)
  return string.len(s) >= 20 + 4 * n
end
local function parse(s)
  local kind, flags, hi, lo, xid, xmax, n, pos = struct.unpack('>BBI4I4I4I4H', s)
  local xip = {}
  for i = 1, n do
    xip[i], pos = struct.unpack('>I4', s, pos)
  end
  return {hi = hi, lo = lo, hasxid = (flags % 2) == 1, xid = xid,
          hassnap = math.floor(flags / 2) % 2 == 1, xmax = xmax, xip = xip}
end
local function precedes(a, b)
  return ((a - b) % 4294967296) >= 2147483648
end
local function sees(v, xid)
  if not precedes(xid, v.xmax) then return false end
  for _, x in ipairs(v.xip) do
    if x == xid then return false end
  end
  return true
end
local function lsn_lt(a, b)
  return a.hi < b.hi or (a.hi == b.hi and a.lo < b.lo)
end
local function supersedes(new, old)
  if old.hassnap and new.hasxid and lsn_lt(new, old) then
    return not sees(old, new.xid)
  end
  if new.hassnap and old.hasxid then
    return sees(new, old.xid)
  end
  return not lsn_lt(new, old)
end
"#;

/// Lua: `cas(key, record, ttl_ms)` installs `record` unless the record there is newer.
const CAS_FN: &str = r#"
local function cas(key, rec, ttl)
  local old = redis.call('GET', key)
  -- Something that is not a record (written by another program) is replaced, never trusted.
  if old and valid(old) and not supersedes(parse(rec), parse(old)) then
    return 0
  end
  redis.call('SET', key, rec, 'PX', ttl)
  return 1
end
"#;

/// Lua: `announce(meta, stream, epoch, maxlen, node, notices, floor)` appends one entry with the
/// stream's epoch (created from `epoch` when missing) and the next sequence number; returns
/// `{epoch, seq}`.
const ANNOUNCE_FN: &str = r#"
local function announce(meta, stream, proposed, maxlen, node, notices, f)
  local e = redis.call('HGET', meta, 'e')
  if not e then
    e = proposed
    redis.call('HSET', meta, 'e', e)
  end
  local s = redis.call('HINCRBY', meta, 's', 1)
  if f ~= '' then
    local old = redis.call('HGET', meta, 'f')
    if (not old) or old < f then
      redis.call('HSET', meta, 'f', f)
    end
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', e, 's', s, 'n', node, 'c', notices, 'f', f)
  return {e, s}
end
"#;

/// `KEYS[1]` record key · `ARGV[1]` record · `ARGV[2]` time to live (ms). Returns 1 when
/// installed, 0 when the record there is newer.
pub static CAS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{DECODE}{CAS_FN}\nreturn cas(KEYS[1], ARGV[1], ARGV[2])\n")));

/// `KEYS[1]` record key · `ARGV[1]` the exact record expected. Returns 1 when removed.
pub static DELETE_IF: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// `KEYS[1]` meta hash · `KEYS[2]` stream · `ARGV[1]` proposed epoch · `ARGV[2]` stream length
/// bound · `ARGV[3]` announcing node · `ARGV[4]` notices · `ARGV[5]` clear floor (20-digit
/// zero-padded LSN, or empty). Returns `{epoch, seq}`.
pub static ANNOUNCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{ANNOUNCE_FN}\nreturn announce(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"
    ))
});

/// One Redis server only (its keys span hash slots): the compare-and-set of a batch of records
/// and their announcement in one round trip. `KEYS[1]` meta · `KEYS[2]` stream · `KEYS[3..]`
/// record keys · `ARGV[1..5]` as [`ANNOUNCE`] · then a record and its time to live (ms) per
/// record key. Returns the compare-and-set results, in order.
pub static PUBLISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{DECODE}{CAS_FN}{ANNOUNCE_FN}
local out = {{}}
for i = 3, #KEYS do
  out[#out + 1] = cas(KEYS[i], ARGV[6 + 2 * (i - 3)], ARGV[7 + 2 * (i - 3)])
end
announce(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return out
"#
    ))
});
