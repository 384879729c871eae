-- Removes a client from presence and announces the leave if it was there.
-- KEYS[1] zset, KEYS[2] hash. ARGV[1] client, ARGV[2] pub/sub channel, ARGV[3] '1' to
-- SPUBLISH, ARGV[4] announcement ('' = none). Returns 1 when the client was present.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 1 and ARGV[4] ~= '' then
  if ARGV[3] == '1' then
    redis.call('SPUBLISH', ARGV[2], ARGV[4])
  else
    redis.call('PUBLISH', ARGV[2], ARGV[4])
  end
end
return removed
