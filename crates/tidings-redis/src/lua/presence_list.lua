-- Who is present: purges expired entries (a bounded batch per call), returns the info JSON of
-- at most ARGV[1] unexpired clients.
-- KEYS[1] zset, KEYS[2] hash. ARGV[1] limit.
local now = now_ms()
-- Lua's C stack bounds unpack(), hence the batches of 500.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0, 500)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
local members = redis.call('ZRANGEBYSCORE', KEYS[1], int(now), '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for i = 1, #members, 500 do
  local batch = {}
  for j = i, math.min(i + 499, #members) do
    batch[#batch + 1] = members[j]
  end
  local infos = redis.call('HMGET', KEYS[2], unpack(batch))
  for j = 1, #infos do
    if infos[j] then
      out[#out + 1] = infos[j]
    end
  end
end
return out
