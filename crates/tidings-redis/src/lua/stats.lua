-- A channel's position and history length, without creating it.
-- KEYS[1] meta hash, KEYS[2] stream. ARGV[1] history ttl (ms), ARGV[2] history size.
-- Returns nil when the channel does not exist, else {epoch, top, history length}.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  return false
end
trim_expired(stream, now_ms() - tonumber(ARGV[1]))
-- Approximate trimming (publish.lua) may keep a few more than the size: they are not history.
local len = math.min(redis.call('XLEN', stream), tonumber(ARGV[2]))
return {epoch, tonumber(redis.call('HGET', meta, 'o')), len}
