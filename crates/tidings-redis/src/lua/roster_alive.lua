-- A node says it is alive: its liveness deadline moves to now + ttl. Returns what Redis
-- holds for it, {fields, holds}, for the node to compare with its own record.
-- KEYS[1] zset node -> deadline (ms), KEYS[2] the node's hash. ARGV[1] node id, ARGV[2] ttl.
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
local holds = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  holds = holds + tonumber(v)
end
return {redis.call('HLEN', KEYS[2]), holds}
