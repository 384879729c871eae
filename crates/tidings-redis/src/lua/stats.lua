-- A channel's position and history length, without creating it.
-- KEYS[1] meta hash, KEYS[2] stream. ARGV[1] history ttl (ms).
-- Returns nil when the channel does not exist, else {epoch, top, history length}.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  return false
end
trim_expired(stream, now_ms() - tonumber(ARGV[1]))
return {epoch, tonumber(redis.call('HGET', meta, 'o')), redis.call('XLEN', stream)}
