-- One hold less by one node. A node whose holds were reaped (it was taken for dead) holds
-- nothing: its release changes nothing, so nothing is counted down twice.
-- KEYS as roster_hold.lua. ARGV[1] member, ARGV[2] the node's field.
-- Returns 1 when it was the member's last hold.
local mine = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
if mine <= 0 then
  return 0
end
if mine == 1 then
  redis.call('HDEL', KEYS[3], ARGV[2])
else
  redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
