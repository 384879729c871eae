-- Pushes a present client's expiry forward. XX: a client that left (or was purged) is never
-- brought back by a refresh that raced with its leave.
-- KEYS[1] zset, KEYS[2] hash. ARGV[1] client, ARGV[2] entry ttl (ms).
local ttl = tonumber(ARGV[2])
local updated = redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms() + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
return updated
