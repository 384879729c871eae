-- One more hold of a member by one node (roster.rs). The set's total per member decides
-- "first across the cluster" atomically; the node's own count is what a reap takes back.
-- KEYS[1] hash member -> holds, KEYS[2] hash member -> value, KEYS[3] the node's hash
-- "set\nmember" -> holds, KEYS[4] zset node -> liveness deadline (ms).
-- ARGV[1] member, ARGV[2] value, ARGV[3] the node's field, ARGV[4] node id, ARGV[5] ttl (ms).
-- Returns 1 when this is the member's first hold.
redis.call('ZADD', KEYS[4], now_ms() + tonumber(ARGV[5]), ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
