-- A set's members: flat {member, holds, value, ...}; with ARGV[2], that member only.
-- KEYS[1] hash member -> holds, KEYS[2] hash member -> value. ARGV[1] at most this many.
local out = {}
if ARGV[2] then
  local holds = redis.call('HGET', KEYS[1], ARGV[2])
  if holds then
    out = {ARGV[2], holds, redis.call('HGET', KEYS[2], ARGV[2]) or ''}
  end
  return out
end
local all = redis.call('HGETALL', KEYS[1])
local max = tonumber(ARGV[1])
for i = 1, #all, 2 do
  if #out >= 3 * max then
    break
  end
  table.insert(out, all[i])
  table.insert(out, all[i + 1])
  table.insert(out, redis.call('HGET', KEYS[2], all[i]) or '')
end
return out
