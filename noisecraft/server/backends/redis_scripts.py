"""The Lua scripts of :mod:`.redis_queue`: each state change of a job is one script, which
Redis runs atomically (no other command runs in between), so two workers can never both
claim, finish or release the same attempt of a job.

Keys (``P`` is the key prefix, ``noisecraft`` by default)::

    P:job:ID       hash: id number kind payload client_id status attempt owner lease_expires
                   cancel_requested created started finished result finished_by
    P:pending      sorted set: ID -> number (ComfyUI's queue order; "front" is negative)
    P:running      sorted set: ID -> started
    P:leases       sorted set: ID of a running job -> when its lease expires (Redis's clock)
    P:history      sorted set: ID -> finished (jobs still shown in history)
    P:number       counter of queue numbers
    P:events       stream of events with IDs "SEQ-0"; P:events:seq is SEQ's counter
    P:latest:ID:T  SEQ of job ID's latest event of type T (A1111's progress preview)
    P:options      hash: A1111 option -> JSON value

Job keys are computed inside the scripts from IDs taken from the sorted sets, which a
single Redis server (or a replicated pair) allows; Redis Cluster does not.
"""

ENQUEUE = """
-- KEYS: job, pending, number  ARGV: id, kind, payload, client_id, front, now
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('job exists') end
local number
if ARGV[5] == '1' then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local lowest = 0
  if #first > 0 then lowest = tonumber(first[2]) end
  number = math.min(-1, lowest - 1)
else
  number = redis.call('INCR', KEYS[3]) - 1
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'number', number, 'kind', ARGV[2],
           'payload', ARGV[3], 'client_id', ARGV[4], 'status', 'pending', 'attempt', 0,
           'cancel_requested', 0, 'created', ARGV[6])
redis.call('ZADD', KEYS[2], number, ARGV[1])
return number
"""

CLAIM = """
-- KEYS: pending, running, leases, history
-- ARGV: prefix, owner, lease_seconds, now, max_attempts, worker_lost_result
-- -> {id, taken_over} or false.  Lease times are Redis's clock (TIME), so the workers'
-- clocks on different machines need not agree.
local t = redis.call('TIME')
local rnow = tonumber(t[1]) + tonumber(t[2]) / 1e6
local taken_over = 0
local id
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', rnow, 'LIMIT', 0, 1)
if #expired > 0 then
  id = expired[1]  -- its worker died (or hung): no lease renewal for lease_seconds
  taken_over = 1
else
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then return false end
  id = first[1]
  redis.call('ZREM', KEYS[1], id)
end
local job = ARGV[1] .. ':job:' .. id
local attempt = tonumber(redis.call('HGET', job, 'attempt'))
if attempt >= tonumber(ARGV[5]) then
  redis.call('HSET', job, 'status', 'error', 'finished', ARGV[4], 'result', ARGV[6],
             'owner', '')
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[4], ARGV[4], id)
  return {id, -1}
end
redis.call('HSET', job, 'status', 'running', 'attempt', attempt + 1, 'owner', ARGV[2],
           'lease_expires', rnow + tonumber(ARGV[3]), 'started', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], id)
redis.call('ZADD', KEYS[3], rnow + tonumber(ARGV[3]), id)
return {id, taken_over}
"""

RENEW = """
-- KEYS: job, leases  ARGV: id, attempt, owner, lease_seconds  -> {ours, cancel_requested}
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'owner', 'cancel_requested')
local ours = 0
if s[1] == 'running' and s[2] == ARGV[2] and s[3] == ARGV[3] then
  local t = redis.call('TIME')
  local expires = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'lease_expires', expires)
  redis.call('ZADD', KEYS[2], expires, ARGV[1])
  ours = 1
end
return {ours, tonumber(s[4] or '0')}
"""

FINISH = """
-- KEYS: job, running, history, leases  ARGV: id, attempt, owner, status, result, now
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'owner')
if s[1] ~= 'running' or s[2] ~= ARGV[2] or s[3] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'result', ARGV[5], 'finished', ARGV[6],
           'owner', '', 'finished_by', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""

RELEASE = """
-- KEYS: job, running, pending, leases  ARGV: id, attempt, owner
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'owner', 'number')
if s[1] ~= 'running' or s[2] ~= ARGV[2] or s[3] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending', 'attempt', tonumber(s[2]) - 1,
           'owner', '', 'lease_expires', '')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[3], s[4], ARGV[1])
return 1
"""

CANCEL = """
-- KEYS: job, pending  ARGV: id, now
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[2])
return 1
"""

INTERRUPT = """
-- KEYS: job
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
return 1
"""

MOVE_TO_FRONT = """
-- KEYS: job, pending  ARGV: id
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local number = math.min(-1, tonumber(first[2]) - 1)
redis.call('ZADD', KEYS[2], number, ARGV[1])
redis.call('HSET', KEYS[1], 'number', number)
return 1
"""

PUBLISH = """
-- KEYS: events, seq, latest  ARGV: event JSON, blob, has_blob, maxlen, has_latest, ttl
local n = redis.call('INCR', KEYS[2])
local id = n .. '-0'
if ARGV[3] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], id, 'e', ARGV[1], 'b', ARGV[2])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], id, 'e', ARGV[1])
end
if ARGV[5] == '1' then redis.call('SET', KEYS[3], n, 'EX', ARGV[6]) end
return n
"""
