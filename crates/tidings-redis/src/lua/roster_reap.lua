-- Takes back the holds of nodes whose liveness deadline passed, in one atomic step, so each
-- member whose last hold goes is reported to exactly one caller. Set and member keys are
-- derived from the dead node's fields (all under one hash tag, so one cluster slot).
-- KEYS[1] zset node -> deadline (ms). ARGV[1] key base ("P:{roster}:"), ARGV[2] at most
-- this many nodes per call. Returns flat {set, member, value, ...}.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, node in ipairs(dead) do
  local nkey = ARGV[1] .. 'n:' .. node
  local held = redis.call('HGETALL', nkey)
  for i = 1, #held, 2 do
    local field, count = held[i], tonumber(held[i + 1])
    local cut = string.find(field, '\n', 1, true)
    if cut and count and count > 0 then
      local set, member = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
      local hkey, vkey = ARGV[1] .. 'h:' .. set, ARGV[1] .. 'v:' .. set
      if redis.call('HINCRBY', hkey, member, -count) <= 0 then
        local value = redis.call('HGET', vkey, member) or ''
        redis.call('HDEL', hkey, member)
        redis.call('HDEL', vkey, member)
        table.insert(out, set)
        table.insert(out, member)
        table.insert(out, value)
      end
    end
  end
  redis.call('DEL', nkey)
  redis.call('ZREM', KEYS[1], node)
end
return out
