"""The fleet's state transitions, each one atomic server-side step (a Lua script).

Every job's lifecycle change happens here and only here, so two replicas can
never both move the same job. Times come from the Redis server's clock
(``TIME``), so replica clocks do not matter. The ``attempt`` field is the
fencing token: an owner whose attempt is no longer the job's cannot renew,
record or release it. Nothing newer than Redis 5.0 is used (tested on 6.2).

A full Redis (``maxmemory`` with ``noeviction``) refuses commands that may use
more memory, but in a script it judges only the *first* write: once a script
has written, it runs to its end (a script is atomic). So every step that writes
starts with such a command (HSET, HINCRBY, ZADD) and reads before it: a full
Redis refuses the whole step, as it would refuse one write, instead of letting
it through after a first DEL or ZREM (a submit accepted past ``maxmemory``).
Only steps that free memory (pruning ``{rvib}:jobs``, forgetting an ended job) run when
Redis is full.

Key layout (all keys share the hash tag ``{rvib}``, one Cluster slot):

* ``{rvib}:job:<id>`` hash: the job (``fleet_store.snapshot_from_hash`` reads it); expires
  only once terminal
* ``{rvib}:queue`` zset: queued ids by submission time (FIFO; a reclaimed job keeps its place)
* ``{rvib}:leases`` zset: owned ids by lease expiry (server ms)
* ``{rvib}:jobs`` zset: every known id by submission time, for listings (the reaper prunes
  the ids whose hash expired)
* ``{rvib}:replicas`` zset: replica ids by registration expiry
* ``{rvib}:audit`` stream: start / end / reclaimed / released / rejected events, for operators
  and tests
"""

from __future__ import annotations

# Shared by every script: the server clock in ms and the terminal states.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local TERMINAL = {completed = true, failed = true, cancelled = true}
local function audit(key, ...)
  redis.call('XADD', key, 'MAXLEN', '~', 10000, '*', ...)
end
-- The caller still owns this attempt of a job that is running.
local function owns(job, rid, attempt)
  local f = redis.call('HMGET', job, 'owner', 'attempt', 'state', 'cancel')
  if f[1] ~= rid or f[2] ~= attempt or not f[3] or f[3] == 'queued' or TERMINAL[f[3]] then
    return false, f[4]
  end
  return true, f[4]
end
"""

# KEYS: job, queue, jobs, leases. ARGV: id, fingerprint, request json, max active, channel.
# Returns {outcome, state}: created, exists (same request), conflict, full.
SUBMIT = _PRELUDE + """
local state = redis.call('HGET', KEYS[1], 'state')
local attempt = 0
if state then
  if state ~= 'failed' and state ~= 'cancelled' then
    if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[2] then return {'conflict', state} end
    return {'exists', state}
  end
  attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
end
local active = redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[4])
if active >= tonumber(ARGV[4]) then return {'full', tostring(active)} end
local now = now_ms()
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'fp', ARGV[2], 'req', ARGV[3], 'state', 'queued',
  'attempt', attempt, 'interrupted', 0, 'submitted_at', now, 'cancel', 0)
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('PUBLISH', ARGV[5], 'submitted ' .. ARGV[1])
return {'created', 'queued'}
"""

# KEYS: job, queue, leases, audit. ARGV: id, replica, lease ms.
# Returns the new attempt (the fencing token), or 0 if the job is no longer queued.
CLAIM = _PRELUDE + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local now = now_ms()
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'downloading', 'owner', ARGV[2], 'started_at', now,
  'lease_until', expires)
redis.call('HDEL', KEYS[1], 'progress', 'device')
redis.call('ZADD', KEYS[3], expires, ARGV[1])
audit(KEYS[4], 'event', 'start', 'job', ARGV[1], 'attempt', attempt, 'replica', ARGV[2],
  'at', now)
return attempt
"""

# KEYS: job, leases. ARGV: id, replica, attempt, lease ms, state ('' keeps it), progress json,
# device. Returns {1 if the lease was extended else 0, cancel flag}.
RENEW = _PRELUDE + """
local ok, cancel = owns(KEYS[1], ARGV[2], ARGV[3])
if not ok then return {0, cancel or '0'} end
local expires = now_ms() + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], 'XX', expires, ARGV[1])
redis.call('HSET', KEYS[1], 'lease_until', expires, 'progress', ARGV[6], 'device', ARGV[7])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[5]) end
return {1, cancel or '0'}
"""

# KEYS: job, leases, audit. ARGV: id, replica, attempt, state, file name, error, ttl ms, device,
# index bytes, quality json, progress json. Returns 1 if recorded, 0 if fenced.
COMPLETE = _PRELUDE + """
if not owns(KEYS[1], ARGV[2], ARGV[3]) then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished_at', now, 'file_name', ARGV[5],
  'error', ARGV[6], 'device', ARGV[8], 'index_bytes', ARGV[9], 'quality', ARGV[10],
  'progress', ARGV[11])
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
audit(KEYS[3], 'event', 'end', 'job', ARGV[1], 'attempt', ARGV[3], 'replica', ARGV[2],
  'state', ARGV[4], 'at', now)
return 1
"""

# KEYS: job, queue, leases, audit. ARGV: id, max attempts, ttl ms, channel, cancelled message,
# interrupted message (a format with one %d). Only a lease that expired by the server clock
# is reclaimed. Returns none (nothing to do), alive, queued, failed or cancelled.
RECLAIM = _PRELUDE + """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score then return 'none' end
local now = now_ms()
if tonumber(score) > now then return 'alive' end
local f = redis.call('HMGET', KEYS[1], 'state', 'cancel', 'submitted_at', 'attempt', 'owner')
if not f[1] or f[1] == 'queued' or TERMINAL[f[1]] then
  redis.call('ZREM', KEYS[3], ARGV[1])  -- a stale lease: dropping it frees memory
  return 'none'
end
local runs = redis.call('HINCRBY', KEYS[1], 'interrupted', 1)
redis.call('ZREM', KEYS[3], ARGV[1])
local outcome
if f[2] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'error', ARGV[5], 'finished_at', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  outcome = 'cancelled'
elseif runs >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', string.format(ARGV[6], runs),
    'finished_at', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  outcome = 'failed'
else
  redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '')
  redis.call('ZADD', KEYS[2], f[3], ARGV[1])
  redis.call('PUBLISH', ARGV[4], 'submitted ' .. ARGV[1])
  outcome = 'queued'
end
redis.call('HDEL', KEYS[1], 'lease_until')
audit(KEYS[4], 'event', 'reclaimed', 'job', ARGV[1], 'attempt', f[4] or '0',
  'replica', f[5] or '', 'state', outcome, 'at', now)
return outcome
"""

# KEYS: job, queue, leases, audit. ARGV: id, replica, attempt, channel.
# The owner hands the job back (shutdown): queued again in its old place, not an interruption.
RELEASE = _PRELUDE + """
if not owns(KEYS[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'submitted_at'), ARGV[1])
redis.call('PUBLISH', ARGV[4], 'submitted ' .. ARGV[1])
audit(KEYS[4], 'event', 'released', 'job', ARGV[1], 'attempt', ARGV[3], 'replica', ARGV[2],
  'at', now_ms())
return 1
"""

# KEYS: job, queue, audit. ARGV: id, error, ttl ms.
# A queued job no replica can take (its stored request cannot be read, its bucket is not
# allowed any more) ends failed, so the jobs behind it move on. Returns 1, or 0 if it was no
# longer queued.
REJECT = _PRELUDE + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2], 'finished_at', now)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
audit(KEYS[3], 'event', 'rejected', 'job', ARGV[1], 'state', 'failed', 'at', now)
return 1
"""

# KEYS: job, queue, jobs. ARGV: id, ttl ms, cancelled message, channel.
# Returns {outcome, state before, fields}: missing; forgotten (it had ended: its hash as it
# was, now deleted, so the id is free for a corrected request); cancelled (it was queued);
# requested (it runs: its owner stops it). Forgetting only frees memory, like PRUNE.
DELETE = _PRELUDE + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', '', {}} end
if TERMINAL[state] then
  local fields = redis.call('HGETALL', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'forgotten', state, fields}
end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'error', ARGV[3], 'finished_at', now_ms(),
    'cancel', 1)
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'cancelled', state, {}}
end
redis.call('HSET', KEYS[1], 'cancel', 1)
redis.call('PUBLISH', ARGV[4], 'cancel ' .. ARGV[1])
return {'requested', state, {}}
"""

# KEYS: replicas, replica. ARGV: replica id, ttl ms, description json.
# Returns the ids of the replicas registered now (this one included).
REGISTER = _PRELUDE + """
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: queue, leases, replicas. Returns {queued, owned, live replicas, server ms}.
STATS = _PRELUDE + """
local now = now_ms()
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]),
  redis.call('ZCOUNT', KEYS[3], now, '+inf'), now}
"""

# KEYS: jobs, then the hash of each id in ARGV. Drops the ids whose hash is gone (a finished
# job's TTL ran out). Only removes: it runs while Redis is full, and frees memory then.
# Returns how many ids it dropped.
PRUNE = _PRELUDE + """
local removed = 0
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], id)
  end
end
return removed
"""

# KEYS: leases. ARGV: how many. The ids whose lease expired by the server clock.
EXPIRED = _PRELUDE + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
"""
