-- One publish: offset assignment, history append and fan-out as one atomic step, and the
-- idempotency key checked and recorded in the same step.
-- KEYS[1] meta hash {e = epoch, o = last offset, t = last time}, KEYS[2] stream,
-- KEYS[3], KEYS[4] idempotency hashes of even and odd time buckets (all one slot).
-- ARGV[1] candidate epoch (used when the channel starts a new incarnation)
-- ARGV[2] history size, ARGV[3] history ttl (ms), ARGV[4] meta ttl (ms)
-- ARGV[5] pub/sub channel, ARGV[6] '1' to SPUBLISH (Redis Cluster) instead of PUBLISH
-- ARGV[7] data kind (j|t|b), ARGV[8] event name ('' for none), ARGV[9] data
-- ARGV[10] idempotency key ('' for none), ARGV[11] idempotency window (ms)
-- ARGV[12], ARGV[13] the highest position of the channel the calling node has seen (epoch ''
-- for none): see regressed() in common.lua
-- Returns {epoch, offset, time ms, 1 if the key had been seen (nothing published) else 0}.
--
-- Idempotency keys live in two hashes that take turns by time bucket (bucket = now / window):
-- the hash of the current bucket collects keys, the other one still answers for the previous
-- bucket, and a hash found holding an older bucket is emptied before reuse. A key is thus
-- remembered at least one window and at most two, with no per-key expiry and no scan.
local meta, stream = KEYS[1], KEYS[2]
local size, ttl, meta_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local key = ARGV[10]
local clock = now_ms()
local bucket, current
if key ~= '' then
  local window = tonumber(ARGV[11])
  bucket = math.floor(clock / window)
  current = KEYS[3 + bucket % 2]
  local previous = KEYS[3 + (bucket + 1) % 2]
  local field = 'k:' .. key
  local cur = redis.call('HMGET', current, 'b', field)
  local prev = redis.call('HMGET', previous, 'b', field)
  local seen = nil
  if tonumber(cur[1]) == bucket and cur[2] then
    seen = cur[2]
  elseif tonumber(prev[1]) == bucket - 1 and prev[2] then
    seen = prev[2]
  end
  if seen then
    local e, o, t = string.match(seen, '^(.-)\n(%d+)\n(%d+)$')
    return {e, tonumber(o), tonumber(t), 1}
  end
  if cur[1] and tonumber(cur[1]) ~= bucket then
    redis.call('DEL', current)
  end
end
local state = redis.call('HMGET', meta, 'e', 'o', 't')
local epoch, offset, last_time = state[1], tonumber(state[2] or '0'), tonumber(state[3] or '0')
if epoch and regressed(epoch, offset, ARGV[12], ARGV[13]) then
  epoch = nil
end
if not epoch then
  -- A new incarnation (see epoch_of): whatever stream is left belonged to the lost one.
  epoch, offset, last_time = ARGV[1], 0, 0
  redis.call('DEL', stream)
end
offset = offset + 1
-- A clock that steps back must not make times decrease along the stream.
local now = math.max(clock, last_time)
redis.call('HSET', meta, 'e', epoch, 'o', int(offset), 't', int(now))
redis.call('PEXPIRE', meta, meta_ttl)
if size > 0 then
  -- MAXLEN ~ trims whole stream nodes, never one entry at a time (exact trimming rewrites a
  -- node on every publish): the stream may keep up to a node's worth (100 by default) beyond
  -- `size`, which read.lua and stats.lua hide. No expiry trimming here either: every read and
  -- stats call trims what expired before looking, and PEXPIRE drops a stream whose newest
  -- entry expired. A publish stays a handful of O(1) commands.
  local id = int(offset) .. '-' .. int(now)
  if ARGV[8] == '' then
    redis.call('XADD', stream, 'MAXLEN', '~', size, id, 'k', ARGV[7], 'd', ARGV[9])
  else
    redis.call('XADD', stream, 'MAXLEN', '~', size, id, 'k', ARGV[7], 'v', ARGV[8], 'd', ARGV[9])
  end
  redis.call('PEXPIRE', stream, ttl)
else
  -- No history for this namespace (any left from a larger setting is dropped).
  redis.call('DEL', stream)
end
if key ~= '' then
  redis.call('HSET', current, 'b', int(bucket), 'k:' .. key, epoch .. '\n' .. int(offset) .. '\n' .. int(now))
  redis.call('PEXPIRE', current, 2 * tonumber(ARGV[11]))
end
local payload = 'm' .. epoch .. '\n' .. int(offset) .. '\n' .. int(now) .. '\n' .. ARGV[7] .. '\n' .. ARGV[8] .. '\n' .. ARGV[9]
if ARGV[6] == '1' then
  redis.call('SPUBLISH', ARGV[5], payload)
else
  redis.call('PUBLISH', ARGV[5], payload)
end
return {epoch, offset, now, 0}
