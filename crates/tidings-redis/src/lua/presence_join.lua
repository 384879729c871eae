-- Records a client as present, with an expiry its node keeps pushing forward while the client
-- stays (a dead node's clients vanish on their own), and announces the join.
-- KEYS[1] zset client -> expiry (ms), KEYS[2] hash client -> info JSON.
-- ARGV[1] client, ARGV[2] info JSON, ARGV[3] entry ttl (ms)
-- ARGV[4] pub/sub channel, ARGV[5] '1' to SPUBLISH, ARGV[6] announcement ('' = none)
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms() + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
if ARGV[6] ~= '' then
  if ARGV[5] == '1' then
    redis.call('SPUBLISH', ARGV[4], ARGV[6])
  else
    redis.call('PUBLISH', ARGV[4], ARGV[6])
  end
end
return 1
