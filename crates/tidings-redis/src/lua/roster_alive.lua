-- A node says it is alive: its liveness deadline moves to now + ttl.
-- KEYS[1] zset node -> deadline (ms). ARGV[1] node id, ARGV[2] ttl (ms).
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
